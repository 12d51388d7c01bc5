//! The durable inbound journal: every message received over MLLP, accepted or refused,
//! exactly as its bytes arrived.
//!
//! # Design
//! - **Format.** One row per received message in the `messages` table of `journal.db` (see
//!   `db`): the raw bytes, the MSH fields that identify it, the character set applied, a
//!   SHA-256 of the bytes, the ACK that was sent and a status (`accepted`, `refused`; later
//!   stages move accepted rows on).
//! - **Durable before the ACK.** [`Journal::append`] returns only after the message is on
//!   disk: written to the ingest log ([`log`], a directory `journal-log/` beside
//!   `journal.db`) with a synchronous (`O_DSYNC`, and `O_DIRECT` where the file system
//!   allows) write. The listener sends the ACK after that, so an AA never names a message
//!   that a power cut could lose.
//! - **Group commit.** Whoever writes the log takes every append waiting in the queue (up to
//!   [`MAX_BATCH`]) into one log write and one sync, so that many connections share one
//!   fsync. That is the caller waiting for its answer when the log is free (no thread
//!   hand-off on a quiet line), otherwise the appender thread (see `appender::Committer`).
//!   Appends are written in queue order, which keeps the order of each connection.
//! - **Into SQLite moments later.** The writer thread reads the log behind the appender and
//!   inserts its records into `journal.db` (row id = the record's sequence number), in
//!   transactions as large as the backlog: every 20 ms, or every 500 ms while the line is
//!   busy. Readers of `journal.db` (the pipeline, the operator API) see a message that long
//!   after its ACK. It reads the recent commits from memory, where the appender keeps them
//!   ([`MAX_MIRROR_BYTES`]), and the files only at start and when it has fallen that far
//!   behind: the log is written past the page cache, so a read goes to the disk, where it
//!   would queue with the ACK path's writes. During a burst, `journal.db`'s checkpoints
//!   wait until the line is ordinary again (up to 256 MiB of WAL).
//! - **The log is the durable copy.** The writer commits with `synchronous=NORMAL` (no sync
//!   per commit; SQLite syncs at checkpoints, keeping the file consistent) and syncs
//!   `journal.db` itself before a log segment is reused: a record leaves the log only once
//!   its row is on disk. Each sync in `journal.db` would hold back the ACK path's writes to
//!   the same disk; these come once per segment instead of once per commit, and on an
//!   ordinary line a second after the commits (with a checkpoint), ahead of the next burst.
//! - **Duplicates.** An accepted message whose sender (MSH-3, MSH-4), MSH-10 and content
//!   hash match a non-refused message received inside the duplicate window is not stored
//!   again: the original's ACK is returned and its duplicate counter incremented. The
//!   appender looks among the logged records not yet copied into `journal.db`, and in
//!   `journal.db` only when the duplicate notes (`recent`: every accepted message of the
//!   window, by sender and MSH-10, in memory) cannot rule a repeat out.
//! - **Bounded.** The queue of appends holds at most [`QUEUE_CAPACITY`] requests, and
//!   the log at most [`MAX_LIVE_SEGMENTS`] segments that the writer has not finished;
//!   callers wait when either is full (back-pressure reaches the sender as a slower ACK).
//! - **One writer.** The writer thread is the only one that writes rows of `journal.db`:
//!   other parts of the gateway that change journal rows (the pipeline recording outcomes)
//!   hand it their change with [`Journal::apply_blocking`], and it runs in the writer's next
//!   transaction.
//! - **Crash recovery.** [`Journal::open`] first copies every logged record with a higher
//!   sequence number than the last row of `journal.db` into it, syncs `journal.db`, then
//!   empties the log. After a power cut, `journal.db` may have lost its last transactions
//!   (never a row the log no longer has); they come back from the log here, except the
//!   pipeline's outcomes in them, whose messages are converted again. A
//!   restart may see a message again that was logged but whose ACK was lost; the duplicate
//!   check answers it with the original ACK. Duplicate counters are the one thing not
//!   logged: an increment not yet committed when the process dies is lost.

mod appender;
pub mod log;
mod recent;
mod writer;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use sha2::Digest;
use tokio::sync::oneshot;

pub use appender::{MAX_BATCH, QUEUE_CAPACITY};

