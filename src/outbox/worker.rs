//! The delivery worker: a tokio task that picks due partitions, POSTs their Bundles (up to
//! `max_in_flight` partitions at once, one request per partition at a time), and records
//! each outcome. SQLite work runs on blocking threads with the worker's own connection.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
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
use super::queue::{self, Batch, Row};
use super::Error;
use crate::telemetry::{self, Metrics};

/// How often an idle worker looks for due rows nobody signalled (retries, requeues).
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
    status: Arc<Status>,
    order_by: OrderBy,
    drain_within: Duration,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    client: Client,
    database: Arc<Mutex<Connection>>,
    metrics: Arc<Metrics>,
    settings: Settings,
}

async fn with_database<T: Send + 'static>(
    database: &Arc<Mutex<Connection>>,
    work: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let database = database.clone();
    tokio::task::spawn_blocking(move || {
        let connection = database.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&connection)
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
        let order_by = settings.order_by;
        let drain_within = settings.timeout * 2 + Duration::from_secs(5);
        let shared = Arc::new(Shared { client, database: Arc::new(Mutex::new(connection)), metrics, settings });
        let task = tokio::spawn(run(shared, stop.clone(), wakeup.clone(), status.clone()));
        tracing::info!("aggregator push started");
        Ok(Outbox { stop, wakeup, status, order_by, drain_within, task })
    }

    /// The producer the pipeline queues with.
    pub fn producer(&self) -> Producer {
        Producer { order_by: self.order_by, wakeup: self.wakeup.clone() }
    }

    /// The readiness figure.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Wakes the worker (after an operator requeue).
    pub fn wakeup(&self) -> Arc<Notify> {
        self.wakeup.clone()
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

async fn run(shared: Arc<Shared>, stop: CancellationToken, wakeup: Arc<Notify>, status: Arc<Status>) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut busy: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut gauges_at = Instant::now() - GAUGES_EVERY;
    let mut pruned_at = Instant::now() - PRUNE_EVERY;
    let max_in_flight = shared.settings.max_in_flight;
    let max_messages = shared.settings.max_bundle_messages;
    loop {
        let capacity = max_in_flight.saturating_sub(tasks.len());
        if capacity > 0 {
            let busy_keys: HashSet<String> = busy.values().cloned().collect();
            let now_us = telemetry::now_us();
            let picked = with_database(&shared.database, move |connection| {
                queue::pick(connection, &busy_keys, capacity, max_messages, now_us)
            })
            .await;
            match picked {
                Ok(batches) => {
                    for batch in batches {
                        let key = batch.partition_key.clone();
                        let handle = tasks.spawn(deliver(shared.clone(), batch));
                        busy.insert(handle.id(), key);
                    }
                }
                Err(error) => tracing::error!(error = %error, "outbox pick failed"),
            }
        }
        if gauges_at.elapsed() >= GAUGES_EVERY {
            gauges_at = Instant::now();
            refresh_gauges(&shared, &status).await;
        }
        if pruned_at.elapsed() >= PRUNE_EVERY {
            pruned_at = Instant::now();
            prune(&shared).await;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match joined {
                    Ok((id, ())) => id,
                    Err(error) => {
                        tracing::error!(error = %error, "outbox delivery task failed");
                        error.id()
                    }
                };
                busy.remove(&id);
            }
            _ = wakeup.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    // Shutdown: no new picks; in-flight requests finish or reach their timeout (the
    // caller bounds the wait). Unsent rows stay pending for the next start.
    while tasks.join_next().await.is_some() {}
    refresh_gauges(&shared, &status).await;
    tracing::info!("aggregator push stopped");
}

async fn refresh_gauges(shared: &Shared, status: &Status) {
    match with_database(&shared.database, queue::backlog).await {
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
        match with_database(&shared.database, move |connection| queue::prune(connection, cutoff_us, PRUNE_CHUNK)).await
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

async fn deliver(shared: Arc<Shared>, batch: Batch) {
    let attempt = send(&shared, &batch.rows).await;
    if attempt.verdict == Verdict::Reject && batch.rows.len() > 1 {
        // One refused message must not take the others down with it: send them one by one.
        for row in &batch.rows {
            let single = send(&shared, std::slice::from_ref(row)).await;
            let stop = single.verdict == Verdict::Retry;
            record(&shared, &batch.partition_key, std::slice::from_ref(row), single).await;
            if stop {
                break;
            }
        }
        return;
    }
    record(&shared, &batch.partition_key, &batch.rows, attempt).await;
}

async fn record(shared: &Shared, partition_key: &str, rows: &[Row], attempt: Attempt) {
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    let first = ids.first().copied().unwrap_or(0);
    let partition = queue::partition_hash(partition_key);
    let now_us = telemetry::now_us();
    let metrics = &shared.metrics;
    let status_code = attempt.status;
    let recorded = match attempt.verdict {
        Verdict::Delivered => {
            let response = attempt.response;
            let code = status_code.unwrap_or(200);
            let result = with_database(&shared.database, {
                let ids = ids.clone();
                move |connection| queue::mark_delivered(connection, &ids, code, &response, now_us)
            })
            .await;
            if result.is_ok() {
                metrics.outbox_deliveries.inc_by(ids.len() as u64);
                for row in rows {
                    metrics.outbox_delivery_latency.observe((now_us - row.created_at_us).max(0) as f64 / 1e6);
                }
                tracing::debug!(outbox = first, messages = ids.len(), partition = %partition, status = code, "delivered");
            }
            result
        }
        Verdict::Retry => {
            let failures = rows.first().map_or(1, |row| row.attempts + 1).clamp(1, i64::from(u32::MAX)) as u32;
            let mut delay = policy::backoff(failures, shared.settings.initial_backoff, shared.settings.max_backoff);
            if let Some(retry_after) = attempt.retry_after {
                delay = delay.max(retry_after);
            }
            let next_us = now_us + delay.as_micros().min(i64::MAX as u128 / 2) as i64;
            metrics.outbox_retries.inc();
            tracing::warn!(
                outbox = first, messages = ids.len(), partition = %partition, status = ?status_code,
                error = %attempt.error, retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry"
            );
            let error = attempt.error;
            with_database(&shared.database, {
                let ids = ids.clone();
                move |connection| queue::mark_retry(connection, &ids, status_code, &error, next_us)
            })
            .await
        }
        Verdict::Reject => {
            metrics.outbox_dead_letters.inc_by(ids.len() as u64);
            tracing::warn!(
                outbox = first, messages = ids.len(), partition = %partition, status = ?status_code,
                error = %attempt.error, "aggregator refused the Bundle; dead-lettered (see /admin/outbox?status=dead)"
            );
            let (error, response) = (attempt.error, attempt.response);
            with_database(&shared.database, {
                let ids = ids.clone();
                move |connection| queue::mark_dead(connection, &ids, status_code.unwrap_or(0), &error, &response)
            })
            .await
        }
    };
    if let Err(error) = recorded {
        // The rows stay pending and are sent again: harmless, the PUTs are idempotent.
        tracing::error!(outbox = first, error = %error, "cannot record the delivery outcome");
    }
}
