use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{
    auth::caller,
    convert, pb,
    requests::{self, SetState},
    streams::{self, EventStream},
};
use crate::{
    domain::{Violations, execution::check_chars},
    orchestration::{Ledger, rules::Status as Outcome},
    stream::Streams,
};

/// runledger.v1.ExecutionService.
#[derive(Debug, Clone)]
pub struct ExecutionApi {
    streams: Streams,
}

impl ExecutionApi {
    pub(crate) fn new(streams: Streams) -> Self {
        ExecutionApi { streams }
    }

    fn ledger(&self) -> &Ledger {
        &self.streams.ledger
    }
}

pub(crate) fn set_state_status(s: Outcome) -> i32 {
    (match s {
        Outcome::Accept => pb::SetStateStatus::Accept,
        Outcome::Reject => pb::SetStateStatus::Reject,
        Outcome::Wait => pb::SetStateStatus::Wait,
        Outcome::Abort => pb::SetStateStatus::Abort,
    }) as i32
}

#[tonic::async_trait]
impl pb::execution_service_server::ExecutionService for ExecutionApi {
    #[instrument(skip_all)]
    async fn create_execution(
        &self,
        req: Request<pb::CreateExecutionRequest>,
    ) -> Result<Response<pb::CreateExecutionResponse>, Status> {
        let caller = caller(&req)?;
        let new = requests::new_execution(req.into_inner()).map_err(crate::Error::from)?;
        let (execution, created) = self.ledger().create_execution(&caller, new).await?;
        Ok(Response::new(pb::CreateExecutionResponse {
            execution: Some(convert::execution(&execution)),
            created,
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn get_execution(
        &self,
        req: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::GetExecutionResponse>, Status> {
        let caller = caller(&req)?;
        let mut v = Violations::new();
        let id = requests::execution_id("id", &req.get_ref().id, &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let (execution, _) = self.ledger().execution(&caller, id).await?;
        Ok(Response::new(pb::GetExecutionResponse {
            execution: Some(convert::execution(&execution)),
        }))
    }

    #[instrument(skip_all)]
    async fn list_executions(
        &self,
        req: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        let caller = caller(&req)?;
        let (filter, page) =
            requests::execution_list(req.into_inner()).map_err(crate::Error::from)?;
        let (items, next) = self
            .ledger()
            .list_executions(&caller, &filter, &page)
            .await?;
        Ok(Response::new(pb::ListExecutionsResponse {
            executions: items.iter().map(convert::execution).collect(),
            next_page_token: next.map(|c| c.to_token()).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn set_execution_state(
        &self,
        req: Request<pb::SetExecutionStateRequest>,
    ) -> Result<Response<pb::SetExecutionStateResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let id = requests::execution_id("id", &r.id, &mut v);
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
            .set_execution_state(&caller, id, proposal)
            .await?;
        Ok(Response::new(pb::SetExecutionStateResponse {
            status: set_state_status(o.status),
            state: Some(convert::state(&o.state)),
            reason: o.reason,
            retry_after: o.retry_after.map(convert::duration),
            execution: Some(convert::execution(&o.run)),
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn cancel_execution(
        &self,
        req: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::CancelExecutionResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let id = requests::execution_id("id", &r.id, &mut v);
        let reason = v.check("reason", check_chars(r.reason, 0, 10_000));
        let (id, reason) = v
            .finish(|| (id.expect("checked"), reason.unwrap_or_default()))
            .map_err(crate::Error::from)?;
        let execution = self.ledger().cancel_execution(&caller, id, reason).await?;
        Ok(Response::new(pb::CancelExecutionResponse {
            execution: Some(convert::execution(&execution)),
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn resume_execution(
        &self,
        req: Request<pb::ResumeExecutionRequest>,
    ) -> Result<Response<pb::ResumeExecutionResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let id = requests::execution_id("id", &r.id, &mut v);
        let input = requests::run_input(r.run_input.as_ref(), &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let execution = self.ledger().resume_execution(&caller, id, input).await?;
        Ok(Response::new(pb::ResumeExecutionResponse {
            execution: Some(convert::execution(&execution)),
        }))
    }

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn delete_execution(
        &self,
        req: Request<pb::DeleteExecutionRequest>,
    ) -> Result<Response<pb::DeleteExecutionResponse>, Status> {
        let caller = caller(&req)?;
        let mut v = Violations::new();
        let id = requests::execution_id("id", &req.get_ref().id, &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let execution = self.ledger().delete_execution(&caller, id).await?;
        Ok(Response::new(pb::DeleteExecutionResponse {
            execution: Some(convert::execution(&execution)),
        }))
    }

    type StreamExecutionStatusStream = EventStream<pb::StreamExecutionStatusResponse>;

    #[instrument(skip_all, fields(id = %super::log_id(&req.get_ref().id)))]
    async fn stream_execution_status(
        &self,
        req: Request<pb::StreamExecutionStatusRequest>,
    ) -> Result<Response<Self::StreamExecutionStatusStream>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let id = requests::execution_id("id", &r.id, &mut v);
        let after = requests::after_sequence(r.after_sequence, &mut v);
        let id = v
            .finish(|| id.expect("checked"))
            .map_err(crate::Error::from)?;
        let sub = self
            .streams
            .execution(&caller, id, r.include_task_runs, after)
            .await?;
        Ok(Response::new(streams::serve(sub)))
    }
}
