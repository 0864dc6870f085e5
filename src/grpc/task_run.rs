use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{
    auth::caller,
    convert,
    execution::set_state_status,
    pb,
    requests::{self, SetState},
    streams::{self, EventStream},
};
use crate::{domain::Violations, orchestration::Ledger, stream::Streams};

/// runledger.v1.TaskRunService.
#[derive(Debug, Clone)]
pub struct TaskRunApi {
    streams: Streams,
}

impl TaskRunApi {
    pub(crate) fn new(streams: Streams) -> Self {
        TaskRunApi { streams }
    }

    fn ledger(&self) -> &Ledger {
        &self.streams.ledger
    }
}

#[tonic::async_trait]
impl pb::task_run_service_server::TaskRunService for TaskRunApi {
    #[instrument(skip_all)]
    async fn create_task_run(
        &self,
        req: Request<pb::CreateTaskRunRequest>,
    ) -> Result<Response<pb::CreateTaskRunResponse>, Status> {
        let caller = caller(&req)?;
        let new = requests::new_task_run(req.into_inner()).map_err(crate::Error::from)?;
        let (run, created) = self.ledger().create_task_run(&caller, new).await?;
        Ok(Response::new(pb::CreateTaskRunResponse {
            task_run: Some(convert::task_run(&run)),
            created,
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn get_task_run(
        &self,
        req: Request<pb::GetTaskRunRequest>,
    ) -> Result<Response<pb::GetTaskRunResponse>, Status> {
        let caller = caller(&req)?;
        let mut v = Violations::new();
        let id = requests::task_run_id("id", &req.get_ref().id, &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let (run, _) = self.ledger().task_run(&caller, id).await?;
        Ok(Response::new(pb::GetTaskRunResponse {
            task_run: Some(convert::task_run(&run)),
        }))
    }

    #[instrument(skip_all)]
    async fn list_task_runs(
        &self,
        req: Request<pb::ListTaskRunsRequest>,
    ) -> Result<Response<pb::ListTaskRunsResponse>, Status> {
        let caller = caller(&req)?;
        let (filter, page) =
            requests::task_run_list(req.into_inner()).map_err(crate::Error::from)?;
        let (items, next) = self
            .ledger()
            .list_task_runs(&caller, &filter, &page)
            .await?;
        Ok(Response::new(pb::ListTaskRunsResponse {
            task_runs: items.iter().map(convert::task_run).collect(),
            next_page_token: next.map(|c| c.to_token()).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn set_task_run_state(
        &self,
        req: Request<pb::SetTaskRunStateRequest>,
    ) -> Result<Response<pb::SetTaskRunStateResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let id = requests::task_run_id("id", &r.id, &mut v);
        let proposal = requests::proposal(
            SetState {
                state: r.state,
                output: r.output,
                error: r.error,
                force: r.force,
                expected_state_id: r.expected_state_id,
            },
            &mut v,
        );
        let (id, proposal) = v
            .finish(|| (id.expect("checked"), proposal.expect("checked")))
            .map_err(crate::Error::from)?;
        let o = self
            .ledger()
            .set_task_run_state(&caller, id, proposal)
            .await?;
        Ok(Response::new(pb::SetTaskRunStateResponse {
            status: set_state_status(o.status),
            state: Some(convert::state(&o.state)),
            reason: o.reason,
            retry_after: o.retry_after.map(convert::duration),
            task_run: Some(convert::task_run(&o.run)),
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn delete_task_run(
        &self,
        req: Request<pb::DeleteTaskRunRequest>,
    ) -> Result<Response<pb::DeleteTaskRunResponse>, Status> {
        let caller = caller(&req)?;
        let mut v = Violations::new();
        let id = requests::task_run_id("id", &req.get_ref().id, &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let run = self.ledger().delete_task_run(&caller, id).await?;
        Ok(Response::new(pb::DeleteTaskRunResponse {
            task_run: Some(convert::task_run(&run)),
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn mark_task_run_stale(
        &self,
        req: Request<pb::MarkTaskRunStaleRequest>,
    ) -> Result<Response<pb::MarkTaskRunStaleResponse>, Status> {
        let caller = caller(&req)?;
        let mut v = Violations::new();
        let id = requests::task_run_id("id", &req.get_ref().id, &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let run = self.ledger().mark_task_run_stale(&caller, id).await?;
        Ok(Response::new(pb::MarkTaskRunStaleResponse {
            task_run: Some(convert::task_run(&run)),
        }))
    }

    type StreamTaskRunStatusStream = EventStream<pb::StreamTaskRunStatusResponse>;

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn stream_task_run_status(
        &self,
        req: Request<pb::StreamTaskRunStatusRequest>,
    ) -> Result<Response<Self::StreamTaskRunStatusStream>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let id = requests::task_run_id("id", &r.id, &mut v);
        let after = requests::after_sequence(r.after_sequence, &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let sub = self.streams.task_run(&caller, id, after).await?;
        Ok(Response::new(streams::serve(sub)))
    }

    #[instrument(skip_all)]
    async fn list_states(
        &self,
        req: Request<pb::ListStatesRequest>,
    ) -> Result<Response<pb::ListStatesResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let page = requests::history_page(r.page_size, &r.page_token, &mut v);
        let (states, next) = match (r.execution_id.is_empty(), r.task_run_id.is_empty()) {
            (false, true) => {
                let id = requests::execution_id("execution_id", &r.execution_id, &mut v);
                let (id, page) = v
                    .finish(|| (id.expect("checked"), page.expect("checked")))
                    .map_err(crate::Error::from)?;
                self.ledger().execution_states(&caller, id, &page).await?
            }
            (true, false) => {
                let id = requests::task_run_id("task_run_id", &r.task_run_id, &mut v);
                let (id, page) = v
                    .finish(|| (id.expect("checked"), page.expect("checked")))
                    .map_err(crate::Error::from)?;
                self.ledger().task_run_states(&caller, id, &page).await?
            }
            _ => {
                v.add(
                    "execution_id",
                    "exactly one of execution_id and task_run_id is required",
                );
                return Err(crate::Error::from(v).into());
            }
        };
        Ok(Response::new(pb::ListStatesResponse {
            next_page_token: next.unwrap_or_default(),
            states: states.iter().map(convert::state).collect(),
        }))
    }
}
