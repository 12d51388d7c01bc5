//! The resource store: the current version and the full history of every FHIR resource the
//! pipeline produced, in the same SQLite database as the journal, plus the search indexes.
//!
//! # Design
//! - **Tables** (see [`SCHEMA`]): `resources` holds the current version of each resource
//!   (a deletion is a version too, with an empty body); `resource_versions` every version
//!   ever written. Each stored body is the resource's JSON with `meta.versionId` and
//!   `meta.lastUpdated` already set, so a read sends stored bytes without re-encoding.
//! - **Writes** happen only inside the pipeline's transaction ([`put`], [`delete`]), the
//!   same transaction that marks the source message processed: a crash leaves either
//!   both or neither.
//! - **Idempotent.** Putting a resource whose content equals the current version (ignoring
//!   `meta`) changes nothing, so reprocessing a message does not create versions.
//! - **Search indexes** are rows in index tables, one family per search parameter type,
//!   extracted at write time from the definitions in [`params`] (data, not code per
//!   parameter). [`search`] turns a FHIR search into SQL over them.
//! - **Reads** go through a small pool of read-only connections ([`Store::read`]), or, for
//!   lookups by key, the calling thread's own connection ([`Store::point_read`]); with WAL
//!   they never wait for the writer.

pub mod fhirpath;
pub mod index;
pub mod params;
pub mod search;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use tokio::sync::Semaphore;

use index::Row;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("resource store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database could not be opened.
    #[error(transparent)]
    Open(#[from] crate::db::Error),
    /// A resource to store lacks `resourceType` or `id`, or is not an object.
    #[error("resource cannot be stored: {0}")]
    Malformed(String),
    /// A stored body is not valid JSON (database damaged or written by hand).
    #[error("stored resource {0} is damaged: {1}")]
    Damaged(String, String),
    /// The read pool is closed.
    #[error("resource store is closed")]
    Closed,
}

/// Schema of the resource store and its search indexes (migration 2 in [`crate::db`];
/// [`REFERENCE_BY_ID`], migration 5, changes one index).
///
/// `resources.rid` is the internal row id: stable for the life of a resource (updates,
/// deletions and re-creations keep it), it keys every index row and is the final sort key
/// of searches, so paging is stable. Index tables name parameters by qualified key
/// (`Observation.code`), so one `(param, value)` index serves every type.
pub const SCHEMA: &str = "CREATE TABLE resources (
        rid INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        last_updated_us INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        content_hash BLOB NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (type, id)
    );
    CREATE INDEX resources_by_type ON resources (type, deleted, rid);
    CREATE INDEX resources_by_time ON resources (type, last_updated_us);
    CREATE TABLE resource_versions (
        seq INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        last_updated_us INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        message_id INTEGER,
        body TEXT NOT NULL,
        UNIQUE (type, id, version)
    );
    CREATE INDEX resource_versions_by_time ON resource_versions (last_updated_us, seq);
    CREATE INDEX resource_versions_by_type_time ON resource_versions (type, last_updated_us, seq);
    CREATE TABLE idx_string (rid INTEGER NOT NULL, param TEXT NOT NULL, norm TEXT NOT NULL, exact TEXT NOT NULL);
    CREATE INDEX idx_string_by_value ON idx_string (param, norm);
    CREATE INDEX idx_string_by_resource ON idx_string (rid, param);
    CREATE TABLE idx_token (rid INTEGER NOT NULL, param TEXT NOT NULL, system TEXT, code TEXT, text TEXT);
    CREATE INDEX idx_token_by_value ON idx_token (param, code, system);
    CREATE INDEX idx_token_by_system ON idx_token (param, system);
    CREATE INDEX idx_token_by_resource ON idx_token (rid, param);
    CREATE TABLE idx_date (rid INTEGER NOT NULL, param TEXT NOT NULL, low INTEGER NOT NULL, high INTEGER NOT NULL);
    CREATE INDEX idx_date_by_low ON idx_date (param, low);
    CREATE INDEX idx_date_by_high ON idx_date (param, high);
    CREATE INDEX idx_date_by_resource ON idx_date (rid, param);
    CREATE TABLE idx_reference (rid INTEGER NOT NULL, param TEXT NOT NULL, target_type TEXT NOT NULL, target_id TEXT NOT NULL);
    CREATE INDEX idx_reference_by_target ON idx_reference (target_id, target_type, param);
    CREATE INDEX idx_reference_by_param ON idx_reference (param, target_type, target_id);
    CREATE INDEX idx_reference_by_resource ON idx_reference (rid, param);
    CREATE TABLE idx_number (rid INTEGER NOT NULL, param TEXT NOT NULL, value REAL NOT NULL, system TEXT, code TEXT);
    CREATE INDEX idx_number_by_value ON idx_number (param, value);
    CREATE INDEX idx_number_by_resource ON idx_number (rid, param);";

