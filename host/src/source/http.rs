//! The HTTP ingest source: each `POST /v1/events` body becomes a
//! [`Submission`]; one lane forms batches of whatever queued meanwhile and
//! runs them through the [`Engine`] (the next batch's rules while the
//! previous one commits, so one fsync serves many requests under load). A
//! request's answer is stored as its idempotency receipt in the same commit
//! as its effects, and sent only once that commit is durable.
//!
//! A receipt is bound to the request body by its SHA-256: a key reused with
//! another body is refused (422), never answered with the first body's
//! answer. Receipts live for [`RECEIPT_RETENTION_MS`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::ingest;
use crate::engine::apart::PartReceipts;
use crate::engine::{Batch, Committed, Computed, Engine, EngineError, Lane, Rejection};
use crate::event::Incoming;
use crate::store::Progress;
pub use crate::store::RECEIPT_RETENTION_MS;

/// The partition of the HTTP ingest's lane.
pub const PARTITION: &str = "http";
/// Requests waiting for the lane before senders wait too.
const QUEUE_DEPTH: usize = 1024;
/// Committed groups waiting to be published before commits wait too: a
/// sink that slows down holds the lane back instead of piling up alerts
/// in memory (they are safe in the outbox either way).
const PUBLISH_DEPTH: usize = 16;

/// An event (by its line) that was not applied, and why. With `rule` set,
/// only that rule did not apply it; the tenant's other rules did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rejected {
    pub line: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub error: String,
}

/// The answer to one submission, as `POST /v1/events` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Answer {
    /// Events every rule of their tenant applied.
    pub accepted: usize,
    /// Lines not applied (or not by every rule), in line order.
    pub rejected: Vec<Rejected>,
}

/// Why a request got no answer of its own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// The body is not NDJSON or a JSON array of events.
    #[error("{0}")]
    BadBody(String),
    /// The idempotency key was used before for a different body.
    #[error(
        "Idempotency-Key `{0}` was already used for a different request body; use a new key for new events"
    )]
    KeyReused(String),
    /// Nothing of the request was applied; retrying it is safe.
    #[error("not applied, retry: {0}")]
    NotApplied(String),
    /// The caller may not post these events: nothing was applied.
    #[error("{0}")]
    Forbidden(String),
    /// A tenant of the request is over a quota: nothing was applied.
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaExceeded),
}

/// What may refuse a request once its events are read, before any is
/// applied: who may post for which tenant, and their quotas.
pub type Gate<'a> = &'a (dyn Fn(&[Incoming]) -> Result<(), Refusal> + Send + Sync);

impl From<EngineError> for Refusal {
    fn from(error: EngineError) -> Self {
        Refusal::NotApplied(error.to_string())
    }
}

/// What a receipt holds: the answer, and the body it answered.
#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    /// SHA-256 of the request body, hex.
    digest: String,
    answer: Answer,
}

type Reply = oneshot::Sender<Result<Answer, Refusal>>;

/// One request's events, waiting for the lane.
struct Submission {
    events: Vec<Incoming>,
    /// The body line of each event.
    lines: Vec<usize>,
    /// Lines refused at parsing: part of the answer.
    rejected: Vec<Rejected>,
    key: Option<String>,
    digest: String,
    reply: Reply,
}

/// What the lane takes, in order.
enum Work {
    Submit(Submission),
    /// Fire the timers due by `until` (on the host's clock): they touch the
    /// same buckets as the requests, so they go through the same lane.
    Timers {
        until: i64,
        fired: oneshot::Sender<Result<usize, EngineError>>,
    },
}

/// A key's request being processed, and retries waiting for its answer.
struct Inflight {
    digest: String,
    waiting: Vec<Reply>,
}

/// The HTTP source as the host runs it: [`HttpIngest`] takes the API's
/// requests; this waits for its lane.
pub struct HttpSource {
    /// Not held strongly: the lane ends once the API drops the ingest.
    ingest: std::sync::Weak<HttpIngest>,
    lane: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl HttpSource {
    pub fn new(ingest: &Arc<HttpIngest>, lane: JoinHandle<()>) -> Self {
        HttpSource {
            ingest: Arc::downgrade(ingest),
            lane: tokio::sync::Mutex::new(Some(lane)),
        }
    }
}

#[async_trait::async_trait]
impl super::Source for HttpSource {
    fn not_ready(&self) -> Option<String> {
        self.ingest
            .upgrade()
            .is_some_and(|ingest| !ingest.running())
            .then(|| "the ingest lane stopped: see the host's log".to_owned())
    }

