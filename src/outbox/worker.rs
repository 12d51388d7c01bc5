//! The delivery worker: a tokio task that takes due partitions from its [`Schedule`], POSTs
//! their Bundles (up to `max_in_flight` partitions at once, one request per partition at a
//! time), and records the outcomes. Each turn of its loop is one blocking step on the
//! worker's own connection: record every request that finished since the last turn (one
//! transaction, one fsync), schedule those partitions' next heads, learn of newly queued
//! rows, and take the next due partitions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::{Attempt, Client};
use super::config::{OrderBy, Settings};
use super::policy::{self, Verdict};
use super::queue::{self, Batch, Outcome, Row};
use super::schedule::Schedule;
use super::Error;
use crate::telemetry::{self, Metrics};

/// How often an idle worker looks for rows nobody signalled.
pub const POLL: Duration = Duration::from_millis(200);
/// How often the gauges and the readiness figure are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// How often delivered rows past the retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per prune statement (short write transactions).
const PRUNE_CHUNK: usize = 5000;

/// What the pipeline needs to queue Bundles and wake the worker.
#[derive(Clone, Debug)]
pub struct Producer {
    order_by: OrderBy,
    wakeup: Arc<Notify>,
}

impl Producer {
    /// A producer that partitions by `order_by` and wakes nobody (tests, or a gateway whose
    /// worker runs elsewhere).
    pub fn detached(order_by: OrderBy) -> Producer {
        Producer { order_by, wakeup: Arc::new(Notify::new()) }
    }

    /// Queues a message's Bundle inside the pipeline's transaction; `sender` is MSH-3^MSH-4.
    /// Returns false when the message was already queued.
    pub fn enqueue(
        &self,
        transaction: &rusqlite::Transaction<'_>,
        message_id: i64,
        bundle: &Value,
        sender: &str,
    ) -> Result<bool, Error> {
        queue::enqueue(transaction, message_id, bundle, &queue::partition_key(bundle, sender, self.order_by))
    }

    /// Tells the worker that rows were committed.
    pub fn notify(&self) {
        self.wakeup.notify_one();
    }
}

/// The backlog figure readiness looks at.
#[derive(Debug)]
pub struct Status {
    oldest_pending_created_us: AtomicI64,
    degraded_after: Duration,
}

impl Status {
    /// `Some(reason)` when the oldest undelivered Bundle is older than `degraded_after_secs`.
    pub fn degraded(&self) -> Option<String> {
        let oldest = self.oldest_pending_created_us.load(Ordering::Relaxed);
        if oldest == 0 {
            return None;
        }
        let age = Duration::from_micros((telemetry::now_us() - oldest).max(0) as u64);
        (age > self.degraded_after).then(|| {
            format!(
                "aggregator push is behind: the oldest undelivered Bundle is {} s old (threshold {} s)",
                age.as_secs(),
                self.degraded_after.as_secs()
            )
        })
    }
}

/// Handle of the running worker.
pub struct Outbox {
    stop: CancellationToken,
    wakeup: Arc<Notify>,
    reload: Arc<AtomicBool>,
    status: Arc<Status>,
    order_by: OrderBy,
    drain_within: Duration,
    task: tokio::task::JoinHandle<()>,
}

/// Tells the worker that an operator made rows pending again: they may sit before the
/// heads it knows, so it rebuilds its schedule from the table.
#[derive(Clone, Debug)]
pub struct RequeueSignal {
    reload: Arc<AtomicBool>,
    wakeup: Arc<Notify>,
}

impl RequeueSignal {
    /// Rows were requeued.
    pub fn requeued(&self) {
        self.reload.store(true, Ordering::Release);
        self.wakeup.notify_one();
    }
}

struct Shared {
    client: Client,
    database: Arc<Mutex<Local>>,
    metrics: Arc<Metrics>,
    settings: Settings,
}

/// The worker's connection and the schedule read through it.
struct Local {
    connection: Connection,
    schedule: Schedule,
}

async fn with_database<T: Send + 'static>(
    database: &Arc<Mutex<Local>>,
    work: impl FnOnce(&mut Local) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let database = database.clone();
    tokio::task::spawn_blocking(move || {
        let mut local = database.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&mut local)
    })
    .await
    .map_err(|_| Error::Task)?
}