/// Migration 5 of the resource store: reference searches look up `(param, target_id)`,
/// with the target type only when the search names it (`subject=123` matches any type,
/// `subject=Patient/123` one). This index serves both forms; it replaces
/// `idx_reference_by_param`, whose `(param, target_type, target_id)` order left a search by
/// bare id reading every row of the parameter.
///
/// It deliberately does not carry `rid`: without statistics SQLite guesses that `param = ?`
/// alone is selective, and would prefer such a covering index to `idx_reference_by_resource`
/// for `_include` (`rid = ? AND param = ?`), reading the whole parameter.
pub const REFERENCE_BY_ID: &str =
    "CREATE INDEX idx_reference_by_param_id ON idx_reference (param, target_id, target_type);
    DROP INDEX idx_reference_by_param;";

/// One version of a resource as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResource {
    /// `resourceType`.
    pub resource_type: String,
    /// Logical id.
    pub id: String,
    /// Version number, 1 for the first.
    pub version: i64,
    /// When this version was written, microseconds since the Unix epoch.
    pub last_updated_us: i64,
    /// True when this version is a deletion.
    pub deleted: bool,
    /// The resource's JSON with `meta.versionId` and `meta.lastUpdated` set; empty for a
    /// deletion.
    pub body: String,
}

/// What [`put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// First version written.
    Created {
        /// Its version (1, or the next after a deletion).
        version: i64,
    },
    /// A new version replaced the current one.
    Updated {
        /// The new version.
        version: i64,
    },
    /// The content equals the current version; nothing written.
    Unchanged {
        /// The current version.
        version: i64,
    },
}

/// The CPU work of a [`put`] that does not need the database: the content hash and the
/// search index rows. The pipeline prepares resources while converting, in parallel and
/// before it takes SQLite's write lock, so that the lock (which the journal's commits wait
/// for) is held only for the writes. Index rows do not depend on `meta` (no parameter reads
/// it; `_lastUpdated` is a column), so they are the same before and after the put sets it.
#[derive(Clone, Debug)]
pub struct Prepared {
    hash: Vec<u8>,
    rows: Vec<Row>,
}

/// Prepares `resource` for [`put_prepared`].
pub fn prepare(resource: &Value) -> Prepared {
    Prepared { hash: content_hash(resource), rows: index::extract(resource) }
}

/// Writes `resource` (which must have `resourceType` and `id`) as the new current version,
/// unless its content equals the current one. Sets `meta.versionId` and `meta.lastUpdated`
/// (from `now_us`), keeps the history row and rebuilds the resource's index rows.
/// `message_id` names the journal row that produced it (kept with the version).
pub fn put(
    transaction: &rusqlite::Transaction<'_>,
    resource: &serde_json::Value,
    now_us: i64,
    message_id: Option<i64>,
) -> Result<PutOutcome, StoreError> {
    put_prepared(transaction, resource, &prepare(resource), now_us, message_id)
}

