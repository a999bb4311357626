//! A store's memory of bucket items, bounded: past its size, entries not in
//! use are dropped (a tenth at a time, so eviction is rare) and read again
//! from the store when next needed. Which ones go is arbitrary: a bucket read
//! again costs one lookup, and tracking recency would cost every hit.

use std::collections::HashMap;

use super::BucketId;

/// Maps keyed by bucket on the hot path: foldhash, seeded per process, is
/// several times faster than SipHash on these short string keys.
pub type BucketMap<V> = HashMap<BucketId, V, foldhash::fast::RandomState>;

#[derive(Debug)]
pub(super) struct BucketCache<V> {
    entries: BucketMap<V>,
    max: usize,
}

impl<V> BucketCache<V> {
    pub(super) fn new(max: usize) -> Self {
        BucketCache {
            entries: BucketMap::default(),
            max: max.max(1),
        }
    }

    pub(super) fn get(&self, id: &BucketId) -> Option<&V> {
        self.entries.get(id)
    }

    #[cfg(any(feature = "aws", test))]
    pub(super) fn contains(&self, id: &BucketId) -> bool {
        self.entries.contains_key(id)
    }

    #[cfg(any(feature = "aws", test))]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn remove(&mut self, id: &BucketId) -> Option<V> {
        self.entries.remove(id)
    }

    /// Insert or replace; make room first if the cache is full.
    pub(super) fn insert(&mut self, id: BucketId, value: V) {
        if !self.entries.contains_key(&id) {
            self.make_room(1, |_| false);
        }
        self.entries.insert(id, value);
    }

    /// Room for `incoming` new entries, sparing those `keep` names.
    pub(super) fn make_room(&mut self, incoming: usize, keep: impl Fn(&BucketId) -> bool) {
        if self.entries.len() + incoming <= self.max {
            return;
        }
        let excess = (self.entries.len() + incoming).saturating_sub(self.max * 9 / 10);
        let evict: Vec<BucketId> = self
            .entries
            .keys()
            .filter(|id| !keep(id))
            .take(excess)
            .cloned()
            .collect();
        for id in evict {
            self.entries.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> BucketId {
        BucketId {
            tenant: "t".into(),
            rule: "r".into(),
            bucket: n.to_string(),
        }
    }

    #[test]
    fn stays_within_its_size_and_spares_what_is_in_use() {
        let mut cache = BucketCache::new(10);
        for n in 0..100 {
            cache.insert(id(n), n);
            assert!(cache.len() <= 10);
        }
        assert_eq!(cache.get(&id(99)), Some(&99), "the newest is kept");
        cache.make_room(5, |b| b == &id(99));
        assert!(cache.len() <= 5);
        assert!(cache.contains(&id(99)), "spared");
    }
}
