//! The first stage of a batch of events, in named steps: leave out the
//! tenants run apart, reject the events of unknown tenants, route once
//! (tenant, filter, bucket key, event time), read every state the batch
//! touches in one call, run the tenants ([`super::tenants`]), gather their
//! outcomes ([`super::outcome`]) and hand the stragglers to their chains
//! ([`super::apart`]). [`Engine::process`] takes a batch through both
//! stages and out to the sink, running it again after a conflict.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::watch;

use super::outcome::Finish;
use super::tenants::{Straggler, panic_text};
use super::{
    Batch, Committed, Computed, Engine, EngineError, Lane, MAX_CONFLICTS, RejectCause, Rejection,
    apart, route, run,
};
use crate::event::Incoming;
use crate::runtime::LoadedRule;
use crate::store::{BucketId, Prior, StoreError};

/// What a compute is: a batch's first try, its run again after a conflict
/// (its ticket, and the tenants already run apart), or a tenant's part.
#[derive(Debug, Default, Clone)]
struct Attempt {
    ticket: Option<u64>,
    handed: Vec<String>,
    part: bool,
}

/// One rule of a tenant, routed, with its buckets' ids and priors.
pub(super) struct Routed {
    pub(super) rule: Arc<LoadedRule>,
    pub(super) buckets: Vec<route::Bucket>,
    pub(super) ids: Vec<BucketId>,
    pub(super) unroutable: Vec<route::Unroutable>,
    pub(super) priors: Vec<Prior>,
}

/// A tenant's rules to run over its events (their indices in the batch).
pub(super) struct TenantWork {
    pub(super) tenant: String,
    pub(super) indices: Vec<usize>,
    pub(super) rules: Vec<Routed>,
}

/// Each tenant of the batch with its events' indices.
type Tenants<'a> = Vec<(&'a str, Vec<usize>)>;
/// Each tenant's rules, as the catalogue has them (`None`: unknown).
type RuleSets = Vec<Option<Arc<[Arc<LoadedRule>]>>>;

