//! The processing pipeline, the one module that knows the whole flow: journal row →
//! decode → parse → map → store, then the message's outcome recorded in the journal.
//!
//! # Design
//! - **One worker thread** owns the store's write connection. It reads the oldest
//!   `accepted` journal rows (up to [`BATCH`]), converts them (in parallel, conversion is
//!   pure), then applies the results **in journal order** in one store transaction: each
//!   Bundle entry is put into the store and the Bundle queued for the aggregator. After that
//!   commit, each row becomes `processed` (with its conversion report) or `failed` (with the
//!   error) through the journal's writer (the journal file's only writer). Journal order is
//!   arrival order, so each sender's messages are applied in the order they were sent: an
//!   A08 after an A01 updates the Patient the A01 created.
//! - **Second to the ACKs.** The worker and its conversion threads run at a lower CPU
//!   priority ([`PRIORITY`]) than the MLLP listener and the journal writer. During an
//!   inbound burst (more than [`BUSY_INBOUND_PER_SECOND`] messages stored per second) the
//!   worker also holds back its batches, whose store writes and journal updates would share
//!   the disk with the ACKs' commits, for at most [`MAX_DEFER`] of conversion lag (a burst
//!   ends after [`QUIET_HOLD`] below that rate). Senders
//!   get their ACKs first; the backlog (`hl7gw_pipeline_backlog`, `/admin/messages/stats`)
//!   is converted as the burst ends. A feed of ordinary rate (tens of messages per second)
//!   is converted as it arrives.
//! - **Crash safety.** A crash before the store commit leaves the rows `accepted`; a crash
//!   between the store commit and the journal's leaves them `accepted` with their resources
//!   stored. Either way they are converted again at the next start: putting an unchanged
//!   resource writes nothing and a message is queued for the aggregator once, so the repeat
//!   is harmless.
//! - **Failures stay with the message.** A message that cannot be decoded, parsed or mapped
//!   is `failed` with the reason. After the mapping is fixed (and reloaded), an operator
//!   requeues it ([`requeue`], via `/admin` or the `messages reprocess` command).
//! - **Wake-ups.** The journal signals after each commit; without a signal the worker looks
//!   again every [`IDLE_POLL`], so rows requeued by another process are picked up too.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::hl7::charset::Charset;
use crate::journal::Journal;
use crate::mapping::{ConvertError, Converted, Engine};
use crate::outbox::Producer;
use crate::store::{self, StoreError};
use crate::telemetry::{self, Metrics};

/// Most messages converted and committed together. Small enough that the write lock is
/// held only for a few milliseconds, so the journal (whose commits gate ACKs) rarely waits.
pub const BATCH: usize = 16;
/// Inbound rate (messages stored per second) above which the journal counts as busy and
/// the worker waits before its next batch, so that a burst is ACKed at full speed.
pub const BUSY_INBOUND_PER_SECOND: u64 = 500;
/// The longest the worker waits for a busy journal: once the oldest unconverted message is
/// this old, it converts whatever the inbound rate.
pub const MAX_DEFER: Duration = Duration::from_secs(30);
/// How often a waiting worker looks at the inbound rate again.
const DEFER_PROBE: Duration = Duration::from_millis(50);
/// A burst counts as over only after this long below [`BUSY_INBOUND_PER_SECOND`]: senders
/// pause between batches and reconnect, and a batch converted in such a gap holds the
/// disk and a core while the burst goes on. Measured (the Python load generator, 8
/// connections, three runs of 20,000 with short pauses between them): without the hold,
/// the pipeline used 10.5 µs of CPU per message received during the runs, against 0.5 in
/// one run without pauses.
pub const QUIET_HOLD: Duration = Duration::from_secs(1);
/// The worker's nice value (Linux): 10 gives it about a tenth of a core that the MLLP
/// listener and journal writer (nice 0) also want, and all of an idle one.
pub const PRIORITY: i32 = 10;
/// How often an idle worker looks for requeued messages nobody signalled.
pub const IDLE_POLL: Duration = Duration::from_millis(500);
/// Wait after a failed store transaction before trying the batch again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Pipeline errors (all from the database; conversion failures are a message's outcome).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite refused an operation.
    #[error("pipeline: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store refused a write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database could not be opened.
    #[error(transparent)]
    Open(#[from] crate::db::Error),
    /// The outbox refused a Bundle.
    #[error(transparent)]
    Outbox(#[from] crate::outbox::Error),
    /// The journal did not record the outcomes (they are recorded when the batch is retried).
    #[error("pipeline: recording outcomes in the journal: {0}")]
    Journal(crate::journal::Error),
    /// The worker thread could not be started.
    #[error("cannot start the pipeline thread: {0}")]
    Thread(std::io::Error),
}

/// Statuses a journal row moves through after `accepted`.
pub mod status {
    /// Stored, waiting for the pipeline.
    pub const ACCEPTED: &str = "accepted";
    /// Converted; its resources are in the store.
    pub const PROCESSED: &str = "processed";
    /// Could not be converted; `error` says why.
    pub const FAILED: &str = "failed";
    /// Answered with a NAK at ingest; never processed.
    pub const REFUSED: &str = "refused";
}

/// A wake-up signal from the journal (or the admin API) to the worker.
#[derive(Default)]
pub struct Wakeup {
    pending: Mutex<bool>,
    condition: Condvar,
}

impl Wakeup {
    /// Signals that there may be work.
    pub fn wake(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *pending = true;
        self.condition.notify_one();
    }

    /// Waits for a signal or `timeout`, whichever comes first.
    fn wait(&self, timeout: Duration) {
        let pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut pending, _) = self
            .condition
            .wait_timeout_while(pending, timeout, |pending| !*pending)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *pending = false;
    }
}

