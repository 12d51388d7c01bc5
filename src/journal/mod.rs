//! The durable inbound journal: every message received over MLLP, accepted or refused,
//! exactly as its bytes arrived.
//!
//! # Design
//! - **Format.** One row per received message in the `messages` table (see `db`): the raw
//!   bytes, the MSH fields that identify it, the character set applied, a SHA-256 of the
//!   bytes, the ACK that was sent and a status (`accepted`, `refused`; later stages move
//!   accepted rows on).
//! - **Commit before ACK.** [`Journal::append`] returns only after the transaction holding
//!   the row has committed with `synchronous=FULL` (the WAL is fsynced). The listener sends
//!   the ACK after that, so an AA never names a message that a power cut could lose.
//! - **Group commit.** One writer thread owns the write connection. It takes every request
//!   waiting in its queue (up to [`MAX_BATCH`]) into one transaction, so that many
//!   connections share one fsync. Requests are committed in queue order, which keeps the
//!   order of each connection.
//! - **Duplicates.** An accepted message whose sender (MSH-3, MSH-4), MSH-10 and content
//!   hash match a non-refused row received inside the duplicate window is not stored again:
//!   the original row's ACK is returned and its duplicate counter incremented.
//! - **Bounded.** The queue to the writer holds at most [`QUEUE_CAPACITY`] requests;
//!   callers wait when it is full (back-pressure reaches the sender as a slower ACK).
//! - **One writer.** The journal has a database file of its own (`db::JOURNAL_FILE`), and
//!   the writer thread is the only one that writes to it: other parts of the gateway that
//!   change journal rows (the pipeline recording outcomes) hand it their change with
//!   [`Journal::apply`], and it runs in the writer's next transaction. So an append never
//!   waits for another writer's lock, and the store's transactions never delay an ACK.
//! - **Crash recovery** is SQLite's: a transaction either committed (and its ACK may have
//!   gone out) or it did not (and no ACK was sent). A restart may therefore see a message
//!   again that was committed but whose ACK was lost; the duplicate check answers it with
//!   the original ACK.

mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use writer::{MAX_BATCH, QUEUE_CAPACITY};

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened.
    #[error(transparent)]
    Open(#[from] crate::db::Error),
    /// A write failed; nothing of that batch was stored.
    #[error("journal write failed: {0}")]
    Write(String),
    /// The writer thread has stopped (shutdown or a fatal error).
    #[error("journal writer is not running")]
    Closed,
}

/// Called by the writer after a commit that stored new messages.
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// Status of a journal row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Acknowledged with AA/CA; waiting to be processed.
    Accepted,
    /// Answered with a NAK; kept for forensics.
    Refused,
}

impl Status {
    /// The value stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Refused => "refused",
        }
    }
}

/// Identifying MSH fields of a message, as raw text (empty when absent).
#[derive(Clone, Debug, Default)]
pub struct MessageKey {
    /// MSH-3.
    pub sending_application: String,
    /// MSH-4.
    pub sending_facility: String,
    /// MSH-5.
    pub receiving_application: String,
    /// MSH-6.
    pub receiving_facility: String,
    /// MSH-7.
    pub message_datetime: String,
    /// MSH-9.
    pub message_type: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-12.
    pub version: String,
}

/// A message to append.
#[derive(Clone, Debug)]
pub struct NewEntry {
    /// Receive time, microseconds since the Unix epoch.
    pub received_at_us: i64,
    /// Remote address of the connection.
    pub peer: String,
    /// Identifying MSH fields.
    pub key: MessageKey,
    /// Character set applied to decode the message.
    pub charset: String,
    /// The exact bytes received (for an oversize frame, its first bytes).
    pub raw: Bytes,
    /// True when `raw` is only the start of an oversize frame.
    pub raw_truncated: bool,
    /// Accepted or refused.
    pub status: Status,
    /// Reason for a refusal.
    pub error: Option<String>,
    /// MSA-1 of `ack`.
    pub ack_code: String,
    /// The acknowledgment to send (empty when none is to be sent).
    pub ack: Vec<u8>,
    /// Duplicate window in microseconds (0 disables duplicate detection).
    pub duplicate_window_us: i64,
}

