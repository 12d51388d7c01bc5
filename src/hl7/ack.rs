//! ACK and NAK messages, in original and enhanced acknowledgment mode.
//!
//! The rules followed (HL7 v2 chapter 2):
//! - MSA-2 echoes MSH-10 of the message acknowledged; the ACK gets a control id of its own.
//! - The ACK's MSH swaps sender and receiver (MSH-3/4 ⇄ MSH-5/6) and echoes MSH-11, MSH-12
//!   and MSH-18, with the message's own separators.
//! - Original mode answers AA, AE (content error) or AR (rejected for reasons unrelated to
//!   content: unsupported type or version, damaged header, storage unavailable).
//! - Enhanced mode (MSH-15 or MSH-16 valued) answers a commit accept CA, CE or CR, sent
//!   according to MSH-15 (AL or empty always, NE never, ER only on error, SU only on
//!   success) when the listener is set to honour MSH-15, and always otherwise.
//! - Every AE/AR/CE/CR carries an ERR segment with the table 0357 code and the location:
//!   ERR-2/ERR-3/ERR-4/ERR-7 from v2.5 on, ERR-1 (and MSA-3) before.

use super::header::Header;

/// MSA-1 acknowledgment code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: accepted.
    AA,
    /// Original mode: application error (content).
    AE,
    /// Original mode: application reject.
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    /// The code as it stands in MSA-1.
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    /// Parses an MSA-1 value.
    pub fn parse(value: &str) -> Option<AckCode> {
        match value.trim() {
            "AA" => Some(AckCode::AA),
            "AE" => Some(AckCode::AE),
            "AR" => Some(AckCode::AR),
            "CA" => Some(AckCode::CA),
            "CE" => Some(AckCode::CE),
            "CR" => Some(AckCode::CR),
            _ => None,
        }
    }

    /// True for AA and CA: the message is durably accepted.
    pub fn is_accept(self) -> bool {
        matches!(self, AckCode::AA | AckCode::CA)
    }
}

/// Where in the message an error was found (ERR-2 / ERR-1 location).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorLocation {
    /// Segment id, e.g. `PID`.
    pub segment: String,
    /// Occurrence of that segment in the message, from 1.
    pub sequence: u32,
    /// Field position, from 1 (0 when the error concerns the segment as a whole).
    pub field: u32,
}

impl ErrorLocation {
    /// A field of the first occurrence of `segment`.
    pub fn field(segment: &str, field: u32) -> ErrorLocation {
        ErrorLocation { segment: segment.to_string(), sequence: 1, field }
    }
}

/// One error reported in an ERR segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorDetail {
    /// HL7 table 0357 code (100–207).
    pub code: u16,
    /// Human-readable diagnostic, free of patient data.
    pub diagnostic: String,
    /// Location, when known.
    pub location: Option<ErrorLocation>,
}

impl ErrorDetail {
    /// An error with a table 0357 code and a diagnostic text.
    pub fn new(code: u16, diagnostic: impl Into<String>) -> ErrorDetail {
        ErrorDetail { code, diagnostic: diagnostic.into(), location: None }
    }

    /// The same error, located.
    pub fn at(mut self, location: ErrorLocation) -> ErrorDetail {
        self.location = Some(location);
        self
    }
}

/// Table 0357 description of a code.
pub fn error_code_text(code: u16) -> &'static str {
    match code {
        0 => "Message accepted",
        100 => "Segment sequence error",
        101 => "Required field missing",
        102 => "Data type error",
        103 => "Table value not found",
        104 => "Value too long",
        200 => "Unsupported message type",
        201 => "Unsupported event code",
        202 => "Unsupported processing id",
        203 => "Unsupported version id",
        204 => "Unknown key identifier",
        205 => "Duplicate key identifier",
        206 => "Application record locked",
        _ => "Application internal error",
    }
}

/// What the gateway decided about a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// Stored durably: AA / CA.
    Accepted,
    /// Refused because of its content: AE / CE.
    Error(ErrorDetail),
    /// Refused for reasons unrelated to its content: AR / CR.
    Rejected(ErrorDetail),
}

impl AckOutcome {
    /// The MSA-1 code for this outcome under the header's acknowledgment mode.
    pub fn code(&self, header: &Header) -> AckCode {
        match (self, header.enhanced_mode()) {
            (AckOutcome::Accepted, false) => AckCode::AA,
            (AckOutcome::Error(_), false) => AckCode::AE,
            (AckOutcome::Rejected(_), false) => AckCode::AR,
            (AckOutcome::Accepted, true) => AckCode::CA,
            (AckOutcome::Error(_), true) => AckCode::CE,
            (AckOutcome::Rejected(_), true) => AckCode::CR,
        }
    }

