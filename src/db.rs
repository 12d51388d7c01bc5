//! The embedded SQLite databases: opening them with the durability settings the gateway's
//! promises rest on, and the schema migrations. No domain types live here.
//!
//! Two files in the data directory: [`JOURNAL_FILE`] holds the inbound journal (every
//! message as received, and its processing status), written only by the journal's writer
//! thread; [`STORE_FILE`] holds the FHIR resources, their search indexes and the aggregator
//! outbox. Apart, the journal's commits (which gate every ACK) never wait for the pipeline's
//! or the outbox's write transactions, and each file has its own WAL and checkpoints.
//!
//! Durability: WAL journal with `synchronous=FULL`, so every commit syncs the WAL to disk
//! before it returns (with `fdatasync`: the bundled SQLite is built with `HAVE_FDATASYNC`, see
//! `.cargo/config.toml`). A commit that returned survives power loss, not only a process crash.
//! The journal's writer alone lowers its connection to `NORMAL`: its rows are in the synced
//! ingest log until it syncs them itself (see `journal`). The
//! on-disk format is versioned by `PRAGMA user_version`; [`MIGRATIONS`] and
//! [`JOURNAL_MIGRATIONS`] are applied in order at open, each in its own transaction.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// Errors opening or migrating the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite refused an operation.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer gateway.
    #[error("database {path} has schema version {found}, newer than this gateway's {supported}")]
    TooNew {
        /// The database file.
        path: String,
        /// Version found on disk.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
}

/// The journal's table, in its own file ([`JOURNAL_FILE`]) so that its fsynced commits, which
/// gate every ACK, never wait for the store's write lock.
const JOURNAL_TABLE: &str = "CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        received_at_us INTEGER NOT NULL,
        peer TEXT NOT NULL,
        sending_application TEXT NOT NULL,
        sending_facility TEXT NOT NULL,
        receiving_application TEXT NOT NULL,
        receiving_facility TEXT NOT NULL,
        message_datetime TEXT NOT NULL,
        message_type TEXT NOT NULL,
        control_id TEXT NOT NULL,
        version TEXT NOT NULL,
        charset TEXT NOT NULL,
        content_sha256 BLOB NOT NULL,
        raw BLOB NOT NULL,
        raw_truncated INTEGER NOT NULL DEFAULT 0,
        ack_code TEXT NOT NULL,
        ack BLOB NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        duplicates INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX messages_by_control_id
        ON messages (sending_application, sending_facility, control_id);
    CREATE INDEX messages_by_status ON messages (status, id);";

/// Processing results kept with each message.
const JOURNAL_OUTCOME_COLUMNS: &str = "ALTER TABLE messages ADD COLUMN processed_at_us INTEGER;
    ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN report TEXT;";

/// Every column of `messages`, for moving rows between files.
const JOURNAL_COLUMNS: &str = "id, received_at_us, peer, sending_application, sending_facility,
    receiving_application, receiving_facility, message_datetime, message_type, control_id, version,
    charset, content_sha256, raw, raw_truncated, ack_code, ack, status, error, duplicates,
    processed_at_us, attempts, report";

/// File name of the journal database inside the data directory.
pub const JOURNAL_FILE: &str = "journal.db";
/// File name of the store database (resources, search indexes, outbox) inside the data directory.
pub const STORE_FILE: &str = "gateway.db";

/// One schema step.
#[derive(Clone, Copy, Debug)]
pub enum Migration {
    /// SQL run in one transaction.
    Sql(&'static str),
    /// Moves the journal rows of a store database written before the journal had a file
    /// of its own into [`JOURNAL_FILE`] beside it, then drops the store's copy.
    MoveJournalOut,
}

/// Migrations of the journal database ([`JOURNAL_FILE`]).
pub const JOURNAL_MIGRATIONS: &[Migration] = &[Migration::Sql(JOURNAL_TABLE), Migration::Sql(JOURNAL_OUTCOME_COLUMNS)];

/// Migrations of the store database ([`STORE_FILE`]), applied in order; the database's
/// `user_version` is the number applied. Steps 1 and 3 created the journal in this file
/// before it moved out (step 6); they stay so that old files upgrade in order.
pub const MIGRATIONS: &[Migration] = &[
    // 1: the inbound journal (moved out by step 6).
    Migration::Sql(JOURNAL_TABLE),
    // 2: the resource store and its search indexes.
    Migration::Sql(crate::store::SCHEMA),
    // 3: processing results kept with each message.
    Migration::Sql(JOURNAL_OUTCOME_COLUMNS),
    // 4: the aggregator outbox.
    Migration::Sql(crate::outbox::SCHEMA),
    // 5: reference searches by bare id use an index.
    Migration::Sql(crate::store::REFERENCE_BY_ID),
    // 6: the journal lives in its own file.
    Migration::MoveJournalOut,
];

/// Opens (creating if needed) the store database at `path` with WAL and full fsync, and
/// applies pending [`MIGRATIONS`].
pub fn open(path: &Path) -> Result<Connection, Error> {
    open_with(path, MIGRATIONS)
}

/// Opens (creating if needed) the journal database at `path` with WAL and full fsync, and
/// applies pending [`JOURNAL_MIGRATIONS`].
pub fn open_journal(path: &Path) -> Result<Connection, Error> {
    open_with(path, JOURNAL_MIGRATIONS)
}

fn open_with(path: &Path, migrations: &[Migration]) -> Result<Connection, Error> {
    let name = path.display().to_string();
    let wrap = |source| Error::Sqlite { path: name.clone(), source };
    let mut connection = Connection::open(path).map_err(wrap)?;
    // Writers (journal, pipeline, outbox) take the write lock with BEGIN IMMEDIATE and
    // wait for each other here. SQLite's default busy handler sleeps up to 100 ms between
    // tries, which would show up as ACK latency; this one polls every 100 µs for the first
    // 50 ms, then every millisecond, for about 10 s in all.
    connection
        .busy_handler(Some(|attempt: i32| {
            let pause = if attempt < 500 { Duration::from_micros(100) } else { Duration::from_millis(1) };
            std::thread::sleep(pause);
            attempt < 10_500
        }))
        .map_err(wrap)?;
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;",
        )
        .map_err(wrap)?;
    migrate(&mut connection, path, migrations)?;
    Ok(connection)
}

