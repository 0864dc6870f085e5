use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{
    auth::caller,
    pb, requests,
    streams::{self, EventStream},
};
use crate::{domain::Violations, stream::Streams};

/// runledger.v1.EventService.
#[derive(Debug, Clone)]
pub struct EventApi {
    streams: Streams,
}

impl EventApi {
    pub(crate) fn new(streams: Streams) -> Self {
        EventApi { streams }
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for EventApi {
    type SubscribeStream = EventStream<pb::SubscribeResponse>;

    #[instrument(skip_all)]
    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let mut v = Violations::new();
        let filter = requests::event_filter(&r, &mut v);
        let after = requests::after_sequence(r.after_sequence, &mut v);
        v.finish(|| ()).map_err(crate::Error::from)?;
        let sub = self.streams.tenant(&caller, filter, after).await?;
        Ok(Response::new(streams::serve(sub)))
    }
}
