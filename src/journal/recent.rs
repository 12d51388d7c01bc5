//! Which senders' MSH-10s the duplicate window holds, kept in memory so that the ACK path
//! asks `journal.db` only about a message that may repeat an earlier one.
//!
//! Every accepted message (refused ones never count as originals) is noted here when it is
//! logged, as a 64-bit hash of MSH-3, MSH-4 and MSH-10 with its receive time. A message
//! whose hash is absent, while the notes cover its whole window, repeats nothing: no query.
//! A present hash (a retransmission, or a collision of two hashes) is checked in full
//! (content hash, status, time) by the database query, as before; the notes only ever spare
//! queries that could not have found anything.
//!
//! The notes are bounded: at most [`MAX_NOTED`] messages (about 32 bytes each). Past that,
//! the oldest are forgotten and the notes cover less than the window: a message whose window
//! reaches further back is looked up in `journal.db` when its hash is absent.
//!
//! At start the rows already in `journal.db` are read by the `journal-index` thread, not on
//! the way to listening (the newest million rows of a large journal are a gigabyte or more
//! of pages): until it is done the notes cover nothing and every accepted message is looked
//! up, as before they existed. It loads the newest rows, up to the bound, and when older rows
//! were left out, scans them once for the latest time one of them was received.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use super::MessageKey;

/// Most messages noted: at 32 bytes each, 32 MiB. A window holding more (over 11 messages
/// a second, all day, with the default 24 hours) is covered only in part.
pub const MAX_NOTED: usize = 1 << 20;

/// The hash a message is noted by: its sender (MSH-3, MSH-4) and MSH-10.
pub fn key_hash(key: &MessageKey) -> u64 {
    // SipHash with fixed keys: the same message always gets the same hash in this process.
    let mut hasher = std::hash::DefaultHasher::new();
    key.sending_application.hash(&mut hasher);
    key.sending_facility.hash(&mut hasher);
    key.control_id.hash(&mut hasher);
    hasher.finish()
}

/// A noted message: its receive time (µs) and key hash.
type Note = (i64, u64);

/// Accepted messages of the duplicate window, by key hash.
#[derive(Debug)]
pub struct RecentKeys {
    /// Key hash → how many of `order` have it.
    counts: HashMap<u64, u32>,
    /// (receive time in µs, key hash), oldest first (in log order: receive times may
    /// step back a little between connections, or with the clock).
    order: VecDeque<Note>,
    /// The rows of `journal.db` not loaded at start were all received before this time
    /// (µs): `i64::MIN` when every row was loaded, `i64::MAX` until the `journal-index`
    /// thread's notes are adopted.
    unloaded_before: i64,
    /// Notes dropped (outside every window, or over the bound) were received before this.
    dropped_before: i64,
    /// Notes older than the longest window seen are dropped.
    longest_window_us: i64,
    /// Most notes kept.
    capacity: usize,
}

impl RecentKeys {
    /// Notes covering every time: the journal held nothing else.
    pub fn complete(capacity: usize) -> RecentKeys {
        RecentKeys {
            counts: HashMap::new(),
            order: VecDeque::new(),
            unloaded_before: i64::MIN,
            dropped_before: i64::MIN,
            longest_window_us: 0,
            capacity,
        }
    }

    /// Notes that cover nothing yet, because the rows already in `journal.db` are still to
    /// be loaded: misses are looked up until [`RecentKeys::adopt`].
    pub fn covering_nothing(capacity: usize) -> RecentKeys {
        RecentKeys { unloaded_before: i64::MAX, ..RecentKeys::complete(capacity) }
    }

    /// Notes a logged accepted message.
    pub fn insert(&mut self, received_at_us: i64, hash: u64, window_us: i64) {
        self.longest_window_us = self.longest_window_us.max(window_us);
        self.prune(received_at_us.saturating_sub(self.longest_window_us));
        if self.order.len() >= self.capacity {
            self.forget_oldest();
        }
        self.order.push_back((received_at_us, hash));
        *self.counts.entry(hash).or_default() += 1;
    }

    /// False only when no accepted message received at or after `not_before` has this
    /// hash: nothing inside the window can be repeated.
    pub fn may_contain(&self, hash: u64, not_before: i64) -> bool {
        self.unloaded_before.max(self.dropped_before) > not_before || self.counts.contains_key(&hash)
    }

