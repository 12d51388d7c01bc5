//! The embedded SQLite database: opening it with the durability settings the gateway's
//! promises rest on, and the schema migrations. No domain types live here.
//!
//! Durability: WAL journal with `synchronous=FULL`, so every commit fsyncs the WAL before
//! it returns. A commit that returned survives power loss, not only a process crash. The
//! on-disk format is versioned by `PRAGMA user_version`; [`MIGRATIONS`] are applied in
//! order at open, each in its own transaction.

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

/// Schema migrations, applied in order; the database's `user_version` is the number applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: the inbound journal.
    "CREATE TABLE messages (
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
    CREATE INDEX messages_by_status ON messages (status, id);",
    // 2: the resource store and its search indexes.
    crate::store::SCHEMA,
    // 3: processing results kept with each message.
    "ALTER TABLE messages ADD COLUMN processed_at_us INTEGER;
    ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN report TEXT;",
    // 4: the aggregator outbox.
    crate::outbox::SCHEMA,
    // 5: reference searches by bare id use an index.
    crate::store::REFERENCE_BY_ID,
];

/// Opens (creating if needed) the database at `path` with WAL and full fsync, and applies
/// pending migrations.
pub fn open(path: &Path) -> Result<Connection, Error> {
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
    migrate(&mut connection, &name)?;
    Ok(connection)
}

fn migrate(connection: &mut Connection, name: &str) -> Result<(), Error> {
    let wrap = |source| Error::Sqlite { path: name.to_string(), source };
    let applied: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(wrap)?;
    let supported = MIGRATIONS.len() as i64;
    if applied > supported {
        return Err(Error::TooNew { path: name.to_string(), found: applied, supported });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let transaction = connection.transaction().map_err(wrap)?;
        transaction.execute_batch(migration).map_err(wrap)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1).map_err(wrap)?;
        transaction.commit().map_err(wrap)?;
    }
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
}
