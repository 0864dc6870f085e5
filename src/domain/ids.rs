use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Parses any textual UUID form; ids are shown lowercase and hyphenated.
            pub fn parse(s: &str) -> Result<Self, String> {
                Uuid::try_parse(s)
                    .map(Self)
                    .map_err(|_| "must be a UUID".to_owned())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// Identifies an execution.
    ExecutionId
);
uuid_id!(
    /// Identifies a task run.
    TaskRunId
);
uuid_id!(
    /// Identifies one state in a run's history.
    StateId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_lowercase_hyphenated_and_round_trip() {
        let id = ExecutionId::parse("0190A1B2-C3D4-7E5F-8A6B-7C8D9E0F1A2B").unwrap();
        assert_eq!(id.to_string(), "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b");
        assert_eq!(ExecutionId::parse(&id.to_string()).unwrap(), id);
        assert!(TaskRunId::parse("not-a-uuid").is_err());
        assert!(TaskRunId::parse("").is_err());
    }

    #[test]
    fn new_ids_are_time_ordered() {
        let a = TaskRunId::new();
        let b = TaskRunId::new();
        assert!(a < b);
    }
}