    /// Takes the notes of the rows that were in `journal.db` at start, oldest first (all of
    /// them logged before anything noted since), and the time before which the rows not
    /// loaded were all received (`i64::MIN` when none was left out).
    pub fn adopt(&mut self, older: Vec<Note>, unloaded_before: i64) {
        for (received_at_us, hash) in older.into_iter().rev() {
            self.order.push_front((received_at_us, hash));
            *self.counts.entry(hash).or_default() += 1;
        }
        while self.order.len() > self.capacity {
            self.forget_oldest();
        }
        self.unloaded_before = unloaded_before;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }

    /// Drops the notes received before `oldest`, from the front, in log order.
    fn prune(&mut self, oldest: i64) {
        while self.order.front().is_some_and(|(received_at_us, _)| *received_at_us < oldest) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        let Some((received_at_us, hash)) = self.order.pop_front() else { return };
        if let Some(count) = self.counts.get_mut(&hash) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&hash);
            }
        }
        // A message received at that time may no longer be noted.
        self.dropped_before = self.dropped_before.max(received_at_us.saturating_add(1));
    }
}

/// Notes for the accepted rows of `journal.db` up to `last_id`, the newest `capacity` of
/// them, oldest first; and, when older rows were left out, the id of the newest left out.
pub fn load(
    connection: &rusqlite::Connection,
    last_id: i64,
    capacity: usize,
) -> rusqlite::Result<(Vec<Note>, Option<i64>)> {
    let mut statement = connection.prepare(
        "SELECT id, received_at_us, sending_application, sending_facility, control_id FROM messages
         WHERE id <= ?1 AND status <> 'refused' ORDER BY id DESC LIMIT ?2",
    )?;
    let mut rows = statement.query([last_id, capacity as i64 + 1])?;
    let mut loaded = Vec::new();
    let mut left_out = None;
    while let Some(row) = rows.next()? {
        if loaded.len() == capacity {
            left_out = Some(row.get::<_, i64>(0)?);
            break;
        }
        let key = MessageKey {
            sending_application: row.get(2)?,
            sending_facility: row.get(3)?,
            control_id: row.get(4)?,
            ..MessageKey::default()
        };
        loaded.push((row.get::<_, i64>(1)?, key_hash(&key)));
    }
    loaded.reverse();
    Ok((loaded, left_out))
}

/// The latest receive time of the rows up to `last_id` (those not loaded), plus one: from
/// then on the loaded notes are complete. `i64::MIN` when there are none.
pub fn older_rows_received_before(connection: &rusqlite::Connection, last_id: i64) -> rusqlite::Result<i64> {
    let latest: Option<i64> = connection.query_row(
        "SELECT max(received_at_us) FROM messages WHERE id <= ?1 AND status <> 'refused'",
        [last_id],
        |row| row.get(0),
    )?;
    Ok(latest.map_or(i64::MIN, |latest| latest.saturating_add(1)))
}