/// The mappings in use; replaced as a whole when an operator reloads them.
pub type SharedEngine = Arc<RwLock<Arc<Engine>>>;

/// Handle to the running worker.
pub struct Pipeline {
    wakeup: Arc<Wakeup>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pipeline {
    /// Opens a write connection to the store database at `store` and starts the worker,
    /// which reads `journal`'s file and records outcomes through its writer.
    /// `wakeup` is the signal the journal and the admin API raise when there is work.
    /// With `outbox`, each converted message's Bundle is queued for the aggregator in the
    /// transaction that stores its resources.
    pub fn start(
        store: &Path,
        journal: Journal,
        engine: SharedEngine,
        wakeup: Arc<Wakeup>,
        metrics: Arc<Metrics>,
        outbox: Option<Producer>,
    ) -> Result<Pipeline, Error> {
        let worker = Worker::open(store, journal, engine, metrics, wakeup.clone(), outbox)?;
        let stop = worker.stop.clone();
        let thread = std::thread::Builder::new()
            .name("pipeline".to_string())
            .spawn(move || worker.run())
            .map_err(Error::Thread)?;
        Ok(Pipeline { wakeup, stop, thread: Some(thread) })
    }

    /// The signal that makes the worker look for work now.
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    /// Stops the worker after the batch it is on and waits for it.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wakeup.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("pipeline worker panicked");
            }
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop_now();
    }
}

struct Worker {
    /// Write connection to the store.
    connection: Connection,
    /// Read connection to the journal.
    journal_reader: Connection,
    /// The journal's writer, which records outcomes.
    journal: Journal,
    engine: SharedEngine,
    metrics: Arc<Metrics>,
    wakeup: Arc<Wakeup>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    outbox: Option<Producer>,
}

/// A claimed journal row.
struct Claimed {
    id: i64,
    /// MSH-3^MSH-4, the outbox partition when the Bundle names no Patient.
    sender: String,
    received_at_us: i64,
    charset: String,
    raw: Vec<u8>,
    raw_truncated: bool,
}

/// Why a message failed, kept in the row's `error` column.
#[derive(Debug)]
enum Failure {
    Decode(String),
    Convert(ConvertError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Decode(reason) => write!(formatter, "cannot decode: {reason}"),
            Failure::Convert(error) => write!(formatter, "{error}"),
        }
    }
}

impl Failure {
    /// A label for metrics and logs that carries no message content.
    fn kind(&self) -> &'static str {
        match self {
            Failure::Decode(_) => "decode",
            Failure::Convert(ConvertError::Parse(_)) => "parse",
            Failure::Convert(ConvertError::Unrouted { .. }) => "unrouted",
            Failure::Convert(ConvertError::Invalid { .. }) => "invalid",
        }
    }
}

