//! The MSH segment, read tolerantly.
//!
//! [`Header::scan`] reads whatever MSH fields are present, even from a damaged message, so
//! that a best-effort NAK can always be addressed back to its sender. [`Header::check`]
//! then says whether the header is good enough for the message to be accepted.

use super::ack::{ErrorDetail, ErrorLocation};

/// The delimiters a message declares in MSH-1 and MSH-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Separators {
    /// Field separator (MSH-1), normally `|`.
    pub field: char,
    /// Component separator, normally `^`.
    pub component: char,
    /// Repetition separator, normally `~`.
    pub repetition: char,
    /// Escape character, normally `\`.
    pub escape: char,
    /// Subcomponent separator, normally `&`.
    pub subcomponent: char,
}

impl Default for Separators {
    fn default() -> Self {
        Separators { field: '|', component: '^', repetition: '~', escape: '\\', subcomponent: '&' }
    }
}

impl Separators {
    /// The MSH-2 value for these separators.
    pub fn encoding_characters(&self) -> String {
        [self.component, self.repetition, self.escape, self.subcomponent].iter().collect()
    }

    /// Escapes `text` so that it can stand in a field (HL7 escape sequences `\F\`, `\S\`,
    /// `\R\`, `\E\`, `\T\`); line breaks become `\.br\`.
    pub fn escape(&self, text: &str) -> String {
        let mut escaped = String::with_capacity(text.len());
        for character in text.chars() {
            let sequence = if character == self.field {
                "F"
            } else if character == self.component {
                "S"
            } else if character == self.repetition {
                "R"
            } else if character == self.escape {
                "E"
            } else if character == self.subcomponent {
                "T"
            } else if character == '\r' || character == '\n' {
                ".br"
            } else {
                escaped.push(character);
                continue;
            };
            escaped.push(self.escape);
            escaped.push_str(sequence);
            escaped.push(self.escape);
        }
        escaped
    }

    fn are_distinct(&self) -> bool {
        let all = [self.field, self.component, self.repetition, self.escape, self.subcomponent];
        all.iter().enumerate().all(|(index, first)| {
            !first.is_alphanumeric() && !first.is_whitespace() && all[index + 1..].iter().all(|second| second != first)
        })
    }
}

/// MSH fields as raw (still escaped) text. A field that is absent is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Delimiters from MSH-1/MSH-2 (defaults when they were unusable).
    pub separators: Separators,
    /// MSH-3 Sending Application.
    pub sending_application: String,
    /// MSH-4 Sending Facility.
    pub sending_facility: String,
    /// MSH-5 Receiving Application.
    pub receiving_application: String,
    /// MSH-6 Receiving Facility.
    pub receiving_facility: String,
    /// MSH-7 Date/Time of Message.
    pub message_datetime: String,
    /// MSH-9 Message Type (all components).
    pub message_type: String,
    /// MSH-10 Message Control ID.
    pub control_id: String,
    /// MSH-11 Processing ID.
    pub processing_id: String,
    /// MSH-12 Version ID (first component).
    pub version: String,
    /// MSH-15 Accept Acknowledgment Type.
    pub accept_ack_type: String,
    /// MSH-16 Application Acknowledgment Type.
    pub application_ack_type: String,
    /// MSH-18 Character Set (all repetitions).
    pub charset: String,
    /// False when MSH-1/MSH-2 could not be read and default separators were assumed.
    pub separators_declared: bool,
}

/// Versions of HL7 v2 the gateway accepts (MSH-12.1).
const SUPPORTED_VERSIONS: [&str; 12] =
    ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1"];

impl Header {
    /// Reads the MSH segment of a decoded message. Returns `None` when the text does not
    /// start with `MSH` (after blanks): there is then nothing to address a NAK to beyond
    /// the defaults.
    pub fn scan(text: &str) -> Option<Header> {
        let trimmed = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        let rest = trimmed.strip_prefix("MSH")?;
        let segment_end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let segment = &rest[..segment_end];

        let mut characters = segment.chars();
        let field_separator = characters.next();
        let mut header = Header::default();
        let Some(field_separator) = field_separator else {
            return Some(header);
        };
        let encoding: Vec<char> = characters.take_while(|&c| c != field_separator).collect();
        let declared = Separators {
            field: field_separator,
            component: encoding.first().copied().unwrap_or('^'),
            repetition: encoding.get(1).copied().unwrap_or('~'),
            escape: encoding.get(2).copied().unwrap_or('\\'),
            subcomponent: encoding.get(3).copied().unwrap_or('&'),
        };
        header.separators_declared = encoding.len() >= 2 && declared.are_distinct();
        if !header.separators_declared {
            return Some(header);
        }
        header.separators = declared;

        // pieces[0] is empty (before MSH-1), pieces[1] is MSH-2, pieces[n-1] is MSH-n.
        let pieces: Vec<&str> = segment.split(field_separator).collect();
        let field = |number: usize| pieces.get(number - 1).map(|value| value.to_string()).unwrap_or_default();
        header.sending_application = field(3);
        header.sending_facility = field(4);
        header.receiving_application = field(5);
        header.receiving_facility = field(6);
        header.message_datetime = field(7);
        header.message_type = field(9);
        header.control_id = field(10);
        header.processing_id = field(11);
        header.version = first_component(&field(12), declared.component).trim().to_string();
        header.accept_ack_type = field(15).trim().to_ascii_uppercase();
        header.application_ack_type = field(16).trim().to_ascii_uppercase();
        header.charset = field(18);
        Some(header)
    }