    /// The error, if any.
    pub fn error(&self) -> Option<&ErrorDetail> {
        match self {
            AckOutcome::Accepted => None,
            AckOutcome::Error(detail) | AckOutcome::Rejected(detail) => Some(detail),
        }
    }
}

/// Whether an accept acknowledgment is to be sent at all.
///
/// With `honor_accept_ack_type` false (the default, as in Mirth Connect) every message is
/// answered: most senders that fill MSH-15 with NE still block on the MLLP connection
/// waiting for an answer. With it true, enhanced mode follows MSH-15 (AL or empty: always,
/// NE: never, ER: on error, SU: on success). Unknown MSH-15 values are read as AL: an
/// unwanted ACK is harmless, a missing one makes the sender resend forever.
pub fn should_send(header: &Header, outcome: &AckOutcome, honor_accept_ack_type: bool) -> bool {
    if !honor_accept_ack_type || !header.enhanced_mode() {
        return true;
    }
    let accepted = matches!(outcome, AckOutcome::Accepted);
    match header.accept_ack_type.as_str() {
        "NE" => false,
        "ER" => !accepted,
        "SU" => accepted,
        _ => true,
    }
}

/// Builds the acknowledgment for a message as text with segments ending in CR.
///
/// `ack_control_id` is the ACK's own MSH-10; `timestamp` its MSH-7 (`YYYYMMDDHHMMSS+ZZZZ`).
pub fn build_ack(header: &Header, outcome: &AckOutcome, ack_control_id: &str, timestamp: &str) -> String {
    let separators = header.separators;
    let field = separators.field;
    let component = separators.component;
    let version = if header.version.is_empty() { "2.5.1" } else { header.version.as_str() };
    let version_number = version_tuple(version);
    let trigger = header.trigger_event();
    let message_type = if version_number < (2, 2, 0) || trigger.is_empty() {
        "ACK".to_string()
    } else if version_number < (2, 3, 1) {
        format!("ACK{component}{trigger}")
    } else {
        format!("ACK{component}{trigger}{component}ACK")
    };
    let processing_id = if header.processing_id.is_empty() { "P" } else { header.processing_id.as_str() };
    let code = outcome.code(header);

    // Written straight into one string: the listener builds an ACK for every message.
    let encoding_characters = separators.encoding_characters();
    let escaped_control_id = separators.escape(ack_control_id);
    // MSH-2 to MSH-12.
    let msh_fields: [&str; 11] = [
        &encoding_characters,
        &header.receiving_application,
        &header.receiving_facility,
        &header.sending_application,
        &header.sending_facility,
        timestamp,
        "",
        &message_type,
        &escaped_control_id,
        processing_id,
        version,
    ];
    let mut ack = String::with_capacity(256);
    ack.push_str("MSH");
    for value in msh_fields {
        ack.push(field);
        ack.push_str(value);
    }
    if !header.charset.is_empty() {
        // MSH-13 to MSH-17 empty, then MSH-18.
        for _ in 13..=18 {
            ack.push(field);
        }
        ack.push_str(&header.charset);
    }
    ack.push('\r');

    ack.push_str("MSA");
    ack.push(field);
    ack.push_str(code.as_str());
    ack.push(field);
    ack.push_str(&header.control_id);
    let modern_err = version_number >= (2, 5, 0);
    if let (Some(detail), false) = (outcome.error(), modern_err) {
        // MSA-3 text message, deprecated from v2.4 but what older receivers display.
        ack.push_str(&format!("{field}{}", separators.escape(&detail.diagnostic)));
    }
    ack.push('\r');

    if let Some(detail) = outcome.error() {
        ack.push_str(&error_segment(header, detail, modern_err));
        ack.push('\r');
    }
    ack
}

fn error_segment(header: &Header, detail: &ErrorDetail, modern: bool) -> String {
    let separators = header.separators;
    let field = separators.field;
    let component = separators.component;
    let subcomponent = separators.subcomponent;
    let location = detail.location.clone().unwrap_or_else(|| ErrorLocation::field("MSH", 0));
    let code_text = error_code_text(detail.code);
    let diagnostic = separators.escape(&detail.diagnostic);
    let segment = &location.segment;
    let sequence = location.sequence;
    let position = if location.field == 0 { String::new() } else { location.field.to_string() };
    if modern {
        // ERR-1 (withdrawn) empty, ERR-2 location, ERR-3 code, ERR-4 severity, ERR-7 diagnostic.
        format!(
            "ERR{field}{field}{segment}{component}{sequence}{component}{position}{field}{}{component}{code_text}{component}HL70357{field}E{field}{field}{field}{diagnostic}",
            detail.code
        )
    } else {
        // ERR-1: segment^sequence^field^code&text&HL70357.
        format!(
            "ERR{field}{segment}{component}{sequence}{component}{position}{component}{}{subcomponent}{code_text}{subcomponent}HL70357",
            detail.code
        )
    }
}