/// Loads the notes of the rows up to `last_id` (those in `journal.db` at start), at most
/// `capacity`, on a thread of its own, and hands them to the live notes.
pub(super) fn spawn_load(shared: std::sync::Arc<super::Shared>, last_id: i64, capacity: usize) {
    let work = move || {
        let started = std::time::Instant::now();
        let loaded =
            crate::db::open_journal(&shared.database).map_err(|error| error.to_string()).and_then(|connection| {
                let (older, left_out) = load(&connection, last_id, capacity).map_err(|error| error.to_string())?;
                let before = match left_out {
                    Some(newest_left_out) => {
                        older_rows_received_before(&connection, newest_left_out).map_err(|error| error.to_string())?
                    }
                    None => i64::MIN,
                };
                Ok((older, before))
            });
        match loaded {
            Ok((older, before)) => {
                let rows = older.len();
                shared.recent().adopt(older, before);
                tracing::info!(rows, seconds = started.elapsed().as_secs_f64(), "duplicate notes loaded");
            }
            // The notes then never cover the rows from before the start: misses keep being
            // looked up.
            Err(error) => tracing::warn!(error = %error, "cannot load the duplicate notes from journal.db"),
        }
    };
    if let Err(error) = std::thread::Builder::new().name("journal-index".to_string()).spawn(work) {
        tracing::warn!(error = %error, "cannot start loading the duplicate notes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(application: &str, control_id: &str) -> u64 {
        key_hash(&MessageKey {
            sending_application: application.to_string(),
            sending_facility: "FAC".to_string(),
            control_id: control_id.to_string(),
            ..MessageKey::default()
        })
    }

    #[test]
    fn an_absent_key_inside_covered_time_repeats_nothing() {
        let mut recent = RecentKeys::complete(100);
        recent.insert(1_000, key("APP", "1"), 500);
        assert!(recent.may_contain(key("APP", "1"), 600));
        assert!(!recent.may_contain(key("APP", "2"), 600));
        assert!(!recent.may_contain(key("OTHER", "1"), 600), "the sender is part of the key");
        assert_ne!(key("AP", "P1"), key("APP", "1"), "fields do not run into each other");
    }

    #[test]
    fn notes_older_than_the_longest_window_are_dropped_and_coverage_follows() {
        let mut recent = RecentKeys::complete(100);
        recent.insert(1_000, key("APP", "1"), 500);
        recent.insert(1_400, key("APP", "2"), 500);
        recent.insert(1_600, key("APP", "3"), 500);
        assert_eq!(recent.len(), 2, "the note received at 1000 is outside every window");
        assert!(!recent.may_contain(key("APP", "1"), 1_100), "inside coverage and absent");
        assert!(recent.may_contain(key("APP", "9"), 1_000), "a longer look back than coverage must ask");
    }

    #[test]
    fn the_bound_forgets_the_oldest_and_narrows_coverage() {
        let mut recent = RecentKeys::complete(2);
        recent.insert(10, key("APP", "1"), 1_000);
        recent.insert(20, key("APP", "2"), 1_000);
        recent.insert(30, key("APP", "3"), 1_000);
        assert_eq!(recent.len(), 2);
        assert!(recent.may_contain(key("APP", "1"), 5), "forgotten: coverage starts after it");
        assert!(!recent.may_contain(key("APP", "1"), 11));
        assert!(recent.may_contain(key("APP", "2"), 11));
    }

    #[test]
    fn notes_adopted_from_the_journal_come_before_the_live_ones_and_share_the_bound() {
        let mut recent = RecentKeys::covering_nothing(2);
        recent.insert(100, key("APP", "live"), 1_000);
        assert!(recent.may_contain(key("APP", "7"), 50), "nothing covered before the load");
        recent.adopt(vec![(40, key("APP", "1")), (60, key("APP", "2"))], 30);
        assert_eq!(recent.len(), 2, "the oldest adopted note is dropped at the bound");
        assert!(recent.may_contain(key("APP", "1"), 35), "dropped: not covered from before it");
        assert!(!recent.may_contain(key("APP", "1"), 41));
        assert!(recent.may_contain(key("APP", "2"), 41));
        assert!(recent.may_contain(key("APP", "live"), 41));
    }

    #[test]
    fn repeated_keys_are_counted() {
        let mut recent = RecentKeys::complete(100);
        recent.insert(10, key("APP", "1"), 15);
        recent.insert(20, key("APP", "1"), 15);
        recent.insert(26, key("APP", "2"), 15);
        assert!(recent.may_contain(key("APP", "1"), 11), "the second note is still there");
        recent.insert(40, key("APP", "3"), 15);
        assert!(!recent.may_contain(key("APP", "1"), 25));
    }

    #[test]
    fn loading_a_large_journal_covers_nothing_until_the_older_rows_are_scanned() {
        let connection = rusqlite::Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE messages (id INTEGER PRIMARY KEY, received_at_us INTEGER, sending_application TEXT,
                    sending_facility TEXT, control_id TEXT, status TEXT);
                 INSERT INTO messages VALUES (1, 500, 'APP', 'FAC', '1', 'processed'),
                    (2, 900, 'APP', 'FAC', '2', 'refused'), (3, 450, 'APP', 'FAC', '3', 'accepted'),
                    (4, 700, 'APP', 'FAC', '4', 'accepted'), (5, 800, 'APP', 'FAC', '5', 'accepted');",
            )
            .unwrap();
        let (all, left_out) = load(&connection, 5, 10).unwrap();
        assert_eq!(all.iter().map(|(received_at_us, _)| *received_at_us).collect::<Vec<_>>(), [500, 450, 700, 800]);
        assert_eq!(left_out, None, "refused rows are never originals");
        let (up_to_four, _) = load(&connection, 4, 10).unwrap();
        assert_eq!(up_to_four.len(), 3, "rows after the start are noted live, not loaded");

        let (newest, left_out) = load(&connection, 5, 2).unwrap();
        assert_eq!((newest.len(), left_out), (2, Some(3)));
        let before = older_rows_received_before(&connection, 3).unwrap();
        assert_eq!(before, 501, "row 1, not the refused row 2 nor row 3's earlier time");
        let mut recent = RecentKeys::covering_nothing(10);
        recent.adopt(newest, before);
        assert!(!recent.may_contain(key("APP", "9"), 501));
        assert!(recent.may_contain(key("APP", "9"), 500));
        assert!(recent.may_contain(key("APP", "4"), 501));
        assert!(!recent.may_contain(key("APP", "3"), 501), "row 3 was left out and is older than coverage");
    }
}