    /// Says whether the header allows the message to be accepted. The returned detail is
    /// the reason for an AR (or CR): these are rejections unrelated to the message content.
    pub fn check(&self) -> Result<(), ErrorDetail> {
        if !self.separators_declared {
            return Err(ErrorDetail::new(102, "MSH-1/MSH-2 do not declare usable separators")
                .at(ErrorLocation::field("MSH", 2)));
        }
        if self.message_code().is_empty() {
            return Err(ErrorDetail::new(101, "MSH-9 message type is missing").at(ErrorLocation::field("MSH", 9)));
        }
        if self.control_id.trim().is_empty() {
            return Err(
                ErrorDetail::new(101, "MSH-10 message control id is missing").at(ErrorLocation::field("MSH", 10))
            );
        }
        if !self.version.is_empty() && !SUPPORTED_VERSIONS.contains(&self.version.as_str()) {
            return Err(ErrorDetail::new(203, "MSH-12 version is not supported").at(ErrorLocation::field("MSH", 12)));
        }
        Ok(())
    }

    /// MSH-9.1, the message code (`ADT`).
    pub fn message_code(&self) -> &str {
        first_component(&self.message_type, self.separators.component).trim()
    }

    /// MSH-9.2, the trigger event (`A01`), empty when absent.
    pub fn trigger_event(&self) -> &str {
        self.message_type.split(self.separators.component).nth(1).unwrap_or("").trim()
    }

    /// `ADT^A01` style label (code and trigger only), for metrics and logs.
    pub fn message_label(&self) -> String {
        match (self.message_code(), self.trigger_event()) {
            ("", _) => "unknown".to_string(),
            (code, "") => code.to_string(),
            (code, trigger) => format!("{code}^{trigger}"),
        }
    }

    /// `MSH-3^MSH-4` (first components), the sender's identity for duplicates and metrics.
    pub fn sender_label(&self) -> String {
        let application = first_component(&self.sending_application, self.separators.component);
        let facility = first_component(&self.sending_facility, self.separators.component);
        format!("{application}^{facility}")
    }

    /// Enhanced acknowledgment mode applies when MSH-15 or MSH-16 is valued.
    pub fn enhanced_mode(&self) -> bool {
        !self.accept_ack_type.is_empty() || !self.application_ack_type.is_empty()
    }

    /// The first MSH-18 repetition, the character set of the message, if declared.
    pub fn declared_charset(&self) -> Option<&str> {
        let first = self.charset.split(self.separators.repetition).next().unwrap_or("").trim();
        (!first.is_empty()).then_some(first)
    }
}

fn first_component(value: &str, component_separator: char) -> &str {
    value.split(component_separator).next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &str = "MSH|^~\\&|EPIC|HOSP^1.2.3^ISO|GW|CENTRAL|20240102030405||ADT^A01^ADT_A01|MSG0001|P|2.5.1^^|||AL|NE||8859/1\rPID|1";

    #[test]
    fn scans_all_fields() {
        let header = Header::scan(ADT).unwrap();
        assert_eq!(header.sending_application, "EPIC");
        assert_eq!(header.sending_facility, "HOSP^1.2.3^ISO");
        assert_eq!(header.message_type, "ADT^A01^ADT_A01");
        assert_eq!(header.message_label(), "ADT^A01");
        assert_eq!(header.sender_label(), "EPIC^HOSP");
        assert_eq!(header.control_id, "MSG0001");
        assert_eq!(header.version, "2.5.1");
        assert_eq!(header.accept_ack_type, "AL");
        assert_eq!(header.application_ack_type, "NE");
        assert_eq!(header.declared_charset(), Some("8859/1"));
        assert!(header.enhanced_mode());
        assert!(header.check().is_ok());
    }

    #[test]
    fn honours_unusual_separators() {
        let header = Header::scan("MSH#*@!%#APP#FAC#R#RF#2024##ORU*R01#42#P#2.3\n").unwrap();
        assert_eq!(header.separators.component, '*');
        assert_eq!(header.message_label(), "ORU^R01");
        assert_eq!(header.control_id, "42");
    }

    #[test]
    fn damaged_headers_are_scanned_best_effort_and_refused() {
        let header = Header::scan("MSH|^~\\&|APP|FAC|||2024||ADT^A01||P|2.5").unwrap();
        assert_eq!(header.check().unwrap_err().code, 101);

        let header = Header::scan("MSH|^~\\&|APP|FAC|||2024||ADT^A01|1|P|9.9").unwrap();
        assert_eq!(header.check().unwrap_err().code, 203);

        let header = Header::scan("MSH").unwrap();
        assert!(!header.separators_declared);
        assert_eq!(header.check().unwrap_err().code, 102);

        let header = Header::scan("MSH|||||").unwrap();
        assert!(header.check().is_err());

        assert!(Header::scan("PID|1").is_none());
    }

    #[test]
    fn escapes_delimiters() {
        let separators = Separators::default();
        assert_eq!(separators.escape("a|b^c~d\\e&f\rg"), "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\\.br\\g");
    }
}
