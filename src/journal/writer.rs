//! The journal's writer thread: copies the ingest log into `journal.db`, runs the changes
//! other parts of the gateway hand it, and reuses log segments once they are copied.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, Transaction};

use super::log::{self, Record, BLOCK, SEGMENT_BYTES};
use super::{Error, NewEntry, Notify, Shared, State, BUSY_WAL_CHECKPOINT_PAGES, MAX_SPARES, WAL_CHECKPOINT_PAGES};

/// Most log bytes copied in one transaction (a single larger segment goes whole).
const MAX_READ_BYTES: u64 = 32 << 20;
/// Longest a logged message waits to be copied into `journal.db` while the log has room,
/// on an ordinary line.
const COPY_INTERVAL: Duration = Duration::from_millis(20);
/// The same during an inbound burst (the last copy carried more than
/// [`BUSY_RECORDS_PER_SECOND`]): fewer, larger transactions, whose writes share the disk
/// with the ACK path's. Readers of `journal.db` see a message up to this long after its
/// ACK while the burst lasts; the pipeline holds back during bursts anyway.
const BUSY_COPY_INTERVAL: Duration = Duration::from_millis(500);
/// Copy rate, in records per second, above which the line counts as busy.
const BUSY_RECORDS_PER_SECOND: f64 = 500.0;
/// The writer's nice value: below the MLLP connections' (0), whose ACKs would wait for the
/// CPU a copy takes, above the pipeline's (10). The writer needs 15–40 µs of CPU per
/// message, so even a fully contended core lets it keep up with several thousand a second;
/// when it cannot, the log's bound slows the ACKs.
pub const PRIORITY: i32 = 5;
/// On an ordinary line, how long committed rows may wait to be synced. The log keeps them
/// safe meanwhile; the sync (with a checkpoint) is for the next burst, which would otherwise
/// meet their pages still to be written back by the kernel and a WAL due for a checkpoint,
/// both beside its ACKs' writes.
const QUIET_SYNC_AFTER: Duration = Duration::from_secs(1);
/// Pause before retrying after `journal.db` refused a transaction.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

pub(super) fn spawn(
    connection: Connection,
    shared: Arc<Shared>,
    committed: Option<Notify>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("journal-writer".to_string())
        .spawn(move || {
            crate::priority::lower(PRIORITY, "journal-writer");
            Writer { connection, shared, committed, cursor: None, staging: log::Aligned::default() }.run()
        })
        .expect("spawning a thread fails only when the OS is out of resources at startup")
}

/// Where the writer is in the log.
struct Cursor {
    path: PathBuf,
    /// Offset just past the last record copied.
    offset: u64,
    /// Sequence number of the next record.
    next_seq: i64,
}

/// One stretch of a segment to read.
struct Stretch {
    path: PathBuf,
    from: u64,
    to: u64,
    first_seq: i64,
    /// Its commits, when memory still holds them all; otherwise the file is read.
    mirrored: Option<Vec<(u64, Arc<[u8]>)>>,
}

struct Writer {
    connection: Connection,
    shared: Arc<Shared>,
    committed: Option<Notify>,
    cursor: Option<Cursor>,
    /// Read buffer for the log (direct I/O needs it aligned).
    staging: log::Aligned,
}

type Changes = Vec<(super::Change, tokio::sync::oneshot::Sender<Result<(), Error>>)>;