    /// What is queued is processed, answered and published.
    async fn join(&self) {
        if let Some(lane) = self.lane.lock().await.take()
            && let Err(error) = lane.await
        {
            tracing::error!(%error, "the ingest lane failed");
        }
    }
}

/// The HTTP ingest: submit bodies, get answers once durable.
pub struct HttpIngest {
    engine: Arc<Engine>,
    lane: Arc<Lane>,
    queue: mpsc::Sender<Work>,
    inflight: Mutex<HashMap<String, Inflight>>,
    tenant_field: String,
    max_event_bytes: usize,
    /// Distinguishes requests without an idempotency key.
    instance: String,
    requests: AtomicU64,
}

impl HttpIngest {
    /// Publish what the lane left in the outbox, then start the lane; it
    /// runs until every handle is dropped and the queue drains. With
    /// `fires_timers` (a store only this host writes) the lane fires the
    /// store's due timers too; hosts sharing a store share its timer
    /// partitions instead ([`super::timers`]).
    pub async fn start(
        engine: Arc<Engine>,
        tenant_field: &str,
        max_batch_events: usize,
        max_event_bytes: usize,
        fires_timers: bool,
    ) -> Result<(Arc<HttpIngest>, JoinHandle<()>), EngineError> {
        let lane = Arc::new(Lane::new(PARTITION));
        engine.flush(&lane).await?;
        let (queue, submissions) = mpsc::channel(QUEUE_DEPTH);
        let ingest = Arc::new(HttpIngest {
            engine,
            lane,
            queue,
            inflight: Mutex::default(),
            tenant_field: tenant_field.to_owned(),
            max_event_bytes,
            instance: format!("r{:x}", rand::random::<u64>()),
            requests: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(
            Arc::downgrade(&ingest),
            submissions,
            max_batch_events,
            fires_timers,
        ));
        Ok((ingest, task))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Whether the lane still takes requests.
    pub fn running(&self) -> bool {
        !self.queue.is_closed()
    }

    /// Apply one request body; answers once its effects are durable.
    pub async fn submit(&self, body: &str, key: Option<String>) -> Result<Answer, Refusal> {
        self.submit_gated(body, key, &|_| Ok(())).await
    }

    /// [`submit`](Self::submit), refused whole if `gate` refuses its events.
    /// A retry of a request already answered is answered again without it.
    pub async fn submit_gated(
        &self,
        body: &str,
        key: Option<String>,
        gate: Gate<'_>,
    ) -> Result<Answer, Refusal> {
        let digest = hex::encode(Sha256::digest(body.as_bytes()));
        if let Some(key) = &key
            && let Some(answer) = self.answered(key, &digest).await?
        {
            return Ok(answer);
        }
        let request = match &key {
            Some(key) => format!("key:{key}"),
            None => format!(
                "{}-{}",
                self.instance,
                self.requests.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let arrival = self.engine.clock().now_ms();
        let parsed = ingest::parse(
            body,
            &self.tenant_field,
            &request,
            arrival,
            self.max_event_bytes,
        )
        .map_err(Refusal::BadBody)?;
        gate(&parsed.events)?;
        if parsed.events.is_empty() && key.is_none() {
            return Ok(Answer {
                accepted: 0,
                rejected: parsed.rejected,
            });
        }
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            events: parsed.events,
            lines: parsed.lines,
            rejected: parsed.rejected,
            key,
            digest,
            reply,
        };
        if self.queue.send(Work::Submit(submission)).await.is_err() {
            return Err(Refusal::NotApplied("shutting down".to_owned()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Refusal::NotApplied("processing failed".to_owned())))
    }

    /// Fire the timers due by `until`, in the lane's turn; how many fired.
    pub async fn fire_timers(&self, until: i64) -> Result<usize, EngineError> {
        let (fired, count) = oneshot::channel();
        if self
            .queue
            .send(Work::Timers { until, fired })
            .await
            .is_err()
        {
            return Ok(0);
        }
        count.await.unwrap_or(Ok(0))
    }

    /// The stored answer of `key`'s request, if it was applied.
    async fn answered(&self, key: &str, digest: &str) -> Result<Option<Answer>, Refusal> {
        let Some(bytes) = self
            .engine
            .store()
            .receipt(key)
            .await
            .map_err(|e| Refusal::NotApplied(e.to_string()))?
        else {
            return Ok(None);
        };
        let receipt: Receipt = serde_json::from_slice(&bytes).map_err(|e| {
            Refusal::NotApplied(format!("the receipt of `{key}` is unreadable: {e}"))
        })?;
        if receipt.digest != digest {
            return Err(Refusal::KeyReused(key.to_owned()));
        }
        Ok(Some(receipt.answer))
    }

    /// Answer retries of requests already applied or in flight; the rest
    /// are marked in flight and returned.
    async fn admit(&self, group: Vec<Submission>) -> Vec<Submission> {
        let mut fresh = Vec::with_capacity(group.len());
        for submission in group {
            let Some(key) = submission.key.clone() else {
                fresh.push(submission);
                continue;
            };
            // A key is in flight until its receipt is stored: check the
            // map first, the store second, then claim the key.
            {
                let mut inflight = self.inflight.lock().expect("inflight lock");
                if let Some(waiting) = inflight.get_mut(&key) {
                    if waiting.digest == submission.digest {
                        waiting.waiting.push(submission.reply);
                    } else {
                        let _ = submission.reply.send(Err(Refusal::KeyReused(key)));
                    }
                    continue;
                }
            }
            match self.answered(&key, &submission.digest).await {
                Ok(Some(answer)) => {
                    let _ = submission.reply.send(Ok(answer));
                }
                Err(refusal) => {
                    let _ = submission.reply.send(Err(refusal));
                }
                Ok(None) => {
                    self.inflight.lock().expect("inflight lock").insert(
                        key,
                        Inflight {
                            digest: submission.digest.clone(),
                            waiting: Vec::new(),
                        },
                    );
                    fresh.push(submission);
                }
            }
        }
        fresh
    }

    /// Answer each submission (and the retries waiting on its key) and let
    /// its key be processed again.
    fn answer(&self, submissions: Vec<(Submission, Answer)>, result: Result<(), Refusal>) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        for (submission, answer) in submissions {
            let answer = result.clone().map(|()| answer);
            if let Some(key) = &submission.key
                && let Some(waiting) = inflight.remove(key)
            {
                for reply in waiting.waiting {
                    let _ = reply.send(answer.clone());
                }
            }
            let _ = submission.reply.send(answer);
        }
    }

    /// Run a group's rules; `None` when nothing of it is left to commit.
    /// Requests of tenants run apart are answered when their part commits.
    async fn compute(
        self: &Arc<Self>,
        group: Vec<Submission>,
    ) -> Option<(Vec<(Submission, Answer)>, Computed)> {
        let fresh = self.admit(group).await;
        if fresh.is_empty() {
            return None;
        }
        let mut events = Vec::with_capacity(fresh.iter().map(|s| s.events.len()).sum());
        let mut requests = Vec::with_capacity(fresh.len());
        let mut together = Vec::new();
        let mut fresh = fresh;
        for submission in &mut fresh {
            requests.push(Request {
                start: events.len(),
                lines: submission.lines.clone(),
                rejected: submission.rejected.clone(),
                key: submission.key.clone(),
                digest: submission.digest.clone(),
            });
            if let Some(first) = submission.events.first()
                && submission.events.iter().any(|e| e.tenant != first.tenant)
            {
                together.extend(submission.events.iter().map(|e| e.tenant.clone()));
            }
            events.append(&mut submission.events);
        }
        together.sort();
        together.dedup();
        let requests: Arc<[Request]> = requests.into();
        let mut batch = Batch::new(events, Progress::none());
        batch.together = together;
        batch.receipts = Some({
            let requests = requests.clone();
            PartReceipts::new(move |part: &[usize], rejected: &[Rejection]| {
                requests
                    .iter()
                    .filter(|r| part.binary_search(&r.start).is_ok())
                    .filter_map(|r| r.receipt(&r.answer(rejected)))
                    .collect()
            })
        });
        let mut computed = match self.engine.compute(&self.lane, batch).await {
            Ok(computed) => computed,
            Err(error) => {
                let answers = fresh.into_iter().map(|s| (s, empty_answer())).collect();
                self.answer(answers, Err(error.into()));
                return None;
            }
        };
        // Requests whose events were run apart wait for their part.
        let aparts = computed.take_apart();
        let mut deferred: Vec<Vec<(Submission, Request)>> =
            aparts.iter().map(|_| Vec::new()).collect();
        let mut answered: Vec<(Submission, Answer)> = Vec::with_capacity(fresh.len());
        let mut receipts = Vec::new();
        for (submission, request) in fresh.into_iter().zip(requests.iter()) {
            if !request.lines.is_empty()
                && let Some(n) = aparts
                    .iter()
                    .position(|a| a.indices.binary_search(&request.start).is_ok())
            {
                deferred[n].push((submission, request.clone()));
                continue;
            }
            let answer = request.answer(computed.rejected());
            receipts.extend(request.receipt(&answer));
            answered.push((submission, answer));
        }
        for (apart, waiting) in aparts.into_iter().zip(deferred) {
            let ingest = self.clone();
            tokio::spawn(async move {
                match apart.committed().await {
                    Ok(rejected) => {
                        let answers = waiting
                            .into_iter()
                            .map(|(s, r)| {
                                let answer = r.answer(&rejected);
                                (s, answer)
                            })
                            .collect();
                        ingest.answer(answers, Ok(()));
                    }
                    Err(error) => {
                        let answers = waiting
                            .into_iter()
                            .map(|(s, _)| (s, empty_answer()))
                            .collect();
                        ingest.answer(answers, Err(error.into()));
                    }
                }
            });
        }
        computed.set_progress(Progress::receipts(receipts));
        Some((answered, computed))
    }
}

/// What answering a request takes, apart from its reply.
#[derive(Debug, Clone)]
struct Request {
    /// Index of its first event in the batch.
    start: usize,
    /// The body line of each event.
    lines: Vec<usize>,
    /// Lines refused at parsing.
    rejected: Vec<Rejected>,
    key: Option<String>,
    digest: String,
}

impl Request {
    /// Its answer, from the rejections (by index in the batch, in order)
    /// of the commit that applied its events.
    fn answer(&self, rejections: &[Rejection]) -> Answer {
        let end = self.start + self.lines.len();
        let from = rejections.partition_point(|r| r.index < self.start);
        let mut rejected = self.rejected.clone();
        let mut not_applied = Vec::new();
        for r in rejections[from..].iter().take_while(|r| r.index < end) {
            let line = self.lines[r.index - self.start];
            not_applied.push(line);
            rejected.push(Rejected {
                line,
                rule: r.rule.clone(),
                error: r.reason.clone(),
            });
        }
        not_applied.dedup();
        rejected.sort_by_key(|r| r.line);
        Answer {
            accepted: self.lines.len() - not_applied.len(),
            rejected,
        }
    }

    /// The receipt its answer is stored as, if it has a key.
    fn receipt(&self, answer: &Answer) -> Option<(String, Vec<u8>)> {
        let key = self.key.clone()?;
        let receipt = Receipt {
            digest: self.digest.clone(),
            answer: answer.clone(),
        };
        Some((
            key,
            serde_json::to_vec(&receipt).expect("receipts serialize"),
        ))
    }
}

fn empty_answer() -> Answer {
    Answer {
        accepted: 0,
        rejected: Vec::new(),
    }
}

/// The lane: group what queued, compute it, commit it while the next group
/// computes. Returns when the queue closes and the last group is answered.
async fn run(
    ingest: std::sync::Weak<HttpIngest>,
    mut queue: mpsc::Receiver<Work>,
    max_events: usize,
    fires_timers: bool,
) {
    // At most two groups in flight: one committing, one computing. What
    // queues meanwhile forms a larger next group. Publishing runs beside
    // them, in commit order: a group's alerts go out while the next commits.
    let mut committing: Option<JoinHandle<()>> = None;
    let (to_publish, mut committed) = mpsc::channel::<Committed>(PUBLISH_DEPTH);
    let Some((engine, lane)) = ingest.upgrade().map(|i| (i.engine.clone(), i.lane.clone())) else {
        return;
    };
    // Holds the engine, not the ingest: everything committed is published
    // even while the host stops.
    let publisher = tokio::spawn(async move {
        while let Some(mut batch) = committed.recv().await {
            engine.publish(&lane, &mut batch).await;
        }
    });
    let timers = fires_timers.then(|| tokio::spawn(super::timers::drive(ingest.clone())));
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(work) => work,
            None => match queue.recv().await {
                Some(work) => work,
                None => break,
            },
        };
        let Some(ingest) = ingest.upgrade() else {
            break;
        };
        let first = match first {
            Work::Submit(submission) => submission,
            Work::Timers { until, fired } => {
                // On what is committed: after the group before them.
                if let Some(task) = committing.take() {
                    settle(task).await;
                }
                let _ = fired.send(
                    ingest
                        .engine
                        .fire_timers(&ingest.lane, until, Progress::none())
                        .await,
                );
                continue;
            }
        };
        let mut events = first.events.len();
        let mut group = vec![first];
        while events < max_events {
            match queue.try_recv() {
                Ok(Work::Submit(next)) => {
                    events += next.events.len();
                    group.push(next);
                }
                Ok(timers) => {
                    carried = Some(timers);
                    break;
                }
                Err(_) => break,
            }
        }
        let computed = ingest.compute(group).await;
        if let Some(task) = committing.take() {
            settle(task).await;
        }
        let Some((answered, computed)) = computed else {
            continue;
        };
        let task = {
            let ingest = ingest.clone();
            let to_publish = to_publish.clone();
            tokio::spawn(async move {
                let answered = answered;
                // Declared after `answered`: if the commit panics, this runs
                // before the requests' replies are dropped.
                let unwinding = Unanswered {
                    keys: answered.iter().filter_map(|(s, _)| s.key.clone()).collect(),
                    ingest: ingest.clone(),
                    armed: true,
                };
                let result = ingest.engine.commit(&ingest.lane, computed).await;
                unwinding.disarm();
                match result {
                    // Durable: answer, then publish.
                    Ok(committed) => {
                        ingest.answer(answered, Ok(()));
                        let _ = to_publish.send(committed).await;
                    }
                    Err(error) => ingest.answer(answered, Err(error.into())),
                }
            })
        };
        committing = Some(task);
    }
    if let Some(timers) = timers {
        timers.abort();
    }
    if let Some(task) = committing.take() {
        settle(task).await;
    }
    // Requests of tenants run apart are answered once their parts commit.
    if let Some(ingest) = ingest.upgrade() {
        ingest.engine.settle(&ingest.lane).await;
    }
    drop(to_publish);
    if let Err(error) = publisher.await {
        tracing::error!(%error, "publishing alerts failed; they stay in the outbox");
    }
}

async fn settle(task: JoinHandle<()>) {
    if let Err(error) = task.await {
        tracing::error!(%error, "committing a batch failed; its requests were not applied");
    }
}

/// A group whose commit panicked: its requests get no answer (their
/// replies are dropped, which answers "not applied, retry"). Free their
/// keys, answer the retries waiting on them, and let the lane start over
/// from the store, which the commit may or may not have changed.
struct Unanswered {
    ingest: Arc<HttpIngest>,
    keys: Vec<String>,
    armed: bool,
}

impl Unanswered {
    /// The commit returned: its requests are answered as usual.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.ingest.lane.reset();
        let mut inflight = self.ingest.inflight.lock().expect("inflight lock");
        for key in &self.keys {
            for reply in inflight.remove(key).map(|i| i.waiting).unwrap_or_default() {
                let _ = reply.send(Err(Refusal::NotApplied("processing failed".to_owned())));
            }
        }
    }
}