/// What happened to an appended message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored durably as row `id`; the entry's own acknowledgment is to be sent.
    Stored {
        /// Journal row id.
        id: i64,
    },
    /// Already stored as row `original_id` inside the duplicate window: send `ack`, the
    /// acknowledgment originally sent.
    Duplicate {
        /// The original row.
        original_id: i64,
        /// The original acknowledgment.
        ack: Vec<u8>,
        /// MSA-1 of the original acknowledgment.
        ack_code: String,
    },
}

/// A submitted append whose commit has not been awaited yet.
pub struct Pending {
    answer: oneshot::Receiver<Result<Appended, Error>>,
}

impl Pending {
    /// Waits until the append is durable (or found to be a duplicate).
    pub async fn wait(self) -> Result<Appended, Error> {
        self.answer.await.map_err(|_| Error::Closed)?
    }
}

/// A change to journal rows, run by the writer inside its transaction (in a savepoint of
/// its own, so that a failing change does not refuse the appends committed with it).
pub type Change = Box<dyn FnOnce(&rusqlite::Connection) -> rusqlite::Result<()> + Send>;

enum Request {
    Append { entry: Box<NewEntry>, reply: oneshot::Sender<Result<Appended, Error>> },
    Apply { change: Change, reply: oneshot::Sender<Result<(), Error>> },
}

/// Handle to the journal; cheap to clone. The writer thread stops when the last handle is
/// dropped, after committing what was queued.
#[derive(Clone)]
pub struct Journal {
    sender: mpsc::Sender<Request>,
    healthy: Arc<AtomicBool>,
    /// Messages stored since the journal was opened (the pipeline reads the inbound rate).
    stored: Arc<AtomicU64>,
    path: Arc<Path>,
}

impl Journal {
    /// Opens the journal database and starts its writer thread.
    pub fn open(path: &Path) -> Result<(Journal, std::thread::JoinHandle<()>), Error> {
        Journal::open_notifying(path, None)
    }

    /// Like [`Journal::open`]; `committed` is called after each commit that stored at
    /// least one new message (the pipeline's wake-up).
    pub fn open_notifying(
        path: &Path,
        committed: Option<Notify>,
    ) -> Result<(Journal, std::thread::JoinHandle<()>), Error> {
        let connection = crate::db::open_journal(path)?;
        // The pages every append touches (the right edge of the table and of both indexes)
        // and the rows the pipeline's outcomes update stay in memory: 16 MiB.
        connection
            .pragma_update(None, "cache_size", -16_384)
            .map_err(|source| crate::db::Error::Sqlite { path: path.display().to_string(), source })?;
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let stored = Arc::new(AtomicU64::new(0));
        let thread = writer::spawn(connection, receiver, healthy.clone(), stored.clone(), committed);
        Ok((Journal { sender, healthy, stored, path: Arc::from(path) }, thread))
    }

    /// Messages stored (not duplicates, not failed writes) since the journal was opened.
    pub fn stored_count(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// The journal's database file (for readers: the pipeline, the operator API).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a message and waits until it is durable (or found to be a duplicate).
    pub async fn append(&self, entry: NewEntry) -> Result<Appended, Error> {
        self.submit(entry).await?.wait().await
    }

    /// Queues a message for the writer without waiting for the commit. Appends are
    /// committed in the order they were submitted, so a connection may submit several
    /// pipelined messages and then wait for each in turn.
    pub async fn submit(&self, entry: NewEntry) -> Result<Pending, Error> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Request::Append { entry: Box::new(entry), reply }).await.map_err(|_| Error::Closed)?;
        Ok(Pending { answer })
    }

    /// Runs `change` in the writer's next transaction and waits until it is committed.
    /// For threads outside the async runtime (the pipeline); it blocks the caller.
    pub fn apply_blocking(&self, change: Change) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.sender.blocking_send(Request::Apply { change, reply }).map_err(|_| Error::Closed)?;
        answer.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// False after the last write failed, or when the writer has stopped.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.sender.is_closed()
    }
}
