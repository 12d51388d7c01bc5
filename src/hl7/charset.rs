//! Character sets of HL7 v2 messages (HL7 table 0211, MSH-18).
//!
//! Decoding is strict: a byte sequence that is not valid in the declared (or default)
//! character set is an error naming its byte offset. Nothing is ever replaced by U+FFFD:
//! interface engines that substitute silently corrupt names and then fail somewhere far
//! from the cause.
//!
//! Notes on single-byte sets: the WHATWG tables used by `encoding_rs` treat the labels
//! ISO-8859-1 and ISO-8859-9 as Windows-1252 and Windows-1254. HL7's 8859/1 and 8859/9 are
//! the real ISO sets (0x80–0x9F are C1 controls), so those two are decoded here by table.

use std::borrow::Cow;
use std::fmt;

use encoding_rs::{DecoderResult, Encoding, UTF_8};

/// A character set the gateway can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charset {
    /// 7-bit US-ASCII (`ASCII`, HL7's formal default).
    Ascii,
    /// ISO 8859-1 (`8859/1`): every byte maps to the code point of the same value.
    Latin1,
    /// ISO 8859-9 (`8859/9`): Latin-1 with six Turkish letters.
    Latin5,
    /// UTF-8 (`UNICODE UTF-8`).
    Utf8,
    /// Any other set supported by `encoding_rs` (8859/2–8, 10, 13–16, Windows-125x,
    /// Shift_JIS, EUC-JP, ISO-2022-JP, GB 18030, Big5, EUC-KR, UTF-16).
    Other(&'static Encoding),
}

impl Charset {
    /// Resolves an MSH-18 value (table 0211) or a common alias (`UTF-8`, `ISO-8859-1`,
    /// `windows-1252`, `cp1252`, ...). Comparison ignores case and surrounding blanks.
    pub fn from_name(name: &str) -> Option<Charset> {
        let normalized = name.trim().to_ascii_uppercase();
        let charset = match normalized.as_str() {
            "" | "UNICODE UTF-8" | "UNICODE" | "UTF-8" | "UTF8" => Charset::Utf8,
            "ASCII" | "US-ASCII" => Charset::Ascii,
            "8859/1" | "ISO-8859-1" | "ISO8859-1" | "LATIN1" | "ISO IR100" => Charset::Latin1,
            "8859/9" | "ISO-8859-9" | "ISO8859-9" | "LATIN5" | "ISO IR148" => Charset::Latin5,
            "8859/2" => Charset::Other(encoding_rs::ISO_8859_2),
            "8859/3" => Charset::Other(encoding_rs::ISO_8859_3),
            "8859/4" => Charset::Other(encoding_rs::ISO_8859_4),
            "8859/5" => Charset::Other(encoding_rs::ISO_8859_5),
            "8859/6" => Charset::Other(encoding_rs::ISO_8859_6),
            "8859/7" => Charset::Other(encoding_rs::ISO_8859_7),
            "8859/8" => Charset::Other(encoding_rs::ISO_8859_8),
            "8859/10" => Charset::Other(encoding_rs::ISO_8859_10),
            "8859/13" => Charset::Other(encoding_rs::ISO_8859_13),
            "8859/14" => Charset::Other(encoding_rs::ISO_8859_14),
            "8859/15" => Charset::Other(encoding_rs::ISO_8859_15),
            "8859/16" => Charset::Other(encoding_rs::ISO_8859_16),
            "ISO IR14" | "ISO IR13" => Charset::Other(encoding_rs::SHIFT_JIS),
            "ISO IR87" | "ISO 2022-1994" => Charset::Other(encoding_rs::ISO_2022_JP),
            "ISO IR159" => Charset::Other(encoding_rs::EUC_JP),
            "GB 18030-2000" | "GB18030" | "GB 18030" => Charset::Other(encoding_rs::GB18030),
            "KS X 1001" => Charset::Other(encoding_rs::EUC_KR),
            "BIG-5" | "BIG5" => Charset::Other(encoding_rs::BIG5),
            "UNICODE UTF-16" | "UTF-16" => Charset::Other(encoding_rs::UTF_16LE),
            other => {
                // Last resort: a WHATWG label such as "windows-1252" or "shift_jis". The
                // two labels WHATWG remaps (Latin-1, Latin-5) were handled above.
                let encoding = Encoding::for_label_no_replacement(other.as_bytes())?;
                if encoding == encoding_rs::UTF_8 {
                    Charset::Utf8
                } else {
                    Charset::Other(encoding)
                }
            }
        };
        Some(charset)
    }