/// Most log segments holding records not yet in `journal.db` (16 MiB each: 1 GiB). When the
/// writer falls this far behind, appends wait for it.
pub const MAX_LIVE_SEGMENTS: usize = 64;
/// Most bytes of recent commits kept in memory for the writer, which copies them into
/// `journal.db` from there instead of reading the log file back from the disk, where its
/// reads would queue with the ACK path's writes. 64 MiB is several of the writer's copies
/// during a burst; beyond it (the writer is behind), it reads the file.
const MAX_MIRROR_BYTES: usize = 64 << 20;
/// Read connections kept for the callers' duplicate lookups.
const MAX_READERS: usize = 8;
/// Empty segments kept for reuse, so that rotating to a new one costs no zero-filling.
const MAX_SPARES: usize = 2;
/// WAL pages (4 KiB) after which the writer's commit checkpoints `journal.db`.
const WAL_CHECKPOINT_PAGES: i64 = 8192;
/// The same during an inbound burst (see `writer::BUSY_COPY_INTERVAL`): 256 MiB, about
/// 170,000 messages of 1 KiB. A checkpoint reads back and writes again every page the burst
/// wrote, a quarter of the writer's CPU; deferred, it runs once the burst is over (at the
/// first ordinary commit or the quiet-line sync), not beside the ACK path.
const BUSY_WAL_CHECKPOINT_PAGES: i64 = 65_536;

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
    committer: Arc<appender::Committer>,
}

impl Pending {
    /// Waits until the append is durable (or found to be a duplicate). When the log is free
    /// and one connection is sending, the caller writes it (see [`appender::Committer`]): this may block
    /// the calling thread for one synced write, about as long as an async task may run
    /// between two awaits.
    pub async fn wait(mut self) -> Result<Appended, Error> {
        match self.answer.try_recv() {
            Ok(answer) => return answer,
            Err(oneshot::error::TryRecvError::Closed) => return Err(Error::Closed),
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        self.committer.lead();
        (&mut self.answer).await.map_err(|_| Error::Closed)?
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Dropped without waiting (its connection went away): the append is still queued,
        // and the appender thread must not wait for a leader that will not come.
        self.committer.nudge();
    }
}

/// A change to journal rows, run by the writer inside its transaction (in a savepoint of
/// its own, so that a failing change does not hold back the rows committed with it).
pub type Change = Box<dyn FnOnce(&rusqlite::Connection) -> rusqlite::Result<()> + Send>;

/// An append waiting to be logged.
struct Request {
    entry: Box<NewEntry>,
    /// SHA-256 of the raw bytes.
    content_hash: [u8; 32],
    /// [`recent::key_hash`] of its sender and MSH-10.
    key_hash: u64,
    /// The duplicate lookup in `journal.db` done by the caller, when one was due.
    checked: Option<Checked>,
    reply: oneshot::Sender<Result<Appended, Error>>,
    /// Its place in the bounded queue, freed once it is answered.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A duplicate lookup in `journal.db`, done on the caller's thread so that the appender's
/// group commit does not wait for one query per message.
struct Checked {
    /// `Shared::applied` read before the query: every row up to it was visible to the query.
    through: i64,
    /// The earliest duplicate found: id, ACK and ACK code.
    found: Option<(i64, Vec<u8>, String)>,
}

/// A log segment whose records are not all in `journal.db` yet.
#[derive(Debug)]
struct Live {
    path: PathBuf,
    /// Sequence number of its first record.
    first_seq: i64,
    /// Offset just past its last synced commit.
    end: u64,
    /// Sequence number of its last synced record (`first_seq - 1` while it has none).
    last_seq: i64,
    /// Its commits that the writer has not copied yet, as written: offset and bytes.
    mirror: VecDeque<(u64, Arc<[u8]>)>,
}

impl Live {
    fn new(path: PathBuf, first_seq: i64) -> Live {
        Live { path, first_seq, end: log::BLOCK, last_seq: first_seq - 1, mirror: VecDeque::new() }
    }