impl Worker {
    fn open(
        store: &Path,
        journal: Journal,
        engine: SharedEngine,
        metrics: Arc<Metrics>,
        wakeup: Arc<Wakeup>,
        outbox: Option<Producer>,
    ) -> Result<Worker, Error> {
        Ok(Worker {
            connection: crate::db::open(store)?,
            journal_reader: crate::db::open_journal(journal.path())?,
            journal,
            engine,
            metrics,
            wakeup,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            outbox,
        })
    }

    fn run(mut self) {
        crate::priority::lower(PRIORITY, "pipeline");
        let mut inbound = Inbound::new(self.journal.stored_count());
        while !self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            self.metrics.journal_log_backlog.set(self.journal.log_backlog());
            if inbound.busy(self.journal.stored_count()) && self.lag().is_some_and(|lag| lag < MAX_DEFER) {
                std::thread::sleep(DEFER_PROBE);
                continue;
            }
            match self.step() {
                Ok(0) => self.wakeup.wait(IDLE_POLL),
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(error = %error, "pipeline batch failed; retrying");
                    self.wakeup.wait(RETRY_PAUSE);
                }
            }
        }
    }

    /// Age of the oldest message waiting for conversion (`None`: none waits, or the journal
    /// could not be read, in which case the worker goes on and `step` reports the error).
    fn lag(&self) -> Option<Duration> {
        let oldest: Option<i64> = self
            .journal_reader
            .prepare_cached("SELECT received_at_us FROM messages WHERE status = 'accepted' ORDER BY id LIMIT 1")
            .and_then(|mut statement| statement.query_row([], |row| row.get(0)).optional())
            .ok()
            .flatten();
        oldest.map(|received| Duration::from_micros((telemetry::now_us() - received).max(0) as u64))
    }

    /// Claims, converts and stores one batch; returns how many messages it handled.
    fn step(&mut self) -> Result<usize, Error> {
        let claimed = claim(&self.journal_reader, BATCH)?;
        if claimed.is_empty() {
            self.metrics.pipeline_backlog.set(0);
            return Ok(0);
        }
        let engine = self.engine.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let outcomes = convert_all(&engine, &claimed);
        let now_us = telemetry::now_us();
        let transaction = self.connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut counts = Vec::with_capacity(claimed.len());
        for (message, outcome) in claimed.iter().zip(&outcomes) {
            counts.push(apply(&transaction, message, outcome, now_us, self.outbox.as_ref())?);
        }
        transaction.commit()?;
        if let Some(outbox) = &self.outbox {
            outbox.notify();
        }
        let recorded: Vec<Recorded> = claimed
            .iter()
            .zip(&outcomes)
            .map(|(message, outcome)| Recorded {
                id: message.id,
                outcome: match outcome {
                    Ok(ready) => Ok(serde_json::to_string(&ready.converted.report).unwrap_or_default()),
                    Err(failure) => Err(failure.to_string()),
                },
            })
            .collect();
        self.journal
            .apply_blocking(Box::new(move |journal| record(journal, &recorded, now_us)))
            .map_err(Error::Journal)?;
        for (message, (outcome, resources)) in claimed.iter().zip(outcomes.iter().zip(counts)) {
            let latency = (now_us - message.received_at_us).max(0) as f64 / 1e6;
            self.metrics.pipeline_latency.observe(latency);
            match outcome {
                Ok(_) => {
                    self.metrics.pipeline_messages.get_or_create(&outcome_label("processed")).inc();
                    tracing::debug!(message = message.id, resources, "message processed");
                }
                Err(failure) => {
                    self.metrics.pipeline_messages.get_or_create(&outcome_label(failure.kind())).inc();
                    if telemetry::log_phi() {
                        tracing::warn!(message = message.id, kind = failure.kind(), error = %failure, "message failed");
                    } else {
                        tracing::warn!(
                            message = message.id,
                            kind = failure.kind(),
                            "message failed; see /admin/messages"
                        );
                    }
                }
            }
        }
        let backlog: i64 =
            self.journal_reader
                .query_row("SELECT count(*) FROM messages WHERE status = 'accepted'", [], |row| row.get(0))?;
        self.metrics.pipeline_backlog.set(backlog);
        Ok(claimed.len())
    }
}

