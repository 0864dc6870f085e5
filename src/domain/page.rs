//! What a list asks for: filters, and keyset pagination: a page token
//! names the last row of the previous page (its creation time and id), so
//! later pages stay exact while rows are inserted.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{ExecutionId, StateType, Timestamp};
use crate::Result;

/// Which executions a list returns.
#[derive(Debug, Clone, Default)]
pub struct ExecutionFilter {
    pub task_id: Option<String>,
    pub state_types: Vec<StateType>,
    pub metadata: Vec<(String, String)>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
    pub show_deleted: bool,
}

/// Which task runs a list returns.
#[derive(Debug, Clone, Default)]
pub struct TaskRunFilter {
    pub execution_id: Option<ExecutionId>,
    pub task_key: Option<String>,
    pub state_types: Vec<StateType>,
    pub labels: Vec<(String, String)>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
    pub show_deleted: bool,
    pub stale: Option<bool>,
}

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Where the next page starts: just after this row, in newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: i64,
    pub id: String,
}

impl Cursor {
    pub fn to_token(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1:{}:{}", self.created_at, self.id))
    }

    pub fn from_token(token: &str) -> Result<Self, String> {
        let bad = || "not a page token from this server".to_owned();
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = raw.splitn(3, ':');
        if parts.next() != Some("v1") {
            return Err(bad());
        }
        let created_at = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let id = parts
            .next()
            .filter(|id| uuid::Uuid::try_parse(id).is_ok())
            .ok_or_else(bad)?;
        Ok(Cursor {
            created_at,
            id: id.to_owned(),
        })
    }
}

/// A page request.
#[derive(Debug, Clone)]
pub struct Page {
    pub size: u32,
    pub after: Option<Cursor>,
}

impl Page {
    /// 0 means the default size.
    pub fn new(size: i32, token: &str) -> Result<Self, (&'static str, String)> {
        let size = match size {
            0 => DEFAULT_PAGE_SIZE,
            s if s > 0 && s as u32 <= MAX_PAGE_SIZE => s as u32,
            _ => {
                return Err((
                    "page_size",
                    format!("must be between 1 and {MAX_PAGE_SIZE}"),
                ));
            }
        };
        let after = if token.is_empty() {
            None
        } else {
            Some(Cursor::from_token(token).map_err(|e| ("page_token", e))?)
        };
        Ok(Page { size, after })
    }
}

/// A page of a run's state history, oldest first: the token names the
/// last history row of the previous page, so later pages stay exact while
/// states are appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub size: u32,
    /// The history row the page starts after.
    pub after: Option<i64>,
}

impl HistoryPage {
    /// 0 means the default size; the limits are those of the other lists.
    pub fn new(size: i32, token: &str) -> Result<Self, (&'static str, String)> {
        let Page { size, .. } = Page::new(size, "")?;
        let after =
            if token.is_empty() {
                None
            } else {
                Some(Self::row_from_token(token).ok_or_else(|| {
                    ("page_token", "not a page token from this server".to_owned())
                })?)
            };
        Ok(HistoryPage { size, after })
    }

    pub(crate) fn token(row: i64) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1:state:{row}"))
    }

    fn row_from_token(token: &str) -> Option<i64> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
        raw.strip_prefix("v1:state:")?
            .parse()
            .ok()
            .filter(|row| *row > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let c = Cursor {
            created_at: 1_700_000_000_000_000,
            id: uuid::Uuid::now_v7().to_string(),
        };
        assert_eq!(Cursor::from_token(&c.to_token()).unwrap(), c);
        assert!(Cursor::from_token("garbage").is_err());
        assert!(Cursor::from_token(&URL_SAFE_NO_PAD.encode("v1:12:not-an-id")).is_err());
        assert!(Page::new(1001, "").is_err());
        assert!(Page::new(-1, "").is_err());
        assert_eq!(Page::new(0, "").unwrap().size, 50);
    }

    #[test]
    fn history_tokens_round_trip_and_are_not_list_tokens() {
        let page = HistoryPage::new(10, &HistoryPage::token(42)).unwrap();
        assert_eq!((page.size, page.after), (10, Some(42)));
        assert_eq!(HistoryPage::new(0, "").unwrap().size, 50);
        let list_token = Cursor {
            created_at: 1,
            id: uuid::Uuid::now_v7().to_string(),
        }
        .to_token();
        assert_eq!(
            HistoryPage::new(10, &list_token).unwrap_err().0,
            "page_token"
        );
        assert!(Cursor::from_token(&HistoryPage::token(42)).is_err());
        assert_eq!(HistoryPage::new(1001, "").unwrap_err().0, "page_size");
        assert_eq!(
            HistoryPage::new(10, "v1:state:x").unwrap_err().0,
            "page_token"
        );
    }
}