    /// The name this charset is reported under.
    pub fn name(self) -> &'static str {
        match self {
            Charset::Ascii => "ASCII",
            Charset::Latin1 => "8859/1",
            Charset::Latin5 => "8859/9",
            Charset::Utf8 => "UNICODE UTF-8",
            Charset::Other(encoding) => encoding.name(),
        }
    }

    /// Decodes `raw` strictly. A leading UTF-8 or UTF-16 byte order mark overrides the
    /// declared set (it is an explicit declaration too) and is not part of the text.
    ///
    /// Text that is already UTF-8 as it stands (UTF-8, ASCII, and Latin-1 or Latin-5 bytes
    /// that are all ASCII, as most messages are) is borrowed, not copied: the MLLP listener
    /// decodes every message before its ACK.
    pub fn decode(self, raw: &[u8]) -> Result<Cow<'_, str>, DecodeError> {
        if let Some((bom_encoding, bom_length)) = Encoding::for_bom(raw) {
            let body = &raw[bom_length..];
            if bom_encoding == UTF_8 {
                return std::str::from_utf8(body)
                    .map(Cow::Borrowed)
                    .map_err(|error| DecodeError::at(error.valid_up_to() + bom_length, bom_encoding.name()));
            }
            return decode_with(bom_encoding, body)
                .map(Cow::Owned)
                .map_err(|offset| DecodeError::at(offset + bom_length, bom_encoding.name()));
        }
        let single_byte = |to_char: fn(u8) -> char| match std::str::from_utf8(raw) {
            Ok(text) if text.is_ascii() => Cow::Borrowed(text),
            _ => Cow::Owned(raw.iter().map(|&byte| to_char(byte)).collect()),
        };
        match self {
            Charset::Ascii => match raw.iter().position(|byte| !byte.is_ascii()) {
                Some(offset) => Err(DecodeError::at(offset, "ASCII")),
                // Every byte is ASCII, hence valid UTF-8.
                None => std::str::from_utf8(raw)
                    .map(Cow::Borrowed)
                    .map_err(|error| DecodeError::at(error.valid_up_to(), "ASCII")),
            },
            Charset::Latin1 => Ok(single_byte(char::from)),
            Charset::Latin5 => Ok(single_byte(latin5_char)),
            Charset::Utf8 => match std::str::from_utf8(raw) {
                Ok(text) => Ok(Cow::Borrowed(text)),
                Err(error) => Err(DecodeError::at(error.valid_up_to(), "UNICODE UTF-8")),
            },
            // Borrowed when the bytes mean the same in UTF-8; decoded again only to find
            // where they go wrong.
            Charset::Other(encoding) => match encoding.decode_without_bom_handling_and_without_replacement(raw) {
                Some(text) => Ok(text),
                None => {
                    let offset = decode_with(encoding, raw).err().unwrap_or(0);
                    Err(DecodeError::at(offset, encoding.name()))
                }
            },
        }
    }

    /// [`Charset::encode`], reusing `text`'s bytes where they already are the encoding
    /// (UTF-8, or ASCII text in an ASCII-compatible single-byte set).
    pub fn encode_owned(self, text: String) -> Vec<u8> {
        match self {
            Charset::Utf8 => text.into_bytes(),
            Charset::Ascii | Charset::Latin1 | Charset::Latin5 if text.is_ascii() => text.into_bytes(),
            _ => self.encode(&text),
        }
    }

    /// Encodes `text` for an outgoing message (an ACK) in this set. Characters the set
    /// cannot represent become `?`: only header values echoed from the inbound message can
    /// contain them, and those were decoded from this very set.
    pub fn encode(self, text: &str) -> Vec<u8> {
        match self {
            Charset::Utf8 => text.as_bytes().to_vec(),
            Charset::Ascii => text.chars().map(|c| if c.is_ascii() { c as u8 } else { b'?' }).collect(),
            Charset::Latin1 => text.chars().map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')).collect(),
            Charset::Latin5 => text.chars().map(latin5_byte).collect(),
            Charset::Other(encoding) => {
                let output_encoding = encoding.output_encoding();
                let (bytes, _, _) = output_encoding.encode(text);
                bytes.into_owned()
            }
        }
    }
}

