//! The `outbox` table: enqueueing inside the pipeline's transaction, the worker's picks and
//! outcomes, operator queries, and pruning. Sync; callers run it on blocking threads.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::config::OrderBy;
use super::Error;

/// Migration 4: the outbox table and the indexes of the worker's picks.
pub const SCHEMA: &str = "CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        message_id INTEGER NOT NULL UNIQUE,
        partition_key TEXT NOT NULL,
        bundle TEXT NOT NULL,
        created_at_us INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at_us INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_status INTEGER,
        response TEXT,
        delivered_at_us INTEGER
    );
    CREATE INDEX outbox_pending_by_partition ON outbox (partition_key, id) WHERE status = 'pending';
    CREATE INDEX outbox_by_status ON outbox (status, id);
    CREATE INDEX outbox_delivered_at ON outbox (delivered_at_us) WHERE status = 'delivered';";

/// Row statuses.
pub mod status {
    /// Waiting for (another) delivery attempt.
    pub const PENDING: &str = "pending";
    /// Accepted by the aggregator.
    pub const DELIVERED: &str = "delivered";
    /// Refused by the aggregator; waits for an operator.
    pub const DEAD: &str = "dead";
}

/// Largest aggregator answer kept with a row, in bytes.
pub const MAX_KEPT_RESPONSE_BYTES: usize = 64 * 1024;

/// Queues `bundle` for message `message_id` inside the caller's transaction. Returns
/// false when the message was queued before (a message is never queued twice).
pub fn enqueue(
    transaction: &rusqlite::Transaction<'_>,
    message_id: i64,
    bundle: &Value,
    partition_key: &str,
) -> Result<bool, Error> {
    let text = serde_json::to_string(bundle).map_err(|error| Error::Bundle(error.to_string()))?;
    let now_us = crate::telemetry::now_us();
    let inserted = transaction
        .prepare_cached(
            "INSERT OR IGNORE INTO outbox (message_id, partition_key, bundle, created_at_us, next_attempt_at_us)
             VALUES (?1, ?2, ?3, ?4, 0)",
        )?
        .execute(params![message_id, partition_key, text, now_us])?;
    Ok(inserted == 1)
}

/// The ordering key of a Bundle: the id of its Patient (a Patient entry, else the first
/// `subject` or `patient` reference to a Patient), else `sender`; always `sender` when
/// ordering by sender. Patient keys are prefixed `Patient/`, sender keys `sender:`.
pub fn partition_key(bundle: &Value, sender: &str, order_by: OrderBy) -> String {
    if order_by == OrderBy::Patient {
        if let Some(patient) = patient_of(bundle) {
            return format!("Patient/{patient}");
        }
    }
    format!("sender:{sender}")
}

fn patient_of(bundle: &Value) -> Option<String> {
    let entries = bundle.get("entry").and_then(Value::as_array)?;
    for entry in entries {
        let resource = entry.get("resource");
        if resource.and_then(|resource| resource.get("resourceType")).and_then(Value::as_str) == Some("Patient") {
            if let Some(id) = resource.and_then(|resource| resource.get("id")).and_then(Value::as_str) {
                return Some(id.to_string());
            }
        }
    }
    for entry in entries {
        let Some(resource) = entry.get("resource") else { continue };
        for field in ["subject", "patient"] {
            let reference = resource.pointer(&format!("/{field}/reference")).and_then(Value::as_str);
            if let Some(id) = reference.and_then(|reference| reference.strip_prefix("Patient/")) {
                if !id.is_empty() {
                    return Some(id.to_string());
                }
            }
        }
    }
    None
}

/// A short hash of a partition key, for logs (patient ids stay out of logs).
pub fn partition_hash(partition_key: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(partition_key.as_bytes()).iter().take(6).map(|byte| format!("{byte:02x}")).collect()
}

/// A pending row as the worker sends it.
#[derive(Clone, Debug)]
pub struct Row {
    /// Outbox id.
    pub id: i64,
    /// The Bundle JSON.
    pub bundle: String,
    /// Attempts made so far.
    pub attempts: i64,
    /// When it was queued.
    pub created_at_us: i64,
}