    /// The mirrored commits that make up bytes `from..to` exactly, when memory holds them
    /// all (none was left out for [`MAX_MIRROR_BYTES`]).
    fn mirrored(&self, from: u64, to: u64) -> Option<Vec<(u64, Arc<[u8]>)>> {
        let mut commits = Vec::new();
        let mut next = from;
        for (offset, bytes) in self.mirror.iter().skip_while(|(offset, _)| *offset < from) {
            if next == to {
                break;
            }
            if *offset != next {
                return None;
            }
            next += bytes.len() as u64;
            commits.push((*offset, bytes.clone()));
        }
        (next == to).then_some(commits)
    }
}

/// State shared by the appender (which logs), the writer (which copies the log into
/// `journal.db`) and the callers of [`Journal::apply_blocking`].
#[derive(Default)]
struct State {
    /// Segments in order; the last is the one being appended to.
    live: VecDeque<Live>,
    /// Retired segments of the standard size, ready to be reused.
    spares: Vec<PathBuf>,
    /// Number for the next segment file created.
    next_number: u64,
    /// Changes waiting for the writer.
    changes: Vec<(Change, oneshot::Sender<Result<(), Error>>)>,
    /// Row ids whose duplicate counter is to be incremented.
    duplicates: Vec<i64>,
    /// The appender has stopped: the writer finishes the log and stops too.
    closed: bool,
    /// Bytes held in the segments' mirrors.
    mirrored_bytes: usize,
}

impl State {
    /// Keeps a commit's bytes, just written at `offset` of the active segment, for the
    /// writer; left out (the writer reads the file) when [`MAX_MIRROR_BYTES`] are held.
    fn mirror(&mut self, offset: u64, bytes: Arc<[u8]>) {
        if self.mirrored_bytes + bytes.len() > MAX_MIRROR_BYTES {
            return;
        }
        if let Some(live) = self.live.back_mut() {
            self.mirrored_bytes += bytes.len();
            live.mirror.push_back((offset, bytes));
        }
    }

    /// Lets go of the mirrored commits before `offset` of segment `path` and of every
    /// segment before it: the writer has copied them.
    fn forget_mirrored(&mut self, path: &Path, offset: u64) {
        let Some(position) = self.live.iter().position(|live| live.path == path) else { return };
        for (index, live) in self.live.iter_mut().enumerate().take(position + 1) {
            let current = index == position;
            while live.mirror.front().is_some_and(|(start, bytes)| !current || start + bytes.len() as u64 <= offset) {
                if let Some((_, bytes)) = live.mirror.pop_front() {
                    self.mirrored_bytes -= bytes.len();
                }
            }
        }
    }