/// "2.5.1" → (2, 5, 1); unparsable parts count as 0.
fn version_tuple(version: &str) -> (u32, u32, u32) {
    let mut parts = version.split('.').map(|part| part.trim().parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Reads MSA-1 and MSA-2 from an acknowledgment (for the `send` client and tests).
pub fn read_ack(text: &str) -> Option<(AckCode, String)> {
    let header = Header::scan(text)?;
    let field = header.separators.field;
    let msa = text.split(['\r', '\n']).find(|segment| segment.starts_with("MSA"))?;
    let mut pieces = msa.split(field).skip(1);
    let code = AckCode::parse(pieces.next()?)?;
    let control_id = pieces.next().unwrap_or("").to_string();
    Some((code, control_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> Header {
        Header::scan(text).unwrap()
    }

    const V251: &str = "MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102||ADT^A01^ADT_A01|MSG1|P|2.5.1\rPID|1";
    const V23: &str = "MSH|^~\\&|LAB|H|GW|C|2024||ORU^R01|77|T|2.3\rPID|1";

    #[test]
    fn original_mode_accept_swaps_sender_and_receiver() {
        let ack = build_ack(&header(V251), &AckOutcome::Accepted, "ACK1", "20240102030405+0000");
        assert_eq!(ack, "MSH|^~\\&|GW|CENTRAL|EPIC|HOSP|20240102030405+0000||ACK^A01^ACK|ACK1|P|2.5.1\rMSA|AA|MSG1\r");
        assert_eq!(read_ack(&ack), Some((AckCode::AA, "MSG1".to_string())));
    }

    #[test]
    fn modern_error_has_err_2_3_4_7() {
        let detail = ErrorDetail::new(102, "byte offset 40 is not valid ASCII").at(ErrorLocation::field("PID", 5));
        let ack = build_ack(&header(V251), &AckOutcome::Error(detail), "A2", "2024");
        let err = ack.split('\r').find(|s| s.starts_with("ERR")).unwrap();
        assert_eq!(err, "ERR||PID^1^5|102^Data type error^HL70357|E|||byte offset 40 is not valid ASCII");
        assert!(ack.contains("MSA|AE|MSG1\r"));
    }

    #[test]
    fn legacy_error_uses_err_1_and_msa_3() {
        let detail = ErrorDetail::new(200, "ORU^R01 is not routed").at(ErrorLocation::field("MSH", 9));
        let ack = build_ack(&header(V23), &AckOutcome::Rejected(detail), "A3", "2024");
        assert!(ack.contains("|ACK^R01|A3|T|2.3\r"), "{ack}");
        assert!(ack.contains("MSA|AR|77|ORU\\S\\R01 is not routed\r"), "{ack}");
        assert!(ack.contains("ERR|MSH^1^9^200&Unsupported message type&HL70357\r"), "{ack}");
    }

    #[test]
    fn enhanced_mode_follows_msh_15() {
        let always = header("MSH|^~\\&|A|B|C|D|2024||ADT^A08|9|P|2.4|||AL|NE\r");
        assert_eq!(AckOutcome::Accepted.code(&always), AckCode::CA);
        assert!(should_send(&always, &AckOutcome::Accepted, true));

        let never = header("MSH|^~\\&|A|B|C|D|2024||ADT^A08|9|P|2.4|||NE|AL\r");
        assert!(!should_send(&never, &AckOutcome::Accepted, true));
        assert!(should_send(&never, &AckOutcome::Accepted, false));

        let on_error = header("MSH|^~\\&|A|B|C|D|2024||ADT^A08|9|P|2.4|||ER|AL\r");
        let rejected = AckOutcome::Rejected(ErrorDetail::new(207, "storage unavailable"));
        assert!(!should_send(&on_error, &AckOutcome::Accepted, true));
        assert!(should_send(&on_error, &rejected, true));
        assert_eq!(rejected.code(&on_error), AckCode::CR);

        let original = header(V251);
        assert!(should_send(&original, &rejected, true));
    }

    #[test]
    fn echoes_charset_and_custom_separators() {
        let custom = header("MSH#*@!%#APP#FAC#GW#C#2024##ADT*A04#5#P#2.6######8859/1\r");
        let ack = build_ack(&custom, &AckOutcome::Accepted, "X", "2024");
        assert_eq!(ack, "MSH#*@!%#GW#C#APP#FAC#2024##ACK*A04*ACK#X#P#2.6######8859/1\rMSA#AA#5\r");
    }

    #[test]
    fn version_2_1_has_plain_ack_type() {
        let old = header("MSH|^~\\&|A|B|C|D|2024||ADT|9|P|2.1\r");
        assert!(build_ack(&old, &AckOutcome::Accepted, "X", "2024").contains("||ACK|X|P|2.1\r"));
    }
}