/// [`put`] with the hash and index rows computed beforehand by [`prepare`] on the same
/// `resource`.
pub fn put_prepared(
    transaction: &rusqlite::Transaction<'_>,
    resource: &serde_json::Value,
    prepared: &Prepared,
    now_us: i64,
    message_id: Option<i64>,
) -> Result<PutOutcome, StoreError> {
    let object = resource.as_object().ok_or_else(|| StoreError::Malformed("not a JSON object".into()))?;
    let resource_type = object
        .get("resourceType")
        .and_then(Value::as_str)
        .filter(|kind| !kind.is_empty())
        .ok_or_else(|| StoreError::Malformed("no resourceType".into()))?;
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| StoreError::Malformed(format!("{resource_type} without id")))?;
    let Prepared { hash, rows } = prepared;
    let hash = hash.as_slice();

    let current: Option<(i64, i64, bool, Vec<u8>, String)> = transaction
        .prepare_cached("SELECT rid, version, deleted, content_hash, body FROM resources WHERE type = ?1 AND id = ?2")?
        .query_row(params![resource_type, id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)? != 0, row.get(3)?, row.get(4)?))
        })
        .optional()?;
    if let Some((_, version, false, stored_hash, body)) = &current {
        if *stored_hash == hash || same_content(body, resource) {
            return Ok(PutOutcome::Unchanged { version: *version });
        }
    }
    let version = current.as_ref().map_or(1, |current| current.1 + 1);

    let mut stored = resource.clone();
    if let Some(object) = stored.as_object_mut() {
        let meta = object.entry("meta").or_insert_with(|| Value::Object(Default::default()));
        if !meta.is_object() {
            *meta = Value::Object(Default::default());
        }
        if let Some(meta) = meta.as_object_mut() {
            meta.insert("versionId".into(), Value::String(version.to_string()));
            meta.insert("lastUpdated".into(), Value::String(index::format_instant(now_us)));
        }
    }
    let body = serde_json::to_string(&stored).map_err(|error| StoreError::Malformed(error.to_string()))?;

    let rid = match &current {
        Some((rid, ..)) => {
            transaction
                .prepare_cached(
                    "UPDATE resources SET version = ?2, last_updated_us = ?3, deleted = 0, content_hash = ?4, body = ?5
                     WHERE rid = ?1",
                )?
                .execute(params![rid, version, now_us, hash, body])?;
            *rid
        }
        None => {
            transaction
                .prepare_cached(
                    "INSERT INTO resources (type, id, version, last_updated_us, deleted, content_hash, body)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6)",
                )?
                .execute(params![resource_type, id, version, now_us, hash, body])?;
            transaction.last_insert_rowid()
        }
    };
    insert_version(transaction, resource_type, id, version, now_us, false, message_id, &body)?;
    remove_index_rows(transaction, rid)?;
    write_index_rows(transaction, rid, rows)?;
    Ok(match current {
        Some((_, _, false, ..)) => PutOutcome::Updated { version },
        _ => PutOutcome::Created { version },
    })
}

#[allow(clippy::too_many_arguments)]
fn insert_version(
    transaction: &rusqlite::Transaction<'_>,
    resource_type: &str,
    id: &str,
    version: i64,
    now_us: i64,
    deleted: bool,
    message_id: Option<i64>,
    body: &str,
) -> Result<(), StoreError> {
    transaction
        .prepare_cached(
            "INSERT INTO resource_versions (type, id, version, last_updated_us, deleted, message_id, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![resource_type, id, version, now_us, deleted, message_id, body])?;
    Ok(())
}

/// The resource without `meta`, for content comparison.
fn without_meta(resource: &Value) -> Value {
    let mut copy = resource.clone();
    if let Some(object) = copy.as_object_mut() {
        object.shift_remove("meta");
    }
    copy
}

/// SHA-256 of the resource's JSON without `meta`: equal content written the same way
/// hashes equal, so reprocessing a message is detected without parsing the stored body.
fn content_hash(resource: &Value) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_string(&without_meta(resource)).unwrap_or_default();
    Sha256::digest(text.as_bytes()).to_vec()
}

/// True when the stored body has the same content as `resource` (ignoring `meta` and key
/// order).
fn same_content(body: &str, resource: &Value) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|stored| without_meta(&stored) == without_meta(resource))
}