impl Engine {
    /// A batch through both stages and out to the sink, running it again
    /// when another writer changed a bucket it read (the distributed
    /// store's version check). Its checkpoint is in the commit; tenants run
    /// apart commit on their own.
    pub async fn process(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: &Batch,
    ) -> Result<Committed, EngineError> {
        // Publishing lags behind: keep the outbox from growing unbounded.
        self.flush(lane).await?;
        let mut conflicts = 0;
        let mut attempt = Attempt::default();
        loop {
            let computed = self.compute_attempt(lane, batch.clone(), attempt).await?;
            attempt = Attempt {
                ticket: computed.ticket,
                handed: computed.handed.clone(),
                part: false,
            };
            match self.commit(lane, computed).await {
                Ok(mut committed) => {
                    self.publish(lane, &mut committed).await;
                    return Ok(committed);
                }
                Err(EngineError::Store(StoreError::Conflict(ids))) if conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(partition = %lane.partition, buckets = ids.len(), "buckets changed by another writer; running the batch again");
                    self.store.forget(&ids);
                }
                result => return result,
            }
        }
    }

    /// The first stage: route the batch, read the states it needs, and run
    /// every tenant's rules; their new states wait in the lane's overlay
    /// for the lane's next batch. Tenants run apart ([`apart`]) are left
    /// out: [`Computed::take_apart`] has them.
    pub(crate) async fn compute(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
    ) -> Result<Computed, EngineError> {
        self.compute_attempt(lane, batch, Attempt::default()).await
    }

    /// One tenant's part of a batch, on its chain.
    pub(super) async fn compute_part(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
    ) -> Result<Computed, EngineError> {
        let attempt = Attempt {
            part: true,
            ..Attempt::default()
        };
        self.compute_attempt(lane, batch, attempt).await
    }

    async fn compute_attempt(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
        attempt: Attempt,
    ) -> Result<Computed, EngineError> {
        let engine = self.clone();
        let lane = lane.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // A panic here is a host bug: it fails this batch, not the lane.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.compute_blocking(&lane, batch, &handle, attempt)
            }))
            .unwrap_or_else(|panic| Err(EngineError::Panicked(panic_text(&panic))))
        })
        .await
        .map_err(|e| EngineError::Panicked(e.to_string()))?
    }

    fn compute_blocking(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: Batch,
        handle: &tokio::runtime::Handle,
        attempt: Attempt,
    ) -> Result<Computed, EngineError> {
        let now = self.clock.now_ms();
        let (batch_no, generation) = lane.next_batch();
        if !batch.timers.is_empty() || !batch.expired.is_empty() {
            return self.fire_blocking(lane, batch, handle, now, batch_no, generation);
        }
        let events = batch.events.clone();
        let mut rejected = Vec::new();
        let started = Instant::now();

        let mut tenants = run::by_tenant(&events);
        let queued = if attempt.part {
            Vec::new()
        } else {
            hold_apart(lane, &attempt.handed, &mut tenants, &mut rejected)
        };
        let rule_sets: RuleSets = tenants
            .iter()
            .map(|(tenant, _)| self.catalogue.rules(tenant))
            .collect();
        let unknown_tenant = self.reject_unknown_tenants(&tenants, &rule_sets, &mut rejected);
        let mut works = route_tenants(&events, &tenants, &rule_sets);
        let load = self.load_states(lane, &mut works, handle)?;

        // Run: tenants in parallel, each tenant's rules in turn; past its
        // share of the time, a tenant goes on apart.
        let share = match (attempt.part, self.fair_share) {
            (false, Some(share)) => Some(share),
            _ => None,
        };
        let together: HashSet<&str> = batch.together.iter().map(String::as_str).collect();
        let splittable = |tenant: &str| !together.contains(tenant);
        let (outcomes, stragglers) = self.run_tenants(&events, works, now, share, &splittable);
        // Routing and running, not the state reads counted above.
        self.stats.rules_ns.fetch_add(
            started.elapsed().saturating_sub(load).as_nanos() as u64,
            Ordering::Relaxed,
        );

        let apart_events: usize = stragglers.iter().map(|s| s.indices.len()).sum::<usize>()
            + queued.iter().map(|q| q.1.len()).sum::<usize>();
        let mut computed = self.finish(
            lane,
            &events,
            Finish {
                outcomes,
                rejected,
                progress: batch.progress.clone(),
                bad: batch.bad.clone(),
                unanswered: batch.unanswered,
                count: events.len() - apart_events,
                now,
                batch_no,
                generation,
                unknown_tenant,
                started,
            },
        )?;
        if attempt.part {
            return Ok(computed);
        }

        let mut parts = Vec::new();
        for Straggler {
            tenant,
            indices,
            outcome,
        } in stragglers
        {
            let run = apart::Run::Started {
                outcome,
                events: events.clone(),
                generation,
            };
            parts.push((tenant, batch.part(&indices), indices, run));
        }
        for (tenant, indices) in queued {
            parts.push((tenant, batch.part(&indices), indices, apart::Run::Queued));
        }
        self.hand_apart(lane, &batch, attempt, parts, &mut computed, handle);
        Ok(computed)
    }

    /// Count and reject the events of tenants without rules; how many.
    fn reject_unknown_tenants(
        &self,
        tenants: &Tenants<'_>,
        rule_sets: &RuleSets,
        rejected: &mut Vec<Rejection>,
    ) -> u64 {
        let mut unknown_tenant = 0;
        for ((tenant, indices), rules) in tenants.iter().zip(rule_sets) {
            if rules.is_none() {
                unknown_tenant += indices.len() as u64;
                self.stats
                    .unknown_tenant
                    .fetch_add(indices.len() as u64, Ordering::Relaxed);
                for &index in indices {
                    rejected.push(Rejection {
                        index,
                        rule: None,
                        cause: RejectCause::UnknownTenant,
                        reason: format!(
                            "unknown tenant `{tenant}`: no rules are configured for it"
                        ),
                    });
                }
            }
        }
        unknown_tenant
    }

    /// Read every bucket the batch touches, once, all in one call: what
    /// the store holds, under what the lane's uncommitted batches wrote.
    /// How long it took.
    fn load_states(
        &self,
        lane: &Lane,
        works: &mut [TenantWork],
        handle: &tokio::runtime::Handle,
    ) -> Result<Duration, EngineError> {
        let load_started = Instant::now();
        let ids: Vec<BucketId> = works
            .iter_mut()
            .flat_map(|w| &mut w.rules)
            .flat_map(|r| std::mem::take(&mut r.ids))
            .collect();
        let mut priors = handle.block_on(self.store.load(&ids, &lane.partition))?;
        lane.overlay().apply(&ids, &mut priors);
        let (mut ids, mut priors) = (ids.into_iter(), priors.drain(..));
        for r in works.iter_mut().flat_map(|w| &mut w.rules) {
            let n = r.buckets.len();
            r.ids = ids.by_ref().take(n).collect();
            r.priors = priors.by_ref().take(n).collect();
        }
        let load = load_started.elapsed();
        self.stats
            .load_ns
            .fetch_add(load.as_nanos() as u64, Ordering::Relaxed);
        Ok(load)
    }

    /// Hand the tenants run apart to their chains: each part waits for the
    /// rest of the batch (`computed`) to commit, and a shard's batch takes
    /// a ticket so its checkpoint waits for its parts.
    fn hand_apart(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        batch: &Batch,
        attempt: Attempt,
        parts: Vec<(String, Batch, Vec<usize>, apart::Run)>,
        computed: &mut Computed,
        handle: &tokio::runtime::Handle,
    ) {
        let (rest, rest_closed) = watch::channel(());
        let mut lane_parts = lane.parts.lock().expect("parts lock");
        // Parts of a partition read by sequence numbers hold back its
        // checkpoint until they are in.
        let reads = batch
            .progress
            .position
            .as_ref()
            .filter(|p| p.last.is_some());
        let ticket = match reads {
            Some(position) if self.fair_share.is_some() => {
                Some(lane_parts.open(attempt.ticket, 1 + parts.len(), position.checkpoint.clone()))
            }
            _ => None,
        };
        computed.ticket = ticket;
        computed.handed = attempt.handed;
        for (tenant, sub, indices, run) in parts {
            computed.handed.push(tenant.clone());
            let (mut part, apart) = apart::Part::new(
                tenant,
                sub,
                indices,
                run,
                batch.receipts.clone(),
                rest_closed.clone(),
            );
            part.ticket = ticket;
            self.send_part(lane, &mut lane_parts, part, handle);
            computed.apart.push(apart);
        }
        computed.rest = Some(rest);
    }
}

