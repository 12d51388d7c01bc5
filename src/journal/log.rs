//! The ingest log: the ACK path's durable write, in front of the SQLite journal.
//!
//! # Why a log in front of SQLite
//! An acknowledged message must be on disk before its ACK leaves, so one connection that
//! waits for each ACK gets at most one message per synced write. A SQLite commit writes
//! several WAL frames (the table's page, each index's page, the header page when the file
//! grows) and syncs them: about 270 µs on the reference machine. One aligned write of a few
//! KiB into an already allocated file, opened with `O_DSYNC` so that the write returns once
//! the data is on disk (and `O_DIRECT`, see [`open_for_append`]), takes 120–150 µs. So the
//! ACK path appends each group of messages to
//! this log with one such write, and answers; the journal's writer
//! thread copies the records into `journal.db` moments later, in larger transactions.
//!
//! # Format
//! - The log is a directory of **segment files** (`NNNNNNNNNNNNNNNN.log`), each
//!   [`SEGMENT_BYTES`] long (larger only for a single record that needs it), zero-filled when
//!   created so that later writes overwrite allocated blocks and the sync has no file
//!   metadata to flush.
//! - **Block 0** of a segment is its header: magic, format, the sequence number of its first
//!   record and its size, with a CRC. A segment whose header is zeroed or damaged is a spare.
//! - **Records** follow from block 1. A record is a 24-byte header (magic, payload length,
//!   sequence number, CRC-32 of sequence number and payload) and its payload, padded to 8
//!   bytes. Sequence numbers are the journal's row ids and are consecutive inside a segment.
//! - Each group commit starts on a fresh 4 KiB block and ends zero-padded to one, so a write
//!   never touches a block that holds acknowledged records: a torn write can only damage the
//!   records whose ACK had not gone out.
//!
//! # Reading
//! [`scan`] decodes records from a segment's bytes until the first one that is not the
//! expected sequence number with a good CRC: the end of the data, a torn last write, or the
//! older records of a recycled segment.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{MessageKey, NewEntry, Status};

/// Alignment of commits and size of the header block.
pub const BLOCK: u64 = 4096;
/// Size of a segment file. Larger segments mean fewer rotations; each one is zero-filled
/// once when created and then reused.
pub const SEGMENT_BYTES: u64 = 16 << 20;
const SEGMENT_MAGIC: &[u8; 8] = b"HL7GWLOG";
const FORMAT: u32 = 1;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"HREC");
const RECORD_HEADER: usize = 24;
const PAYLOAD_FORMAT: u8 = 1;

/// A message read back from the log.
#[derive(Debug)]
pub struct Record {
    /// Sequence number: the journal row id.
    pub seq: i64,
    /// The message and what the listener decided about it.
    pub entry: NewEntry,
    /// SHA-256 of the raw bytes.
    pub content_hash: [u8; 32],
}

/// The path of segment `number` in `directory`.
pub fn segment_path(directory: &Path, number: u64) -> PathBuf {
    directory.join(format!("{number:016}.log"))
}

/// A segment file found in the log directory.
#[derive(Debug)]
pub struct Found {
    /// Its number (from the file name).
    pub number: u64,
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The first sequence number, when the header is valid (an active or sealed segment).
    pub first_seq: Option<i64>,
}

/// Lists the segment files in `directory`, in number order.
pub fn list(directory: &Path) -> io::Result<Vec<Found>> {
    let mut found = Vec::new();
    for item in std::fs::read_dir(directory)? {
        let item = item?;
        let name = item.file_name();
        let Some(number) = name.to_str().and_then(|name| name.strip_suffix(".log")).and_then(|n| n.parse().ok()) else {
            continue;
        };
        let path = item.path();
        let file = File::open(&path)?;
        let size = file.metadata()?.len();
        found.push(Found { number, first_seq: read_header(&file), path, size });
    }
    found.sort_by_key(|segment| segment.number);
    Ok(found)
}

/// Zero-filling writes this much per synced write.
const FILL_CHUNK: usize = 256 << 10;

