//! Sharing a deployment's partitions among its hosts: [`Leases`], one group
//! of leases in the store's [`LeaseTable`]; [`coordinate`], which keeps
//! this host's leases of one kind ([`Leased`]: the stream's shards, the
//! timer partitions) and starts a worker under each; and [`plan`], which
//! decides what it takes (see [`crate::store::lease`] for the protocol).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::SourceError;
use crate::store::Result;
pub use crate::store::lease::Lease;
use crate::store::lease::LeaseTable;

/// How often leases are renewed and the lease table is read.
const TICK: Duration = Duration::from_millis(500);

/// One group of leases (a stream's shards, the timer partitions).
#[derive(Clone)]
pub struct Leases {
    table: Arc<dyn LeaseTable>,
    group: String,
}

impl Leases {
    pub fn new(table: Arc<dyn LeaseTable>, group: &str) -> Self {
        Leases {
            table,
            group: group.to_owned(),
        }
    }

    /// The group's name: the `stream` of the fences of commits under it.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The same table's group `group`.
    pub fn other(&self, group: &str) -> Self {
        Leases::new(self.table.clone(), group)
    }

    pub async fn list(&self) -> Result<Vec<Lease>> {
        self.table.list(&self.group).await
    }

    pub async fn create(&self, name: &str, parents: &[String]) -> Result<bool> {
        self.table.create(&self.group, name, parents).await
    }

    pub async fn take(&self, lease: &Lease, me: &str) -> Result<Option<u64>> {
        self.table.take(&self.group, lease, me).await
    }

    pub async fn renew(&self, name: &str, me: &str, epoch: u64) -> Result<bool> {
        self.table.renew(&self.group, name, me, epoch).await
    }

    pub async fn release(&self, name: &str, me: &str, epoch: u64) -> Result<bool> {
        self.table.release(&self.group, name, me, epoch).await
    }
}

/// What a host does with the leases of one kind: the stream's shards, or
/// the timer partitions of its buckets.
#[async_trait::async_trait]
pub(crate) trait Leased: Send + Sync + 'static {
    /// What there is to lease now, each with the leases that must finish
    /// first; a lease is created for each one not seen yet.
    async fn list(&self) -> std::result::Result<Vec<(String, Vec<String>)>, SourceError>;

    /// How often to list again (also after a worker ends).
    fn list_every(&self) -> Duration;

    /// Every lease, as just read.
    fn read(&self, _leases: &[Lease]) {}

    /// What this host holds now.
    fn held(&self, names: Vec<String>);

    /// Leases whose worker stopped on an error that cannot heal: kept, see
    /// the module docs.
    fn failed(&self) -> Vec<String> {
        Vec::new()
    }

    /// The lease of `name` is no longer this host's.
    fn lost(&self, _name: &str) {}

    /// Work under `lease`, taken at `epoch`, until the host stops or the
    /// lease is lost.
    fn start(
        &self,
        lease: Lease,
        epoch: u64,
        stop: watch::Receiver<bool>,
        lost: Arc<AtomicBool>,
    ) -> JoinHandle<()>;
}

