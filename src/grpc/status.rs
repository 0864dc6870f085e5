//! The one mapping from the library's errors to gRPC statuses. Internal
//! causes are logged here and never sent.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::Error;

/// The most field violations one status reports.
const MAX_REPORTED_VIOLATIONS: usize = 20;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidArgument(violations) => {
                // The status travels in response headers: report a bounded
                // number of violations.
                let mut details = ErrorDetails::new();
                let mut message = String::from("invalid request: ");
                for (i, v) in violations.iter().take(MAX_REPORTED_VIOLATIONS).enumerate() {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                    if i > 0 {
                        message.push_str("; ");
                    }
                    message.push_str(&format!("{}: {}", v.field, v.description));
                }
                let more = violations
                    .iter()
                    .count()
                    .saturating_sub(MAX_REPORTED_VIOLATIONS);
                if more > 0 {
                    message.push_str(&format!("; and {more} more"));
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::OutOfRange(m) => Status::out_of_range(m),
            Error::Unavailable => Status::unavailable(
                "the server is shutting down or lost its database; \
                 retry (with the same idempotency keys)",
            ),
            Error::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Violations;

    #[test]
    fn violations_travel_as_bad_request_details() {
        let mut v = Violations::new();
        v.add("goal", "must not be blank");
        let status = Status::from(Error::InvalidArgument(v));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status
            .get_details_bad_request()
            .expect("a BadRequest detail");
        assert_eq!(bad.field_violations[0].field, "goal");
    }

    #[test]
    fn a_status_reports_a_bounded_number_of_violations() {
        let mut v = Violations::new();
        for _ in 0..10_000 {
            v.add("execution_ids", "must be a UUID");
        }
        let status = Status::from(Error::InvalidArgument(v));
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), MAX_REPORTED_VIOLATIONS);
        assert!(status.message().len() < 1_000, "{}", status.message());
        assert!(status.message().ends_with("and 9980 more"));
    }

    #[test]
    fn internal_causes_are_not_sent() {
        let status = Status::from(Error::Internal(
            "database: disk I/O error at /secret/path".into(),
        ));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