/// Creates segment `number` of `size` bytes, zero-filled and synced, and syncs the
/// directory so that the file itself survives a power cut.
///
/// The zeros go in synced direct writes of [`FILL_CHUNK`] rather than through the page
/// cache with one sync at the end: that sync flushed 16 MiB at once, and the ACK path's
/// writes to the active segment waited behind it for 30 ms (measured); a chunk's flush
/// holds them back a millisecond or two.
pub fn create(directory: &Path, number: u64, size: u64) -> io::Result<PathBuf> {
    let path = segment_path(directory, number);
    File::options().read(true).write(true).create_new(true).open(&path)?;
    let file = open_for_append(&path)?;
    let mut staging = Aligned::default();
    let zeros = staging.reserve(FILL_CHUNK)?;
    zeros.fill(0);
    let mut written = 0;
    while written < size {
        let chunk = (size - written).min(FILL_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..chunk], written)?;
        written += chunk as u64;
    }
    // The file's size and blocks (the data is synced already).
    file.sync_all()?;
    File::open(directory)?.sync_all()?;
    Ok(path)
}

/// The header block of a segment whose first record is `first_seq`.
pub fn header(first_seq: i64, size: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK as usize];
    block[..8].copy_from_slice(SEGMENT_MAGIC);
    block[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    block[16..24].copy_from_slice(&first_seq.to_le_bytes());
    block[24..32].copy_from_slice(&size.to_le_bytes());
    let crc = crc32fast::hash(&block[..32]);
    block[32..36].copy_from_slice(&crc.to_le_bytes());
    block
}

fn read_header(file: &File) -> Option<i64> {
    let mut block = [0u8; 36];
    file.read_exact_at(&mut block, 0).ok()?;
    let valid = &block[..8] == SEGMENT_MAGIC
        && block[8..12] == FORMAT.to_le_bytes()
        && crc32fast::hash(&block[..32]).to_le_bytes() == block[32..36];
    valid.then(|| i64::from_le_bytes(block[16..24].try_into().unwrap_or_default()))
}

/// Marks a segment as a spare: its records are in `journal.db` and must never be read
/// again. Not synced: should the zeroes be lost, the records are older than every row id a
/// restart replays, so they are skipped anyway.
pub fn retire(path: &Path) -> io::Result<()> {
    File::options().write(true).open(path)?.write_all_at(&[0u8; BLOCK as usize], 0)
}

/// `offset` rounded up to the next block boundary.
pub fn align(offset: u64) -> u64 {
    offset.div_ceil(BLOCK) * BLOCK
}

/// The text fields of a record, in their order in the payload.
fn texts(entry: &NewEntry) -> [&String; 11] {
    let key = &entry.key;
    [
        &entry.peer,
        &key.sending_application,
        &key.sending_facility,
        &key.receiving_application,
        &key.receiving_facility,
        &key.message_datetime,
        &key.message_type,
        &key.control_id,
        &key.version,
        &entry.charset,
        &entry.ack_code,
    ]
}

/// At least as many bytes as [`encode`] appends for `entry`, padding included.
pub fn encoded_bound(entry: &NewEntry) -> u64 {
    let texts = texts(entry).iter().map(|text| 4 + text.len()).sum::<usize>();
    let error = entry.error.as_ref().map_or(0, |error| 4 + error.len());
    // Header, format, time, two flags, hash; the texts; the error flag and error; ACK, raw; padding.
    (RECORD_HEADER + 1 + 8 + 2 + 32 + texts + 1 + error + 4 + entry.ack.len() + 4 + entry.raw.len() + 7) as u64
}

/// Appends one record to `out` (8-byte aligned, as every record must start).
pub fn encode(seq: i64, entry: &NewEntry, content_hash: &[u8; 32], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER]);
    out.push(PAYLOAD_FORMAT);
    out.extend_from_slice(&entry.received_at_us.to_le_bytes());
    out.push(u8::from(entry.raw_truncated));
    out.push(match entry.status {
        Status::Accepted => 0,
        Status::Refused => 1,
    });
    out.extend_from_slice(content_hash);
    for text in texts(entry) {
        put_bytes(out, text.as_bytes());
    }
    match &entry.error {
        Some(error) => {
            out.push(1);
            put_bytes(out, error.as_bytes());
        }
        None => out.push(0),
    }
    put_bytes(out, &entry.ack);
    put_bytes(out, &entry.raw);
    let payload_length = out.len() - start - RECORD_HEADER;
    let crc = {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(&out[start + RECORD_HEADER..]);
        hasher.finalize()
    };
    let header = &mut out[start..start + RECORD_HEADER];
    header[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&(payload_length as u32).to_le_bytes());
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    header[16..20].copy_from_slice(&crc.to_le_bytes());
    out.resize(start + (RECORD_HEADER + payload_length).next_multiple_of(8), 0);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Where [`scan`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Absolute offset just after the last good record and the padding that closes its
    /// commit: the end of what was read, when every record was good.
    pub end: u64,
    /// The sequence number the next record would have.
    pub next_seq: i64,
}

