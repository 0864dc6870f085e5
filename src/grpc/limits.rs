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
    /// Requests per key id on `day`: the total last read from the store
    /// (every server's) and those counted here since.
    counts: HashMap<String, i64>,
    day: i64,
    /// Requests counted here and not yet recorded, by key id and the day
    /// they belong to, with the key's tenant.
    dirty: HashMap<(String, i64), (String, i64)>,
}

/// How a request is counted against its key's daily quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Here, recorded later.
    Here,
    /// In the store already, which took it from the quota shared by every
    /// server.
    InStore,
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
        today: (i64, Duration),
    ) -> Result<(), Status> {
        self.check(key, now, today, true)?;
        self.count(key, today.0, Counted::Here);
        Ok(())
    }

    /// Refuses a request of `key` over its quota as far as this server
    /// knows (its count never exceeds the true one), and with `rate` over
    /// its rate; counts nothing.
    pub fn check(
        &mut self,
        key: &ActiveKey,
        now: Instant,
        (day, day_left): (i64, Duration),
        rate: bool,
    ) -> Result<(), Status> {
        if day != self.day {
            self.day = day;
            self.counts.clear();
        }
        if let Some(rate) = key.rate.filter(|_| rate) {
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
                // A rate too small for a Duration waits a day.
                let wait = Duration::try_from_secs_f64((1.0 - b.tokens) / rate)
                    .unwrap_or(Duration::from_secs(DAY));
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
        Ok(())
    }

    /// Counts one request of `key` on `day` (which [`Limits::check`] let
    /// through).
    pub fn count(&mut self, key: &ActiveKey, day: i64, counted: Counted) {
        if day != self.day {
            self.day = day;
            self.counts.clear();
        }
        if let Some(b) = self.buckets.get_mut(&key.id) {
            b.tokens -= 1.0;
        }
        *self.counts.entry(key.id.clone()).or_default() += 1;
        if counted == Counted::Here {
            let (_, n) = self
                .dirty
                .entry((key.id.clone(), day))
                .or_insert_with(|| (key.caller.tenant_id.clone(), 0));
            *n += 1;
        }
    }

    /// The requests to record, counted since last asked: (tenant, key id,
    /// day, requests to add to that day's count).
    pub fn take_dirty(&mut self) -> Vec<(String, String, i64, i64)> {
        self.dirty
            .drain()
            .map(|((id, day), (tenant, n))| (tenant, id, day, n))
            .collect()
    }

    /// Puts back counts [`Limits::take_dirty`] gave that were not recorded.
    pub fn restore(&mut self, counts: Vec<(String, String, i64, i64)>) {
        for (tenant, id, day, n) in counts {
            self.dirty.entry((id, day)).or_insert_with(|| (tenant, 0)).1 += n;
        }
    }

    /// Takes today's totals as recorded (every server's, including what
    /// this one recorded), adding what was counted here since.
    pub fn refresh(&mut self, day: i64, totals: HashMap<String, i64>) {
        if day != self.day {
            return;
        }
        for (id, total) in totals {
            let pending = self.dirty.get(&(id.clone(), day)).map_or(0, |(_, n)| *n);
            let count = self.counts.entry(id).or_default();
            *count = (*count).max(total + pending);
        }
    }
}

/// A request over a daily quota, to retry in `day_left`.
pub fn quota_exhausted(quota: i64, day_left: Duration) -> Status {
    exhausted(
        format!("daily limit of {quota} requests exceeded"),
        day_left,
    )
}

/// A request over a rate, to retry in `wait`.
pub fn rate_exhausted(rate: f64, wait: Duration) -> Status {
    exhausted(
        format!("rate limit of {rate} requests per second exceeded"),
        wait,
    )
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
    fn a_tiny_rate_refuses_without_failing() {
        let mut l = Limits::new(1, HashMap::new());
        let k = key(Some(1e-20), None);
        let now = Instant::now();
        let day = (1, Duration::from_secs(100));
        l.admit(&k, now, day).unwrap();
        let refused = l.admit(&k, now, day).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
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
        assert_eq!(l.take_dirty(), [("t".to_owned(), "k".to_owned(), 1, 1)]);
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
        assert_eq!(
            dirty,
            [
                ("t".to_owned(), "b".to_owned(), 2, 1),
                ("t".to_owned(), "k".to_owned(), 1, 3)
            ]
        );
    }

    #[test]
    fn other_servers_counts_join_what_was_counted_here() {
        let mut l = Limits::new(1, HashMap::new());
        let k = key(None, Some(10));
        let now = Instant::now();
        let today = (1, Duration::from_secs(60));
        for _ in 0..3 {
            l.admit(&k, now, today).unwrap();
        }
        let recorded = l.take_dirty();
        assert_eq!(recorded, [("t".to_owned(), "k".to_owned(), 1, 3)]);
        // Counted while recording; then the store says 8 in all (these 3
        // and 5 from elsewhere).
        l.admit(&k, now, today).unwrap();
        l.refresh(1, HashMap::from([("k".to_owned(), 8)]));
        l.admit(&k, now, today).unwrap();
        assert_eq!(
            l.admit(&k, now, today).unwrap_err().code(),
            Code::ResourceExhausted,
            "8 recorded + 2 counted here reach the quota"
        );
        // Counted in the store: not recorded again.
        let mut m = Limits::new(1, HashMap::new());
        m.count(&k, 1, Counted::InStore);
        assert!(m.take_dirty().is_empty());
    }
}