/// Leave out of the batch the tenants `lane` runs apart (and those already
/// `handed` to their chains): their events join their chain (returned, by
/// tenant), or are rejected while it is too long.
fn hold_apart(
    lane: &Lane,
    handed: &[String],
    tenants: &mut Tenants<'_>,
    rejected: &mut Vec<Rejection>,
) -> Vec<(String, Vec<usize>)> {
    let mut queued = Vec::new();
    let parts = lane.parts.lock().expect("parts lock");
    tenants.retain(|(tenant, indices)| {
        if handed.iter().any(|t| t == tenant) {
            return false;
        }
        match parts.behind(tenant) {
            None => true,
            Some(behind) if behind >= apart::MAX_BEHIND => {
                let reason = format!(
                    "tenant `{tenant}` is {behind} batches behind on `{}`: its rules take more than their share of the time, so its events are dead-lettered until it catches up; replay them then",
                    lane.partition
                );
                rejected.extend(indices.iter().map(|&index| Rejection {
                    index,
                    rule: None,
                    cause: RejectCause::Behind,
                    reason: reason.clone(),
                }));
                false
            }
            Some(_) => {
                queued.push(((*tenant).to_owned(), indices.clone()));
                false
            }
        }
    });
    queued
}

/// Route once, tenants in parallel: each known tenant's rules, each rule's
/// buckets and their ids.
fn route_tenants(
    events: &[Incoming],
    tenants: &Tenants<'_>,
    rule_sets: &RuleSets,
) -> Vec<TenantWork> {
    tenants
        .par_iter()
        .zip(rule_sets.par_iter())
        .filter_map(|((tenant, indices), rules)| {
            let rules = rules.as_ref()?;
            let tenant_events: Vec<&Incoming> = indices.iter().map(|&i| &events[i]).collect();
            let restricted = tenant_events.iter().any(|e| e.only_rule.is_some());
            let rules = rules
                .iter()
                .map(|rule| route_rule(tenant, rule, &tenant_events, restricted))
                .collect();
            Some(TenantWork {
                tenant: (*tenant).to_owned(),
                indices: indices.clone(),
                rules,
            })
        })
        .collect()
}

/// One rule's buckets of its tenant's events; with `restricted`, events
/// meant for one rule only (dead letters run again) are left to it.
fn route_rule(
    tenant: &str,
    rule: &Arc<LoadedRule>,
    tenant_events: &[&Incoming],
    restricted: bool,
) -> Routed {
    let name = rule.name();
    let (mut buckets, mut unroutable) = route::route(rule.manifest(), tenant_events);
    if restricted {
        // Dead letters run again: each for its rule only.
        let mine = |i: usize| {
            tenant_events[i]
                .only_rule
                .as_deref()
                .is_none_or(|r| r == name)
        };
        buckets = buckets
            .iter()
            .map(|b| route::rebuild(rule.manifest(), tenant_events, b, mine))
            .filter(|b| !b.members.is_empty())
            .collect();
        unroutable.retain(|u| mine(u.index));
    }
    let ids = buckets
        .iter()
        .map(|b| BucketId {
            tenant: tenant.to_owned(),
            rule: name.to_owned(),
            bucket: b.key.clone(),
        })
        .collect();
    Routed {
        rule: rule.clone(),
        buckets,
        ids,
        unroutable,
        priors: Vec::new(),
    }
}
