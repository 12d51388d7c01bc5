//! One received frame → verdict → journal → acknowledgment.
//!
//! [`examine`] is the pure part: decode by MSH-18 (or the listener default), read the
//! header, check the structure, and decide accepted / error (AE) / rejected (AR). [`Ingest`]
//! then journals the exact bytes with that verdict and hands back the ACK to write, which
//! for an accepted message is sent only once the journal commit has returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::codec::Oversize;
use crate::hl7::ack::{self, AckCode, AckOutcome, ErrorDetail, ErrorLocation};
use crate::hl7::charset::{self, Charset};
use crate::hl7::header::Header;
use crate::journal::{self, Appended, Journal, MessageKey, NewEntry, Pending, Status};
use crate::telemetry::{MessageLabels, Metrics, RefusedLabels};

/// What [`examine`] found out about a message.
#[derive(Debug)]
pub struct Examined {
    /// The header, possibly defaulted when the message has none.
    pub header: Header,
    /// The character set applied.
    pub charset: Charset,
    /// The verdict.
    pub outcome: AckOutcome,
}

/// Decides about a message from its bytes alone.
pub fn examine(raw: &[u8], default_charset: Charset) -> Examined {
    let mut problem: Option<AckOutcome> = None;
    let charset = charset::message_charset(raw, default_charset).unwrap_or_else(|unsupported| {
        problem = Some(AckOutcome::Rejected(
            ErrorDetail::new(103, unsupported.to_string()).at(ErrorLocation::field("MSH", 18)),
        ));
        default_charset
    });
    let text = match charset.decode(raw) {
        Ok(text) => text,
        Err(error) => {
            let location = locate(raw, error.offset);
            problem.get_or_insert(AckOutcome::Error(ErrorDetail::new(102, error.to_string()).at(location)));
            String::from_utf8_lossy(raw)
        }
    };
    let Some(header) = Header::scan(&text) else {
        let detail =
            ErrorDetail::new(100, "message does not start with an MSH segment").at(ErrorLocation::field("MSH", 0));
        return Examined { header: Header::default(), charset, outcome: AckOutcome::Rejected(detail) };
    };
    if let Err(detail) = header.check() {
        return Examined { header, charset, outcome: AckOutcome::Rejected(detail) };
    }
    if let Some(outcome) = problem {
        return Examined { header, charset, outcome };
    }
    let outcome = match structure_problem(&text) {
        Some(detail) => AckOutcome::Error(detail),
        None => AckOutcome::Accepted,
    };
    Examined { header, charset, outcome }
}

/// Checks the segment structure as `hl7-parser` judges it; its failure position is turned
/// into a segment and field location.
///
/// [`structure::check`](crate::hl7::structure::check) answers first: it accepts exactly what `hl7-parser` accepts but
/// allocates nothing, where the full parse (a tree of `Vec`s per message) was a large share
/// of the listener's CPU. Only a message it refuses, which is rare, is parsed again by
/// `hl7-parser`, so that the diagnostic and location stay the ones `hl7-parser` gives.
fn structure_problem(text: &str) -> Option<ErrorDetail> {
    use crate::hl7::structure;
    let trimmed = structure::trim(text);
    if structure::check(trimmed).is_ok() {
        return None;
    }
    match hl7_parser::Message::parse_with_lenient_newlines(trimmed, true) {
        Ok(_) => None,
        Err(hl7_parser::parser::ParseError::FailedToParse { position, .. }) => {
            let location = locate(trimmed.as_bytes(), position);
            let diagnostic =
                format!("message structure is invalid in segment {} near field {}", location.segment, location.field);
            Some(ErrorDetail::new(100, diagnostic).at(location))
        }
        Err(hl7_parser::parser::ParseError::IncompleteInput(_)) => {
            Some(ErrorDetail::new(100, "message structure is incomplete"))
        }
    }
}

/// Finds the segment, its occurrence and the field that hold byte `offset` of a message.
pub fn locate(raw: &[u8], offset: usize) -> ErrorLocation {
    let offset = offset.min(raw.len());
    let segment_start =
        raw[..offset].iter().rposition(|&byte| byte == b'\r' || byte == b'\n').map_or(0, |index| index + 1);
    let segment = &raw[segment_start..];
    let name_length = segment.iter().take(3).take_while(|byte| byte.is_ascii_alphanumeric()).count();
    let name = String::from_utf8_lossy(&segment[..name_length]).into_owned();
    let field_separator =
        raw.windows(3).position(|window| window == b"MSH").and_then(|start| raw.get(start + 3).copied());
    let separators_before = field_separator
        .map_or(0, |separator| raw[segment_start..offset].iter().filter(|&&byte| byte == separator).count());
    // In MSH the field separator is MSH-1, so MSH fields are numbered one higher.
    let field = if name == "MSH" { separators_before + 1 } else { separators_before } as u32;
    let sequence = raw[..segment_start]
        .split(|&byte| byte == b'\r' || byte == b'\n')
        .filter(|line| !name.is_empty() && line.starts_with(name.as_bytes()))
        .count() as u32
        + 1;
    ErrorLocation { segment: if name.is_empty() { "MSH".to_string() } else { name }, sequence, field }
}