impl Outbox {
    /// Builds the client (reads TLS files and credentials), opens a connection and starts
    /// the worker task. Needs a tokio runtime.
    pub fn start(database: &Path, settings: Settings, metrics: Arc<Metrics>) -> Result<Outbox, Error> {
        let client = Client::build(&settings)?;
        let connection = crate::db::open(database)?;
        let status =
            Arc::new(Status { oldest_pending_created_us: AtomicI64::new(0), degraded_after: settings.degraded_after });
        let stop = CancellationToken::new();
        let wakeup = Arc::new(Notify::new());
        let reload = Arc::new(AtomicBool::new(false));
        let order_by = settings.order_by;
        let drain_within = settings.timeout * 2 + Duration::from_secs(5);
        let local = Local { connection, schedule: Schedule::new() };
        let shared = Arc::new(Shared { client, database: Arc::new(Mutex::new(local)), metrics, settings });
        let signals = Signals { stop: stop.clone(), wakeup: wakeup.clone(), reload: reload.clone() };
        let task = tokio::spawn(run(shared, signals, status.clone()));
        tracing::info!("aggregator push started");
        Ok(Outbox { stop, wakeup, reload, status, order_by, drain_within, task })
    }

    /// The producer the pipeline queues with.
    pub fn producer(&self) -> Producer {
        Producer { order_by: self.order_by, wakeup: self.wakeup.clone() }
    }

    /// The readiness figure.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// What the admin API calls after requeueing rows.
    pub fn requeue_signal(&self) -> RequeueSignal {
        RequeueSignal { reload: self.reload.clone(), wakeup: self.wakeup.clone() }
    }

    /// Stops picking new work, lets in-flight requests finish (or time out) and waits.
    pub async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(self.drain_within, &mut task).await.is_err() {
            tracing::warn!("aggregator push did not stop in time; abandoning in-flight requests");
            task.abort();
        }
    }
}

struct Signals {
    stop: CancellationToken,
    wakeup: Arc<Notify>,
    reload: Arc<AtomicBool>,
}

/// What a delivery task hands back to the loop.
struct Finished {
    partition_key: String,
    /// The outcome to record; `None` when the task recorded its rows itself (a refused
    /// merged request retried message by message) or failed.
    sent: Option<Sent>,
}

struct Sent {
    outcome: Outcome,
    /// Creation times of delivered rows, for the latency histogram.
    created_at_us: Vec<i64>,
}

/// What one turn's blocking step decided.
struct Turn {
    batches: Vec<Batch>,
    delivered_created_at_us: Vec<i64>,
    next_due_us: Option<i64>,
}