/// Decodes consecutive records from `data`, which holds a segment's bytes from the
/// absolute offset `base` (block-aligned or just after a record), expecting `next_seq`
/// first. Stops at the end of `data` or at the first record that is damaged, zero, or out
/// of sequence, and calls `visit` with each good one.
pub fn scan(data: &[u8], base: u64, mut next_seq: i64, mut visit: impl FnMut(Record)) -> Scanned {
    let mut position = 0usize;
    let mut end = base;
    while position + 4 <= data.len() {
        let magic = u32::from_le_bytes(data[position..position + 4].try_into().unwrap_or_default());
        if magic == 0 {
            // Padding after a commit: the next commit starts on the next block, if any.
            let absolute = base + position as u64;
            let next_block = align(absolute + 1);
            if absolute.is_multiple_of(BLOCK) {
                break; // a block that starts with zeroes was never written
            }
            position = (next_block - base) as usize;
            // The commit ends with its padding: a reader that got this far read it whole.
            end = base + position.min(data.len()) as u64;
            continue;
        }
        let Some(header) = data.get(position..position + RECORD_HEADER) else { break };
        let field = |range: std::ops::Range<usize>| -> [u8; 8] {
            let mut bytes = [0u8; 8];
            bytes[..range.len()].copy_from_slice(&header[range]);
            bytes
        };
        let length = u64::from_le_bytes(field(4..8)) as usize;
        let seq = i64::from_le_bytes(field(8..16));
        let crc = u64::from_le_bytes(field(16..20)) as u32;
        let Some(payload) = data.get(position + RECORD_HEADER..position + RECORD_HEADER + length) else { break };
        if magic != RECORD_MAGIC || seq != next_seq {
            break;
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(payload);
        if hasher.finalize() != crc {
            break;
        }
        let Some((entry, content_hash)) = decode(payload) else { break };
        visit(Record { seq, entry, content_hash });
        next_seq += 1;
        position += (RECORD_HEADER + length).next_multiple_of(8);
        end = base + position.min(data.len()) as u64;
    }
    Scanned { end, next_seq }
}

fn decode(payload: &[u8]) -> Option<(NewEntry, [u8; 32])> {
    let mut cursor = Cursor { data: payload };
    if cursor.take(1)?[0] != PAYLOAD_FORMAT {
        return None;
    }
    let received_at_us = i64::from_le_bytes(cursor.take(8)?.try_into().ok()?);
    let raw_truncated = cursor.take(1)?[0] != 0;
    let status = match cursor.take(1)?[0] {
        0 => Status::Accepted,
        1 => Status::Refused,
        _ => return None,
    };
    let content_hash: [u8; 32] = cursor.take(32)?.try_into().ok()?;
    let mut texts = Vec::with_capacity(11);
    for _ in 0..11 {
        texts.push(cursor.text()?);
    }
    let error = match cursor.take(1)?[0] {
        0 => None,
        _ => Some(cursor.text()?),
    };
    let ack = cursor.bytes()?.to_vec();
    let raw = Bytes::copy_from_slice(cursor.bytes()?);
    let mut texts = texts.into_iter();
    let mut next = || texts.next().unwrap_or_default();
    let peer = next();
    let key = MessageKey {
        sending_application: next(),
        sending_facility: next(),
        receiving_application: next(),
        receiving_facility: next(),
        message_datetime: next(),
        message_type: next(),
        control_id: next(),
        version: next(),
    };
    let charset = next();
    let ack_code = next();
    let entry = NewEntry {
        received_at_us,
        peer,
        key,
        charset,
        raw,
        raw_truncated,
        status,
        error,
        ack_code,
        ack,
        duplicate_window_us: 0,
    };
    Some((entry, content_hash))
}

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if count > self.data.len() {
            return None;
        }
        let (taken, rest) = self.data.split_at(count);
        self.data = rest;
        Some(taken)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let length = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(length)
    }

    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// Reads bytes `from..to` of a segment into `buffer` (whole blocks around them, as a file
