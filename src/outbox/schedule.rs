//! The delivery worker's schedule: the head row (oldest pending row) of every partition
//! that has pending rows, kept in memory so that finding the next due partitions does not
//! scan the outbox.
//!
//! The outbox table stays the truth; the schedule is rebuilt from it at start, after an
//! operator requeue, and every [`RELOAD_EVERY`] as a safety net. Between reloads it learns
//! of new rows as those above the largest outbox id it has seen (ids only grow: see
//! [`queue::prune`]), and of a partition's next head when that partition's request has been
//! recorded. A partition with a request in flight is not in the schedule, so it never has
//! two requests at once, and its later rows wait behind the one being sent or retried.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::queue::{self, Batch, Head};
use super::Error;

/// How often the schedule is rebuilt from the table even when nothing asked for it.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// New rows read per query when catching up.
const CATCH_UP_CHUNK: usize = 2048;

/// Partitions waiting to be sent, and those in flight.
#[derive(Debug)]
pub struct Schedule {
    /// Due heads by outbox id: the oldest head goes first.
    ready: BTreeMap<i64, String>,
    /// Heads in backoff, by (due time, outbox id).
    waiting: BTreeMap<(i64, i64), String>,
    /// Partitions in `ready` or `waiting`, with their (due time, head id).
    scheduled: HashMap<String, (i64, i64)>,
    /// Partitions with a request in flight.
    in_flight: HashSet<String>,
    /// The largest outbox id the schedule has looked at.
    seen: i64,
    /// When the schedule was last rebuilt; `None` forces a rebuild.
    loaded_at: Option<Instant>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::new()
    }
}

impl Schedule {
    /// An empty schedule that loads itself at the first [`Schedule::refresh`].
    pub fn new() -> Schedule {
        Schedule {
            ready: BTreeMap::new(),
            waiting: BTreeMap::new(),
            scheduled: HashMap::new(),
            in_flight: HashSet::new(),
            seen: 0,
            loaded_at: None,
        }
    }

    /// Rebuild from the table at the next refresh (rows were requeued).
    pub fn invalidate(&mut self) {
        self.loaded_at = None;
    }

    /// Partitions scheduled (not in flight).
    pub fn len(&self) -> usize {
        self.scheduled.len()
    }

    /// True when no partition is waiting.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    /// Brings the schedule up to date: a rebuild when asked for or due, else the rows
    /// queued since the last look.
    pub fn refresh(&mut self, connection: &Connection) -> Result<(), Error> {
        if self.loaded_at.is_none_or(|at| at.elapsed() >= RELOAD_EVERY) {
            let (heads, max_id) = queue::heads(connection)?;
            self.ready.clear();
            self.waiting.clear();
            self.scheduled.clear();
            for head in heads {
                self.add(head);
            }
            self.seen = max_id;
            self.loaded_at = Some(Instant::now());
            return Ok(());
        }
        loop {
            let rows = queue::pending_after(connection, self.seen, CATCH_UP_CHUNK)?;
            let complete = rows.len() < CATCH_UP_CHUNK;
            for row in rows {
                self.seen = self.seen.max(row.id);
                self.add(row);
            }
            if complete {
                return Ok(());
            }
        }
    }

    /// Schedules `head` unless its partition is in flight or already has an earlier head.
    fn add(&mut self, head: Head) {
        if self.in_flight.contains(&head.partition_key) || self.scheduled.contains_key(&head.partition_key) {
            return;
        }
        self.scheduled.insert(head.partition_key.clone(), (head.due_us, head.id));
        if head.due_us <= 0 {
            self.ready.insert(head.id, head.partition_key);
        } else {
            self.waiting.insert((head.due_us, head.id), head.partition_key);
        }
    }

    /// Takes up to `capacity` due partitions, oldest head first, each with up to
    /// `max_messages` of its pending rows; they are in flight until [`Schedule::finished`].
    pub fn take(
        &mut self,
        connection: &Connection,
        capacity: usize,
        max_messages: usize,
        now_us: i64,
    ) -> Result<Vec<Batch>, Error> {
        while let Some(entry) = self.waiting.first_entry() {
            let (due_us, id) = *entry.key();
            if due_us > now_us {
                break;
            }
            let key = entry.remove();
            self.ready.insert(id, key);
        }
        let mut batches = Vec::new();
        while batches.len() < capacity {
            let Some((_, key)) = self.ready.pop_first() else { break };
            self.scheduled.remove(&key);
            let rows = queue::rows_of(connection, &key, max_messages)?;
            if rows.is_empty() {
                continue;
            }
            self.in_flight.insert(key.clone());
            batches.push(Batch { partition_key: key, rows });
        }
        Ok(batches)
    }

    /// The partition's request has been recorded: schedule its next head, if any.
    pub fn finished(&mut self, connection: &Connection, partition_key: &str) -> Result<(), Error> {
        self.in_flight.remove(partition_key);
        if let Some(head) = queue::head_of(connection, partition_key)? {
            self.add(head);
        }
        Ok(())
    }

