//! The journal's writer thread: group commit of queued appends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection, Transaction};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Appended, Error, NewEntry, Notify, Request, Status};

/// What the writer did with one request of a batch.
enum Done {
    Appended(Appended),
    Applied(Result<(), String>),
}

/// Most appends committed in one transaction.
pub const MAX_BATCH: usize = 512;
/// Most appends waiting for the writer.
pub const QUEUE_CAPACITY: usize = 4096;

pub(super) fn spawn(
    connection: Connection,
    receiver: mpsc::Receiver<Request>,
    healthy: Arc<AtomicBool>,
    stored: Arc<AtomicU64>,
    committed: Option<Notify>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("journal-writer".to_string())
        .spawn(move || run(connection, receiver, healthy, stored, committed))
        .expect("spawning a thread fails only when the OS is out of resources at startup")
}

fn run(
    mut connection: Connection,
    mut receiver: mpsc::Receiver<Request>,
    healthy: Arc<AtomicBool>,
    stored: Arc<AtomicU64>,
    committed: Option<Notify>,
) {
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        match write_batch(&mut connection, &mut batch) {
            Ok(outcomes) => {
                healthy.store(true, Ordering::Relaxed);
                let stored_now = outcomes
                    .iter()
                    .filter(|outcome| matches!(outcome, Done::Appended(Appended::Stored { .. })))
                    .count();
                stored.fetch_add(stored_now as u64, Ordering::Relaxed);
                if let (true, Some(committed)) = (stored_now > 0, &committed) {
                    committed();
                }
                // A caller that went away (connection closed) needs no answer.
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    match (request, outcome) {
                        (Request::Append { reply, .. }, Done::Appended(appended)) => {
                            let _ = reply.send(Ok(appended));
                        }
                        (Request::Apply { reply, .. }, Done::Applied(applied)) => {
                            let _ = reply.send(applied.map_err(Error::Write));
                        }
                        _ => unreachable!("write_batch answers each request in kind"),
                    }
                }
            }
            Err(error) => {
                healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %error, batch = batch.len(), "journal commit failed; batch refused");
                for request in batch.drain(..) {
                    let failure = Error::Write(error.to_string());
                    match request {
                        Request::Append { reply, .. } => {
                            let _ = reply.send(Err(failure));
                        }
                        Request::Apply { reply, .. } => {
                            let _ = reply.send(Err(failure));
                        }
                    }
                }
            }
        }
    }
    // Checkpoint so that the WAL does not grow across restarts; failure here is harmless.
    if let Err(error) = connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        tracing::warn!(error = %error, "wal checkpoint at shutdown failed");
    }
}

fn write_batch(connection: &mut Connection, batch: &mut [Request]) -> rusqlite::Result<Vec<Done>> {
    // IMMEDIATE: the write lock is taken up front. This thread is the journal file's only
    // writer in the gateway; an operator's tool writing to it at the same time makes this
    // wait for the busy handler instead of failing a lock upgrade.
    let mut transaction = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for request in batch.iter_mut() {
        match request {
            Request::Append { entry, .. } => outcomes.push(Done::Appended(write_one(&transaction, entry)?)),
            Request::Apply { change, .. } => {
                // The change runs once; what stays behind in the request is a no-op.
                let change = std::mem::replace(change, Box::new(|_| Ok(())));
                let savepoint = transaction.savepoint()?;
                let applied = match change(&savepoint) {
                    Ok(()) => savepoint.commit().map_err(|error| error.to_string()),
                    Err(error) => Err(error.to_string()), // dropping the savepoint rolls it back
                };
                outcomes.push(Done::Applied(applied));
            }
        }
    }
    transaction.commit()?;
    Ok(outcomes)
}

fn write_one(transaction: &Transaction<'_>, entry: &NewEntry) -> rusqlite::Result<Appended> {
    let digest = Sha256::digest(&entry.raw);
    let content_hash = digest.as_slice();
    if entry.status == Status::Accepted && entry.duplicate_window_us > 0 {
        if let Some(duplicate) = find_duplicate(transaction, entry, content_hash)? {
            return Ok(duplicate);
        }
    }
    let key = &entry.key;
    transaction
        .prepare_cached(
            "INSERT INTO messages (received_at_us, peer, sending_application, sending_facility,
                receiving_application, receiving_facility, message_datetime, message_type,
                control_id, version, charset, content_sha256, raw, raw_truncated, ack_code, ack,
                status, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        )?
        .execute(params![
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
            content_hash,
            &entry.raw[..],
            entry.raw_truncated,
            entry.ack_code,
            entry.ack,
            entry.status.as_str(),
            entry.error,
        ])?;
    Ok(Appended::Stored { id: transaction.last_insert_rowid() })
}

/// Earlier non-refused rows of the same sender, MSH-10 and content inside the window.
/// Without ORDER BY/LIMIT: with them (and the range on received_at_us) SQLite, built with
/// STAT4, re-plans the statement at every execution, which cost about a quarter of the writer's CPU.
/// Matches are few (one sender's uses of one MSH-10); the earliest is the original.
const DUPLICATE_QUERY: &str = "SELECT id, ack, ack_code FROM messages
    WHERE sending_application = ?1 AND sending_facility = ?2 AND control_id = ?3
      AND content_sha256 = ?4 AND status <> 'refused' AND received_at_us >= ?5";

fn find_duplicate(
    transaction: &Transaction<'_>,
    entry: &NewEntry,
    content_hash: &[u8],
) -> rusqlite::Result<Option<Appended>> {
    let key = &entry.key;
    let not_before = entry.received_at_us.saturating_sub(entry.duplicate_window_us);
    let mut statement = transaction.prepare_cached(DUPLICATE_QUERY)?;
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
    let Some((original_id, ack, ack_code)) = original else {
        return Ok(None);
    };
    transaction
        .prepare_cached("UPDATE messages SET duplicates = duplicates + 1 WHERE id = ?1")?
        .execute([original_id])?;
    Ok(Some(Appended::Duplicate { original_id, ack, ack_code }))
}

#[cfg(test)]
mod tests {
    use super::super::{Journal, MessageKey};
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

        drop(journal);
        thread.join().unwrap();
        let connection = crate::db::open_journal(&directory.path().join("j.db")).unwrap();
        let (rows, duplicates): (i64, i64) = connection
            .query_row("SELECT count(*), sum(duplicates) FROM messages", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap();
        assert_eq!((rows, duplicates), (3, 1));
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
}