impl Writer {
    fn run(mut self) {
        let mut last_copy = Instant::now();
        let mut interval = COPY_INTERVAL;
        let mut checkpoint_after = WAL_CHECKPOINT_PAGES;
        // When the oldest commit not yet synced was made.
        let mut unsynced_since: Option<Instant> = None;
        loop {
            let ((plan, reached), changes, duplicates) = {
                let mut state = self.shared.lock();
                loop {
                    // Changes wait for nobody (the pipeline blocks on them); the log is
                    // copied every `interval`, or at once when a segment is full, so that
                    // each journal.db commit carries many messages.
                    if !state.changes.is_empty() || state.closed {
                        break;
                    }
                    let logged = self.shared.copy_due() || !state.duplicates.is_empty();
                    let due = interval.saturating_sub(last_copy.elapsed());
                    if logged && (due.is_zero() || state.live.len() > 1) {
                        break;
                    }
                    let quiet = interval == COPY_INTERVAL;
                    let sync_due =
                        unsynced_since.filter(|_| quiet).map(|since| QUIET_SYNC_AFTER.saturating_sub(since.elapsed()));
                    if sync_due.is_some_and(|wait| wait.is_zero()) {
                        drop(state);
                        self.sync_quietly();
                        unsynced_since = None;
                        state = self.shared.lock();
                        continue;
                    }
                    let timeout = match (logged, sync_due) {
                        (true, Some(wait)) => Some(due.min(wait)),
                        (true, None) => Some(due),
                        (false, wait) => wait,
                    };
                    state = match timeout {
                        Some(timeout) => self
                            .shared
                            .changed
                            .wait_timeout(state, timeout)
                            .map_or_else(|error| error.into_inner().0, |(guard, _)| guard),
                        None => self.shared.wait(state),
                    };
                }
                if state.closed && !self.shared.copy_due() && state.changes.is_empty() && state.duplicates.is_empty() {
                    break;
                }
                (self.plan(&state), std::mem::take(&mut state.changes), std::mem::take(&mut state.duplicates))
            };
            let since_last = last_copy.elapsed();
            last_copy = Instant::now();
            match self.copy(plan, reached, changes, &duplicates) {
                Ok(records) => {
                    interval = copy_interval(records, since_last);
                    let pages = checkpoint_pages(interval);
                    if pages != checkpoint_after {
                        match self.connection.pragma_update(None, "wal_autocheckpoint", pages) {
                            Ok(()) => checkpoint_after = pages,
                            Err(error) => tracing::warn!(error = %error, "cannot change when journal.db checkpoints"),
                        }
                    }
                    if self.shared.synced.load(Ordering::Acquire) < self.shared.applied.load(Ordering::Acquire) {
                        unsynced_since.get_or_insert_with(Instant::now);
                    } else {
                        unsynced_since = None;
                    }
                }
                Err(error) => {
                    self.shared.copying.store(false, Ordering::Relaxed);
                    if self.shared.lock().closed {
                        // Shutting down: the records stay in the log, and the next start
                        // copies them (or refuses to start, naming this error).
                        tracing::error!(error = %error, "journal.db refused the ingest log's records; they stay in the log");
                        break;
                    }
                    tracing::error!(error = %error, "journal.db refused the ingest log's records; retrying");
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
        // Checkpoint so that the WAL does not grow across restarts; failure here is harmless.
        if let Err(error) = self.connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %error, "wal checkpoint at shutdown failed");
        }
    }

    /// The log stretches from the cursor to the last synced commit, at most
    /// [`MAX_READ_BYTES`] (but always the cursor's next stretch), and the sequence number
    /// they reach.
    fn plan(&self, state: &State) -> (Vec<Stretch>, i64) {
        let mut plan = Vec::new();
        let mut bytes = 0;
        let mut reached = self.shared.applied.load(Ordering::Acquire);
        let start = self
            .cursor
            .as_ref()
            .and_then(|cursor| state.live.iter().position(|live| live.path == cursor.path))
            .unwrap_or(0);
        for (index, live) in state.live.iter().enumerate().skip(start) {
            let (from, first_seq) = match &self.cursor {
                Some(cursor) if index == start && cursor.path == live.path => (cursor.offset, cursor.next_seq),
                _ => (BLOCK, live.first_seq),
            };
            if live.end > from {
                if !plan.is_empty() && bytes + live.end - from > MAX_READ_BYTES {
                    break;
                }
                bytes += live.end - from;
                let mirrored = live.mirrored(from, live.end);
                plan.push(Stretch { path: live.path.clone(), from, to: live.end, first_seq, mirrored });
            }
            reached = reached.max(live.last_seq);
        }
        (plan, reached)
    }

    /// Reads `plan`, commits its records, the duplicate counts and `changes` in one
    /// transaction, then moves the cursor and frees the segments it left behind. Returns
    /// how many records it copied.
    fn copy(
        &mut self,
        plan: Vec<Stretch>,
        reached: i64,
        changes: Changes,
        duplicates: &[i64],
    ) -> Result<usize, String> {
        let mut records = Vec::new();
        let mut cursor = None;
        for stretch in plan {
            let scanned = match &stretch.mirrored {
                // Commit by commit: each is whole blocks, its records followed by padding.
                Some(commits) => {
                    let mut scanned = log::Scanned { end: stretch.from, next_seq: stretch.first_seq };
                    for (offset, bytes) in commits {
                        scanned = log::scan(bytes, *offset, scanned.next_seq, |record| records.push(record));
                        if scanned.end < offset + bytes.len() as u64 {
                            break;
                        }
                    }
                    scanned
                }
                None => {
                    let data = log::open_for_reading(&stretch.path)
                        .and_then(|file| log::read_range(&file, stretch.from, stretch.to, &mut self.staging))
                        .map_err(|error| format!("{}: {error}", stretch.path.display()))?;
                    log::scan(data, stretch.from, stretch.first_seq, |record| records.push(record))
                }
            };
            if scanned.end < stretch.to {
                tracing::warn!(segment = %stretch.path.display(), offset = scanned.end, "ingest log record unreadable; rest of the segment skipped");
            }
            // Past the unreadable part, so that the writer does not stop on it.
            cursor = Some(Cursor { path: stretch.path, offset: stretch.to, next_seq: scanned.next_seq });
        }
        let outcome = write(&mut self.connection, &records, duplicates, changes);
        let (applied, replies) = match outcome {
            Ok(done) => done,
            Err(error) => return Err(error.to_string()),
        };
        if cursor.is_some() {
            self.cursor = cursor;
        }
        let mut healthy = true;
        if self.sync_due(reached) {
            // The log is about to let go of records whose rows were only committed.
            match sync_database(&self.shared.database) {
                Ok(()) => {
                    self.shared.synced.fetch_max(reached, Ordering::AcqRel);
                }
                Err(error) => {
                    healthy = false;
                    tracing::error!(error = %error, "cannot sync journal.db; the ingest log keeps its segments until it can");
                }
            }
        }
        self.shared.copying.store(healthy, Ordering::Relaxed);
        {
            let mut state = self.shared.lock();
            // `reached`, not the last record read: an unreadable stretch is passed over
            // rather than waited for.
            self.shared.applied.fetch_max(reached, Ordering::AcqRel);
            if let Some(cursor) = &self.cursor {
                state.forget_mirrored(&cursor.path, cursor.offset);
            }
            self.recycle(&mut state);
        }
        self.shared.changed.notify_all();
        for (reply, applied) in replies {
            let _ = reply.send(applied.map_err(Error::Write));
        }
        if let (true, Some(committed)) = (applied > 0, &self.committed) {
            committed();
        }
        self.keep_a_spare();
        Ok(applied)
    }

    /// Checkpoints `journal.db` and syncs it, on an ordinary line after
    /// [`QUIET_SYNC_AFTER`]. A failure is only logged: the log still holds the rows.
    fn sync_quietly(&self) {
        let applied = self.shared.applied.load(Ordering::Acquire);
        // PASSIVE: it waits for no reader. With synchronous=NORMAL it syncs the WAL, writes
        // the pages back and syncs the database file.
        if let Err(error) = self.connection.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
            tracing::warn!(error = %error, "journal.db checkpoint failed; retried at the next quiet moment");
        }
        match sync_database(&self.shared.database) {
            Ok(()) => {
                self.shared.synced.fetch_max(applied, Ordering::AcqRel);
            }
            Err(error) => tracing::warn!(error = %error, "cannot sync journal.db; retried at the next quiet moment"),
        }
    }