fn remove_index_rows(transaction: &rusqlite::Transaction<'_>, rid: i64) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM idx_string WHERE rid = ?1",
        "DELETE FROM idx_token WHERE rid = ?1",
        "DELETE FROM idx_date WHERE rid = ?1",
        "DELETE FROM idx_reference WHERE rid = ?1",
        "DELETE FROM idx_number WHERE rid = ?1",
    ] {
        transaction.prepare_cached(sql)?.execute([rid])?;
    }
    Ok(())
}

fn write_index_rows(transaction: &rusqlite::Transaction<'_>, rid: i64, rows: &[Row]) -> Result<(), StoreError> {
    for row in rows {
        match row {
            Row::String { key, norm, exact } => transaction
                .prepare_cached("INSERT INTO idx_string (rid, param, norm, exact) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![rid, key, norm, exact])?,
            Row::Token { key, system, code, text } => transaction
                .prepare_cached("INSERT INTO idx_token (rid, param, system, code, text) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![rid, key, system, code, text])?,
            Row::Date { key, low, high } => transaction
                .prepare_cached("INSERT INTO idx_date (rid, param, low, high) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![rid, key, low, high])?,
            Row::Reference { key, target_type, target_id } => transaction
                .prepare_cached(
                    "INSERT INTO idx_reference (rid, param, target_type, target_id) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![rid, key, target_type, target_id])?,
            Row::Number { key, value, system, code } => transaction
                .prepare_cached("INSERT INTO idx_number (rid, param, value, system, code) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![rid, key, value, system, code])?,
        };
    }
    Ok(())
}

/// Rebuilds the index rows of every current resource, after the search parameter
/// definitions changed. Returns how many resources were indexed.
pub fn reindex(transaction: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    for table in ["idx_string", "idx_token", "idx_date", "idx_reference", "idx_number"] {
        transaction.execute(&format!("DELETE FROM {table}"), [])?;
    }
    let mut statement = transaction.prepare("SELECT rid, type, id, body FROM resources WHERE deleted = 0")?;
    let mut rows = statement.query([])?;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let rid: i64 = row.get(0)?;
        let name = format!("{}/{}", row.get::<_, String>(1)?, row.get::<_, String>(2)?);
        let body: String = row.get(3)?;
        let resource: Value =
            serde_json::from_str(&body).map_err(|error| StoreError::Damaged(name, error.to_string()))?;
        write_index_rows(transaction, rid, &index::extract(&resource))?;
        count += 1;
    }
    Ok(count)
}

/// Records a deletion of `Type/id` as a new version (no body) and removes its index rows.
/// Returns the deletion's version, or `None` when the resource does not exist or is
/// already deleted.
pub fn delete(
    transaction: &rusqlite::Transaction<'_>,
    resource_type: &str,
    id: &str,
    now_us: i64,
    message_id: Option<i64>,
) -> Result<Option<i64>, StoreError> {
    let current: Option<(i64, i64)> = transaction
        .prepare_cached("SELECT rid, version FROM resources WHERE type = ?1 AND id = ?2 AND deleted = 0")?
        .query_row(params![resource_type, id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((rid, version)) = current else { return Ok(None) };
    let version = version + 1;
    transaction
        .prepare_cached(
            "UPDATE resources SET version = ?2, last_updated_us = ?3, deleted = 1, content_hash = x'', body = ''
             WHERE rid = ?1",
        )?
        .execute(params![rid, version, now_us])?;
    insert_version(transaction, resource_type, id, version, now_us, true, message_id, "")?;
    remove_index_rows(transaction, rid)?;
    Ok(Some(version))
}

pub(crate) fn stored_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredResource> {
    Ok(StoredResource {
        resource_type: row.get(0)?,
        id: row.get(1)?,
        version: row.get(2)?,
        last_updated_us: row.get(3)?,
        deleted: row.get::<_, i64>(4)? != 0,
        body: row.get(5)?,
    })
}

/// The current version of `Type/id` (possibly a deletion), or `None` if never stored.
pub fn read(connection: &Connection, resource_type: &str, id: &str) -> Result<Option<StoredResource>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT type, id, version, last_updated_us, deleted, body FROM resources WHERE type = ?1 AND id = ?2",
        )?
        .query_row(params![resource_type, id], stored_from_row)
        .optional()?)
}

/// Version `version` of `Type/id`, or `None`.
pub fn vread(
    connection: &Connection,
    resource_type: &str,
    id: &str,
    version: i64,
) -> Result<Option<StoredResource>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT type, id, version, last_updated_us, deleted, body FROM resource_versions
             WHERE type = ?1 AND id = ?2 AND version = ?3",
        )?
        .query_row(params![resource_type, id, version], stored_from_row)
        .optional()?)
}
/// Which versions a history request asks for.
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    /// Restrict to one type (type and instance history).
    pub resource_type: Option<String>,
    /// Restrict to one resource (instance history; needs `resource_type`).
    pub id: Option<String>,
    /// `_since`: only versions written at or after this instant (µs).
    pub since_us: Option<i64>,
    /// `_at`-style upper bound: only versions written before this instant (µs).
    pub before_us: Option<i64>,
    /// Page size.
    pub count: usize,
    /// Versions to skip (paging).
    pub offset: usize,
}