/// opened with [`open_for_reading`] needs) and returns them.
pub fn read_range<'a>(file: &File, from: u64, to: u64, buffer: &'a mut Aligned) -> io::Result<&'a [u8]> {
    let first_block = from / BLOCK * BLOCK;
    let blocks = buffer.reserve((align(to) - first_block) as usize)?;
    file.read_exact_at(blocks, first_block)?;
    let skip = (from - first_block) as usize;
    Ok(&blocks[skip..skip + (to - from) as usize])
}

/// Opens a segment for the ACK path's writes: each write returns once its data is on disk
/// (`O_DSYNC`), and bypasses the page cache (`O_DIRECT`) where the file system allows it.
/// Measured on the reference machine (4 KiB, p50): 125–150 µs and 30–45 µs of CPU direct,
/// 150–190 µs and 35–75 µs of CPU through the page cache. Writes must then be whole,
/// aligned blocks from an [`Aligned`] buffer, which every commit is.
pub fn open_for_append(path: &Path) -> io::Result<File> {
    open_direct(path, true, libc::O_DSYNC)
}

/// Opens a segment for reading, bypassing the page cache where the file system allows it
/// (so that the reader never sees a cached block that a direct write has since replaced).
pub fn open_for_reading(path: &Path) -> io::Result<File> {
    open_direct(path, false, 0)
}

fn open_direct(path: &Path, write: bool, flags: i32) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |extra: i32| File::options().read(true).write(write).custom_flags(flags | extra).open(path);
    match open(libc::O_DIRECT) {
        // Some file systems (older tmpfs, some FUSE and network mounts) refuse O_DIRECT.
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => open(0),
        opened => opened,
    }
}

/// Writes `data` at `offset` (both whole blocks) through `staging`, which gives the write
/// the alignment that `O_DIRECT` asks of the memory too.
pub fn write_blocks(file: &File, data: &[u8], offset: u64, staging: &mut Aligned) -> io::Result<()> {
    let blocks = staging.reserve(data.len())?;
    blocks.copy_from_slice(data);
    file.write_all_at(blocks, offset)
}

/// A reusable buffer whose contents start on a block boundary in memory, as direct I/O
/// needs (without `unsafe`: the start is found inside a larger vector).
#[derive(Default)]
pub struct Aligned {
    storage: Vec<u8>,
}