    /// The last sequence number of the oldest segment when the cursor has left it and every
    /// record in it is committed up to `through`: it is retirable once `journal.db` is synced
    /// that far.
    fn finished_front(&self, state: &State, through: i64) -> Option<i64> {
        let front = state.live.front().filter(|_| state.live.len() > 1)?;
        let behind = self.cursor.as_ref().is_some_and(|cursor| cursor.path != front.path);
        (behind && front.last_seq <= through).then_some(front.last_seq)
    }

    /// True when only the sync of `journal.db` keeps the oldest segment from being retired
    /// after a commit that reached `reached`.
    fn sync_due(&self, reached: i64) -> bool {
        let synced = self.shared.synced.load(Ordering::Acquire);
        self.finished_front(&self.shared.lock(), reached).is_some_and(|last_seq| last_seq > synced)
    }

    /// Retires the segments before the cursor's, all of whose records are on disk in
    /// `journal.db`.
    fn recycle(&self, state: &mut State) {
        let applied = self.shared.applied.load(Ordering::Acquire);
        let synced = self.shared.synced.load(Ordering::Acquire);
        while self.finished_front(state, applied).is_some_and(|last_seq| last_seq <= synced) {
            let Some(done) = state.pop_front_live() else { break };
            if let Err(error) = retire(done.path.clone(), &mut state.spares) {
                tracing::warn!(segment = %done.path.display(), error = %error, "cannot retire ingest log segment")
            }
        }
    }

    /// Zero-fills a spare segment ahead of need, here rather than on the ACK path, when
    /// none is left and none is about to be retired.
    fn keep_a_spare(&self) {
        let number = {
            let mut state = self.shared.lock();
            // With exactly two segments live, the appender has just rotated and the older
            // one is retired by the next copy or the one after: a spare made now would be
            // one zero-fill too many. Under steady load it came at nearly every rotation,
            // its writes holding back the ACK path's. More segments live means the writer
            // is behind, and the appender's next rotation would find no spare.
            if !state.spares.is_empty() || state.live.len() == 2 || state.closed {
                return;
            }
            state.next_number += 1;
            state.next_number - 1
        };
        match log::create(&self.shared.directory, number, SEGMENT_BYTES) {
            Ok(path) => self.shared.lock().spares.push(path),
            Err(error) => tracing::warn!(error = %error, "cannot prepare a spare ingest log segment"),
        }
    }
}

type Replies = Vec<(tokio::sync::oneshot::Sender<Result<(), Error>>, Result<(), String>)>;

/// One transaction: the records, the duplicate counts, then each change in a savepoint.
/// Returns how many records were inserted and each change's outcome.
fn write(
    connection: &mut Connection,
    records: &[Record],
    duplicates: &[i64],
    changes: Changes,
) -> rusqlite::Result<(usize, Replies)> {
    // IMMEDIATE: the write lock is taken up front. This thread is the journal file's only
    // writer in the gateway; an operator's tool writing to it at the same time makes this
    // wait for the busy handler instead of failing a lock upgrade.
    let mut transaction = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for record in records {
        insert(&transaction, record)?;
    }
    for id in duplicates {
        transaction.prepare_cached("UPDATE messages SET duplicates = duplicates + 1 WHERE id = ?1")?.execute([id])?;
    }
    let mut replies = Vec::with_capacity(changes.len());
    for (change, reply) in changes {
        let savepoint = transaction.savepoint()?;
        let applied = match change(&savepoint) {
            Ok(()) => savepoint.commit().map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()), // dropping the savepoint rolls it back
        };
        replies.push((reply, applied));
    }
    transaction.commit()?;
    Ok((records.len(), replies))
}

fn insert(transaction: &Transaction<'_>, record: &Record) -> rusqlite::Result<()> {
    let entry = &record.entry;
    let key = &entry.key;
    transaction
        .prepare_cached(
            "INSERT INTO messages (id, received_at_us, peer, sending_application, sending_facility,
                receiving_application, receiving_facility, message_datetime, message_type,
                control_id, version, charset, content_sha256, raw, raw_truncated, ack_code, ack,
                status, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
        )?
        .execute(params![
            record.seq,
            entry.received_at_us,
            entry.peer,
            key.sending_application,
            key.sending_facility,
            key.receiving_application,
            key.receiving_facility,
            key.message_datetime,
            key.message_type,
            key.control_id,
            key.version,
            entry.charset,
            &record.content_hash[..],
            &entry.raw[..],
            entry.raw_truncated,
            entry.ack_code,
            entry.ack,
            entry.status.as_str(),
            entry.error,
        ])?;
    Ok(())
}