/// One lease this host works under.
struct Worker {
    epoch: u64,
    /// Set when the lease was lost: stop without releasing.
    lost: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// How a lease looked when last read, and since when.
struct Seen {
    owner: Option<String>,
    counter: u64,
    since: Instant,
}

/// Keep `me`'s leases of one kind: renew what it holds, notice what it
/// lost, create leases for what is new, and take free, expired or (to
/// balance) stolen ones, starting a worker for each.
pub(crate) async fn coordinate(
    what: Arc<dyn Leased>,
    leases: Leases,
    me: String,
    lease_duration: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut listed: Option<Instant> = None;
    loop {
        // Workers that ended: a finished shard (list shards again for its
        // children), a lost lease, or an error that cannot heal (kept: its
        // lease stays this host's, see the module docs).
        let ended: Vec<String> = workers
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(name, _)| name.clone())
            .collect();
        if !ended.is_empty() {
            listed = None;
        }
        let failed = what.failed();
        for name in ended {
            if !failed.contains(&name) {
                workers.remove(&name);
            }
        }

        // Renew.
        let renewals = workers.iter().map(|(name, worker)| {
            let leases = leases.clone();
            let me = me.clone();
            let name = name.clone();
            let epoch = worker.epoch;
            async move { (name.clone(), leases.renew(&name, &me, epoch).await) }
        });
        for (name, renewed) in futures::future::join_all(renewals).await {
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(lease = %name, "lease lost to another host; stopping its worker");
                    if let Some(worker) = workers.remove(&name) {
                        worker.lost.store(true, Ordering::Relaxed);
                    }
                    what.lost(&name);
                }
                Err(error) => tracing::warn!(lease = %name, %error, "cannot renew lease"),
            }
        }

        if listed.is_none_or(|at| at.elapsed() >= what.list_every()) {
            match what.list().await {
                Ok(names) => {
                    listed = Some(Instant::now());
                    for (name, parents) in names {
                        if !seen.contains_key(&name)
                            && let Err(error) = leases.create(&name, &parents).await
                        {
                            tracing::warn!(lease = %name, %error, "cannot create lease");
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot list what to lease"),
            }
        }

        match leases.list().await {
            Ok(all) => {
                what.read(&all);
                for lease in &all {
                    let entry = seen.entry(lease.shard.clone()).or_insert(Seen {
                        owner: lease.owner.clone(),
                        counter: lease.counter,
                        since: Instant::now(),
                    });
                    if entry.owner != lease.owner || entry.counter != lease.counter {
                        *entry = Seen {
                            owner: lease.owner.clone(),
                            counter: lease.counter,
                            since: Instant::now(),
                        };
                    }
                    // Held by someone else now: ours is gone.
                    if let Some(worker) = workers.get(&lease.shard)
                        && (lease.owner.as_deref() != Some(&me) || lease.epoch != worker.epoch)
                    {
                        tracing::warn!(lease = %lease.shard, "lease taken by another host; stopping its worker");
                        worker.lost.store(true, Ordering::Relaxed);
                        workers.remove(&lease.shard);
                        what.lost(&lease.shard);
                    }
                }
                let expired = |lease: &Lease| {
                    lease.owner.as_deref() != Some(&me)
                        && seen
                            .get(&lease.shard)
                            .is_some_and(|s| s.since.elapsed() >= lease_duration)
                };
                if !*stop.borrow() {
                    for lease in plan(&all, &expired, &me).take {
                        match leases.take(&lease, &me).await {
                            Ok(Some(epoch)) => {
                                tracing::info!(lease = %lease.shard, epoch, previous = ?lease.owner, "took lease");
                                let lost = Arc::new(AtomicBool::new(false));
                                let task =
                                    what.start(lease.clone(), epoch, stop.clone(), lost.clone());
                                workers.insert(lease.shard.clone(), Worker { epoch, lost, task });
                            }
                            Ok(None) => {
                                tracing::debug!(lease = %lease.shard, "lease changed before it could be taken")
                            }
                            Err(error) => {
                                tracing::warn!(lease = %lease.shard, %error, "cannot take lease")
                            }
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the lease table"),
        }
        what.held(workers.keys().cloned().collect());

        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }
    // Stopping: each worker finishes its batch and releases its lease; keep
    // renewing until they are done.
    while !workers.is_empty() {
        workers.retain(|_, w| !w.task.is_finished());
        for (name, worker) in &workers {
            let _ = leases.renew(name, &me, worker.epoch).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    what.held(Vec::new());
}

/// What the balancer decides in one round: leases to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub take: Vec<Lease>,
}

/// Decide which leases to take, given every lease, which owners are alive
/// (their leases' counters moved recently) and who `me` is. Leases whose
/// shard is finished, or whose parents are not, are not for the taking.
///
/// Free and expired leases are taken up to this host's fair share; when none
/// is left and some host holds at least two more than this one, one of its
/// leases is stolen, so that in the end max − min leases per host ≤ 1.
pub fn plan(leases: &[Lease], expired: &dyn Fn(&Lease) -> bool, me: &str) -> Plan {
    let finished: HashMap<&str, bool> = leases
        .iter()
        .map(|l| (l.shard.as_str(), l.finished()))
        .collect();
    let ready = |l: &&Lease| {
        !l.finished()
            && l.parents
                .iter()
                .all(|p| finished.get(p.as_str()).copied().unwrap_or(true))
    };
    let workable: Vec<&Lease> = leases.iter().filter(ready).collect();
    fn live_owner<'a>(l: &'a Lease, expired: &dyn Fn(&Lease) -> bool) -> Option<&'a str> {
        l.owner.as_deref().filter(|_| !expired(l))
    }
    let mut held: HashMap<&str, Vec<&Lease>> = HashMap::new();
    held.entry(me).or_default();
    for lease in &workable {
        if let Some(owner) = live_owner(lease, expired) {
            held.entry(owner).or_default().push(lease);
        }
    }
    let hosts = held.len();
    let target = workable.len().div_ceil(hosts);
    let mine = held[me].len();
    let mut take: Vec<Lease> = workable
        .iter()
        .filter(|l| live_owner(l, expired).is_none())
        .take(target.saturating_sub(mine))
        .map(|l| (*l).clone())
        .collect();
    if take.is_empty() {
        let richest = held
            .iter()
            .filter(|(owner, _)| **owner != me)
            .max_by_key(|(owner, leases)| (leases.len(), *owner));
        if let Some((_, leases)) = richest
            && leases.len() >= mine + 2
        {
            take.push((*leases.last().expect("at least two")).clone());
        }
    }
    Plan { take }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SHARD_END;

    fn lease(shard: &str, owner: Option<&str>) -> Lease {
        Lease {
            shard: shard.to_owned(),
            owner: owner.map(str::to_owned),
            epoch: 1,
            counter: 1,
            checkpoint: None,
            parents: Vec::new(),
        }
    }

    fn never(_: &Lease) -> bool {
        false
    }

    #[test]
    fn a_lone_host_takes_every_free_lease() {
        let leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), None)).collect();
        assert_eq!(plan(&leases, &never, "a").take.len(), 4);
    }

    #[test]
    fn a_new_host_steals_one_at_a_time_until_balanced() {
        let mut leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), Some("a"))).collect();
        for round in 0..4 {
            let taken = plan(&leases, &never, "b").take;
            if round < 2 {
                assert_eq!(taken.len(), 1, "round {round}");
                let shard = &taken[0].shard;
                leases.iter_mut().find(|l| &l.shard == shard).unwrap().owner = Some("b".into());
            } else {
                assert!(taken.is_empty(), "balanced after two steals");
            }
        }
        let third = plan(&leases, &never, "c").take;
        assert_eq!(third.len(), 1);
    }

    #[test]
    fn expired_leases_are_shared_out() {
        let leases = vec![
            lease("s0", Some("dead")),
            lease("s1", Some("dead")),
            lease("s2", Some("b")),
            lease("s3", Some("a")),
        ];
        let expired = |l: &Lease| l.owner.as_deref() == Some("dead");
        let taken = plan(&leases, &expired, "a").take;
        assert_eq!(
            taken.len(),
            1,
            "a's share of 4 leases over 2 live hosts is 2"
        );
    }

    #[test]
    fn children_wait_for_their_parents() {
        let mut parent = lease("s0", Some("a"));
        let mut child = lease("s1", None);
        child.parents = vec!["s0".into()];
        assert!(
            plan(&[parent.clone(), child.clone()], &never, "b")
                .take
                .is_empty()
        );
        parent.checkpoint = Some(SHARD_END.into());
        let taken = plan(&[parent, child], &never, "b").take;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].shard, "s1");
    }
}
