//! Bucket states written behind a log. The `states` table is keyed by
//! tenant, rule and bucket, so a commit that changes a few hundred buckets of
//! as many tenants dirties a page for nearly each of them: that was most of
//! what a small commit wrote and synced. Instead a commit appends all its
//! state changes to `state_log` as one entry, one sequential write. The
//! latest change of each bucket waits in memory ([`Logged`]), where reads
//! look first; once enough have gathered, a commit writes them into
//! `states` together, each page once, and empties the log. Opening the
//! store replays the log.

use std::collections::BTreeMap;

use redb::{ReadTransaction, ReadableTable, TableDefinition};

use super::{BucketId, Result, StoreError};

/// commit number → that commit's state changes (see [`encode`]). Every
/// entry is newer than what `states` holds.
pub(super) const STATE_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("state_log");

/// A bucket's state change: the new state, or `None` for deleted.
pub(super) type Change = (BucketId, Option<Vec<u8>>);

/// The changes in `state_log`, not yet written into `states`.
#[derive(Debug, Default)]
pub(super) struct Logged {
    /// The latest state of each bucket changed since; `None`: deleted.
    latest: super::BucketMap<Option<Vec<u8>>>,
    /// Changes logged since, repeats included: what bounds the log.
    changes: usize,
    /// Key of the next log entry.
    next: u64,
}

impl Logged {
    /// The changes of the log in `tx`.
    pub(super) fn replay(tx: &ReadTransaction) -> Result<Logged> {
        let log = tx.open_table(STATE_LOG).map_err(err)?;
        let mut logged = Logged {
            next: 1,
            ..Logged::default()
        };
        for entry in log.iter().map_err(err)? {
            let (n, bytes) = entry.map_err(err)?;
            let changes = decode(bytes.value()).ok_or_else(|| {
                StoreError::Invalid(format!("state log entry {} is corrupt", n.value()))
            })?;
            logged.changes += changes.len();
            logged.latest.extend(changes);
            logged.next = n.value() + 1;
        }
        Ok(logged)
    }

    /// The latest logged change of `id`, if it has one.
    pub(super) fn get(&self, id: &BucketId) -> Option<&Option<Vec<u8>>> {
        self.latest.get(id)
    }

    /// The key for the next log entry.
    pub(super) fn next(&self) -> u64 {
        self.next
    }

    /// Whether a commit adding `incoming` changes should write everything
    /// into `states`, with at most `batch` changes in the log.
    pub(super) fn due(&self, incoming: usize, batch: usize) -> bool {
        self.changes + incoming >= batch
    }

    /// What a flush writes: every logged change with `changes` on top,
    /// latest per bucket, in key order.
    pub(super) fn merged<'a>(
        &'a self,
        changes: &'a [Change],
    ) -> BTreeMap<&'a BucketId, Option<&'a [u8]>> {
        let mut merged: BTreeMap<_, _> = self
            .latest
            .iter()
            .map(|(id, state)| (id, state.as_deref()))
            .collect();
        merged.extend(changes.iter().map(|(id, state)| (id, state.as_deref())));
        merged
    }

    /// After a commit that logged `changes` as entry [`next`](Self::next).
    pub(super) fn logged(&mut self, changes: Vec<Change>) {
        self.changes += changes.len();
        self.next += 1;
        self.latest.extend(changes);
    }

    /// After a commit that wrote everything into `states`.
    pub(super) fn flushed(&mut self) {
        self.latest.clear();
        self.changes = 0;
    }

    /// The logged changes of `tenant`'s buckets.
    pub(super) fn of_tenant(&self, tenant: &str) -> Vec<Change> {
        self.latest
            .iter()
            .filter(|(id, _)| id.tenant == tenant)
            .map(|(id, state)| (id.clone(), state.clone()))
            .collect()
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("state log: {e}"))
}

/// State changes as one log entry: for each, tenant, rule and bucket, then
/// a present flag (1 or 0) and, if present, the state; strings and states
/// prefixed by their length (u32, little-endian).
pub(super) fn encode(changes: &[Change]) -> Vec<u8> {
    let size: usize = changes
        .iter()
        .map(|(id, state)| {
            17 + id.tenant.len()
                + id.rule.len()
                + id.bucket.len()
                + state.as_ref().map_or(0, Vec::len)
        })
        .sum();
    let mut out = Vec::with_capacity(size);
    let put = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    for (id, state) in changes {
        put(&mut out, id.tenant.as_bytes());
        put(&mut out, id.rule.as_bytes());
        put(&mut out, id.bucket.as_bytes());
        match state {
            Some(bytes) => {
                out.push(1);
                put(&mut out, bytes);
            }
            None => out.push(0),
        }
    }
    out
}

/// The changes of one log entry; `None` if it is not one.
fn decode(mut bytes: &[u8]) -> Option<Vec<Change>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        *bytes = rest;
        Some(head)
    }
    fn chunk<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(take(bytes, 4)?.try_into().ok()?);
        take(bytes, len as usize)
    }
    fn text(bytes: &mut &[u8]) -> Option<String> {
        String::from_utf8(chunk(bytes)?.to_vec()).ok()
    }
    let mut changes = Vec::new();
    while !bytes.is_empty() {
        let id = BucketId {
            tenant: text(&mut bytes)?,
            rule: text(&mut bytes)?,
            bucket: text(&mut bytes)?,
        };
        let state = match take(&mut bytes, 1)? {
            [1] => Some(chunk(&mut bytes)?.to_vec()),
            [0] => None,
            _ => return None,
        };
        changes.push((id, state));
    }
    Some(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(tenant: &str, bucket: &str) -> BucketId {
        BucketId {
            tenant: tenant.to_owned(),
            rule: "r".to_owned(),
            bucket: bucket.to_owned(),
        }
    }

    #[test]
    fn entries_decode_to_what_was_encoded_and_damage_is_refused() {
        let changes = vec![
            (id("é", ""), Some(vec![1, 2, 3])),
            (id("t", "machine-01/x"), None),
            (id("t", "b"), Some(Vec::new())),
        ];
        let bytes = encode(&changes);
        assert_eq!(decode(&bytes), Some(changes));
        assert_eq!(decode(&[]), Some(Vec::new()));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None, "cut short");
        let mut flag = bytes.clone();
        let at = 4 + "é".len() + 4 + 1 + 4;
        flag[at] = 7;
        assert_eq!(decode(&flag), None, "a flag that is neither 0 nor 1");
    }
}