/// Syncs `journal.db` and its WAL to disk. The writer commits with `synchronous=NORMAL`:
/// a commit hands its WAL frames to the OS and returns, and the log keeps the records until
/// this sync (SQLite's own syncs come only at checkpoints, which sync the WAL before
/// writing the database file and the database file before the WAL is reused). After it,
/// every committed row survives power loss.
fn sync_database(database: &Path) -> std::io::Result<()> {
    let mut wal = database.as_os_str().to_owned();
    wal.push("-wal");
    match File::open(&wal) {
        Ok(file) => file.sync_data()?,
        // No WAL: everything is in the database file.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    File::open(database)?.sync_data()
}

/// WAL pages after which the writer's commits checkpoint `journal.db`, for a copy interval:
/// deferred during a burst ([`BUSY_WAL_CHECKPOINT_PAGES`]), the default otherwise.
fn checkpoint_pages(interval: Duration) -> i64 {
    if interval == BUSY_COPY_INTERVAL {
        BUSY_WAL_CHECKPOINT_PAGES
    } else {
        WAL_CHECKPOINT_PAGES
    }
}

/// How long the writer waits before its next copy: [`BUSY_COPY_INTERVAL`] after a copy of
/// `records` that arrived faster than [`BUSY_RECORDS_PER_SECOND`] in the `since_last`
/// since the copy before, otherwise [`COPY_INTERVAL`].
fn copy_interval(records: usize, since_last: Duration) -> Duration {
    if records as f64 > BUSY_RECORDS_PER_SECOND * since_last.as_secs_f64().max(COPY_INTERVAL.as_secs_f64()) {
        BUSY_COPY_INTERVAL
    } else {
        COPY_INTERVAL
    }
}

/// An error about the ingest log at `directory`.
fn log_error(directory: &Path, what: &str, error: &dyn std::fmt::Display) -> Error {
    Error::Write(format!("ingest log {}: {what}: {error}", directory.display()))
}

/// Retires a segment whose records are all in `journal.db`: kept as a spare while fewer than
/// [`MAX_SPARES`] are kept and it has the standard size, deleted otherwise.
fn retire(path: PathBuf, spares: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let standard = std::fs::metadata(&path)?.len() == SEGMENT_BYTES;
    if standard && spares.len() < MAX_SPARES {
        log::retire(&path)?;
        spares.push(path);
        Ok(())
    } else {
        std::fs::remove_file(&path)
    }
}

/// Creates the log directory if needed and takes its lock, held as long as the returned
/// file is open: two gateways appending to one log would corrupt it.
pub(super) fn lock(directory: &Path) -> Result<File, Error> {
    let failed = |what: &str, error: &dyn std::fmt::Display| log_error(directory, what, error);
    if !directory.exists() {
        std::fs::create_dir_all(directory).map_err(|error| failed("cannot create", &error))?;
        if let Some(parent) = directory.parent() {
            File::open(parent).and_then(|parent| parent.sync_all()).map_err(|error| failed("cannot sync", &error))?;
        }
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(directory.join("LOCK"))
        .map_err(|error| failed("cannot open the lock file", &error))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(failed("in use", &"another gateway process has this data directory open"))
        }
        Err(std::fs::TryLockError::Error(error)) => Err(failed("cannot lock", &error)),
    }
}

/// Copies into `journal.db` every record of the log at `directory` that it does not have
/// yet (a crash or power cut after the ACK, before the writer's sync), syncs the database
/// at `database` (whose connection this is), then retires the log's segments. Returns the
/// last row id, the next segment number and the spares.
pub(super) fn recover(
    connection: &mut Connection,
    database: &Path,
    directory: &Path,
) -> Result<(i64, u64, Vec<PathBuf>), Error> {
    let failed = |what: &str, error: &dyn std::fmt::Display| log_error(directory, what, error);
    let last_row = |connection: &Connection| {
        connection.query_row("SELECT coalesce(max(id), 0) FROM messages", [], |row| row.get::<_, i64>(0))
    };
    let mut last_id = last_row(connection).map_err(|error| failed("cannot read journal.db", &error))?;
    let mut segments = log::list(directory).map_err(|error| failed("cannot list", &error))?;
    segments.sort_by_key(|segment| (segment.first_seq, segment.number));
    let mut recovered = 0usize;
    let mut staging = log::Aligned::default();
    for segment in segments.iter().filter(|segment| segment.first_seq.is_some()) {
        let first_seq = segment.first_seq.unwrap_or_default();
        let data = log::open_for_reading(&segment.path)
            .and_then(|file| log::read_range(&file, BLOCK, segment.size, &mut staging))
            .map_err(|error| failed("cannot read", &error))?;
        let mut records = Vec::new();
        log::scan(data, BLOCK, first_seq, |record| {
            if record.seq > last_id {
                records.push(record);
            }
        });
        if records.is_empty() {
            continue;
        }
        write(connection, &records, &[], Vec::new()).map_err(|error| failed("cannot copy into journal.db", &error))?;
        recovered += records.len();
        last_id = last_row(connection).map_err(|error| failed("cannot read journal.db", &error))?;
    }
    if recovered > 0 {
        tracing::info!(recovered, "journal: copied logged messages into journal.db after an unclean stop");
    }
    // Rows the last run committed may not be on disk yet (it stopped before syncing them):
    // they are before the log is emptied.
    sync_database(database).map_err(|error| failed("cannot sync journal.db before emptying the log", &error))?;
    let mut spares = Vec::new();
    for segment in &segments {
        retire(segment.path.clone(), &mut spares).map_err(|error| failed("cannot retire a segment", &error))?;
    }
    let mut next_number = segments.iter().map(|segment| segment.number + 1).max().unwrap_or(1);
    while spares.len() < MAX_SPARES {
        // The first append takes one and the first rotation the other, so that neither
        // waits for a zero-fill, nor the ACK path for the writer making one.
        spares.push(
            log::create(directory, next_number, SEGMENT_BYTES)
                .map_err(|error| failed("cannot create a segment", &error))?,
        );
        next_number += 1;
    }
    Ok((last_id, next_number, spares))
}

/// Earlier non-refused rows of the same sender, MSH-10 and content inside the window.
/// Without ORDER BY/LIMIT: with them (and the range on received_at_us) SQLite, built with
/// STAT4, re-plans the statement at every execution, which cost about a quarter of the writer's CPU.
/// Matches are few (one sender's uses of one MSH-10); the earliest is the original.
const DUPLICATE_QUERY: &str = "SELECT id, ack, ack_code FROM messages
    WHERE sending_application = ?1 AND sending_facility = ?2 AND control_id = ?3
      AND content_sha256 = ?4 AND status <> 'refused' AND received_at_us >= ?5";