fn migrate(connection: &mut Connection, path: &Path, migrations: &[Migration]) -> Result<(), Error> {
    let name = path.display().to_string();
    let wrap = |source| Error::Sqlite { path: name.clone(), source };
    let applied: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(wrap)?;
    let supported = migrations.len() as i64;
    if applied > supported {
        return Err(Error::TooNew { path: name.clone(), found: applied, supported });
    }
    for (index, migration) in migrations.iter().enumerate().skip(applied as usize) {
        let sql = match migration {
            Migration::Sql(sql) => *sql,
            Migration::MoveJournalOut => {
                copy_journal_out(connection, path)?;
                "DROP TABLE messages;"
            }
        };
        let transaction = connection.transaction().map_err(wrap)?;
        transaction.execute_batch(sql).map_err(wrap)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1).map_err(wrap)?;
        transaction.commit().map_err(wrap)?;
    }
    Ok(())
}

/// Copies the rows of an old store file's `messages` table into the journal file beside it.
/// Idempotent (rows keep their ids; present ones are skipped), so a crash before the
/// store's copy is dropped only repeats the copy at the next start.
fn copy_journal_out(connection: &Connection, store: &Path) -> Result<(), Error> {
    let journal = store.with_file_name(JOURNAL_FILE);
    let name = store.display().to_string();
    let wrap = |source| Error::Sqlite { path: name.clone(), source };
    let rows: i64 = connection.query_row("SELECT count(*) FROM messages", [], |row| row.get(0)).map_err(wrap)?;
    if rows == 0 {
        return Ok(());
    }
    drop(open_journal(&journal)?);
    connection.execute("ATTACH DATABASE ?1 AS journal", [journal.display().to_string()]).map_err(wrap)?;
    let copied = connection.execute_batch(&format!(
        "INSERT OR IGNORE INTO journal.messages ({JOURNAL_COLUMNS}) SELECT {JOURNAL_COLUMNS} FROM main.messages;"
    ));
    connection.execute_batch("DETACH DATABASE journal").map_err(wrap)?;
    copied.map_err(wrap)?;
    tracing::info!(rows, journal = %journal.display(), "journal moved to its own file");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_twice_and_refuses_newer_schema() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("gateway.db");
        drop(open(&path).unwrap());
        let connection = open(&path).unwrap();
        let mode: String = connection.pragma_query_value(None, "journal_mode", |row| row.get(0)).unwrap();
        assert_eq!(mode, "wal");
        connection.pragma_update(None, "user_version", 999).unwrap();
        drop(connection);
        assert!(matches!(open(&path), Err(Error::TooNew { found: 999, .. })));
    }

    #[test]
    fn a_store_file_from_before_the_split_hands_its_journal_rows_to_the_journal_file() {
        let directory = tempfile::tempdir().unwrap();
        let store = directory.path().join(STORE_FILE);
        // A store file at version 5 (journal inside), holding one message.
        let old = Connection::open(&store).unwrap();
        old.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
        for migration in &MIGRATIONS[..5] {
            let Migration::Sql(sql) = migration else { unreachable!("steps 1-5 are SQL") };
            old.execute_batch(sql).unwrap();
        }
        old.pragma_update(None, "user_version", 5).unwrap();
        old.execute(
            "INSERT INTO messages (id, received_at_us, peer, sending_application, sending_facility,
                receiving_application, receiving_facility, message_datetime, message_type, control_id,
                version, charset, content_sha256, raw, ack_code, ack, status, attempts)
             VALUES (42, 1, 'peer', 'APP', 'FAC', 'GW', 'GW', '', 'ADT^A01', 'C-1', '2.5', 'ASCII', x'00',
                CAST('MSH|raw' AS BLOB), 'AA', x'00', 'processed', 1)",
            [],
        )
        .unwrap();
        drop(old);

        let upgraded = open(&store).unwrap();
        let tables: i64 = upgraded
            .query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'messages'", [], |row| row.get(0))
            .unwrap();
        assert_eq!(tables, 0, "the store file no longer has a journal");
        let journal = open_journal(&directory.path().join(JOURNAL_FILE)).unwrap();
        let (control_id, raw, status): (String, Vec<u8>, String) = journal
            .query_row("SELECT control_id, raw, status FROM messages WHERE id = 42", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .unwrap();
        assert_eq!((control_id.as_str(), raw.as_slice(), status.as_str()), ("C-1", &b"MSH|raw"[..], "processed"));
    }
}