    /// Forgets that a partition is in flight without looking at the table (its request's
    /// outcome could not be recorded; the next rebuild finds its rows again).
    pub fn abandon(&mut self, partition_key: &str) {
        self.in_flight.remove(partition_key);
        self.loaded_at = None;
    }

    /// When the earliest head in backoff becomes due, if any is in backoff.
    pub fn next_due_us(&self) -> Option<i64> {
        self.waiting.first_key_value().map(|((due_us, _), _)| *due_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::queue::{enqueue, record, requeue, Outcome, Requeue};
    use serde_json::json;

    fn queue_row(connection: &mut Connection, message_id: i64, partition: &str) {
        let transaction = connection.transaction().unwrap();
        enqueue(&transaction, message_id, &json!({ "resourceType": "Bundle", "type": "transaction" }), partition)
            .unwrap();
        transaction.commit().unwrap();
    }

    fn shape(batches: &[Batch]) -> Vec<(String, Vec<i64>)> {
        batches
            .iter()
            .map(|batch| (batch.partition_key.clone(), batch.rows.iter().map(|row| row.id).collect()))
            .collect()
    }

    #[test]
    fn partitions_go_oldest_head_first_one_request_each_and_learn_new_rows() {
        let directory = tempfile::tempdir().unwrap();
        let mut connection = crate::db::open(&directory.path().join("gateway.db")).unwrap();
        queue_row(&mut connection, 1, "A");
        queue_row(&mut connection, 2, "B");
        queue_row(&mut connection, 3, "A");
        let mut schedule = Schedule::new();
        schedule.refresh(&connection).unwrap();
        let now = crate::telemetry::now_us();
        let first = schedule.take(&connection, 1, 20, now).unwrap();
        assert_eq!(shape(&first), vec![("A".to_string(), vec![1, 3])]);
        // New rows: C is new, A is in flight and waits.
        queue_row(&mut connection, 4, "C");
        queue_row(&mut connection, 5, "A");
        schedule.refresh(&connection).unwrap();
        let next = schedule.take(&connection, 8, 20, now).unwrap();
        assert_eq!(shape(&next), vec![("B".to_string(), vec![2]), ("C".to_string(), vec![4])]);
        assert!(schedule.take(&connection, 8, 20, now).unwrap().is_empty(), "A is in flight");
        // A's request failed: its head waits for the backoff, then goes with the later row.
        record(
            &connection,
            &[Outcome::Retry {
                ids: vec![1, 3],
                status_code: Some(503),
                error: "503".into(),
                next_attempt_at_us: now + 1_000,
            }],
        )
        .unwrap();
        schedule.finished(&connection, "A").unwrap();
        assert!(schedule.take(&connection, 8, 20, now).unwrap().is_empty(), "A is backing off");
        assert_eq!(schedule.next_due_us(), Some(now + 1_000));
        assert_eq!(
            shape(&schedule.take(&connection, 8, 20, now + 1_000).unwrap()),
            vec![("A".to_string(), vec![1, 3, 5])]
        );
    }

    #[test]
    fn a_requeued_row_goes_before_later_rows_of_its_partition() {
        let directory = tempfile::tempdir().unwrap();
        let mut connection = crate::db::open(&directory.path().join("gateway.db")).unwrap();
        queue_row(&mut connection, 1, "A");
        let mut schedule = Schedule::new();
        schedule.refresh(&connection).unwrap();
        let now = crate::telemetry::now_us();
        schedule.take(&connection, 8, 20, now).unwrap();
        record(
            &connection,
            &[Outcome::Dead { ids: vec![1], status_code: 400, error: "400".into(), response: "{}".into() }],
        )
        .unwrap();
        schedule.finished(&connection, "A").unwrap();
        queue_row(&mut connection, 2, "A");
        schedule.refresh(&connection).unwrap();
        assert_eq!(schedule.len(), 1);
        assert_eq!(requeue(&connection, &Requeue::Ids(vec![1])).unwrap(), 1);
        schedule.invalidate();
        schedule.refresh(&connection).unwrap();
        assert_eq!(shape(&schedule.take(&connection, 8, 20, now).unwrap()), vec![("A".to_string(), vec![1, 2])]);
    }

    #[test]
    fn pruning_keeps_the_newest_row_so_ids_are_never_reused() {
        let directory = tempfile::tempdir().unwrap();
        let mut connection = crate::db::open(&directory.path().join("gateway.db")).unwrap();
        queue_row(&mut connection, 1, "A");
        queue_row(&mut connection, 2, "B");
        let now = crate::telemetry::now_us();
        record(
            &connection,
            &[Outcome::Delivered { ids: vec![1, 2], status_code: 200, response: "{}".into(), now_us: now - 10 }],
        )
        .unwrap();
        assert_eq!(queue::prune(&connection, now, 100).unwrap(), 1);
        let mut schedule = Schedule::new();
        schedule.refresh(&connection).unwrap();
        queue_row(&mut connection, 3, "C");
        schedule.refresh(&connection).unwrap();
        let batches = schedule.take(&connection, 8, 20, now).unwrap();
        assert_eq!(shape(&batches), vec![("C".to_string(), vec![3])]);
    }
}