/// The earliest row in `journal.db` that `entry` duplicates: its id, ACK and ACK code.
pub(super) fn find_duplicate(
    connection: &Connection,
    entry: &NewEntry,
    content_hash: &[u8],
) -> rusqlite::Result<Option<(i64, Vec<u8>, String)>> {
    let key = &entry.key;
    let not_before = entry.received_at_us.saturating_sub(entry.duplicate_window_us);
    let mut statement = connection.prepare_cached(DUPLICATE_QUERY)?;
    let mut original: Option<(i64, Vec<u8>, String)> = None;
    let mut rows = statement.query(params![
        key.sending_application,
        key.sending_facility,
        key.control_id,
        content_hash,
        not_before
    ])?;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        if original.as_ref().is_none_or(|(earliest, _, _)| id < *earliest) {
            original = Some((id, row.get(1)?, row.get(2)?));
        }
    }
    Ok(original)
}

#[cfg(test)]
mod tests {
    use super::super::{Appended, Journal, MessageKey, Status};
    use super::*;
    use bytes::Bytes;

    fn entry(control_id: &str, raw: &'static [u8], received_at_us: i64) -> NewEntry {
        NewEntry {
            received_at_us,
            peer: "127.0.0.1:1".to_string(),
            key: MessageKey {
                sending_application: "APP".to_string(),
                sending_facility: "FAC".to_string(),
                control_id: control_id.to_string(),
                ..MessageKey::default()
            },
            charset: "UNICODE UTF-8".to_string(),
            raw: Bytes::from_static(raw),
            raw_truncated: false,
            status: Status::Accepted,
            error: None,
            ack_code: "AA".to_string(),
            ack: format!("ACK for {control_id}").into_bytes(),
            duplicate_window_us: 60_000_000,
        }
    }