/// Decodes with `encoding_rs` without replacement; on failure returns the offset of the
/// first malformed byte.
fn decode_with(encoding: &'static Encoding, raw: &[u8]) -> Result<String, usize> {
    let mut decoder = encoding.new_decoder_without_bom_handling();
    let capacity = decoder.max_utf8_buffer_length_without_replacement(raw.len()).unwrap_or(raw.len().saturating_mul(3));
    let mut text = String::with_capacity(capacity);
    let (result, read) = decoder.decode_to_string_without_replacement(raw, &mut text, true);
    match result {
        DecoderResult::InputEmpty => Ok(text),
        DecoderResult::Malformed(bad_length, consumed_after) => {
            Err(read - usize::from(consumed_after) - usize::from(bad_length))
        }
        // The buffer was sized for the worst case, so this does not happen; report the
        // position reached rather than panic if it ever does.
        DecoderResult::OutputFull => Err(read),
    }
}

/// ISO 8859-9 differs from ISO 8859-1 in six positions.
const LATIN5_DIFFERENCES: [(u8, char); 6] =
    [(0xD0, 'Ğ'), (0xDD, 'İ'), (0xDE, 'Ş'), (0xF0, 'ğ'), (0xFD, 'ı'), (0xFE, 'ş')];

fn latin5_char(byte: u8) -> char {
    for (position, letter) in LATIN5_DIFFERENCES {
        if position == byte {
            return letter;
        }
    }
    char::from(byte)
}

fn latin5_byte(letter: char) -> u8 {
    for (position, turkish) in LATIN5_DIFFERENCES {
        if turkish == letter {
            return position;
        }
    }
    match u8::try_from(u32::from(letter)) {
        Ok(byte) if !LATIN5_DIFFERENCES.iter().any(|(position, _)| *position == byte) => byte,
        _ => b'?',
    }
}

/// Bytes that are not valid in the character set used to decode them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Offset of the first invalid byte, counted from the start of the message.
    pub offset: usize,
    /// The character set that was applied.
    pub charset: &'static str,
}

impl DecodeError {
    fn at(offset: usize, charset: &'static str) -> DecodeError {
        DecodeError { offset, charset }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "byte offset {} is not valid {}", self.offset, self.charset)
    }
}

impl std::error::Error for DecodeError {}

/// MSH-18 names a character set the gateway cannot decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedCharset {
    /// The name as the message gives it.
    pub name: String,
}

impl fmt::Display for UnsupportedCharset {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "MSH-18 character set {} is not supported", self.name)
    }
}

impl std::error::Error for UnsupportedCharset {}

/// The character set of a message: what its MSH-18 declares, or `default` when it declares
/// nothing.
pub fn message_charset(raw: &[u8], default: Charset) -> Result<Charset, UnsupportedCharset> {
    match declared_charset(raw) {
        None => Ok(default),
        Some(name) => Charset::from_name(&name).ok_or(UnsupportedCharset { name }),
    }
}

/// Reads MSH-18 straight from the raw bytes (the MSH segment is ASCII in every set HL7
/// allows except UTF-16/32, which carry a byte order mark). Returns the first repetition,
/// or `None` when the message declares nothing.
pub fn declared_charset(raw: &[u8]) -> Option<String> {
    let start = find_msh(raw)?;
    let field_separator = *raw.get(start + 3)?;
    let segment_end =
        raw[start..].iter().position(|&byte| byte == b'\r' || byte == b'\n').map_or(raw.len(), |length| start + length);
    let segment = &raw[start..segment_end];
    // Field 1 is the separator itself, so MSH-18 is the 17th piece after "MSH".
    let value = segment.split(|&byte| byte == field_separator).nth(17)?;
    let repetition_separator = segment.get(5).copied().unwrap_or(b'~');
    let first = value.split(|&byte| byte == repetition_separator).next()?;
    let text = String::from_utf8_lossy(first).trim().to_owned();
    if text.is_empty() {
        None
    } else {
        Some(text)
    }
}

