//! The embedded store's per-tenant alert index: `(tenant, seq)` of every
//! logged alert, for listing a tenant's alerts. It is derived data, so it
//! lives in a file of its own beside the store and a thread of its own
//! writes it, many commits' worth at a time.
//!
//! Why apart: its keys are random (one tenant after another), so writing a
//! batch of them dirties a page per tenant. Inside the store's commits that
//! made every few hundredth commit several times slower, and every request
//! waiting behind it. Here a commit only adds its entries to a waiting set in
//! memory; the writer takes the whole set when it is large enough (or has
//! waited a while), writes it in one transaction of the index file, and only
//! then lets it go. Readers see the file and both sets as of one moment, so a
//! committed alert is always listed. After a crash the store rebuilds the
//! waiting entries from its log, from the file's `indexed` mark on.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Result, StoreError};

/// (tenant, seq): each tenant's alerts.
const ENTRIES: TableDefinition<(&str, u64), ()> = TableDefinition::new("tenant_alerts");
/// `indexed`: every alert up to this seq is in `tenant_alerts`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How long entries may wait when fewer than a batch arrive.
const IDLE_FLUSH: Duration = Duration::from_secs(1);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("alert index: {e}"))
}

pub(super) struct AlertIndex {
    db: Database,
    waiting: Mutex<Waiting>,
    wake: Condvar,
    /// Entries that make the writer go without waiting for [`IDLE_FLUSH`].
    batch: usize,
}

/// Entries committed to the store's log but not yet in the index file.
#[derive(Default)]
pub(super) struct Waiting {
    /// Added by commits since the writer last took them.
    entries: BTreeSet<(String, u64)>,
    /// Taken by the writer and being written; every seq here is below every
    /// seq in `entries`.
    writing: Arc<BTreeSet<(String, u64)>>,
    stop: bool,
}

impl Waiting {
    /// Record the index entries of alerts just committed (in seq order).
    pub(super) fn add(&mut self, entries: impl IntoIterator<Item = (String, u64)>) {
        self.entries.extend(entries);
    }

    /// The first `limit` waiting seqs of `tenant` after `after`, in order.
    fn seqs(&self, tenant: &str, after: u64, limit: usize) -> Vec<u64> {
        let range = (tenant.to_owned(), after.saturating_add(1))..=(tenant.to_owned(), u64::MAX);
        self.writing
            .range(range.clone())
            .chain(self.entries.range(range))
            .map(|(_, seq)| *seq)
            .take(limit)
            .collect()
    }
}

impl AlertIndex {
    pub(super) fn open(path: &Path, batch: usize) -> Result<Self> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(ENTRIES).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(AlertIndex {
            db,
            waiting: Mutex::new(Waiting::default()),
            wake: Condvar::new(),
            batch: batch.max(1),
        })
    }

    /// Every alert up to this seq is in the file.
    pub(super) fn indexed(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(err)?;
        let meta = tx.open_table(META).map_err(err)?;
        Ok(meta.get("indexed").map_err(err)?.map_or(0, |v| v.value()))
    }

    /// The waiting entries, locked. A commit holds this across its write, so
    /// that readers see its alerts in the log and here at once.
    pub(super) fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().expect("alert index lock")
    }

    /// Let the writer know entries were added.
    pub(super) fn added(&self, waiting: &Waiting) {
        if waiting.entries.len() >= self.batch {
            self.wake.notify_one();
        }
    }

    /// A read snapshot of the file and the waiting seqs of `tenant` after
    /// `after` (at most `limit`), as of one moment. `also` runs at that
    /// moment too (the caller opens its log snapshot there).
    pub(super) fn snapshot<T>(
        &self,
        tenant: &str,
        after: u64,
        limit: usize,
        also: impl FnOnce() -> Result<T>,
    ) -> Result<(IndexSnapshot, Vec<u64>, T)> {
        let waiting = self.waiting();
        let tx = self.db.begin_read().map_err(err)?;
        let other = also()?;
        let seqs = waiting.seqs(tenant, after, limit);
        Ok((IndexSnapshot(tx), seqs, other))
    }

    /// Write everything waiting into the file in one transaction. Entries
    /// added meanwhile wait for the next time.
    pub(super) fn flush(&self) -> Result<()> {
        let writing = {
            let mut waiting = self.waiting();
            if waiting.entries.is_empty() {
                return Ok(());
            }
            let taken = Arc::new(std::mem::take(&mut waiting.entries));
            waiting.writing = taken.clone();
            taken
        };
        let written = self.write(&writing);
        let mut waiting = self.waiting();
        if written.is_err() {
            // Keep them waiting for the next attempt.
            let mut back = (*writing).clone();
            back.append(&mut waiting.entries);
            waiting.entries = back;
        }
        waiting.writing = Arc::default();
        written
    }

    fn write(&self, entries: &BTreeSet<(String, u64)>) -> Result<()> {
        let last = entries.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(ENTRIES).map_err(err)?;
            for (tenant, seq) in entries {
                table.insert((tenant.as_str(), *seq), ()).map_err(err)?;
            }
            let mut meta = tx.open_table(META).map_err(err)?;
            let indexed = meta.get("indexed").map_err(err)?.map_or(0, |v| v.value());
            meta.insert("indexed", indexed.max(last)).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// The writer's loop: flush when a batch is waiting, or when entries
    /// have waited [`IDLE_FLUSH`]; a last flush when told to stop.
    pub(super) fn run_writer(&self) {
        loop {
            let stop = {
                let mut waiting = self.waiting();
                while !waiting.stop && waiting.entries.len() < self.batch {
                    let (guard, timeout) = self
                        .wake
                        .wait_timeout(waiting, IDLE_FLUSH)
                        .expect("alert index lock");
                    waiting = guard;
                    if timeout.timed_out() && !waiting.entries.is_empty() {
                        break;
                    }
                }
                waiting.stop
            };
            if let Err(error) = self.flush() {
                tracing::error!(%error, "cannot write the alert index; its entries wait in memory");
                if !stop {
                    std::thread::sleep(IDLE_FLUSH);
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Have the writer flush what is left and return.
    pub(super) fn stop(&self) {
        self.waiting().stop = true;
        self.wake.notify_one();
    }
}

/// The index file as of one moment.
pub(super) struct IndexSnapshot(ReadTransaction);

impl IndexSnapshot {
    /// The first `limit` indexed seqs of `tenant` after `after`, in order.
    pub(super) fn seqs(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<u64>> {
        let table = self.0.open_table(ENTRIES).map_err(err)?;
        let range = table
            .range((tenant, after.saturating_add(1))..=(tenant, u64::MAX))
            .map_err(err)?;
        range
            .take(limit)
            .map(|entry| entry.map(|(key, _)| key.value().1).map_err(err))
            .collect()
    }
}
