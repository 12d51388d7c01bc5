//! A parsed v2 message: segments → fields → repetitions → components → subcomponents, with
//! raw (still escaped) text at the leaves and [`unescape`] to decode it.
//!
//! Numbering follows HL7: fields, repetitions, components and subcomponents count from 1,
//! and in MSH the field separator itself is MSH-1 and the encoding characters are MSH-2.
//! Segments may be separated by CR, LF or CRLF; blank lines are ignored.

use super::header::Separators;

/// The HL7 explicit null, `""`: "delete the value the receiver holds".
pub const HL7_NULL: &str = "\"\"";

/// A parse failure, with the segment (1-based line) where it happened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("segment {segment_number}: {reason}")]
pub struct ParseError {
    /// 1-based position of the segment in the message.
    pub segment_number: usize,
    /// What is wrong.
    pub reason: String,
}

/// One subcomponent-level leaf list: a component's subcomponents.
pub type Component = Vec<String>;
/// A repetition's components.
pub type Repetition = Vec<Component>;
/// A field's repetitions.
pub type Field = Vec<Repetition>;

/// A segment: its id and fields (index 0 is field 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Segment id, e.g. `PID`.
    pub name: String,
    /// Fields; `fields[0]` is field 1.
    pub fields: Vec<Field>,
}

impl Segment {
    /// Raw text of field `field`, repetition `repetition`, component `component`,
    /// subcomponent `subcomponent` (all 1-based); `None` when absent.
    pub fn value(&self, field: usize, repetition: usize, component: usize, subcomponent: usize) -> Option<&str> {
        let field_value = self.fields.get(field.checked_sub(1)?)?;
        let repetition_value = field_value.get(repetition.checked_sub(1)?)?;
        let component_value = repetition_value.get(component.checked_sub(1)?)?;
        component_value.get(subcomponent.checked_sub(1)?).map(String::as_str)
    }

    /// Number of repetitions of a field (0 when absent or empty).
    pub fn repetition_count(&self, field: usize) -> usize {
        match field.checked_sub(1).and_then(|index| self.fields.get(index)) {
            Some(repetitions) if !(repetitions.len() == 1 && is_empty_repetition(&repetitions[0])) => repetitions.len(),
            _ => 0,
        }
    }
}

fn is_empty_repetition(repetition: &Repetition) -> bool {
    repetition.iter().all(|component| component.iter().all(String::is_empty))
}

/// A whole message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Delimiters declared in MSH.
    pub separators: Separators,
    /// Segments in order; `segments[0]` is MSH.
    pub segments: Vec<Segment>,
}

impl Message {
    /// Parses decoded text. The first non-blank segment must be MSH with usable
    /// separators; segment ids must be three letters or digits.
    pub fn parse(text: &str) -> Result<Message, ParseError> {
        let mut lines = text
            .split(['\r', '\n'])
            .map(|line| line.trim_start_matches('\u{feff}'))
            .filter(|line| !line.trim().is_empty());
        let first = lines.next().ok_or_else(|| ParseError { segment_number: 1, reason: "message is empty".into() })?;
        let header = super::header::Header::scan(first)
            .ok_or_else(|| ParseError { segment_number: 1, reason: "message does not start with MSH".into() })?;
        if !header.separators_declared {
            return Err(ParseError {
                segment_number: 1,
                reason: "MSH-1/MSH-2 do not declare usable separators".into(),
            });
        }
        let separators = header.separators;
        let mut segments = vec![parse_msh(first, &separators)];
        for (index, line) in lines.enumerate() {
            let segment_number = index + 2;
            let name: String = line.chars().take(3).collect();
            if name.len() != 3 || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(ParseError { segment_number, reason: format!("`{name}` is not a segment id") });
            }
            let rest = &line[name.len()..];
            let fields = match rest.strip_prefix(separators.field) {
                Some(body) => body.split(separators.field).map(|field| split_field(field, &separators)).collect(),
                None if rest.is_empty() => Vec::new(),
                None => {
                    return Err(ParseError {
                        segment_number,
                        reason: format!("segment {name} is not followed by the field separator"),
                    })
                }
            };
            segments.push(Segment { name, fields });
        }
        Ok(Message { separators, segments })
    }

    /// The MSH segment.
    pub fn msh(&self) -> &Segment {
        // parse() always puts MSH first.
        &self.segments[0]
    }

    /// Decodes HL7 escape sequences in a raw value with this message's separators.
    pub fn unescape(&self, raw: &str) -> String {
        unescape(raw, &self.separators)
    }
}

fn parse_msh(line: &str, separators: &Separators) -> Segment {
    // "MSH|^~\&|..." → MSH-1 "|", MSH-2 "^~\&", then ordinary fields.
    let after_name = &line[3..];
    let body = &after_name[separators.field.len_utf8()..];
    let mut pieces = body.split(separators.field);
    let encoding = pieces.next().unwrap_or("");
    let mut fields: Vec<Field> =
        vec![vec![vec![vec![separators.field.to_string()]]], vec![vec![vec![encoding.to_string()]]]];
    fields.extend(pieces.map(|field| split_field(field, separators)));
    Segment { name: "MSH".to_string(), fields }
}