    /// Removes the oldest segment, with whatever it still mirrors.
    fn pop_front_live(&mut self) -> Option<Live> {
        let done = self.live.pop_front()?;
        self.mirrored_bytes -= done.mirror.iter().map(|(_, bytes)| bytes.len()).sum::<usize>();
        Some(done)
    }
}

struct Shared {
    directory: PathBuf,
    /// Highest sequence number committed in `journal.db`; set, under the state lock, after
    /// the commit it names.
    applied: AtomicI64,
    /// Highest sequence number synced in the log; set under the state lock.
    durable: AtomicI64,
    /// Highest sequence number whose row is on disk in `journal.db` (synced, not only
    /// committed): a log segment is retired only once every record in it is. Set by the
    /// writer.
    synced: AtomicI64,
    /// False while the appender's last log write failed.
    logging: AtomicBool,
    /// False while the writer's last copy into `journal.db` failed.
    copying: AtomicBool,
    /// Messages stored since the journal was opened (the pipeline reads the inbound rate).
    stored: AtomicU64,
    /// Synced writes of the log since the journal was opened: `stored / log_writes` is the
    /// average group commit.
    log_writes: AtomicU64,
    /// Read connections to `journal.db` for the callers' duplicate lookups.
    readers: Mutex<Vec<rusqlite::Connection>>,
    /// The accepted messages of the duplicate window, by sender and MSH-10: a message
    /// absent from it is looked up nowhere else.
    recent: Mutex<recent::RecentKeys>,
    /// The journal database file.
    database: PathBuf,
    state: Mutex<State>,
    /// Signalled on every change of `state`.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is one
        // assignment or push), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True while the log holds synced records not yet committed in `journal.db`.
    fn copy_due(&self) -> bool {
        self.durable.load(Ordering::Acquire) > self.applied.load(Ordering::Acquire)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    /// Shared state for the journal at `database` with no thread running, segments to be
    /// numbered from `next_number` and notes covering every time.
    #[cfg(test)]
    fn for_tests(database: &Path, next_number: u64) -> Arc<Shared> {
        Arc::new(Shared {
            directory: log_directory(database),
            applied: AtomicI64::new(0),
            durable: AtomicI64::new(0),
            synced: AtomicI64::new(0),
            logging: AtomicBool::new(true),
            copying: AtomicBool::new(true),
            stored: AtomicU64::new(0),
            log_writes: AtomicU64::new(0),
            readers: Mutex::new(Vec::new()),
            recent: Mutex::new(recent::RecentKeys::complete(100)),
            database: database.to_path_buf(),
            state: Mutex::new(State { next_number, ..State::default() }),
            changed: Condvar::new(),
        })
    }

    fn recent(&self) -> MutexGuard<'_, recent::RecentKeys> {
        // Every update is complete before the next can panic (a push, a count, a pop).
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle to the journal; cheap to clone. The threads stop when the last handle is
/// dropped, after logging what was queued and copying the log into `journal.db`.
#[derive(Clone)]
pub struct Journal {
    handle: Arc<Handle>,
    shared: Arc<Shared>,
}

/// Closes the queue when the last [`Journal`] clone is dropped.
struct Handle(Arc<appender::Committer>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The directory of the ingest log that belongs to the journal database at `path`
/// (`journal.db` → `journal-log/`).
pub fn log_directory(path: &Path) -> PathBuf {
    let stem = path.file_stem().map_or_else(|| "journal".into(), |stem| stem.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-log"))
}

impl Journal {
    /// Opens the journal database, recovers what the log holds beyond it, and starts the
    /// appender and writer threads. The handle returned joins both.
    pub fn open(path: &Path) -> Result<(Journal, std::thread::JoinHandle<()>), Error> {
        Journal::open_notifying(path, None)
    }

    /// Like [`Journal::open`]; `committed` is called after each `journal.db` commit that
    /// stored at least one new message (the pipeline's wake-up).
    pub fn open_notifying(
        path: &Path,
        committed: Option<Notify>,
    ) -> Result<(Journal, std::thread::JoinHandle<()>), Error> {
        let sqlite = |source| crate::db::Error::Sqlite { path: path.display().to_string(), source };
        let mut connection = crate::db::open_journal(path)?;
        // The pages every insert touches (the right edge of the table and of both indexes)
        // and the rows the pipeline's outcomes update stay in memory: 16 MiB.
        connection.pragma_update(None, "cache_size", -16_384).map_err(sqlite)?;
        let directory = log_directory(path);
        let lock = writer::lock(&directory)?;
        let (applied_seq, next_number, spares) = writer::recover(&mut connection, path, &directory)?;
        // From here on the log holds every record until the writer has synced journal.db
        // past it: a commit need not sync (see `writer::sync_database`).
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(sqlite)?;
        // SQLite's own syncs are then its checkpoints' (two each); every 32 MiB of WAL instead
        // of every 4 MiB, as each holds back the ACK path's writes for a few milliseconds.
        connection.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES).map_err(sqlite)?;
        // After a checkpoint that a burst deferred, the WAL file is cut back to 32 MiB when
        // it is next reused, rather than keeping the burst's size on disk.
        connection.pragma_update(None, "journal_size_limit", WAL_CHECKPOINT_PAGES * 4096).map_err(sqlite)?;
        // The rows already in journal.db are noted by a thread of their own (see `recent`).
        let recent = if applied_seq > 0 {
            recent::RecentKeys::covering_nothing(recent::MAX_NOTED)
        } else {
            recent::RecentKeys::complete(recent::MAX_NOTED)
        };
        // The appender's own connection, for the duplicate lookups that the callers' came too
        // early for.
        let reader = crate::db::open_journal(path)?;
        let shared = Arc::new(Shared {
            directory,
            applied: AtomicI64::new(applied_seq),
            durable: AtomicI64::new(applied_seq),
            synced: AtomicI64::new(applied_seq),
            logging: AtomicBool::new(true),
            copying: AtomicBool::new(true),
            stored: AtomicU64::new(0),
            log_writes: AtomicU64::new(0),
            readers: Mutex::new(Vec::new()),
            recent: Mutex::new(recent),
            database: path.to_path_buf(),
            state: Mutex::new(State { spares, next_number, ..State::default() }),
            changed: Condvar::new(),
        });
        if applied_seq > 0 {
            recent::spawn_load(shared.clone(), applied_seq, recent::MAX_NOTED);
        }
        let writer = writer::spawn(connection, shared.clone(), committed);
        let committer = appender::Committer::new(appender::Appender::new(reader, shared.clone(), applied_seq + 1));
        let appender = appender::spawn(committer.clone(), shared.clone(), writer, lock);
        Ok((Journal { handle: Arc::new(Handle(committer)), shared }, appender))
    }

    /// Messages stored (not duplicates, not failed writes) since the journal was opened.
    pub fn stored_count(&self) -> u64 {
        self.shared.stored.load(Ordering::Relaxed)
    }

    /// Synced writes of the ingest log (group commits) since the journal was opened.
    pub fn log_write_count(&self) -> u64 {
        self.shared.log_writes.load(Ordering::Relaxed)
    }

    /// Acknowledged messages in the ingest log not yet copied into `journal.db` (an upper
    /// bound: the sequence numbers of a failed log write count until the next copy).
    pub fn log_backlog(&self) -> i64 {
        let durable = self.shared.durable.load(Ordering::Acquire);
        (durable - self.shared.applied.load(Ordering::Acquire)).max(0)
    }

    /// The journal's database file (for readers: the pipeline, the operator API).
    pub fn path(&self) -> &Path {
        &self.shared.database
    }

    /// Appends a message and waits until it is durable (or found to be a duplicate).
    pub async fn append(&self, entry: NewEntry) -> Result<Appended, Error> {
        self.submit(entry).await?.wait().await
    }

    /// Queues a message for the appender without waiting for it to be durable. Appends are
    /// logged in the order they were submitted, so a connection may submit several
    /// pipelined messages and then wait for each in turn.
    pub async fn submit(&self, entry: NewEntry) -> Result<Pending, Error> {
        let committer = &self.handle.0;
        let slot = committer.reserve().await?;
        let (reply, answer) = oneshot::channel();
        let content_hash: [u8; 32] = sha2::Sha256::digest(&entry.raw).into();
        let key_hash = recent::key_hash(&entry.key);
        let checked = if entry.status == Status::Accepted && entry.duplicate_window_us > 0 {
            // Read before the notes: every record up to it was noted when it was logged.
            let through = self.shared.applied.load(Ordering::Acquire);
            let not_before = entry.received_at_us.saturating_sub(entry.duplicate_window_us);
            if self.shared.recent().may_contain(key_hash, not_before) {
                // A failed lookup here is not an answer: the appender looks again.
                self.check_duplicate(&entry, &content_hash).ok()
            } else {
                Some(Checked { through, found: None })
            }
        } else {
            None
        };
        committer.push(Request { entry: Box::new(entry), content_hash, key_hash, checked, reply, _slot: slot });
        Ok(Pending { answer, committer: committer.clone() })
    }

    /// Looks for an earlier copy of `entry` in `journal.db` (an indexed read from the page
    /// cache, but with two file locks and, after each writer commit, pages read again),
    /// when the duplicate notes have seen its sender and MSH-10.
    fn check_duplicate(&self, entry: &NewEntry, content_hash: &[u8; 32]) -> Result<Checked, Error> {
        let through = self.shared.applied.load(Ordering::Acquire);
        let pooled = self.shared.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let reader = match pooled {
            Some(reader) => reader,
            None => crate::db::open_journal(&self.shared.database)?,
        };
        let found = writer::find_duplicate(&reader, entry, content_hash);
        let mut readers = self.shared.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if readers.len() < MAX_READERS {
            readers.push(reader);
        }
        drop(readers);
        Ok(Checked { through, found: found.map_err(|error| Error::Write(error.to_string()))? })
    }

    /// Runs `change` in the writer's next transaction and waits until it is committed.
    /// For threads outside the async runtime (the pipeline); it blocks the caller.
    pub fn apply_blocking(&self, change: Change) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            state.changes.push((change, reply));
        }
        self.shared.changed.notify_all();
        answer.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// False while the last log write or the last copy into `journal.db` failed, or when
    /// the appender has stopped.
    pub fn is_healthy(&self) -> bool {
        self.shared.logging.load(Ordering::Relaxed)
            && self.shared.copying.load(Ordering::Relaxed)
            && self.handle.0.is_running()
    }
}
