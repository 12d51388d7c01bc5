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
//! - **Reads** go through a small pool of read-only connections ([`Store::read`]); with WAL
//!   they never wait for the writer.

pub mod params;
pub mod search;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::Semaphore;

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

/// Schema of the resource store and its search indexes (migration 2 in [`crate::db`]).
pub const SCHEMA: &str = "";

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
    let _ = (transaction, resource, now_us, message_id);
    unimplemented!("store::put")
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
    let _ = (transaction, resource_type, id, now_us, message_id);
    unimplemented!("store::delete")
}

/// The current version of `Type/id` (possibly a deletion), or `None` if never stored.
pub fn read(connection: &Connection, resource_type: &str, id: &str) -> Result<Option<StoredResource>, StoreError> {
    let _ = (connection, resource_type, id);
    unimplemented!("store::read")
}

/// Version `version` of `Type/id`, or `None`.
pub fn vread(
    connection: &Connection,
    resource_type: &str,
    id: &str,
    version: i64,
) -> Result<Option<StoredResource>, StoreError> {
    let _ = (connection, resource_type, id, version);
    unimplemented!("store::vread")
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
    let _ = (connection, query);
    unimplemented!("store::history")
}

/// Resource types that have at least one stored resource (current, not deleted).
pub fn stored_types(connection: &Connection) -> Result<Vec<String>, StoreError> {
    let _ = connection;
    unimplemented!("store::stored_types")
}

/// A bounded pool of read-only connections to the database, used from async code.
pub struct Store {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl Store {
    /// Opens the pool over the database at `path` (which must already exist and be
    /// migrated), allowing at most `readers` concurrent read connections.
    pub fn open(path: &Path, readers: usize) -> Result<Arc<Store>, StoreError> {
        let readers = readers.max(1);
        let store = Store { path: path.to_path_buf(), idle: Mutex::new(Vec::new()), permits: Semaphore::new(readers) };
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
}