/// Offset of the `MSH` segment id, skipping a byte order mark and leading blanks.
fn find_msh(raw: &[u8]) -> Option<usize> {
    let mut start = 0;
    if raw.starts_with(&[0xEF, 0xBB, 0xBF]) {
        start = 3;
    }
    while raw.get(start).is_some_and(|byte| byte.is_ascii_whitespace()) {
        start += 1;
    }
    raw[start..].starts_with(b"MSH").then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_table_0211_names_and_aliases() {
        assert_eq!(Charset::from_name("8859/1"), Some(Charset::Latin1));
        assert_eq!(Charset::from_name(" unicode utf-8 "), Some(Charset::Utf8));
        assert_eq!(Charset::from_name("ASCII"), Some(Charset::Ascii));
        assert_eq!(Charset::from_name("8859/15"), Some(Charset::Other(encoding_rs::ISO_8859_15)));
        assert_eq!(Charset::from_name("windows-1252"), Some(Charset::Other(encoding_rs::WINDOWS_1252)));
        assert_eq!(Charset::from_name("CNS 11643-1992"), None);
        assert_eq!(Charset::from_name("EBCDIC"), None);
    }

    #[test]
    fn text_that_is_already_utf8_is_borrowed_not_copied() {
        let ascii = b"MSH|^~\\&|A|B\rPID|1";
        for charset in
            [Charset::Utf8, Charset::Ascii, Charset::Latin1, Charset::Latin5, Charset::from_name("cp1252").unwrap()]
        {
            assert!(matches!(charset.decode(ascii).unwrap(), Cow::Borrowed(_)), "{charset:?}");
        }
        assert!(matches!(Charset::Utf8.decode("M\u{fc}ller".as_bytes()).unwrap(), Cow::Borrowed("M\u{fc}ller")));
        assert!(matches!(Charset::Ascii.decode(b"\xef\xbb\xbfMSH").unwrap(), Cow::Borrowed("MSH")));
        // Bytes that mean something else in UTF-8 are decoded.
        assert!(matches!(Charset::Latin1.decode(b"\xc3\xa9").unwrap(), Cow::Owned(text) if text == "\u{c3}\u{a9}"));
        let error = Charset::Ascii.decode(b"\xef\xbb\xbfMSH|\xff").unwrap_err();
        assert_eq!(error.offset, 7, "offset in the raw bytes, byte order mark included");
    }

    #[test]
    fn owned_encoding_matches_encoding_a_borrowed_str() {
        let texts = ["MSH|^~\\&|A", "M\u{fc}ller", "\u{130}stanbul", "\u{201c}q\u{201d}"];
        let charsets =
            [Charset::Utf8, Charset::Ascii, Charset::Latin1, Charset::Latin5, Charset::from_name("cp1252").unwrap()];
        for charset in charsets {
            for text in texts {
                assert_eq!(charset.encode_owned(text.to_string()), charset.encode(text), "{charset:?} {text}");
            }
        }
    }

    #[test]
    fn latin1_decodes_every_byte_to_its_code_point() {
        let text = Charset::Latin1.decode(b"M\xfcller \x80").unwrap();
        assert_eq!(text, "M\u{fc}ller \u{80}");
        assert_eq!(Charset::Latin1.encode(&text), b"M\xfcller \x80");
    }

    #[test]
    fn latin5_has_turkish_letters() {
        let text = Charset::Latin5.decode(b"\xdd\xfd\xfc").unwrap();
        assert_eq!(text, "İıü");
        assert_eq!(Charset::Latin5.encode(&text), b"\xdd\xfd\xfc");
    }

    #[test]
    fn invalid_utf8_names_the_offset() {
        let error = Charset::Utf8.decode(b"MSH|abc\xff").unwrap_err();
        assert_eq!(error.offset, 7);
        assert_eq!(error.to_string(), "byte offset 7 is not valid UNICODE UTF-8");
    }

    #[test]
    fn ascii_rejects_eight_bit_bytes() {
        assert_eq!(Charset::Ascii.decode(b"ab\xe9").unwrap_err().offset, 2);
    }

    #[test]
    fn iso_8859_3_holes_are_errors_with_offset() {
        // 0xA5 is unassigned in ISO 8859-3.
        let charset = Charset::from_name("8859/3").unwrap();
        assert_eq!(charset.decode(b"abc\xa5d").unwrap_err().offset, 3);
    }

    #[test]
    fn windows_1252_decodes_smart_quotes() {
        let charset = Charset::from_name("cp1252").unwrap();
        assert_eq!(charset.decode(b"\x93x\x94").unwrap(), "\u{201c}x\u{201d}");
    }

    #[test]
    fn utf8_bom_is_stripped_and_wins() {
        let text = Charset::Ascii.decode(b"\xef\xbb\xbfMSH|\xc3\xa9").unwrap();
        assert_eq!(text, "MSH|\u{e9}");
    }

    #[test]
    fn reads_msh18_from_raw_bytes() {
        let raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5||||||8859/1~UNICODE UTF-8\rPID|";
        assert_eq!(declared_charset(raw).as_deref(), Some("8859/1"));
        assert_eq!(declared_charset(b"MSH|^~\\&|A|B\r").as_deref(), None);
        assert_eq!(declared_charset(b"PID|1"), None);
    }
}
