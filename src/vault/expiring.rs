//! A map whose entries expire a fixed time after they were put and which
//! holds at most a fixed number of them: the store behind the lease path's
//! caches (sealed connection records, unwrapped DEKs).
//!
//! Invariants:
//! - an entry older than the TTL is never returned;
//! - the map never holds more than `capacity` entries;
//! - every operation but [`ExpiringMap::retain`] is O(1) amortised, whatever
//!   the capacity: a put into a full map evicts the entry put longest ago
//!   (with one TTL for all, also the first to expire), found at the front of
//!   a queue in put order, never by scanning the map. A map that scanned for
//!   expired entries on each put into a full map spent its time in that scan
//!   once connections outnumbered its capacity, under the lock every lease
//!   takes.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// An entry and what identifies its place in the queue.
struct Slot<V> {
    value: V,
    at: Instant,
    /// Which put made it: a queue position naming an older put of the same
    /// key (since replaced or removed) is stale and skipped.
    put: u64,
}

/// See the module documentation.
pub(crate) struct ExpiringMap<K, V> {
    slots: HashMap<K, Slot<V>>,
    /// Keys in put order, each with the put that queued it.
    order: VecDeque<(K, u64)>,
    puts: u64,
    ttl: Duration,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> ExpiringMap<K, V> {
    /// A map keeping each entry for `ttl`, at most `capacity` of them; either
    /// at zero keeps nothing.
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            slots: HashMap::new(),
            order: VecDeque::new(),
            puts: 0,
            ttl,
            capacity,
        }
    }

    /// Whether it keeps anything at all.
    pub(crate) fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.capacity > 0
    }

    /// How many entries it holds (expired ones not yet dropped included).
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The entry of `key`, unless it has expired (it is then dropped).
    pub(crate) fn get(&mut self, key: &K) -> Option<&V> {
        let expired = self.slots.get(key)?.at.elapsed() >= self.ttl;
        if expired {
            self.slots.remove(key);
            return None;
        }
        self.slots.get(key).map(|s| &s.value)
    }

    /// Puts `value` for `key` (replacing any entry), then drops expired
    /// entries from the front of the queue and, while the map is over its
    /// capacity, the oldest ones.
    pub(crate) fn put(&mut self, key: K, value: V) {
        if !self.enabled() {
            return;
        }
        self.puts += 1;
        let put = self.puts;
        let now = Instant::now();
        self.slots.insert(
            key.clone(),
            Slot {
                value,
                at: now,
                put,
            },
        );
        self.order.push_back((key, put));
        while let Some((front, front_put)) = self.order.front() {
            let drop_it = match self.slots.get(front) {
                Some(s) if s.put == *front_put => {
                    if self.slots.len() > self.capacity || now.duration_since(s.at) >= self.ttl {
                        Some(true)
                    } else {
                        None
                    }
                }
                // Replaced or removed since: a stale position.
                _ => Some(false),
            };
            let Some(live) = drop_it else { break };
            let (front, _) = self.order.pop_front().expect("the front was just read");
            if live {
                self.slots.remove(&front);
            }
        }
        // Stale positions behind the front (keys put again or removed) are
        // dropped in one pass once they could outnumber the live ones; the
        // pass leaves at most `capacity` positions, so it runs at most once
        // per `capacity` puts.
        if self.order.len() > 2 * self.capacity + 16 {
            let slots = &self.slots;
            self.order
                .retain(|(k, put)| slots.get(k).is_some_and(|s| s.put == *put));
        }
    }

    /// Drops the entry of `key`.
    pub(crate) fn remove(&mut self, key: &K) {
        self.slots.remove(key);
    }

    /// Keeps only the unexpired entries for which `keep` holds (a scan of the
    /// whole map: for rare purges, such as a key version becoming unusable).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let ttl = self.ttl;
        self.slots
            .retain(|_, s| s.at.elapsed() < ttl && keep(&s.value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_evicts_the_oldest_entry_and_stays_bounded() {
        let mut m = ExpiringMap::new(Duration::from_secs(60), 3);
        for k in 0..3 {
            m.put(k, k * 10);
        }
        m.put(3, 30);
        assert_eq!(m.len(), 3);
        assert!(m.get(&0).is_none(), "the oldest put went");
        assert_eq!(m.get(&3), Some(&30));
        // Putting a key again moves it to the back: 1 is now the oldest.
        m.put(2, 21);
        m.put(4, 40);
        assert!(m.get(&1).is_none());
        assert_eq!(m.get(&2), Some(&21));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn the_queue_stays_bounded_when_keys_are_put_again() {
        let mut m = ExpiringMap::new(Duration::from_secs(60), 4);
        for round in 0..1000 {
            m.put(round % 2, round);
        }
        assert_eq!(m.len(), 2);
        assert!(m.order.len() <= 2 * 4 + 16, "{} positions", m.order.len());
        for k in 0..100 {
            m.put(k, k);
            m.remove(&k);
        }
        assert!(m.order.len() <= 2 * 4 + 16, "{} positions", m.order.len());
    }

    #[test]
    fn expired_entries_are_never_returned() {
        let mut m = ExpiringMap::new(Duration::from_millis(20), 10);
        m.put("a", 1);
        assert_eq!(m.get(&"a"), Some(&1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(m.get(&"a").is_none());
        m.put("b", 2);
        std::thread::sleep(Duration::from_millis(30));
        // An expired entry at the front goes with the next put.
        m.put("c", 3);
        assert_eq!(m.len(), 1);
        m.retain(|v| *v != 3);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn zero_ttl_or_capacity_keeps_nothing() {
        let mut m = ExpiringMap::new(Duration::ZERO, 10);
        m.put(1, 1);
        assert!(m.get(&1).is_none());
        let mut m = ExpiringMap::new(Duration::from_secs(1), 0);
        m.put(1, 1);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn a_full_map_at_a_large_capacity_evicts_one_entry_per_put() {
        let mut m = ExpiringMap::new(Duration::from_secs(60), 100_000);
        for k in 0..100_000u32 {
            m.put(k, ());
        }
        let before = m.order.len();
        for k in 100_000..100_100u32 {
            m.put(k, ());
            assert_eq!(m.len(), 100_000);
        }
        assert_eq!(m.order.len(), before, "one position in, one out, per put");
    }
}