impl Aligned {
    /// `length` bytes (stale contents) starting on a block boundary.
    pub fn reserve(&mut self, length: usize) -> io::Result<&mut [u8]> {
        let block = BLOCK as usize;
        if self.storage.len() < length + block {
            self.storage = vec![0; length + block];
        }
        let start = self.storage.as_ptr().align_offset(block);
        if start >= block {
            return Err(io::Error::other("cannot align an I/O buffer"));
        }
        Ok(&mut self.storage[start..start + length])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(control_id: &str, raw: &[u8]) -> NewEntry {
        NewEntry {
            received_at_us: 1_700_000_000_000_000,
            peer: "10.0.0.1:4000".to_string(),
            key: MessageKey {
                sending_application: "EPIC".to_string(),
                sending_facility: "HOSP".to_string(),
                control_id: control_id.to_string(),
                message_type: "ADT^A01".to_string(),
                ..MessageKey::default()
            },
            charset: "UNICODE UTF-8".to_string(),
            raw: Bytes::copy_from_slice(raw),
            raw_truncated: false,
            status: Status::Accepted,
            error: Some("a reason".to_string()),
            ack_code: "AA".to_string(),
            ack: b"MSH|ack".to_vec(),
            duplicate_window_us: 99,
        }
    }

    /// A commit as the appender writes it: records, then zeroes to the next block.
    fn commit(records: &[(i64, NewEntry)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, entry) in records {
            encode(*seq, entry, &[7; 32], &mut out);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        out
    }

    fn read_all(data: &[u8], first: i64) -> (Vec<Record>, Scanned) {
        let mut records = Vec::new();
        let scanned = scan(data, BLOCK, first, |record| records.push(record));
        (records, scanned)
    }

    #[test]
    fn the_encoded_bound_covers_every_record() {
        let mut without_error = entry("9", b"MSH|^~\\&|A\rPID|1\r");
        without_error.error = None;
        for (seq, entry) in [(1, entry("1", b"MSH|x")), (2, entry("22", &[b'y'; 1001])), (3, without_error)] {
            let mut out = Vec::new();
            encode(seq, &entry, &[0; 32], &mut out);
            let bound = encoded_bound(&entry);
            assert!(out.len() as u64 <= bound && bound < out.len() as u64 + 8, "{} vs {bound}", out.len());
        }
    }

    #[test]
    fn records_read_back_as_written_across_commits() {
        let mut data = commit(&[(5, entry("A", b"MSH|one")), (6, entry("B", &[0xE9, 0x00, 0xFF]))]);
        data.extend(commit(&[(7, entry("C", &vec![b'x'; 5000]))]));
        let (records, scanned) = read_all(&data, 5);
        assert_eq!(records.iter().map(|record| record.seq).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(scanned.next_seq, 8);
        let second = &records[1].entry;
        assert_eq!(&second.raw[..], &[0xE9, 0x00, 0xFF]);
        assert_eq!(second.key.control_id, "B");
        assert_eq!(second.error.as_deref(), Some("a reason"));
        assert_eq!(second.ack, b"MSH|ack");
        assert_eq!(second.duplicate_window_us, 0, "the window is a listener setting, not stored");
        assert_eq!(records[2].entry.raw.len(), 5000);
        assert_eq!(records[0].content_hash, [7; 32]);
    }

    #[test]
    fn reading_stops_at_a_torn_record_and_keeps_those_before() {
        let mut data = commit(&[(1, entry("A", b"MSH|one"))]);
        let second_start = data.len();
        data.extend(commit(&[(2, entry("B", b"MSH|two")), (3, entry("C", b"MSH|three"))]));
        // A power cut in the middle of the second commit's write: its last bytes are old.
        let tear = second_start + 60;
        data[tear] ^= 0xFF;
        let (records, scanned) = read_all(&data, 1);
        assert_eq!(records.len(), 1);
        assert_eq!(scanned.next_seq, 2);
        assert!(scanned.end <= BLOCK + second_start as u64, "the end is at the last good record: {scanned:?}");
    }

    #[test]
    fn reading_stops_at_records_of_an_earlier_use_of_the_segment() {
        // A recycled segment: new commits overwrite the start, older records follow.
        let mut data = commit(&[(10, entry("A", b"MSH|new"))]);
        data.extend(commit(&[(3, entry("OLD", b"MSH|old"))]));
        let (records, scanned) = read_all(&data, 10);
        assert_eq!(records.len(), 1);
        assert_eq!(scanned.next_seq, 11);
    }

    #[test]
    fn an_unwritten_block_ends_the_data() {
        let mut data = commit(&[(1, entry("A", b"MSH|one"))]);
        let (_, scanned) = read_all(&data, 1);
        assert_eq!(scanned.end, BLOCK + data.len() as u64, "a whole commit, its padding included, is read");
        data.extend(vec![0u8; BLOCK as usize * 2]);
        let (records, _) = read_all(&data, 1);
        assert_eq!(records.len(), 1);
        let (records, scanned) = read_all(&[0u8; 64], 1);
        assert!(records.is_empty());
        assert_eq!(scanned, Scanned { end: BLOCK, next_seq: 1 });
    }

    #[test]
    fn headers_identify_active_segments_and_retired_ones_are_spares() {
        let directory = tempfile::tempdir().unwrap();
        let path = create(directory.path(), 3, 4 * BLOCK).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        assert_eq!(read_header(&file), None, "a new segment is a spare");
        file.write_all_at(&header(42, 4 * BLOCK), 0).unwrap();
        let found = list(directory.path()).unwrap();
        assert_eq!((found[0].number, found[0].size, found[0].first_seq), (3, 4 * BLOCK, Some(42)));
        retire(&path).unwrap();
        assert_eq!(list(directory.path()).unwrap()[0].first_seq, None);
    }
}