    #[tokio::test]
    async fn duplicates_inside_the_window_get_the_original_ack() {
        let directory = tempfile::tempdir().unwrap();
        let (journal, thread) = Journal::open(&directory.path().join("j.db")).unwrap();
        let first = journal.append(entry("1", b"MSH|one", 1_000_000)).await.unwrap();
        let Appended::Stored { id } = first else { panic!("first append must store: {first:?}") };

        let mut again = entry("1", b"MSH|one", 2_000_000);
        again.ack = b"a different ack".to_vec();
        let repeated = journal.append(again).await.unwrap();
        assert_eq!(
            repeated,
            Appended::Duplicate { original_id: id, ack: b"ACK for 1".to_vec(), ack_code: "AA".to_string() }
        );

        // Same control id, other content: a new message.
        assert!(matches!(journal.append(entry("1", b"MSH|two", 3_000_000)).await.unwrap(), Appended::Stored { .. }));
        // Outside the window: stored again.
        let late = entry("1", b"MSH|one", 1_000_000 + 61_000_000);
        assert!(matches!(journal.append(late).await.unwrap(), Appended::Stored { .. }));
        // One append at a time: each stored one is its own synced write; the duplicate's
        // answer needs none.
        assert_eq!((journal.stored_count(), journal.log_write_count()), (3, 3));

        drop(journal);
        thread.join().unwrap();
        let connection = crate::db::open_journal(&directory.path().join("j.db")).unwrap();
        let (rows, duplicates): (i64, i64) = connection
            .query_row("SELECT count(*), sum(duplicates) FROM messages", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap();
        assert_eq!((rows, duplicates), (3, 1));
    }

    #[tokio::test]
    async fn a_repeat_after_a_restart_is_found_through_the_notes_loaded_at_start() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        let Appended::Stored { id } = journal.append(entry("1", b"MSH|one", 1_000_000)).await.unwrap() else {
            panic!("first append must store")
        };
        journal.append(entry("2", b"MSH|two", 1_000_001)).await.unwrap();
        drop(journal);
        thread.join().unwrap();

        let (journal, thread) = Journal::open(&path).unwrap();
        let unseen = super::super::recent::key_hash(&entry("9", b"", 0).key);
        let deadline = Instant::now() + Duration::from_secs(10);
        while journal.shared.recent().may_contain(unseen, 0) {
            assert!(Instant::now() < deadline, "the notes of the rows from before the restart were not loaded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let repeated = journal.append(entry("1", b"MSH|one", 2_000_000)).await.unwrap();
        assert!(matches!(repeated, Appended::Duplicate { original_id, .. } if original_id == id), "{repeated:?}");
        assert!(matches!(journal.append(entry("3", b"MSH|one", 2_000_001)).await.unwrap(), Appended::Stored { .. }));
        drop(journal);
        thread.join().unwrap();
    }

    #[test]
    fn changes_run_in_the_writers_transaction_and_a_failing_one_refuses_only_itself() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let Appended::Stored { id } = runtime.block_on(journal.append(entry("1", b"MSH|one", 1))).unwrap() else {
            panic!("a new message is stored")
        };
        journal
            .apply_blocking(Box::new(move |connection| {
                connection.execute("UPDATE messages SET status = 'processed' WHERE id = ?1", [id]).map(drop)
            }))
            .unwrap();
        let failed = journal.apply_blocking(Box::new(|connection| {
            connection.execute("UPDATE messages SET no_such_column = 1", []).map(drop)
        }));
        assert!(matches!(failed, Err(Error::Write(reason)) if reason.contains("no_such_column")));
        assert!(journal.is_healthy(), "a refused change is the caller's failure, not the journal's");
        drop(journal);
        thread.join().unwrap();
        let connection = crate::db::open_journal(&path).unwrap();
        let status: String =
            connection.query_row("SELECT status FROM messages WHERE id = ?1", [id], |row| row.get(0)).unwrap();
        assert_eq!(status, "processed");
    }

    #[tokio::test]
    async fn the_duplicate_lookup_is_planned_once() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        for index in 0..20 {
            journal.append(entry(&index.to_string(), b"MSH|x", index)).await.unwrap();
        }
        drop(journal);
        thread.join().unwrap();
        // The same statement on a fresh connection: executions after the first must not
        // re-plan it (a bound LIMIT or ORDER BY with a range made SQLite do that every time).
        let mut connection = crate::db::open_journal(&path).unwrap();
        let transaction = connection.transaction().unwrap();
        for index in 0..20 {
            find_duplicate(&transaction, &entry(&index.to_string(), b"MSH|x", 100), &[0; 32]).unwrap();
        }
        let statement = transaction.prepare_cached(DUPLICATE_QUERY).unwrap();
        assert_eq!(statement.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    #[tokio::test]
    async fn concurrent_appends_are_all_stored() {
        let directory = tempfile::tempdir().unwrap();
        let (journal, thread) = Journal::open(&directory.path().join("j.db")).unwrap();
        let mut tasks = Vec::new();
        for index in 0..200 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                let control_id = index.to_string();
                journal.append(entry(&control_id, b"MSH|x", index)).await.unwrap()
            }));
        }
        for task in tasks {
            assert!(matches!(task.await.unwrap(), Appended::Stored { .. }));
        }
        assert!(journal.is_healthy());
        drop(journal);
        thread.join().unwrap();
    }

    #[test]
    fn opening_copies_logged_messages_that_journal_db_does_not_have() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        // A previous run stored row 1, then logged 2 and 3 and died before copying them.
        let (journal, thread) = Journal::open(&path).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(journal.append(entry("1", b"MSH|one", 1))).unwrap();
        drop(journal);
        thread.join().unwrap();
        let log_directory = super::super::log_directory(&path);
        let segment = log::create(&log_directory, 99, 8 * BLOCK).unwrap();
        let mut data = log::header(1, 8 * BLOCK);
        for (seq, raw) in [(1, &b"MSH|one"[..]), (2, b"MSH|two"), (3, b"MSH|three")] {
            log::encode(seq, &entry(&seq.to_string(), raw, seq), &[seq as u8; 32], &mut data);
        }
        std::os::unix::fs::FileExt::write_all_at(&File::options().write(true).open(&segment).unwrap(), &data, 0)
            .unwrap();

        let (journal, thread) = Journal::open(&path).unwrap();
        let Appended::Stored { id } = runtime.block_on(journal.append(entry("4", b"MSH|four", 4))).unwrap() else {
            panic!("a new message is stored")
        };
        assert_eq!(id, 4, "row ids continue after the recovered ones");
        drop(journal);
        thread.join().unwrap();
        let connection = crate::db::open_journal(&path).unwrap();
        let mut statement = connection.prepare("SELECT id, raw, status FROM messages ORDER BY id").unwrap();
        let rows: Vec<(i64, Vec<u8>, String)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let expected: Vec<(i64, Vec<u8>, String)> =
            [(1, &b"MSH|one"[..]), (2, b"MSH|two"), (3, b"MSH|three"), (4, b"MSH|four")]
                .into_iter()
                .map(|(id, raw)| (id, raw.to_vec(), "accepted".to_string()))
                .collect();
        assert_eq!(rows, expected);
        assert!(
            log::list(&log_directory)
                .unwrap()
                .iter()
                .all(|segment| segment.first_seq.is_none() || segment.number != 99),
            "the recovered segment is retired"
        );
    }

    #[test]
    fn a_log_longer_than_a_segment_is_copied_whole_and_its_segments_reused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // 48 MiB of messages: three segments and more.
        let count = 768;
        let raw: &'static [u8] = Box::leak(vec![b'x'; 64 << 10].into_boxed_slice());
        for index in 0..count {
            let mut message = entry(&index.to_string(), raw, index);
            message.duplicate_window_us = 0;
            runtime.block_on(journal.append(message)).unwrap();
        }
        drop(journal);
        thread.join().unwrap();
        let connection = crate::db::open_journal(&path).unwrap();
        let (rows, bytes): (i64, i64) = connection
            .query_row("SELECT count(*), sum(length(raw)) FROM messages", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap();
        assert_eq!((rows, bytes), (count, count * (64 << 10)));
        let files = log::list(&super::super::log_directory(&path)).unwrap().len();
        assert!(files <= 4, "segments are reused, not accumulated: {files} files");
    }

    #[tokio::test]
    async fn notes_load_in_the_background_and_cover_the_time_after_the_rows_left_out() {
        use super::super::recent;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        for (index, raw) in [b"MSH|one", b"MSH|two", b"MSH|thr"].into_iter().enumerate() {
            journal.append(entry(&index.to_string(), raw, 1_000_000 + index as i64)).await.unwrap();
        }
        drop(journal);
        thread.join().unwrap();

        // As if the journal were larger than the notes' bound: only the newest row loads.
        let shared = Shared::for_tests(&path, 1);
        *shared.recent() = recent::RecentKeys::covering_nothing(1);
        let unseen = recent::key_hash(&MessageKey {
            sending_application: "APP".to_string(),
            sending_facility: "FAC".to_string(),
            control_id: "9".to_string(),
            ..MessageKey::default()
        });
        assert!(shared.recent().may_contain(unseen, 1_500_000), "looked up until the notes are loaded");
        recent::spawn_load(shared.clone(), 3, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.recent().may_contain(unseen, 1_500_000) {
            assert!(Instant::now() < deadline, "the notes were not loaded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(shared.recent().may_contain(unseen, 1_000_001), "row 2 was received then: not covered");
        assert!(!shared.recent().may_contain(unseen, 1_000_002));
    }

    /// `j.db` in `directory`, opened as a journal (schema, log directory, spares) and closed.
    fn opened_and_closed(directory: &Path) -> PathBuf {
        let path = directory.join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        drop(journal);
        thread.join().unwrap();
        path
    }

    /// A writer on `path` without its thread, for calling its steps one by one.
    fn writer_for(path: &Path, shared: &Arc<Shared>) -> Writer {
        Writer {
            connection: crate::db::open_journal(path).unwrap(),
            shared: shared.clone(),
            committed: None,
            cursor: None,
            staging: log::Aligned::default(),
        }
    }

    #[test]
    fn the_writer_copies_commits_from_memory_and_reads_the_file_for_what_memory_left_out() {
        let directory = tempfile::tempdir().unwrap();
        let path = opened_and_closed(directory.path());
        let shared = Shared::for_tests(&path, 100);
        let mut writer = writer_for(&path, &shared);
        let commit = |seq: i64, control_id: &str| {
            let mut bytes = Vec::new();
            log::encode(seq, &entry(control_id, b"MSH|x", 1), &[0; 32], &mut bytes);
            bytes.resize(log::align(bytes.len() as u64) as usize, 0);
            Arc::<[u8]>::from(bytes)
        };
        let commit_to = |commit: Arc<[u8]>, last_seq: i64, mirrored: bool| {
            let mut state = shared.lock();
            let offset = state.live.back().unwrap().end;
            let length = commit.len() as u64;
            if mirrored {
                state.mirror(offset, commit);
            }
            let live = state.live.back_mut().unwrap();
            live.end = offset + length;
            live.last_seq = last_seq;
        };
        // The segment's file does not exist: only memory can provide its records.
        let missing = directory.path().join("missing.log");
        shared.lock().live.push_back(super::super::Live::new(missing.clone(), 1));
        commit_to(commit(1, "A"), 1, true);
        commit_to(commit(2, "B"), 2, true);
        assert!(shared.lock().mirrored_bytes > 0);

        let (plan, reached) = writer.plan(&shared.lock());
        assert!(plan[0].mirrored.as_ref().is_some_and(|commits| commits.len() == 2));
        assert_eq!(writer.copy(plan, reached, Vec::new(), &[]).unwrap(), 2);
        let control_ids: Vec<String> = writer
            .connection
            .prepare("SELECT control_id FROM messages ORDER BY id")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(control_ids, ["A", "B"]);
        assert_eq!(shared.lock().mirrored_bytes, 0, "copied commits are let go");

        // A commit that memory left out is read from the file (here: the missing one).
        commit_to(commit(3, "C"), 3, false);
        let (plan, reached) = writer.plan(&shared.lock());
        assert!(plan[0].mirrored.is_none());
        let error = writer.copy(plan, reached, Vec::new(), &[]).unwrap_err();
        assert!(error.contains("missing.log"), "{error}");
    }

    #[test]
    fn memory_holds_whole_stretches_only_and_at_most_its_bound() {
        let mut state = State::default();
        state.live.push_back(super::super::Live::new(PathBuf::from("1"), 1));
        let block = |fill: u8| Arc::<[u8]>::from(vec![fill; BLOCK as usize]);
        state.mirror(BLOCK, block(1));
        state.mirror(2 * BLOCK, block(2));
        // The third commit is left out: the stretch past it is not in memory.
        state.mirror(4 * BLOCK, block(4));
        let live = state.live.back().unwrap();
        assert_eq!(live.mirrored(BLOCK, 3 * BLOCK).map(|commits| commits.len()), Some(2));
        assert_eq!(live.mirrored(2 * BLOCK, 3 * BLOCK).map(|commits| commits[0].0), Some(2 * BLOCK));
        assert!(live.mirrored(BLOCK, 5 * BLOCK).is_none(), "a gap");
        assert!(live.mirrored(BLOCK, 2 * BLOCK + 1).is_none(), "not on a commit's end");
        assert_eq!(state.mirrored_bytes, 3 * BLOCK as usize);

        state.forget_mirrored(Path::new("1"), 3 * BLOCK);
        assert_eq!(state.mirrored_bytes, BLOCK as usize);
        state.mirrored_bytes = super::super::MAX_MIRROR_BYTES;
        state.mirror(5 * BLOCK, block(5));
        assert_eq!(state.live.back().unwrap().mirror.len(), 1, "full: left out");
        state.mirrored_bytes = BLOCK as usize;
        assert!(state.pop_front_live().is_some());
        assert_eq!(state.mirrored_bytes, 0, "a retired segment's mirror is let go");
    }

    #[test]
    fn opening_prepares_the_spares_and_the_writer_makes_one_only_when_none_is_coming() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let log_directory = super::super::log_directory(&path);
        let (journal, thread) = Journal::open(&path).unwrap();
        assert_eq!(journal.shared.lock().spares.len(), MAX_SPARES, "zero-filled before the first message");
        drop(journal);
        thread.join().unwrap();

        let shared = Shared::for_tests(&path, 100);
        let writer = writer_for(&path, &shared);
        let live = |number: u64| super::super::Live::new(log_directory.join(format!("{number}")), 1);
        shared.lock().live.extend([live(1), live(2)]);
        writer.keep_a_spare();
        assert!(shared.lock().spares.is_empty(), "just rotated: the older segment becomes the spare");
        shared.lock().live.push_back(live(3));
        writer.keep_a_spare();
        let spares = shared.lock().spares.clone();
        assert_eq!(spares.len(), 1, "behind: the next rotation needs one");
        assert_eq!(std::fs::metadata(&spares[0]).unwrap().len(), SEGMENT_BYTES);
    }

    #[test]
    fn a_segment_is_retired_only_once_journal_db_is_synced_past_it() {
        let directory = tempfile::tempdir().unwrap();
        let path = opened_and_closed(directory.path());
        let log_directory = super::super::log_directory(&path);
        let shared = Shared::for_tests(&path, 100);
        let writer = Writer {
            cursor: Some(Cursor { path: log_directory.join("2"), offset: BLOCK, next_seq: 11 }),
            ..writer_for(&path, &shared)
        };
        let full = log::create(&log_directory, 50, SEGMENT_BYTES).unwrap();
        shared.lock().live.extend([
            super::super::Live { end: SEGMENT_BYTES, last_seq: 10, ..super::super::Live::new(full.clone(), 1) },
            super::super::Live::new(log_directory.join("2"), 11),
        ]);
        // Rows 1 to 10 are committed, not synced.
        shared.applied.store(10, Ordering::Release);
        assert!(writer.sync_due(10));
        writer.recycle(&mut shared.lock());
        assert_eq!(shared.lock().live.len(), 2, "the log keeps records journal.db has only committed");

        sync_database(&path).unwrap();
        shared.synced.store(10, Ordering::Release);
        assert!(!writer.sync_due(10));
        writer.recycle(&mut shared.lock());
        assert_eq!(shared.lock().live.len(), 1);
        assert_eq!(shared.lock().spares, vec![full], "retired as a spare");
    }

    #[tokio::test]
    async fn on_a_quiet_line_committed_rows_are_synced_within_a_second_or_so() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        journal.append(entry("1", b"MSH|one", 1)).await.unwrap();
        let started = Instant::now();
        while journal.shared.synced.load(Ordering::Acquire) < 1 {
            assert!(started.elapsed() < QUIET_SYNC_AFTER * 10, "row 1 was never synced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() >= QUIET_SYNC_AFTER / 2, "synced at once, as if every commit were");
        drop(journal);
        thread.join().unwrap();
    }

    #[test]
    fn a_busy_line_is_copied_in_fewer_larger_transactions() {
        assert_eq!(copy_interval(0, Duration::from_millis(20)), COPY_INTERVAL);
        assert_eq!(copy_interval(5, Duration::from_millis(20)), COPY_INTERVAL, "250 a second");
        assert_eq!(copy_interval(60, Duration::from_millis(20)), BUSY_COPY_INTERVAL, "3,000 a second");
        assert_eq!(copy_interval(400, Duration::from_secs(1)), COPY_INTERVAL);
        assert_eq!(copy_interval(300, BUSY_COPY_INTERVAL), BUSY_COPY_INTERVAL, "600 a second stays busy");
        // A copy soon after the last (a segment filled) is judged over the ordinary interval.
        assert_eq!(copy_interval(5, Duration::from_micros(10)), COPY_INTERVAL);
        // Checkpoints wait while the line is busy, and come back with the ordinary interval.
        assert_eq!(checkpoint_pages(BUSY_COPY_INTERVAL), BUSY_WAL_CHECKPOINT_PAGES);
        assert_eq!(checkpoint_pages(COPY_INTERVAL), WAL_CHECKPOINT_PAGES);
        const { assert!(BUSY_WAL_CHECKPOINT_PAGES > WAL_CHECKPOINT_PAGES) };
    }

    #[test]
    fn a_second_gateway_on_the_same_data_directory_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        let second = Journal::open(&path).err().expect("the log is locked");
        assert!(second.to_string().contains("another gateway process"), "{second}");
        drop(journal);
        thread.join().unwrap();
        let (journal, thread) = Journal::open(&path).expect("the lock goes with the first journal");
        drop(journal);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_duplicate_lookup_that_missed_a_commit_is_done_again() {
        let directory = tempfile::tempdir().unwrap();
        let (journal, thread) = Journal::open(&directory.path().join("j.db")).unwrap();
        let Appended::Stored { id } = journal.append(entry("1", b"MSH|one", 1_000_000)).await.unwrap() else {
            panic!("first append must store")
        };
        // Wait until the writer has copied it into journal.db and the appender has let go of it.
        while journal.shared.applied.load(Ordering::Acquire) < id {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(journal.log_backlog(), 0, "everything logged is copied");
        journal.append(entry("2", b"MSH|two", 1_000_001)).await.unwrap();
        // A caller's lookup made before that commit (it saw nothing) must not be trusted.
        let stale = super::super::Checked { through: 0, found: None };
        let repeat = entry("1", b"MSH|one", 2_000_000);
        let content_hash: [u8; 32] =
            sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&repeat.raw)).into();
        let key_hash = super::super::recent::key_hash(&repeat.key);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let committer = &journal.handle.0;
        let slot = committer.reserve().await.unwrap();
        committer.push(super::super::Request {
            entry: Box::new(repeat),
            content_hash,
            key_hash,
            checked: Some(stale),
            reply,
            _slot: slot,
        });
        committer.lead();
        let answered = answer.await.unwrap().unwrap();
        assert!(matches!(answered, Appended::Duplicate { original_id, .. } if original_id == id), "{answered:?}");
        drop(journal);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_journal_db_that_refuses_copies_makes_the_journal_unhealthy_though_logging_works() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("j.db");
        let (journal, thread) = Journal::open(&path).unwrap();
        // An operator's trigger (standing in for a full disk or a damaged file) refuses inserts.
        let connection = crate::db::open_journal(&path).unwrap();
        connection
            .execute_batch("CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'refused'); END;")
            .unwrap();
        journal.append(entry("1", b"MSH|one", 1)).await.unwrap();
        for _ in 0..500 {
            if !journal.is_healthy() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!journal.is_healthy(), "the failed copy shows");
        journal.append(entry("2", b"MSH|two", 2)).await.unwrap();
        assert!(!journal.is_healthy(), "a good log write does not hide the failing copy");
        drop(journal);
        thread.join().unwrap();
        // The next start copies the log first and says why it cannot.
        let refused = Journal::open(&path).err().expect("recovery meets the same conflict");
        assert!(refused.to_string().contains("cannot copy into journal.db"), "{refused}");
    }
}