/// The journal's inbound rate, measured between the worker's looks at it.
struct Inbound {
    count: u64,
    at: Instant,
    /// The journal counts as busy until then: [`QUIET_HOLD`] after the last busy probe.
    busy_until: Option<Instant>,
}

impl Inbound {
    fn new(count: u64) -> Inbound {
        Inbound { count, at: Instant::now(), busy_until: None }
    }

    /// True while more than [`BUSY_INBOUND_PER_SECOND`] messages were stored per second over
    /// a measured interval (at least [`DEFER_PROBE`] long) that ended less than
    /// [`QUIET_HOLD`] ago.
    fn busy(&mut self, count: u64) -> bool {
        self.busy_at(count, Instant::now())
    }

    fn busy_at(&mut self, count: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        if elapsed >= DEFER_PROBE {
            let rate = count.saturating_sub(self.count) as f64 / elapsed.as_secs_f64();
            if rate > BUSY_INBOUND_PER_SECOND as f64 {
                self.busy_until = Some(now + QUIET_HOLD);
            }
            self.count = count;
            self.at = now;
        }
        self.busy_until.is_some_and(|until| now < until)
    }
}

fn outcome_label(outcome: &str) -> telemetry::OutcomeLabels {
    telemetry::OutcomeLabels { outcome: outcome.to_string() }
}