/// One page of history, newest first.
#[derive(Clone, Debug)]
pub struct HistoryPage {
    /// Number of versions matching the query.
    pub total: u64,
    /// The versions of this page.
    pub versions: Vec<StoredResource>,
}

/// Versions matching `query`, newest first.
pub fn history(connection: &Connection, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
    let mut conditions = Vec::new();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(resource_type) = &query.resource_type {
        values.push(resource_type.clone().into());
        conditions.push(format!("type = ?{}", values.len()));
        if let Some(id) = &query.id {
            values.push(id.clone().into());
            conditions.push(format!("id = ?{}", values.len()));
        }
    }
    if let Some(since) = query.since_us {
        values.push(since.into());
        conditions.push(format!("last_updated_us >= ?{}", values.len()));
    }
    if let Some(before) = query.before_us {
        values.push(before.into());
        conditions.push(format!("last_updated_us < ?{}", values.len()));
    }
    let filter = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    let total: i64 = connection
        .prepare_cached(&format!("SELECT COUNT(*) FROM resource_versions {filter}"))?
        .query_row(rusqlite::params_from_iter(values.iter()), |row| row.get(0))?;
    let limit = i64::try_from(query.count).unwrap_or(i64::MAX);
    let offset = i64::try_from(query.offset).unwrap_or(i64::MAX);
    let sql = format!(
        "SELECT type, id, version, last_updated_us, deleted, body FROM resource_versions {filter}
         ORDER BY last_updated_us DESC, seq DESC LIMIT {limit} OFFSET {offset}"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let versions = statement
        .query_map(rusqlite::params_from_iter(values.iter()), stored_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HistoryPage { total: u64::try_from(total).unwrap_or(0), versions })
}

/// Resource types that have at least one stored resource (current, not deleted).
pub fn stored_types(connection: &Connection) -> Result<Vec<String>, StoreError> {
    // Walks the distinct types through the (type, deleted, rid) index: one seek per type.
    let mut types = Vec::new();
    let mut after = String::new();
    let mut next = connection.prepare_cached("SELECT type FROM resources WHERE type > ?1 ORDER BY type LIMIT 1")?;
    let mut live =
        connection.prepare_cached("SELECT EXISTS (SELECT 1 FROM resources WHERE type = ?1 AND deleted = 0)")?;
    while let Some(kind) = next.query_row([&after], |row| row.get::<_, String>(0)).optional()? {
        if live.query_row([&kind], |row| row.get::<_, bool>(0))? {
            types.push(kind.clone());
        }
        after = kind;
    }
    Ok(types)
}

/// Read access to the database from async code, two ways:
/// - [`Store::read`]: a bounded pool of read-only connections, used on the blocking thread
///   pool. For searches and history, which may take milliseconds.
/// - [`Store::point_read`]: the calling thread's own read-only connection, used in place.
///   For primary-key lookups (read, vread), which take microseconds: less than the hand-off
///   to another thread and back would cost.
pub struct Store {
    /// Tells the point-read connections of different stores apart (tests open many).
    serial: u64,
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

thread_local! {
    /// This thread's point-read connection, with the serial of the store it belongs to.
    static POINT_READER: RefCell<Option<(u64, Connection)>> = const { RefCell::new(None) };
}

impl Store {
    /// Opens the pool over the database at `path` (which must already exist and be
    /// migrated), allowing at most `readers` concurrent read connections.
    pub fn open(path: &Path, readers: usize) -> Result<Arc<Store>, StoreError> {
        static SERIALS: AtomicU64 = AtomicU64::new(1);
        let readers = readers.max(1);
        let store = Store {
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(readers),
        };
        // Open one now so that a bad path fails at start-up, not at the first request.
        let first = store.connect()?;
        store.idle.lock().map_err(|_| StoreError::Closed)?.push(first);
        Ok(Arc::new(store))
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        use rusqlite::OpenFlags;
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.set_prepared_statement_cache_capacity(64);
        Ok(connection)
    }

    /// Runs `work` with a read connection on the blocking thread pool.
    pub async fn read<T, F>(self: &Arc<Self>, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self.permits.acquire().await.map_err(|_| StoreError::Closed)?;
        let store = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let taken = store.idle.lock().map_err(|_| StoreError::Closed)?.pop();
            let connection = match taken {
                Some(connection) => connection,
                None => store.connect()?,
            };
            let result = work(&connection);
            if let Ok(mut idle) = store.idle.lock() {
                idle.push(connection);
            }
            result
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        drop(permit);
        result
    }

    /// Runs `work`, which must be a lookup by key taking microseconds, on the calling
    /// thread with that thread's own read connection (opened on first use).
    ///
    /// The connection does not wait for locks: WAL readers normally never need to, but
    /// when SQLite does answer busy (recovery after a crash, a checkpoint resetting the
    /// log), `work` runs again through [`Store::read`], which waits there instead of
    /// stalling this async worker thread.
    pub async fn point_read<T, F>(self: &Arc<Self>, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        match self.read_here(&work) {
            Some(Err(StoreError::Sqlite(error))) if is_busy(&error) => {
                self.read(move |connection| work(connection)).await
            }
            Some(result) => result,
            // This thread's connection is in use (a point read inside `work`) or gone (the
            // thread is exiting): the pool serves.
            None => self.read(move |connection| work(connection)).await,
        }
    }

    /// `work` with this thread's point-read connection; `None` when it is in use or gone.
    fn read_here<T>(&self, work: &dyn Fn(&Connection) -> Result<T, StoreError>) -> Option<Result<T, StoreError>> {
        let attempt = POINT_READER.try_with(|slot| {
            let mut slot = slot.try_borrow_mut().ok()?;
            if slot.as_ref().is_none_or(|(serial, _)| *serial != self.serial) {
                // A thread keeps one point-read connection: one to another store (tests
                // open many) is closed first.
                *slot = None;
                let connection = match self.connect().and_then(|connection| {
                    connection.busy_timeout(std::time::Duration::ZERO)?;
                    Ok(connection)
                }) {
                    Ok(connection) => connection,
                    Err(error) => return Some(Err(error)),
                };
                *slot = Some((self.serial, connection));
            }
            let (_, connection) = slot.as_ref()?;
            Some(work(connection))
        });
        attempt.ok().flatten()
    }
}

/// Whether SQLite refused for a lock held elsewhere (worth retrying with waiting).
fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(error.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open() -> (tempfile::TempDir, Connection) {
        let directory = tempfile::tempdir().unwrap();
        let connection = crate::db::open(&directory.path().join("gateway.db")).unwrap();
        (directory, connection)
    }

    fn put_one(connection: &mut Connection, resource: Value, now_us: i64) -> PutOutcome {
        let transaction = connection.transaction().unwrap();
        let outcome = put(&transaction, &resource, now_us, Some(7)).unwrap();
        transaction.commit().unwrap();
        outcome
    }

    fn count(connection: &Connection, table: &str) -> i64 {
        connection.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| row.get(0)).unwrap()
    }

    #[test]
    fn put_read_vread_unchanged_update_delete() {
        let (_directory, mut connection) = open();
        let patient =
            json!({"resourceType": "Patient", "id": "p1", "meta": {"source": "lab"}, "name": [{"family": "Smith"}]});
        assert_eq!(put_one(&mut connection, patient.clone(), 1_000_000), PutOutcome::Created { version: 1 });
        let stored = read(&connection, "Patient", "p1").unwrap().unwrap();
        assert_eq!((stored.version, stored.last_updated_us, stored.deleted), (1, 1_000_000, false));
        let body: Value = serde_json::from_str(&stored.body).unwrap();
        assert_eq!(
            body["meta"],
            json!({"source": "lab", "versionId": "1", "lastUpdated": "1970-01-01T00:00:01.000000Z"})
        );
        assert_eq!(body["name"], patient["name"]);

        // Same content, different meta and key order: unchanged, nothing written.
        let same =
            json!({"name": [{"family": "Smith"}], "id": "p1", "resourceType": "Patient", "meta": {"versionId": "9"}});
        assert_eq!(put_one(&mut connection, same, 2_000_000), PutOutcome::Unchanged { version: 1 });
        assert_eq!(count(&connection, "resource_versions"), 1);

        let changed = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Jones"}]});
        assert_eq!(put_one(&mut connection, changed, 3_000_000), PutOutcome::Updated { version: 2 });
        assert_eq!(read(&connection, "Patient", "p1").unwrap().unwrap().version, 2);
        let first = vread(&connection, "Patient", "p1", 1).unwrap().unwrap();
        assert!(first.body.contains("Smith"));
        assert!(vread(&connection, "Patient", "p1", 3).unwrap().is_none());
        // Index rows were rebuilt: only the new family name.
        let families: Vec<String> = connection
            .prepare("SELECT norm FROM idx_string WHERE param = 'Patient.family'")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(families, vec!["jones"]);

        let transaction = connection.transaction().unwrap();
        assert_eq!(delete(&transaction, "Patient", "p1", 4_000_000, None).unwrap(), Some(3));
        assert_eq!(delete(&transaction, "Patient", "p1", 4_000_000, None).unwrap(), None);
        assert_eq!(delete(&transaction, "Patient", "nope", 4_000_000, None).unwrap(), None);
        transaction.commit().unwrap();
        let deleted = read(&connection, "Patient", "p1").unwrap().unwrap();
        assert!(deleted.deleted && deleted.body.is_empty() && deleted.version == 3);
        assert_eq!(count(&connection, "idx_string"), 0);
        assert!(stored_types(&connection).unwrap().is_empty());

        let again = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Jones"}]});
        assert_eq!(put_one(&mut connection, again, 5_000_000), PutOutcome::Created { version: 4 });
        assert_eq!(stored_types(&connection).unwrap(), vec!["Patient"]);
        assert!(read(&connection, "Patient", "p2").unwrap().is_none());
        let message: Option<i64> = connection
            .query_row("SELECT message_id FROM resource_versions WHERE version = 4", [], |row| row.get(0))
            .unwrap();
        assert_eq!(message, Some(7));
    }

    #[test]
    fn malformed_resources_are_refused() {
        let (_directory, mut connection) = open();
        let transaction = connection.transaction().unwrap();
        for bad in [
            json!([]),
            json!({"id": "x"}),
            json!({"resourceType": "Patient"}),
            json!({"resourceType": "Patient", "id": ""}),
        ] {
            assert!(matches!(put(&transaction, &bad, 1, None), Err(StoreError::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn history_levels_and_paging() {
        let (_directory, mut connection) = open();
        put_one(&mut connection, json!({"resourceType": "Patient", "id": "a", "gender": "male"}), 10);
        put_one(&mut connection, json!({"resourceType": "Patient", "id": "b"}), 20);
        put_one(&mut connection, json!({"resourceType": "Observation", "id": "o", "status": "final"}), 30);
        put_one(&mut connection, json!({"resourceType": "Patient", "id": "a", "gender": "female"}), 40);
        let query = |resource_type: Option<&str>, id: Option<&str>| HistoryQuery {
            resource_type: resource_type.map(String::from),
            id: id.map(String::from),
            count: 10,
            ..HistoryQuery::default()
        };
        let all = history(&connection, &query(None, None)).unwrap();
        assert_eq!(all.total, 4);
        let order: Vec<(String, i64)> = all.versions.iter().map(|v| (v.id.clone(), v.version)).collect();
        assert_eq!(order, vec![("a".into(), 2), ("o".into(), 1), ("b".into(), 1), ("a".into(), 1)]);
        assert_eq!(history(&connection, &query(Some("Patient"), None)).unwrap().total, 3);
        let instance = history(&connection, &query(Some("Patient"), Some("a"))).unwrap();
        assert_eq!(instance.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 1]);
        let window = HistoryQuery { since_us: Some(20), before_us: Some(40), ..query(None, None) };
        assert_eq!(
            history(&connection, &window).unwrap().versions.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
            vec!["o", "b"]
        );
        let paged = HistoryQuery { count: 1, offset: 1, ..query(None, None) };
        let page = history(&connection, &paged).unwrap();
        assert_eq!((page.total, page.versions.len(), page.versions[0].id.as_str()), (4, 1, "o"));
        assert_eq!(stored_types(&connection).unwrap(), vec!["Observation", "Patient"]);
    }

    #[tokio::test]
    async fn point_reads_use_each_stores_own_connection() {
        let (first_directory, mut first) = open();
        let (second_directory, mut second) = open();
        put_one(&mut first, json!({"resourceType": "Patient", "id": "a"}), 10);
        put_one(&mut second, json!({"resourceType": "Patient", "id": "b"}), 10);
        let first = Store::open(&first_directory.path().join("gateway.db"), 2).unwrap();
        let second = Store::open(&second_directory.path().join("gateway.db"), 2).unwrap();
        for _ in 0..2 {
            for (store, present, absent) in [(&first, "a", "b"), (&second, "b", "a")] {
                let found = store.point_read(move |connection| read(connection, "Patient", present)).await.unwrap();
                assert_eq!(found.map(|resource| resource.id), Some(present.to_string()));
                let found = store.point_read(move |connection| read(connection, "Patient", absent)).await.unwrap();
                assert!(found.is_none());
            }
        }
    }

    #[tokio::test]
    async fn a_point_read_that_finds_the_database_locked_waits_in_the_pool_not_on_the_caller() {
        let (directory, mut writer) = open();
        put_one(&mut writer, json!({"resourceType": "Patient", "id": "a"}), 10);
        let store = Store::open(&directory.path().join("gateway.db"), 2).unwrap();
        // An exclusive-mode writer keeps every reader out until it returns to normal mode.
        writer.execute_batch("PRAGMA locking_mode = EXCLUSIVE; UPDATE resources SET version = 2;").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            writer.execute_batch("PRAGMA locking_mode = NORMAL; SELECT COUNT(*) FROM resources;").unwrap();
            writer
        });
        // This single-threaded runtime keeps ticking only if the read does not block it.
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let found = store.point_read(|connection| read(connection, "Patient", "a")).await.unwrap();
        ticker.abort();
        assert_eq!(found.map(|resource| resource.version), Some(2));
        assert!(ticks.load(Ordering::Relaxed) >= 5, "the point read blocked the runtime");
        drop(release.join().unwrap());
    }

    #[test]
    fn reindex_rebuilds_rows() {
        let (_directory, mut connection) = open();
        put_one(&mut connection, json!({"resourceType": "Patient", "id": "a", "name": [{"family": "X"}]}), 10);
        let before = count(&connection, "idx_string");
        let transaction = connection.transaction().unwrap();
        assert_eq!(reindex(&transaction).unwrap(), 1);
        transaction.commit().unwrap();
        assert_eq!(count(&connection, "idx_string"), before);
    }
}