async fn run(shared: Arc<Shared>, signals: Signals, status: Arc<Status>) {
    let mut tasks: JoinSet<Finished> = JoinSet::new();
    let mut busy: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut finished: Vec<Finished> = Vec::new();
    let mut gauges_at = Instant::now() - GAUGES_EVERY;
    let mut pruned_at = Instant::now() - PRUNE_EVERY;
    let max_in_flight = shared.settings.max_in_flight;
    loop {
        let capacity = max_in_flight.saturating_sub(tasks.len());
        let reload = signals.reload.swap(false, Ordering::AcqRel);
        let turn = turn(&shared, std::mem::take(&mut finished), capacity, reload).await;
        for batch in turn.batches {
            let key = batch.partition_key.clone();
            let handle = tasks.spawn(deliver(shared.clone(), batch));
            busy.insert(handle.id(), key);
        }
        if gauges_at.elapsed() >= GAUGES_EVERY {
            gauges_at = Instant::now();
            refresh_gauges(&shared, &status).await;
        }
        if pruned_at.elapsed() >= PRUNE_EVERY {
            pruned_at = Instant::now();
            prune(&shared).await;
        }
        let pause = match turn.next_due_us {
            Some(due_us) => {
                Duration::from_micros((due_us - telemetry::now_us()).clamp(1_000, POLL.as_micros() as i64) as u64)
            }
            None => POLL,
        };
        tokio::select! {
            _ = signals.stop.cancelled() => break,
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                finished.push(joined_task(joined, &mut busy));
                while let Some(joined) = tasks.try_join_next_with_id() {
                    finished.push(joined_task(joined, &mut busy));
                }
            }
            _ = signals.wakeup.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    // Shutdown: no new requests; in-flight ones finish or reach their timeout (the caller
    // bounds the wait) and are recorded. Unsent rows stay pending for the next start.
    while let Some(joined) = tasks.join_next_with_id().await {
        finished.push(joined_task(joined, &mut busy));
    }
    turn(&shared, finished, 0, false).await;
    refresh_gauges(&shared, &status).await;
    tracing::info!("aggregator push stopped");
}

fn joined_task(
    joined: Result<(tokio::task::Id, Finished), tokio::task::JoinError>,
    busy: &mut HashMap<tokio::task::Id, String>,
) -> Finished {
    match joined {
        Ok((id, finished)) => {
            busy.remove(&id);
            finished
        }
        Err(error) => {
            tracing::error!(error = %error, "outbox delivery task failed; its rows stay pending");
            Finished { partition_key: busy.remove(&error.id()).unwrap_or_default(), sent: None }
        }
    }
}

/// One blocking step: record what finished, schedule those partitions again, learn of new
/// rows and take up to `capacity` due partitions.
async fn turn(shared: &Shared, finished: Vec<Finished>, capacity: usize, reload: bool) -> Turn {
    let max_messages = shared.settings.max_bundle_messages;
    let now_us = telemetry::now_us();
    let stepped = with_database(&shared.database, move |local| {
        let mut outcomes = Vec::new();
        let mut delivered_created_at_us = Vec::new();
        let mut keys = Vec::with_capacity(finished.len());
        for done in finished {
            if let Some(sent) = done.sent {
                if matches!(sent.outcome, Outcome::Delivered { .. }) {
                    delivered_created_at_us.extend(sent.created_at_us);
                }
                outcomes.push(sent.outcome);
            }
            keys.push(done.partition_key);
        }
        let Local { connection, schedule } = local;
        if let Err(error) = queue::record(connection, &outcomes) {
            // The rows stay pending and are sent again: harmless, the PUTs are idempotent.
            tracing::error!(error = %error, requests = outcomes.len(), "cannot record delivery outcomes");
            delivered_created_at_us.clear();
        }
        for key in &keys {
            if let Err(error) = schedule.finished(connection, key) {
                tracing::error!(error = %error, "cannot look up a partition's next Bundle");
                schedule.abandon(key);
            }
        }
        if reload {
            schedule.invalidate();
        }
        let batches = match schedule.refresh(connection) {
            Ok(()) if capacity > 0 => schedule.take(connection, capacity, max_messages, now_us),
            Ok(()) => Ok(Vec::new()),
            Err(error) => Err(error),
        }
        .unwrap_or_else(|error| {
            tracing::error!(error = %error, "outbox schedule failed; rebuilding it");
            schedule.invalidate();
            Vec::new()
        });
        Ok(Turn { batches, delivered_created_at_us, next_due_us: schedule.next_due_us() })
    })
    .await;
    match stepped {
        Ok(turn) => {
            count_delivered(&shared.metrics, &turn.delivered_created_at_us, now_us);
            turn
        }
        Err(error) => {
            tracing::error!(error = %error, "outbox worker step failed");
            Turn { batches: Vec::new(), delivered_created_at_us: Vec::new(), next_due_us: None }
        }
    }
}

/// Counts recorded deliveries and their queue-to-delivery latency.
fn count_delivered(metrics: &Metrics, created_at_us: &[i64], now_us: i64) {
    metrics.outbox_deliveries.inc_by(created_at_us.len() as u64);
    for created in created_at_us {
        metrics.outbox_delivery_latency.observe((now_us - created).max(0) as f64 / 1e6);
    }
}

async fn refresh_gauges(shared: &Shared, status: &Status) {
    match with_database(&shared.database, |local| queue::backlog(&local.connection)).await {
        Ok((depth, oldest)) => {
            shared.metrics.outbox_depth.set(depth);
            let oldest = oldest.unwrap_or(0);
            status.oldest_pending_created_us.store(oldest, Ordering::Relaxed);
            let age = if oldest == 0 { 0 } else { (telemetry::now_us() - oldest).max(0) / 1_000_000 };
            shared.metrics.outbox_oldest_undelivered_seconds.set(age);
        }
        Err(error) => tracing::error!(error = %error, "outbox backlog query failed"),
    }
}

async fn prune(shared: &Shared) {
    let cutoff_us = telemetry::now_us() - shared.settings.retention.as_micros().min(i64::MAX as u128) as i64;
    loop {
        match with_database(&shared.database, move |local| queue::prune(&local.connection, cutoff_us, PRUNE_CHUNK))
            .await
        {
            Ok(count) if count == PRUNE_CHUNK => continue,
            Ok(count) => {
                if count > 0 {
                    tracing::info!(rows = count, "pruned delivered outbox rows past the retention");
                }
                break;
            }
            Err(error) => {
                tracing::error!(error = %error, "outbox prune failed");
                break;
            }
        }
    }
}

/// The request body and id of some rows: one row as stored, several merged.
fn request_of(rows: &[Row]) -> Result<(bytes::Bytes, String), String> {
    let first = rows.first().map_or(0, |row| row.id);
    let last = rows.last().map_or(0, |row| row.id);
    if rows.len() == 1 {
        return Ok((bytes::Bytes::from(rows[0].bundle.clone()), format!("hl7gw-outbox-{first}")));
    }
    let mut bundles = Vec::with_capacity(rows.len());
    for row in rows {
        bundles.push(
            serde_json::from_str::<Value>(&row.bundle).map_err(|_| format!("outbox row {} is not JSON", row.id))?,
        );
    }
    let id = format!("hl7gw-outbox-{first}-{last}");
    let merged = policy::merge(&bundles, &id);
    Ok((bytes::Bytes::from(merged.to_string()), id))
}

async fn send(shared: &Shared, rows: &[Row]) -> Attempt {
    match request_of(rows) {
        Ok((body, request_id)) => shared.client.post(&body, &request_id).await,
        Err(error) => {
            Attempt { verdict: Verdict::Reject, status: None, error, retry_after: None, response: String::new() }
        }
    }
}

async fn deliver(shared: Arc<Shared>, batch: Batch) -> Finished {
    let attempt = send(&shared, &batch.rows).await;
    if attempt.verdict == Verdict::Reject && batch.rows.len() > 1 {
        // One refused message must not take the others down with it: send them one by one,
        // recording each before the next (a retry stops the partition there).
        for row in &batch.rows {
            let single = send(&shared, std::slice::from_ref(row)).await;
            let stop = single.verdict == Verdict::Retry;
            let sent = outcome_of(&shared, &batch.partition_key, std::slice::from_ref(row), single);
            let delivered = matches!(sent.outcome, Outcome::Delivered { .. });
            let outcome = sent.outcome;
            let recorded =
                with_database(&shared.database, move |local| queue::record(&local.connection, &[outcome])).await;
            match recorded {
                Ok(()) if delivered => count_delivered(&shared.metrics, &[row.created_at_us], telemetry::now_us()),
                Ok(()) => {}
                Err(error) => {
                    tracing::error!(outbox = row.id, error = %error, "cannot record the delivery outcome");
                    break;
                }
            }
            if stop {
                break;
            }
        }
        return Finished { partition_key: batch.partition_key, sent: None };
    }
    let sent = outcome_of(&shared, &batch.partition_key, &batch.rows, attempt);
    Finished { partition_key: batch.partition_key, sent: Some(sent) }
}

/// The outcome to record for `rows` after `attempt`; logs failures and counts retries and
/// dead letters (deliveries are counted once recorded).
fn outcome_of(shared: &Shared, partition_key: &str, rows: &[Row], attempt: Attempt) -> Sent {
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    let first = ids.first().copied().unwrap_or(0);
    let partition = queue::partition_hash(partition_key);
    let now_us = telemetry::now_us();
    let metrics = &shared.metrics;
    let status_code = attempt.status;
    let outcome = match attempt.verdict {
        Verdict::Delivered => {
            let code = status_code.unwrap_or(200);
            tracing::debug!(outbox = first, messages = ids.len(), partition = %partition, status = code, "delivered");
            Outcome::Delivered { ids, status_code: code, response: attempt.response, now_us }
        }
        Verdict::Retry => {
            let failures = rows.first().map_or(1, |row| row.attempts + 1).clamp(1, i64::from(u32::MAX)) as u32;
            let mut delay = policy::backoff(failures, shared.settings.initial_backoff, shared.settings.max_backoff);
            if let Some(retry_after) = attempt.retry_after {
                delay = delay.max(retry_after);
            }
            let next_attempt_at_us = now_us + delay.as_micros().min(i64::MAX as u128 / 2) as i64;
            metrics.outbox_retries.inc();
            tracing::warn!(
                outbox = first, messages = ids.len(), partition = %partition, status = ?status_code,
                error = %attempt.error, retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry"
            );
            Outcome::Retry { ids, status_code, error: attempt.error, next_attempt_at_us }
        }
        Verdict::Reject => {
            metrics.outbox_dead_letters.inc_by(ids.len() as u64);
            tracing::warn!(
                outbox = first, messages = ids.len(), partition = %partition, status = ?status_code,
                error = %attempt.error, "aggregator refused the Bundle; dead-lettered (see /admin/outbox?status=dead)"
            );
            Outcome::Dead {
                ids,
                status_code: status_code.unwrap_or(0),
                error: attempt.error,
                response: attempt.response,
            }
        }
    };
    Sent { outcome, created_at_us: rows.iter().map(|row| row.created_at_us).collect() }
}