fn split_field(field: &str, separators: &Separators) -> Field {
    field
        .split(separators.repetition)
        .map(|repetition| {
            repetition
                .split(separators.component)
                .map(|component| component.split(separators.subcomponent).map(str::to_string).collect())
                .collect()
        })
        .collect()
}

/// Decodes HL7 escape sequences: `\F\ \S\ \T\ \R\ \E\` become the delimiters, `\.br\` and
/// `\.sp\` a line break, `\Xhh..\` the bytes (as UTF-8, else Latin-1); highlighting and
/// other formatting commands (`\H\ \N\ \.in\ \.ti\ \.ce\ \.sk\ \.fi\ \.nf\`) and charset
/// switches (`\C..\ \M..\`) are dropped. An unterminated escape is kept as text.
pub fn unescape(raw: &str, separators: &Separators) -> String {
    let escape = separators.escape;
    if !raw.contains(escape) {
        return raw.to_string();
    }
    let mut decoded = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(escape) {
        decoded.push_str(&rest[..start]);
        let after = &rest[start + escape.len_utf8()..];
        let Some(end) = after.find(escape) else {
            decoded.push_str(&rest[start..]);
            return decoded;
        };
        let sequence = &after[..end];
        match sequence {
            "F" => decoded.push(separators.field),
            "S" => decoded.push(separators.component),
            "T" => decoded.push(separators.subcomponent),
            "R" => decoded.push(separators.repetition),
            "E" => decoded.push(separators.escape),
            ".br" | ".sp" => decoded.push('\n'),
            _ if sequence.starts_with('X') || sequence.starts_with('x') => decoded.push_str(&hex_text(&sequence[1..])),
            _ if sequence.starts_with('.')
                || sequence == "H"
                || sequence == "N"
                || sequence.starts_with('C')
                || sequence.starts_with('M')
                || sequence.starts_with('Z') => {}
            _ => {
                // Not an escape HL7 defines: keep the text as it was.
                decoded.push(escape);
                decoded.push_str(sequence);
                decoded.push(escape);
            }
        }
        rest = &after[end + escape.len_utf8()..];
    }
    decoded.push_str(rest);
    decoded
}

fn hex_text(hex: &str) -> String {
    let bytes: Vec<u8> =
        (0..hex.len() / 2).filter_map(|index| u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).ok()).collect();
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => error.into_bytes().into_iter().map(char::from).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &str = "MSH|^~\\&|EPIC|HOSP|GW|C|20240102||ADT^A01|1|P|2.5.1\nPID|1||123^^^HOSP^MR~456^^^SSA^SS||Doe^John^Q\\T\\R||19700101|\"\"\r\nZPI|custom&sub\r\rNTE";

    #[test]
    fn parses_structure_with_hl7_numbering() {
        let message = Message::parse(ADT).unwrap();
        let msh = message.msh();
        assert_eq!(msh.value(1, 1, 1, 1), Some("|"));
        assert_eq!(msh.value(2, 1, 1, 1), Some("^~\\&"));
        assert_eq!(msh.value(9, 1, 2, 1), Some("A01"));
        let pid = &message.segments[1];
        assert_eq!(pid.value(3, 2, 1, 1), Some("456"));
        assert_eq!(pid.value(3, 1, 5, 1), Some("MR"));
        assert_eq!(pid.repetition_count(3), 2);
        assert_eq!(pid.repetition_count(2), 0);
        assert_eq!(pid.value(8, 1, 1, 1), Some(HL7_NULL));
        assert_eq!(message.segments[2].value(1, 1, 1, 2), Some("sub"));
        assert_eq!(message.segments[3].name, "NTE");
        assert!(message.segments[3].fields.is_empty());
        assert_eq!(message.unescape(pid.value(5, 1, 3, 1).unwrap()), "Q&R");
    }

    #[test]
    fn refuses_bad_segment_ids() {
        let error = Message::parse("MSH|^~\\&|A\rP D|1").unwrap_err();
        assert_eq!(error.segment_number, 2);
        assert!(Message::parse("PID|1").is_err());
    }

    #[test]
    fn unescapes_every_sequence() {
        let separators = Separators::default();
        assert_eq!(unescape("a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f", &separators), "a|b^c~d\\e&f");
        assert_eq!(unescape("line1\\.br\\line2", &separators), "line1\nline2");
        assert_eq!(unescape("\\H\\bold\\N\\", &separators), "bold");
        assert_eq!(unescape("caf\\XC3A9\\", &separators), "café");
        assert_eq!(unescape("\\XE9\\", &separators), "é");
        assert_eq!(unescape("dangling \\ escape", &separators), "dangling \\ escape");
        assert_eq!(unescape("\\Q\\", &separators), "\\Q\\");
    }
}