/// Unique control ids for the ACKs this gateway sends: a prefix from the start time and a
/// counter, so ids do not repeat across restarts.
pub struct AckIds {
    prefix: String,
    counter: AtomicU64,
}

impl AckIds {
    /// A generator whose prefix encodes the current time.
    pub fn new() -> AckIds {
        let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
        AckIds { prefix: format!("GW{}", base36(seconds)), counter: AtomicU64::new(0) }
    }

    /// The next id.
    pub fn next(&self) -> String {
        let count = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}{count:06}", self.prefix)
    }
}

impl Default for AckIds {
    fn default() -> Self {
        AckIds::new()
    }
}

fn base36(mut value: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut text = Vec::new();
    loop {
        text.push(DIGITS[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    text.reverse();
    String::from_utf8_lossy(&text).into_owned()
}

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_micros() as i64)
}

fn hl7_timestamp() -> String {
    jiff::Zoned::now().strftime("%Y%m%d%H%M%S%z").to_string()
}

/// MSH-7 of the ACKs: local time to the second, formatted (time zone lookup included) once
/// a second rather than for every message.
#[derive(Default)]
struct AckClock {
    /// The Unix second last formatted, and its text.
    last: Mutex<(u64, String)>,
}

impl AckClock {
    fn now(&self) -> String {
        let second = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
        // Every update is a single assignment: still consistent after a panic elsewhere.
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.0 != second || last.1.is_empty() {
            *last = (second, hl7_timestamp());
        }
        last.1.clone()
    }
}

/// Shared state of every connection's ingest.
pub struct Ingest {
    journal: Journal,
    metrics: Arc<Metrics>,
    default_charset: Charset,
    duplicate_window_us: i64,
    honor_accept_ack_type: bool,
    ack_ids: AckIds,
    clock: AckClock,
}

/// A frame queued in the journal; [`Submitted::finish`] waits for its commit.
pub struct Submitted {
    pending: Result<Pending, journal::Error>,
    examined: Examined,
    /// The metric labels, bounded once per message.
    labels: MessageLabels,
    ack: Vec<u8>,
    ack_code: AckCode,
}

impl Ingest {
    /// Ingest writing to `journal`.
    pub fn new(journal: Journal, metrics: Arc<Metrics>, settings: &super::Settings) -> Ingest {
        Ingest {
            journal,
            metrics,
            default_charset: settings.default_charset,
            duplicate_window_us: settings.duplicate_window.as_micros().min(i64::MAX as u128) as i64,
            honor_accept_ack_type: settings.honor_accept_ack_type,
            ack_ids: AckIds::new(),
            clock: AckClock::default(),
        }
    }

    /// Examines a frame and queues it in the journal. Call [`Submitted::finish`] in the
    /// same order to get the acknowledgments.
    pub async fn submit(&self, peer: &str, payload: Bytes) -> Submitted {
        let examined = examine(&payload, self.default_charset);
        self.submit_examined(peer, payload, false, examined).await
    }

    /// Journals the start of an oversize frame as refused and returns the AR to send.
    pub async fn refuse_oversize(&self, peer: &str, oversize: Oversize, limit: usize) -> Option<Vec<u8>> {
        self.metrics.oversize_frames.inc();
        let mut examined = examine(&oversize.prefix, self.default_charset);
        let detail = ErrorDetail::new(
            207,
            format!("message exceeds the {limit} byte limit ({} bytes received)", oversize.received_bytes),
        )
        .at(ErrorLocation::field("MSH", 0));
        examined.outcome = AckOutcome::Rejected(detail);
        let submitted = self.submit_examined(peer, oversize.prefix, true, examined).await;
        self.finish(submitted).await
    }

    async fn submit_examined(&self, peer: &str, payload: Bytes, truncated: bool, examined: Examined) -> Submitted {
        let header = &examined.header;
        let labels = self.metrics.message_labels(&header.message_label(), &header.sender_label());
        self.metrics.messages_received.get_or_create(&labels).inc();

        let ack_code = examined.outcome.code(header);
        let ack = if ack::should_send(header, &examined.outcome, self.honor_accept_ack_type) {
            let text = ack::build_ack(header, &examined.outcome, &self.ack_ids.next(), &self.clock.now());
            examined.charset.encode_owned(text)
        } else {
            Vec::new()
        };
        let status = if ack_code.is_accept() { Status::Accepted } else { Status::Refused };
        let entry = NewEntry {
            received_at_us: now_micros(),
            peer: peer.to_string(),
            key: MessageKey {
                sending_application: header.sending_application.clone(),
                sending_facility: header.sending_facility.clone(),
                receiving_application: header.receiving_application.clone(),
                receiving_facility: header.receiving_facility.clone(),
                message_datetime: header.message_datetime.clone(),
                message_type: header.message_type.clone(),
                control_id: header.control_id.clone(),
                version: header.version.clone(),
            },
            charset: examined.charset.name().to_string(),
            raw: payload,
            raw_truncated: truncated,
            status,
            error: examined.outcome.error().map(|detail| detail.diagnostic.clone()),
            ack_code: ack_code.as_str().to_string(),
            ack: ack.clone(),
            duplicate_window_us: self.duplicate_window_us,
        };
        let pending = self.journal.submit(entry).await;
        Submitted { pending, examined, labels, ack, ack_code }
    }

    /// Waits for the journal commit of a submitted frame and returns the acknowledgment to
    /// write, if any (enhanced mode may ask for none).
    pub async fn finish(&self, submitted: Submitted) -> Option<Vec<u8>> {
        let Submitted { pending, examined, labels, ack, ack_code } = submitted;
        let header = &examined.header;
        let appended = match pending {
            Ok(pending) => pending.wait().await,
            Err(error) => Err(error),
        };
        match appended {
            Ok(Appended::Stored { id }) => {
                if ack_code.is_accept() {
                    self.metrics.messages_acknowledged.get_or_create(&labels).inc();
                    tracing::debug!(journal_id = id, control_id = %header.control_id, sender = %labels.sender, message_type = %labels.message_type, "message stored");
                } else {
                    self.count_refusal(&labels, ack_code);
                    let reason = examined.outcome.error().map(|detail| detail.diagnostic.as_str()).unwrap_or("");
                    tracing::warn!(journal_id = id, control_id = %header.control_id, sender = %labels.sender, code = ack_code.as_str(), reason, "message refused");
                }
                (!ack.is_empty()).then_some(ack)
            }
            Ok(Appended::Duplicate { original_id, ack, ack_code }) => {
                self.metrics.duplicates.get_or_create(&labels).inc();
                tracing::info!(original_journal_id = original_id, control_id = %header.control_id, sender = %labels.sender, "duplicate answered with the original ack");
                if AckCode::parse(&ack_code).is_some_and(AckCode::is_accept) {
                    self.metrics.messages_acknowledged.get_or_create(&labels).inc();
                }
                (!ack.is_empty()).then_some(ack)
            }
            Err(error) => {
                tracing::error!(error = %error, control_id = %header.control_id, sender = %labels.sender, "message not stored; answering with a reject");
                let detail = ErrorDetail::new(207, "message could not be stored; send it again later");
                let outcome = AckOutcome::Rejected(detail);
                let code = outcome.code(header);
                self.count_refusal(&labels, code);
                if !ack::should_send(header, &outcome, self.honor_accept_ack_type) {
                    return None;
                }
                let text = ack::build_ack(header, &outcome, &self.ack_ids.next(), &self.clock.now());
                Some(examined.charset.encode_owned(text))
            }
        }
    }

    fn count_refusal(&self, labels: &crate::telemetry::MessageLabels, code: AckCode) {
        let refused = RefusedLabels {
            message_type: labels.message_type.clone(),
            sender: labels.sender.clone(),
            code: code.as_str().to_string(),
        };
        self.metrics.messages_refused.get_or_create(&refused).inc();
    }

    /// True while the journal accepts writes.
    pub fn is_ready(&self) -> bool {
        self.journal.is_healthy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &[u8] = b"MSH|^~\\&|EPIC|HOSP|GW|C|20240102||ADT^A01|1|P|2.5.1\rPID|1||123^^^H^MR||Doe^John\r";

    #[test]
    fn a_sound_message_is_accepted() {
        let examined = examine(ADT, Charset::Utf8);
        assert_eq!(examined.outcome, AckOutcome::Accepted);
        assert_eq!(examined.header.control_id, "1");
    }

    #[test]
    fn latin1_declared_decodes_and_undeclared_utf8_default_refuses() {
        let latin1 = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|2|P|2.5||||||8859/1\rPID|1||1||M\xfcller\r";
        assert_eq!(examine(latin1, Charset::Utf8).outcome, AckOutcome::Accepted);

        let undeclared = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|3|P|2.5\rPID|1||1||M\xfcller\r";
        let examined = examine(undeclared, Charset::Utf8);
        let AckOutcome::Error(detail) = examined.outcome else { panic!("expected AE") };
        assert_eq!(detail.code, 102);
        assert_eq!(detail.diagnostic, "byte offset 50 is not valid UNICODE UTF-8");
        assert_eq!(detail.location, Some(ErrorLocation { segment: "PID".to_string(), sequence: 1, field: 5 }));

        let windows = examine(undeclared, Charset::from_name("windows-1252").unwrap());
        assert_eq!(windows.outcome, AckOutcome::Accepted);
    }

    #[test]
    fn unknown_charset_and_missing_msh_are_rejected() {
        let unknown = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|2|P|2.5||||||EBCDIC\r";
        let AckOutcome::Rejected(detail) = examine(unknown, Charset::Utf8).outcome else { panic!() };
        assert_eq!(detail.code, 103);
        let AckOutcome::Rejected(detail) = examine(b"hello world", Charset::Utf8).outcome else { panic!() };
        assert_eq!(detail.code, 100);
    }

    #[test]
    fn structure_problem_passes_sound_messages_without_hl7_parser() {
        let text = String::from_utf8_lossy(ADT);
        assert!(structure_problem(&text).is_none());
        assert!(structure_problem(&format!(" \u{feff}{}\r\n", text.replace('\r', "\n"))).is_none());
        // hl7-parser stops at a segment it cannot read and still succeeds; so does the check.
        assert!(structure_problem("MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPI|x\rEVN").is_none());
    }

    #[test]
    fn structure_problem_keeps_hl7_parser_diagnostics() {
        // A non-ASCII field separator: hl7-parser fails at byte 3, the separators.
        let detail = structure_problem("MSH¦^~\\&¦A¦B¦C¦D¦2024¦¦ADT^A01¦1¦P¦2.5\r").expect("refused");
        assert_eq!(detail.code, 100);
        assert_eq!(detail.diagnostic, "message structure is invalid in segment MSH near field 1");
        assert_eq!(detail.location, Some(ErrorLocation { segment: "MSH".to_string(), sequence: 1, field: 1 }));

        let detail = structure_problem("\r\nPID|1||123\r").expect("refused");
        assert_eq!(detail.diagnostic, "message structure is invalid in segment PID near field 0");
        assert_eq!(detail.location, Some(ErrorLocation { segment: "PID".to_string(), sequence: 1, field: 0 }));

        let detail = structure_problem("MSH|^~").expect("refused");
        assert_eq!(detail.location, Some(ErrorLocation { segment: "MSH".to_string(), sequence: 1, field: 1 }));
    }

    #[test]
    fn locates_offsets_in_later_segments() {
        let message = b"MSH|^~\\&|A\rOBX|1|x\rOBX|2|y|z\r";
        let location = locate(message, message.len() - 2);
        assert_eq!(location, ErrorLocation { segment: "OBX".to_string(), sequence: 2, field: 3 });
        assert_eq!(locate(message, 5).field, 2);
    }

    #[test]
    fn the_ack_clock_gives_msh_7_as_formatted_fresh_within_the_second() {
        let clock = AckClock::default();
        let (first, fresh) = (clock.now(), hl7_timestamp());
        assert_eq!(first.len(), "20261130160102+0000".len(), "{first}");
        assert!(first.bytes().take(14).all(|byte| byte.is_ascii_digit()), "{first}");
        // Both were read within the same second or across one boundary.
        let seconds = |text: &str| jiff::civil::DateTime::strptime("%Y%m%d%H%M%S", &text[..14]).unwrap();
        let apart = seconds(&first).duration_until(seconds(&fresh)).as_secs();
        assert!((0..=1).contains(&apart), "{first} then {fresh}");
        assert_eq!(first[14..], fresh[14..], "same zone offset");
        // The next second is formatted anew.
        let second = clock.last.lock().unwrap().0;
        clock.last.lock().unwrap().0 = second - 5;
        clock.last.lock().unwrap().1 = "stale".to_string();
        assert_ne!(clock.now(), "stale");
    }

    #[test]
    fn ack_ids_are_unique_and_short() {
        let ids = AckIds::new();
        let first = ids.next();
        assert_ne!(first, ids.next());
        assert!(first.len() <= 20, "{first}");
    }
}
