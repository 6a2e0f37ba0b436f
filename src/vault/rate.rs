//! How fast each caller may begin authorizations: a token bucket per caller
//! identity, in this replica's memory. Each replica keeps its own buckets, so
//! behind N replicas a caller may begin up to N times the configured rate;
//! the per-(tenant, account, caller) cap on pending states (kept in the
//! database) bounds what that can store.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Callers tracked before buckets that have refilled (and so are the same as
/// no bucket at all) are dropped. Only authenticated identities with the app
/// role reach the limiter, so there are few.
const PRUNE_ABOVE: usize = 1024;

/// Less than this short of a whole start counts as one (the refill is
/// computed in floating point).
const EPSILON: f64 = 1e-9;

/// One caller's bucket: the starts it has left, as of `at`.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-caller token buckets holding up to `per_minute` starts each,
/// refilled evenly at `per_minute` a minute.
pub(super) struct CallerRate {
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl CallerRate {
    /// Buckets of `per_minute` (at least 1) starts a minute.
    pub(super) fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The limit, starts per minute.
    pub(super) fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes one start for `caller`, or says how long until it may start one.
    pub(super) fn take(&self, caller: &str) -> Result<(), Duration> {
        self.take_at(caller, Instant::now())
    }

    fn take_at(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let level = |b: &Bucket| {
            let refilled = now.saturating_duration_since(b.at).as_secs_f64() * per_second;
            (b.tokens + refilled).min(capacity)
        };
        // Nothing below panics while the lock is held; a poisoned map is
        // still a valid map.
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= PRUNE_ABOVE && !buckets.contains_key(caller) {
            buckets.retain(|_, b| level(&*b) + EPSILON < capacity);
        }
        let bucket = buckets.entry(caller.to_owned()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let tokens = level(&*bucket);
        bucket.at = now;
        if tokens + EPSILON >= 1.0 {
            bucket.tokens = (tokens - 1.0).max(0.0);
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::from_secs_f64((1.0 - tokens) / per_second))
        }
    }
}

/// Whole seconds to wait, rounded up, at least 1 (for messages).
pub(super) fn retry_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_may_burst_up_to_the_limit_then_waits_for_the_refill() {
        let rate = CallerRate::new(5);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(rate.take_at("app", t0).is_ok(), "start {i}");
        }
        let wait = rate.take_at("app", t0).unwrap_err();
        // One start refills every 60 s / 5 = 12 s.
        assert_eq!(retry_seconds(wait), 12, "{wait:?}");
        assert!(rate.take_at("app", t0 + Duration::from_secs(11)).is_err());
        assert!(rate.take_at("app", t0 + Duration::from_secs(12)).is_ok());
        assert!(rate.take_at("app", t0 + Duration::from_secs(12)).is_err());
    }

    #[test]
    fn callers_have_their_own_buckets() {
        let rate = CallerRate::new(1);
        let t0 = Instant::now();
        assert!(rate.take_at("crm", t0).is_ok());
        assert!(rate.take_at("crm", t0).is_err());
        assert!(rate.take_at("other", t0).is_ok());
    }

    #[test]
    fn refilled_buckets_are_pruned_and_busy_ones_kept() {
        let rate = CallerRate::new(2);
        let tracked = |rate: &CallerRate| rate.buckets.lock().unwrap().len();
        let t0 = Instant::now();
        for i in 0..PRUNE_ABOVE {
            rate.take_at(&format!("caller-{i}"), t0).unwrap();
        }
        // Every bucket is still short of full: none is dropped.
        rate.take_at("busy", t0).unwrap();
        rate.take_at("busy", t0).unwrap();
        assert_eq!(tracked(&rate), PRUNE_ABOVE + 1);
        // Half a minute later each caller-N bucket is full again (1 + 1) and
        // goes; busy's (0 + 1) stays, and so does what it has used.
        let t1 = t0 + Duration::from_secs(30);
        rate.take_at("late", t1).unwrap();
        assert_eq!(tracked(&rate), 2, "busy and late");
        rate.take_at("busy", t1).unwrap();
        assert!(rate.take_at("busy", t1).is_err());
    }
}