fn claim(connection: &Connection, limit: usize) -> Result<Vec<Claimed>, Error> {
    // A literal limit: a bound one makes SQLite (built with STAT4) re-plan at every execution.
    let mut statement = connection.prepare_cached(&format!(
        "SELECT id, received_at_us, charset, raw, raw_truncated, sending_application, sending_facility FROM messages
         WHERE status = 'accepted' ORDER BY id LIMIT {limit}"
    ))?;
    let rows = statement.query_map([], |row| {
        let application: String = row.get(5)?;
        let facility: String = row.get(6)?;
        Ok(Claimed {
            id: row.get(0)?,
            sender: format!("{application}^{facility}"),
            received_at_us: row.get(1)?,
            charset: row.get(2)?,
            raw: row.get(3)?,
            raw_truncated: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Converts every claimed message; on two or more cores, in parallel chunks.
/// A converted message with each entry's resource prepared for the store (hash and index
/// rows computed here, outside the write transaction); `None` for entries without one.
struct Ready {
    converted: Converted,
    prepared: Vec<Option<store::Prepared>>,
}

fn convert_all(engine: &Engine, claimed: &[Claimed]) -> Vec<Result<Ready, Failure>> {
    let workers = std::thread::available_parallelism().map_or(1, |count| count.get()).min(4);
    if workers <= 1 || claimed.len() < 4 {
        return claimed.iter().map(|message| convert_one(engine, message)).collect();
    }
    let chunk = claimed.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = claimed
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || part.iter().map(|message| convert_one(engine, message)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                // Conversion does not panic on input (the engine is tested on fuzz inputs); a
                // panic here is a bug, and re-raising it stops the worker loudly.
                handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

fn convert_one(engine: &Engine, message: &Claimed) -> Result<Ready, Failure> {
    if message.raw_truncated {
        return Err(Failure::Decode("only the start of an oversize frame was kept".to_string()));
    }
    let charset = Charset::from_name(&message.charset)
        .ok_or_else(|| Failure::Decode(format!("unknown character set {}", message.charset)))?;
    let text = charset.decode(&message.raw).map_err(|error| Failure::Decode(error.to_string()))?;
    let converted = engine.convert(&text).map_err(Failure::Convert)?;
    let prepared = entries(&converted)
        .map(|entry| match (method_of(entry), entry.get("resource")) {
            ("DELETE", _) | (_, None) => None,
            (_, Some(resource)) => Some(store::prepare(resource)),
        })
        .collect();
    Ok(Ready { converted, prepared })
}

fn entries(converted: &Converted) -> impl Iterator<Item = &Value> {
    converted.bundle.get("entry").and_then(Value::as_array).into_iter().flatten()
}

fn method_of(entry: &Value) -> &str {
    entry.pointer("/request/method").and_then(Value::as_str).unwrap_or("PUT")
}

/// Stores one converted message's resources and queues its Bundle; returns the number of
/// resources stored. A failed message writes nothing to the store.
fn apply(
    transaction: &rusqlite::Transaction<'_>,
    message: &Claimed,
    outcome: &Result<Ready, Failure>,
    now_us: i64,
    outbox: Option<&Producer>,
) -> Result<usize, Error> {
    match outcome {
        Ok(Ready { converted, prepared }) => {
            let mut stored = 0;
            for (entry, prepared) in entries(converted).zip(prepared) {
                match (method_of(entry), entry.get("resource")) {
                    ("DELETE", _) => {
                        let url = entry.pointer("/request/url").and_then(Value::as_str).unwrap_or("");
                        if let Some((resource_type, id)) = url.split_once('/') {
                            store::delete(transaction, resource_type, id, now_us, Some(message.id))?;
                        }
                    }
                    (_, Some(resource)) => {
                        match prepared {
                            Some(prepared) => {
                                store::put_prepared(transaction, resource, prepared, now_us, Some(message.id))?
                            }
                            None => store::put(transaction, resource, now_us, Some(message.id))?,
                        };
                        stored += 1;
                    }
                    (_, None) => {}
                }
            }
            if let Some(outbox) = outbox {
                outbox.enqueue(transaction, message.id, &converted.bundle, &message.sender)?;
            }
            Ok(stored)
        }
        Err(_) => Ok(0),
    }
}

/// A message's outcome, to be written to its journal row.
struct Recorded {
    id: i64,
    /// The conversion report (JSON), or why the message failed.
    outcome: Result<String, String>,
}

/// Writes outcomes to their journal rows (run by the journal's writer).
fn record(journal: &Connection, recorded: &[Recorded], now_us: i64) -> rusqlite::Result<()> {
    let mut processed = journal.prepare_cached(
        "UPDATE messages SET status = 'processed', error = NULL, report = ?2,
            processed_at_us = ?3, attempts = attempts + 1 WHERE id = ?1",
    )?;
    let mut failed = journal.prepare_cached(
        "UPDATE messages SET status = 'failed', error = ?2, report = NULL,
            processed_at_us = ?3, attempts = attempts + 1 WHERE id = ?1",
    )?;
    for row in recorded {
        match &row.outcome {
            Ok(report) => processed.execute(params![row.id, report, now_us])?,
            Err(error) => failed.execute(params![row.id, error, now_us])?,
        };
    }
    Ok(())
}

/// Which messages [`requeue`] moves back to `accepted`.
#[derive(Clone, Debug)]
pub enum Requeue {
    /// These journal rows (when `failed` or `processed`).
    Ids(Vec<i64>),
    /// Every `failed` row.
    AllFailed,
}

/// Moves messages back to `accepted` so that the pipeline converts them again (after a
/// mapping fix). Refused messages are never requeued. Returns the number requeued.
pub fn requeue(connection: &Connection, which: &Requeue) -> Result<usize, Error> {
    let changed = match which {
        Requeue::AllFailed => {
            connection.execute("UPDATE messages SET status = 'accepted' WHERE status = 'failed'", [])?
        }
        Requeue::Ids(ids) => {
            let mut statement = connection.prepare_cached(
                "UPDATE messages SET status = 'accepted' WHERE id = ?1 AND status IN ('failed', 'processed')",
            )?;
            let mut changed = 0;
            for id in ids {
                changed += statement.execute([id])?;
            }
            changed
        }
    };
    Ok(changed)
}

/// A journal row as operators see it (`/admin/messages`, `messages list`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MessageSummary {
    /// Journal row id.
    pub id: i64,
    /// Receive time, RFC 3339.
    pub received_at: String,
    /// Remote address.
    pub peer: String,
    /// MSH-3^MSH-4.
    pub sender: String,
    /// MSH-9.
    pub message_type: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-12.
    pub version: String,
    /// accepted, processed, failed, refused.
    pub status: String,
    /// MSA-1 sent.
    pub ack_code: String,
    /// Why it failed or was refused.
    pub error: Option<String>,
    /// Times it was processed.
    pub attempts: i64,
    /// Times a duplicate of it arrived.
    pub duplicates: i64,
}

/// One row in full: the summary, the raw message (as decoded text) and the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MessageDetail {
    /// The row's summary.
    #[serde(flatten)]
    pub summary: MessageSummary,
    /// The message text, decoded by its character set (segments separated by `\r`).
    pub raw: String,
    /// The ACK sent, as text.
    pub ack: String,
    /// The conversion report of the last successful processing.
    pub report: Option<Value>,
}

/// Filter of [`list_messages`].
#[derive(Clone, Debug, Default)]
pub struct MessageFilter {
    /// Only rows with this status.
    pub status: Option<String>,
    /// Only rows with id below this (paging backwards from the newest).
    pub before_id: Option<i64>,
    /// Page size.
    pub limit: usize,
}

const SUMMARY_COLUMNS: &str = "id, received_at_us, peer, sending_application, sending_facility, message_type,
    control_id, version, status, ack_code, error, attempts, duplicates";

fn summary_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<MessageSummary> {
    let received_at_us: i64 = row.get(1)?;
    let application: String = row.get(3)?;
    let facility: String = row.get(4)?;
    Ok(MessageSummary {
        id: row.get(0)?,
        received_at: telemetry::rfc3339_us(received_at_us),
        peer: row.get(2)?,
        sender: format!("{application}^{facility}"),
        message_type: row.get(5)?,
        control_id: row.get(6)?,
        version: row.get(7)?,
        status: row.get(8)?,
        ack_code: row.get(9)?,
        error: row.get(10)?,
        attempts: row.get(11)?,
        duplicates: row.get(12)?,
    })
}

/// Newest first.
pub fn list_messages(connection: &Connection, filter: &MessageFilter) -> Result<Vec<MessageSummary>, Error> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM messages
         WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR id < ?2)
         ORDER BY id DESC LIMIT ?3"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let rows =
        statement.query_map(params![filter.status, filter.before_id, filter.limit.max(1) as i64], summary_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Counts per status (for `/admin/messages/stats` and readiness).
pub fn status_counts(connection: &Connection) -> Result<Vec<(String, i64)>, Error> {
    let mut statement = connection.prepare_cached("SELECT status, count(*) FROM messages GROUP BY status")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One row in full, or `None`.
pub fn message_detail(connection: &Connection, id: i64) -> Result<Option<MessageDetail>, Error> {
    let sql = format!("SELECT {SUMMARY_COLUMNS}, charset, raw, ack, report FROM messages WHERE id = ?1");
    let found = connection
        .query_row(&sql, [id], |row| {
            let summary = summary_from_row(row)?;
            let charset: String = row.get(13)?;
            let raw: Vec<u8> = row.get(14)?;
            let ack: Vec<u8> = row.get(15)?;
            let report: Option<String> = row.get(16)?;
            Ok((summary, charset, raw, ack, report))
        })
        .optional()?;
    Ok(found.map(|(summary, charset, raw, ack, report)| {
        let charset = Charset::from_name(&charset).unwrap_or(Charset::Latin1);
        let decode = |bytes: &[u8]| {
            charset.decode(bytes).map_or_else(|_| String::from_utf8_lossy(bytes).into_owned(), Cow::into_owned)
        };
        MessageDetail {
            summary,
            raw: decode(&raw),
            ack: decode(&ack),
            report: report.and_then(|text| serde_json::from_str(&text).ok()),
        }
    }))
}

/// The shared engine holder for a freshly loaded engine.
pub fn shared(engine: Engine) -> SharedEngine {
    Arc::new(RwLock::new(Arc::new(engine)))
}

/// How long the worker has been behind: age of the oldest `accepted` row, if any.
pub fn oldest_unprocessed_age(connection: &Connection) -> Result<Option<Duration>, Error> {
    let oldest: Option<i64> =
        connection
            .query_row("SELECT min(received_at_us) FROM messages WHERE status = 'accepted'", [], |row| row.get(0))?;
    Ok(oldest.map(|received| Duration::from_micros((telemetry::now_us() - received).max(0) as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A01: &str = "MSH|^~\\&|EPIC|HOSP|GW|GW|202401150830||ADT^A01^ADT_A01|P-A01|P|2.5.1\r\
EVN|A01|202401150830\r\
PID|1||MRN-7^^^HOSP^MR||Roe^Richard||19700304|M\r\
PV1|1|I|W^1^A^HOSP||||||||||||||||V-7^^^HOSP^VN\r";
    const A08: &str = "MSH|^~\\&|EPIC|HOSP|GW|GW|202401151000||ADT^A08^ADT_A01|P-A08|P|2.5.1\r\
EVN|A08|202401151000\r\
PID|1||MRN-7^^^HOSP^MR||Roe^Rick||19700304|M\r\
PV1|1|I|W^2^A^HOSP||||||||||||||||V-7^^^HOSP^VN\r";
    const UNMAPPED: &str = "MSH|^~\\&|EPIC|HOSP|GW|GW|202401151100||ZZZ^Z01|P-ZZZ|P|2.5.1\r";

    fn insert(connection: &Connection, control_id: &str, text: &str) -> i64 {
        connection
            .execute(
                "INSERT INTO messages (received_at_us, peer, sending_application, sending_facility,
                    receiving_application, receiving_facility, message_datetime, message_type, control_id,
                    version, charset, content_sha256, raw, ack_code, ack, status)
                 VALUES (?1, 'test', 'EPIC', 'HOSP', 'GW', 'GW', '', '', ?2, '2.5.1', 'UNICODE UTF-8', x'00',
                    ?3, 'AA', x'00', 'accepted')",
                params![telemetry::now_us(), control_id, text.as_bytes()],
            )
            .unwrap();
        connection.last_insert_rowid()
    }

    /// A data directory with both databases, the journal's writer and a worker over them.
    struct Fixture {
        _directory: tempfile::TempDir,
        store_path: std::path::PathBuf,
        /// Connection to the store database.
        store: Connection,
        /// Connection to the journal database.
        journal: Connection,
        writer: Journal,
    }

    fn fixture() -> Fixture {
        let directory = tempfile::tempdir().unwrap();
        let store_path = directory.path().join(crate::db::STORE_FILE);
        let journal_path = directory.path().join(crate::db::JOURNAL_FILE);
        let (writer, _thread) = Journal::open(&journal_path).unwrap();
        Fixture {
            store: crate::db::open(&store_path).unwrap(),
            journal: crate::db::open_journal(&journal_path).unwrap(),
            store_path,
            writer,
            _directory: directory,
        }
    }

    fn worker(fixture: &Fixture) -> Worker {
        Worker::open(
            &fixture.store_path,
            fixture.writer.clone(),
            shared(Engine::builtin().unwrap()),
            Arc::new(Metrics::new()),
            Arc::new(Wakeup::default()),
            None,
        )
        .unwrap()
    }

    fn status_of(connection: &Connection, id: i64) -> (String, Option<String>, i64) {
        connection
            .query_row("SELECT status, error, attempts FROM messages WHERE id = ?1", [id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .unwrap()
    }

    fn patient_of(connection: &Connection) -> crate::store::StoredResource {
        let id: String = connection
            .query_row("SELECT id FROM resources WHERE type = 'Patient' LIMIT 1", [], |row| row.get(0))
            .unwrap();
        crate::store::read(connection, "Patient", &id).unwrap().unwrap()
    }

    #[test]
    fn the_inbound_rate_is_busy_only_above_the_threshold() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let mut inbound = Inbound { count: 0, at: start, busy_until: None };
        assert!(!inbound.busy_at(1_000, at(10)), "no judgement before a full probe interval");
        assert!(inbound.busy_at(1_000, at(60)), "1,000 messages in 60 ms is a burst");
        assert!(inbound.busy_at(1_001, at(120)), "a pause in the burst is still the burst");
        assert!(inbound.busy_at(1_001, at(1_059)), "busy until a second after the last busy probe");
        assert!(!inbound.busy_at(1_002, at(1_061)), "a second below the threshold ends the burst");
        assert!(!inbound.busy_at(1_020, at(1_120)), "19 messages in 61 ms is not a burst");
        assert!(inbound.busy_at(1_100, at(1_180)), "80 messages in 60 ms is");
    }

    #[test]
    fn messages_are_applied_in_arrival_order_and_an_update_makes_a_new_version() {
        let fixture = fixture();
        let connection = &fixture.journal;
        let first = insert(connection, "P-A01", A01);
        let second = insert(connection, "P-A08", A08);
        let mut worker = worker(&fixture);
        assert_eq!(worker.step().unwrap(), 2);
        assert_eq!(worker.step().unwrap(), 0);
        assert_eq!(status_of(connection, first).0, "processed");
        assert_eq!(status_of(connection, second).0, "processed");
        let patient = patient_of(&fixture.store);
        assert_eq!(patient.version, 2);
        let body: Value = serde_json::from_str(&patient.body).unwrap();
        assert_eq!(body["name"][0]["given"][0], "Rick");
        // The report is kept with the message.
        let report: Option<String> =
            connection.query_row("SELECT report FROM messages WHERE id = ?1", [first], |row| row.get(0)).unwrap();
        assert!(serde_json::from_str::<Value>(&report.unwrap()).unwrap().is_object());
    }

    #[test]
    fn reprocessing_an_unchanged_message_creates_no_version() {
        let fixture = fixture();
        let connection = &fixture.journal;
        let id = insert(connection, "P-A01", A01);
        let mut worker = worker(&fixture);
        worker.step().unwrap();
        assert_eq!(requeue(connection, &Requeue::Ids(vec![id])).unwrap(), 1);
        assert_eq!(worker.step().unwrap(), 1);
        assert_eq!(status_of(connection, id), ("processed".to_string(), None, 2));
        assert_eq!(patient_of(&fixture.store).version, 1);
    }

    #[test]
    fn a_failed_message_keeps_its_error_and_can_be_requeued() {
        let fixture = fixture();
        let connection = &fixture.journal;
        let id = insert(connection, "P-ZZZ", UNMAPPED);
        let mut worker = worker(&fixture);
        worker.step().unwrap();
        let (status, error, attempts) = status_of(connection, id);
        assert_eq!((status.as_str(), attempts), ("failed", 1));
        assert!(error.unwrap().contains("no mapping handles ZZZ^Z01"));
        let listed = list_messages(
            connection,
            &MessageFilter { status: Some("failed".into()), limit: 10, ..Default::default() },
        )
        .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].control_id, "P-ZZZ");
        assert_eq!(requeue(connection, &Requeue::AllFailed).unwrap(), 1);
        assert_eq!(status_of(connection, id).0, "accepted");
        worker.step().unwrap();
        assert_eq!(status_of(connection, id).2, 2);
        let detail = message_detail(connection, id).unwrap().unwrap();
        assert!(detail.raw.starts_with("MSH|"));
    }

    #[test]
    fn refused_messages_are_never_requeued() {
        let fixture = fixture();
        let connection = &fixture.journal;
        let id = insert(connection, "P-REF", UNMAPPED);
        connection.execute("UPDATE messages SET status = 'refused' WHERE id = ?1", [id]).unwrap();
        assert_eq!(requeue(connection, &Requeue::Ids(vec![id])).unwrap(), 0);
        assert_eq!(requeue(connection, &Requeue::AllFailed).unwrap(), 0);
    }

    #[test]
    fn processed_messages_are_queued_for_the_aggregator_once_in_the_same_transaction() {
        let fixture = fixture();
        let connection = &fixture.journal;
        let first = insert(connection, "P-A01", A01);
        insert(connection, "P-ZZZ", UNMAPPED);
        let mut worker = worker(&fixture);
        worker.outbox = Some(Producer::detached(crate::outbox::OrderBy::Patient));
        worker.step().unwrap();
        let queued: Vec<(i64, String)> = fixture
            .store
            .prepare("SELECT message_id, partition_key FROM outbox")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let patient = patient_of(&fixture.store);
        assert_eq!(queued, vec![(first, format!("Patient/{}", patient.id))]);
        requeue(connection, &Requeue::Ids(vec![first])).unwrap();
        worker.step().unwrap();
        let count: i64 = fixture.store.query_row("SELECT count(*) FROM outbox", [], |row| row.get(0)).unwrap();
        assert_eq!(count, 1, "a message is queued once");
    }

    #[test]
    fn the_worker_wakes_on_a_signal_and_stops_when_asked() {
        let fixture = fixture();
        let wakeup = Arc::new(Wakeup::default());
        let pipeline = Pipeline::start(
            &fixture.store_path,
            fixture.writer.clone(),
            shared(Engine::builtin().unwrap()),
            wakeup.clone(),
            Arc::new(Metrics::new()),
            None,
        )
        .unwrap();
        let id = insert(&fixture.journal, "P-A01", A01);
        wakeup.wake();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while status_of(&fixture.journal, id).0 != "processed" {
            assert!(std::time::Instant::now() < deadline, "the worker never processed the message");
            std::thread::sleep(Duration::from_millis(5));
        }
        pipeline.stop();
    }
}
