//! Per-key limits: a request rate (token bucket) and a daily quota (per
//! UTC day). A call over either is RESOURCE_EXHAUSTED with RetryInfo. A
//! stream counts once, when it is opened.

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::keys::ActiveKey;

const DAY: u64 = 86_400;

/// The wall clock that decides which UTC day a request counts on: the
/// system's, or one a test sets.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(SystemTime::now))
    }

    /// A clock that reads the time from `now`.
    pub fn from_fn(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    pub fn now(&self) -> SystemTime {
        (self.0)()
    }

    /// The UTC day number (days since the epoch) and the time left in it.
    pub fn today(&self) -> (i64, Duration) {
        let now = self.now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let day = now.as_secs() / DAY;
        let left = Duration::from_secs((day + 1) * DAY).saturating_sub(now);
        (day as i64, left)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Counts and buckets of the keys in use.
#[derive(Debug, Default)]
pub struct Limits {
    buckets: HashMap<String, Bucket>,
    /// Requests per key id on `day`.
    counts: HashMap<String, i64>,
    day: i64,
    /// Counts changed since last persisted, by key id and the day they
    /// belong to.
    dirty: HashMap<(String, i64), i64>,
}

impl Limits {
    /// Starts from the counts already recorded for today.
    pub fn new(day: i64, counts: HashMap<String, i64>) -> Self {
        Limits {
            counts,
            day,
            ..Limits::default()
        }
    }

    /// Counts one request of `key`, or refuses it.
    pub fn admit(
        &mut self,
        key: &ActiveKey,
        now: Instant,
        (day, day_left): (i64, Duration),
    ) -> Result<(), Status> {
        if day != self.day {
            self.day = day;
            self.counts.clear();
        }
        if let Some(rate) = key.rate {
            // A second's worth of burst.
            let capacity = rate.max(1.0);
            let b = self.buckets.entry(key.id.clone()).or_insert(Bucket {
                tokens: capacity,
                at: now,
            });
            b.tokens =
                (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(capacity);
            b.at = now;
            if b.tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - b.tokens) / rate);
                return Err(exhausted(
                    format!("rate limit of {rate} requests per second exceeded"),
                    wait,
                ));
            }
        }
        let used = self.counts.get(&key.id).copied().unwrap_or(0);
        if let Some(quota) = key.daily_quota
            && used >= quota
        {
            return Err(exhausted(
                format!("daily limit of {quota} requests exceeded"),
                day_left,
            ));
        }
        if let Some(b) = self.buckets.get_mut(&key.id) {
            b.tokens -= 1.0;
        }
        self.counts.insert(key.id.clone(), used + 1);
        self.dirty.insert((key.id.clone(), day), used + 1);
        Ok(())
    }

    /// The counts to persist: (key id, day, requests so far that day).
    pub fn take_dirty(&mut self) -> Vec<(String, i64, i64)> {
        self.dirty
            .drain()
            .map(|((id, day), n)| (id, day, n))
            .collect()
    }
}

fn exhausted(message: String, retry_after: Duration) -> Status {
    let details = ErrorDetails::with_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Caller;

    fn key(rate: Option<f64>, quota: Option<i64>) -> ActiveKey {
        ActiveKey {
            id: "k".into(),
            caller: Caller {
                tenant_id: "t".into(),
                name: "n".into(),
            },
            rate,
            daily_quota: quota,
        }
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let mut l = Limits::new(1, HashMap::new());
        let k = key(Some(2.0), None);
        let t0 = Instant::now();
        let day = (1, Duration::from_secs(100));
        assert!(l.admit(&k, t0, day).is_ok());
        assert!(l.admit(&k, t0, day).is_ok());
        let refused = l.admit(&k, t0, day).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let retry = refused
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert!(retry <= Duration::from_millis(500) && retry > Duration::ZERO);
        assert!(l.admit(&k, t0 + Duration::from_millis(500), day).is_ok());
    }

    #[test]
    fn the_quota_counts_per_day_and_resets() {
        let mut l = Limits::new(1, HashMap::from([("k".to_owned(), 2)]));
        let k = key(None, Some(3));
        let now = Instant::now();
        assert!(l.admit(&k, now, (1, Duration::from_secs(60))).is_ok());
        let refused = l.admit(&k, now, (1, Duration::from_secs(60))).unwrap_err();
        assert_eq!(refused.message(), "daily limit of 3 requests exceeded");
        assert_eq!(
            refused.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(60))
        );
        assert_eq!(l.take_dirty(), [("k".to_owned(), 1, 3)]);
        assert!(
            l.admit(&k, now, (2, Duration::from_secs(86_400))).is_ok(),
            "a new day"
        );
    }

    #[test]
    fn counts_of_a_day_are_recorded_under_that_day() {
        let mut l = Limits::new(1, HashMap::new());
        let (a, mut b) = (key(None, Some(5)), key(None, None));
        b.id = "b".into();
        let now = Instant::now();
        for _ in 0..3 {
            l.admit(&a, now, (1, Duration::from_secs(1))).unwrap();
        }
        l.admit(&b, now, (2, Duration::from_secs(86_399))).unwrap();
        let mut dirty = l.take_dirty();
        dirty.sort();
        assert_eq!(dirty, [("b".to_owned(), 2, 1), ("k".to_owned(), 1, 3)]);
    }
}
