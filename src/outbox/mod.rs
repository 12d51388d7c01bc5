//! The aggregator push: a durable outbox in SQLite and the worker that delivers it.
//!
//! # Design note
//! - **Format.** One row per processed message in table `outbox` (migration 4, [`SCHEMA`]):
//!   the message's transaction Bundle as JSON text, its partition key, status
//!   (`pending` → `delivered` | `dead`), attempts, the time of the next attempt, the last
//!   HTTP status and error, and the aggregator's answer (OperationOutcome or
//!   transaction-response, cut at 64 KiB).
//! - **Transactional.** The pipeline calls [`Producer::enqueue`] inside the transaction that
//!   stores the message's resources and marks it processed: either all of it is committed
//!   or none. `message_id` is UNIQUE and the insert is `INSERT OR IGNORE`, so a message is
//!   queued at most once (a message reprocessed after a mapping fix is not pushed again).
//! - **Ordering.** Rows are partitioned by the Patient the Bundle is about (else the
//!   sender), or by sender (`order_by: sender`). A partition has at most one request in
//!   flight, and only its oldest pending row (and the rows after it) is ever sent, so a
//!   later Bundle waits while an earlier one is retried. Partitions run in parallel up to
//!   `max_in_flight`. When a partition has a backlog, up to `max_bundle_messages` of its
//!   rows are merged into one transaction (a resource PUT twice keeps only its last
//!   entry). Dead rows do not block their partition; requeued, they keep their place
//!   before any later pending row.
//! - **Outcomes.** 2xx (and every entry 2xx) → delivered; timeout, connection error, 5xx,
//!   429, 408 and 401 → retry with exponential backoff and jitter, at least `Retry-After`;
//!   other 4xx → dead letter. A merged request that is refused is retried message by
//!   message so that one bad message does not take its neighbours with it.
//! - **Crash recovery.** Nothing lives only in memory: after a crash the worker starts
//!   again from the pending rows. A Bundle whose answer was lost is sent again; that is
//!   harmless because every entry is a PUT with a deterministic id, and the request
//!   carries `X-Request-ID`/`Idempotency-Key` derived from the row ids.
//! - **Bounded.** At most `max_in_flight × max_bundle_messages` Bundles are in memory;
//!   answers are read up to 1 MiB; delivered rows are pruned after `retention_hours`.
//! - **No PHI in logs**: outbox ids, a hash of the partition key, statuses and error kinds.
//!
//! Layout: [`config`] (the `aggregator:` section), [`queue`] (SQL), [`policy`] (pure
//! rules), [`client`] (HTTP, TLS, auth), [`smart`] (SMART Backend Services), [`schedule`] (which
//! partitions are due, in memory), [`worker`].

pub mod client;
pub mod config;
pub mod policy;
pub mod queue;
pub mod schedule;
pub mod smart;
pub mod worker;

pub use config::{Config, OrderBy, Settings};
pub use queue::{enqueue, partition_key, Requeue, SCHEMA};
pub use worker::{Outbox, Producer, RequeueSignal, Status};

/// Outbox errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite refused an operation.
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database could not be opened.
    #[error(transparent)]
    Open(#[from] crate::db::Error),
    /// A Bundle could not be serialized.
    #[error("outbox: bundle cannot be serialized: {0}")]
    Bundle(String),
    /// A credential or TLS file is unusable.
    #[error("aggregator {what}: {reason}")]
    Credentials {
        /// Which file or setting.
        what: String,
        /// Why.
        reason: String,
    },
    /// The SMART token endpoint did not give a token.
    #[error("aggregator access token: {reason}")]
    Token {
        /// Why (no token values).
        reason: String,
    },
    /// A blocking task failed.
    #[error("outbox: database task failed")]
    Task,
}