/// The next rows of one partition, sent as one request.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Partition key.
    pub partition_key: String,
    /// Rows in queue order (at least one).
    pub rows: Vec<Row>,
}

/// The head (oldest pending row) of a partition, as the worker's schedule keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Partition key.
    pub partition_key: String,
    /// Outbox id of the head row.
    pub id: i64,
    /// When the head may be sent (0: now).
    pub due_us: i64,
}

/// The head of every partition with pending rows, and the largest outbox id at that moment
/// (one read transaction, so rows queued later are exactly those with a larger id).
pub fn heads(connection: &Connection) -> Result<(Vec<Head>, i64), Error> {
    let transaction = rusqlite::Transaction::new_unchecked(connection, rusqlite::TransactionBehavior::Deferred)?;
    let heads = {
        let mut statement = transaction.prepare_cached(
            "SELECT o.partition_key, o.id, o.next_attempt_at_us FROM outbox o
             JOIN (SELECT min(id) AS head FROM outbox WHERE status = 'pending' GROUP BY partition_key) h
               ON o.id = h.head",
        )?;
        let rows = statement.query_map([], head_from_row)?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    let max_id: i64 = transaction.query_row("SELECT coalesce(max(id), 0) FROM outbox", [], |row| row.get(0))?;
    transaction.commit()?;
    Ok((heads, max_id))
}

/// The head of one partition, if it has pending rows.
pub fn head_of(connection: &Connection, partition_key: &str) -> Result<Option<Head>, Error> {
    Ok(connection
        .prepare_cached(
            "SELECT partition_key, id, next_attempt_at_us FROM outbox
             WHERE status = 'pending' AND partition_key = ?1 ORDER BY id LIMIT 1",
        )?
        .query_row([partition_key], head_from_row)
        .optional()?)
}

/// Pending rows queued after outbox id `after`, oldest first, at most `limit`.
pub fn pending_after(connection: &Connection, after: i64, limit: usize) -> Result<Vec<Head>, Error> {
    // The limit is written into the SQL: a bound LIMIT makes SQLite (built with STAT4)
    // re-plan the statement at every execution. A handful of limits are ever used, so the
    // statement cache keeps one plan each.
    let mut statement = connection.prepare_cached(&format!(
        "SELECT partition_key, id, next_attempt_at_us FROM outbox
         WHERE id > ?1 AND status = 'pending' ORDER BY id LIMIT {limit}"
    ))?;
    let rows = statement.query_map(params![after], head_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn head_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Head> {
    Ok(Head { partition_key: row.get(0)?, id: row.get(1)?, due_us: row.get(2)? })
}

/// Up to `max_messages` pending rows of a partition, oldest first.
pub fn rows_of(connection: &Connection, partition_key: &str, max_messages: usize) -> Result<Vec<Row>, Error> {
    // A literal limit, as in `pending_after`.
    let mut statement = connection.prepare_cached(&format!(
        "SELECT id, bundle, attempts, created_at_us FROM outbox
         WHERE status = 'pending' AND partition_key = ?1 ORDER BY id LIMIT {}",
        max_messages.max(1)
    ))?;
    let rows = statement.query_map(params![partition_key], |row| {
        Ok(Row { id: row.get(0)?, bundle: row.get(1)?, attempts: row.get(2)?, created_at_us: row.get(3)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Runs `work` in one IMMEDIATE transaction (takes the write lock up front, so the busy
/// timeout applies instead of a failed lock upgrade, and one fsync covers every row).
fn write<T>(connection: &Connection, work: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
    let transaction = rusqlite::Transaction::new_unchecked(connection, rusqlite::TransactionBehavior::Immediate)?;
    let result = work(&transaction)?;
    transaction.commit()?;
    Ok(result)
}

fn clip(text: &str) -> &str {
    if text.len() <= MAX_KEPT_RESPONSE_BYTES {
        return text;
    }
    let mut end = MAX_KEPT_RESPONSE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What became of one request's rows, as [`record`] writes it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Accepted: the rows are delivered.
    Delivered {
        /// Outbox ids.
        ids: Vec<i64>,
        /// HTTP status.
        status_code: u16,
        /// The aggregator's transaction-response (cut at 64 KiB).
        response: String,
        /// When.
        now_us: i64,
    },
    /// Failed for now: another attempt at `next_attempt_at_us`.
    Retry {
        /// Outbox ids.
        ids: Vec<i64>,
        /// HTTP status, when there was an answer.
        status_code: Option<u16>,
        /// What went wrong.
        error: String,
        /// When to try again.
        next_attempt_at_us: i64,
    },
    /// Refused: the rows become dead letters, keeping the aggregator's answer.
    Dead {
        /// Outbox ids.
        ids: Vec<i64>,
        /// HTTP status.
        status_code: u16,
        /// What went wrong.
        error: String,
        /// The aggregator's OperationOutcome (cut at 64 KiB).
        response: String,
    },
}

/// Writes outcomes in one transaction: one fsync for every request that finished since
/// the last write. Only pending rows change (a row requeued or pruned meanwhile is left).
pub fn record(connection: &Connection, outcomes: &[Outcome]) -> Result<(), Error> {
    if outcomes.is_empty() {
        return Ok(());
    }
    write(connection, |connection| {
        for outcome in outcomes {
            match outcome {
                Outcome::Delivered { ids, status_code, response, now_us } => {
                    let mut statement = connection.prepare_cached(
                        "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, last_status = ?2,
                         response = ?3, last_error = NULL, delivered_at_us = ?4 WHERE id = ?1 AND status = 'pending'",
                    )?;
                    for id in ids {
                        statement.execute(params![id, status_code, clip(response), now_us])?;
                    }
                }
                Outcome::Retry { ids, status_code, error, next_attempt_at_us } => {
                    let mut statement = connection.prepare_cached(
                        "UPDATE outbox SET attempts = attempts + 1, last_status = ?2, last_error = ?3,
                         next_attempt_at_us = ?4 WHERE id = ?1 AND status = 'pending'",
                    )?;
                    for id in ids {
                        statement.execute(params![id, status_code, error, next_attempt_at_us])?;
                    }
                }
                Outcome::Dead { ids, status_code, error, response } => {
                    let mut statement = connection.prepare_cached(
                        "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_status = ?2,
                         last_error = ?3, response = ?4 WHERE id = ?1 AND status = 'pending'",
                    )?;
                    for id in ids {
                        statement.execute(params![id, status_code, error, clip(response)])?;
                    }
                }
            }
        }
        Ok(())
    })
}

/// Which rows [`requeue`] makes pending again.
#[derive(Clone, Debug)]
pub enum Requeue {
    /// These rows (dead or delivered).
    Ids(Vec<i64>),
    /// Every dead row.
    AllDead,
}

/// Makes rows pending again, due now. Returns how many changed.
pub fn requeue(connection: &Connection, which: &Requeue) -> Result<usize, Error> {
    match which {
        Requeue::AllDead => Ok(connection.execute(
            "UPDATE outbox SET status = 'pending', next_attempt_at_us = 0, delivered_at_us = NULL WHERE status = 'dead'",
            [],
        )?),
        Requeue::Ids(ids) => {
            let mut statement = connection.prepare_cached(
                "UPDATE outbox SET status = 'pending', next_attempt_at_us = 0, delivered_at_us = NULL
                 WHERE id = ?1 AND status IN ('dead', 'delivered')",
            )?;
            let mut changed = 0;
            for id in ids {
                changed += statement.execute([id])?;
            }
            Ok(changed)
        }
    }
}

/// Deletes delivered rows delivered before `cutoff_us`, at most `limit` at a time. The
/// newest row is always kept: SQLite gives a new row the largest id plus one, so keeping
/// it means an outbox id (and the idempotency key made from it) is never used twice, and
/// the worker's schedule can find new rows as those above the largest id it has seen.
pub fn prune(connection: &Connection, cutoff_us: i64, limit: usize) -> Result<usize, Error> {
    Ok(connection.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
            WHERE status = 'delivered' AND delivered_at_us < ?1 AND id < (SELECT max(id) FROM outbox) LIMIT ?2)",
        params![cutoff_us, limit as i64],
    )?)
}

/// Pending rows and the creation time of the oldest.
pub fn backlog(connection: &Connection) -> Result<(i64, Option<i64>), Error> {
    Ok(connection.query_row("SELECT count(*), min(created_at_us) FROM outbox WHERE status = 'pending'", [], |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?)
}

/// A row as operators see it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    /// Outbox id.
    pub id: i64,
    /// Journal id of the message.
    pub message_id: i64,
    /// Hash of the partition key (not the patient id).
    pub partition: String,
    /// pending, delivered, dead.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// Queued at, RFC 3339.
    pub created_at: String,
    /// Next attempt (pending rows), RFC 3339.
    pub next_attempt_at: Option<String>,
    /// Delivered at, RFC 3339.
    pub delivered_at: Option<String>,
    /// Last HTTP status from the aggregator.
    pub last_status: Option<i64>,
    /// Last error.
    pub last_error: Option<String>,
}

/// One row in full: summary, Bundle and the aggregator's last answer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Detail {
    /// Summary.
    #[serde(flatten)]
    pub summary: Summary,
    /// The transaction Bundle.
    pub bundle: Value,
    /// The aggregator's OperationOutcome or transaction-response (as JSON when it parses).
    pub response: Option<Value>,
}

const SUMMARY_COLUMNS: &str =
    "id, message_id, partition_key, status, attempts, created_at_us, next_attempt_at_us, delivered_at_us, last_status, last_error";

fn summary_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Summary> {
    let status: String = row.get(3)?;
    let partition_key: String = row.get(2)?;
    let next_attempt_us: i64 = row.get(6)?;
    let delivered_us: Option<i64> = row.get(7)?;
    Ok(Summary {
        id: row.get(0)?,
        message_id: row.get(1)?,
        partition: partition_hash(&partition_key),
        next_attempt_at: (status == status::PENDING)
            .then(|| crate::telemetry::rfc3339_us(next_attempt_us.max(row.get::<_, i64>(5).unwrap_or(0)))),
        status,
        attempts: row.get(4)?,
        created_at: crate::telemetry::rfc3339_us(row.get(5)?),
        delivered_at: delivered_us.map(crate::telemetry::rfc3339_us),
        last_status: row.get(8)?,
        last_error: row.get(9)?,
    })
}

/// Rows with `status` (any when `None`), newest first.
pub fn list(connection: &Connection, status: Option<&str>, limit: usize) -> Result<Vec<Summary>, Error> {
    let sql =
        format!("SELECT {SUMMARY_COLUMNS} FROM outbox WHERE (?1 IS NULL OR status = ?1) ORDER BY id DESC LIMIT ?2");
    let mut statement = connection.prepare_cached(&sql)?;
    let rows = statement.query_map(params![status, limit.max(1) as i64], summary_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Counts per status.
pub fn status_counts(connection: &Connection) -> Result<Vec<(String, i64)>, Error> {
    let mut statement = connection.prepare_cached("SELECT status, count(*) FROM outbox GROUP BY status")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One row in full, or `None`.
pub fn detail(connection: &Connection, id: i64) -> Result<Option<Detail>, Error> {
    let sql = format!("SELECT {SUMMARY_COLUMNS}, bundle, response FROM outbox WHERE id = ?1");
    let found = connection
        .query_row(&sql, [id], |row| {
            let summary = summary_from_row(row)?;
            let bundle: String = row.get(10)?;
            let response: Option<String> = row.get(11)?;
            Ok((summary, bundle, response))
        })
        .optional()?;
    Ok(found.map(|(summary, bundle, response)| Detail {
        summary,
        bundle: serde_json::from_str(&bundle).unwrap_or(Value::Null),
        response: response.map(|text| serde_json::from_str(&text).unwrap_or(Value::String(text))),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle_with(entries: Vec<Value>) -> Value {
        json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
    }

    fn put(resource: Value) -> Value {
        let url = format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
        json!({ "resource": resource, "request": { "method": "PUT", "url": url } })
    }

    #[test]
    fn partition_key_prefers_the_patient_entry_then_references_then_sender() {
        let with_patient = bundle_with(vec![
            put(json!({ "resourceType": "Encounter", "id": "e1", "subject": { "reference": "Patient/other" } })),
            put(json!({ "resourceType": "Patient", "id": "p1" })),
        ]);
        assert_eq!(partition_key(&with_patient, "EPIC^HOSP", OrderBy::Patient), "Patient/p1");
        assert_eq!(partition_key(&with_patient, "EPIC^HOSP", OrderBy::Sender), "sender:EPIC^HOSP");
        let by_reference = bundle_with(vec![
            put(json!({ "resourceType": "Organization", "id": "o" })),
            put(json!({ "resourceType": "Observation", "id": "x", "subject": { "reference": "Patient/p2" } })),
        ]);
        assert_eq!(partition_key(&by_reference, "S", OrderBy::Patient), "Patient/p2");
        let by_patient_field = bundle_with(vec![put(
            json!({ "resourceType": "AllergyIntolerance", "id": "a", "patient": { "reference": "Patient/p3" } }),
        )]);
        assert_eq!(partition_key(&by_patient_field, "S", OrderBy::Patient), "Patient/p3");
        let none = bundle_with(vec![put(json!({ "resourceType": "Organization", "id": "o" }))]);
        assert_eq!(partition_key(&none, "LAB^H", OrderBy::Patient), "sender:LAB^H");
        assert_eq!(partition_hash("Patient/p1").len(), 12);
    }

    fn queued(connection: &mut Connection, message_id: i64, partition: &str) -> bool {
        let transaction = connection.transaction().unwrap();
        let inserted = enqueue(&transaction, message_id, &bundle_with(vec![]), partition).unwrap();
        transaction.commit().unwrap();
        inserted
    }

    #[test]
    fn enqueue_once_then_dead_letter_requeue_deliver_and_prune() {
        let directory = tempfile::tempdir().unwrap();
        let mut connection = crate::db::open(&directory.path().join("gateway.db")).unwrap();
        assert!(queued(&mut connection, 1, "A"));
        assert!(!queued(&mut connection, 1, "A"), "a message is never queued twice");
        queued(&mut connection, 2, "B");
        queued(&mut connection, 3, "A");
        let (heads_now, max_id) = heads(&connection).unwrap();
        let mut keys: Vec<(String, i64)> = heads_now.into_iter().map(|head| (head.partition_key, head.id)).collect();
        keys.sort();
        assert_eq!(keys, vec![("A".to_string(), 1), ("B".to_string(), 2)]);
        assert_eq!(max_id, 3);
        assert_eq!(rows_of(&connection, "A", 20).unwrap().iter().map(|row| row.id).collect::<Vec<_>>(), vec![1, 3]);
        let now = crate::telemetry::now_us();
        let refused = "{\"resourceType\":\"OperationOutcome\"}".to_string();
        record(
            &connection,
            &[Outcome::Dead { ids: vec![1], status_code: 400, error: "400".into(), response: refused }],
        )
        .unwrap();
        // Dead rows do not block their partition.
        assert_eq!(head_of(&connection, "A").unwrap().unwrap().id, 3);
        let dead = detail(&connection, 1).unwrap().unwrap();
        assert_eq!(dead.summary.status, "dead");
        assert_eq!(dead.response.unwrap()["resourceType"], "OperationOutcome");
        assert_eq!(requeue(&connection, &Requeue::AllDead).unwrap(), 1);
        assert_eq!(head_of(&connection, "A").unwrap().unwrap().id, 1, "a requeued row keeps its place");
        assert_eq!(pending_after(&connection, 1, 10).unwrap().len(), 2);
        record(
            &connection,
            &[Outcome::Delivered { ids: vec![1, 3], status_code: 200, response: "{}".into(), now_us: now - 10 }],
        )
        .unwrap();
        assert_eq!(backlog(&connection).unwrap().0, 1);
        assert_eq!(prune(&connection, now, 100).unwrap(), 1, "the newest row (3) is kept");
        assert_eq!(list(&connection, None, 10).unwrap().len(), 2);
    }
}
