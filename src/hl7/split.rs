//! Splitting files into messages.
//!
//! Files from analysts and test suites hold one or many messages with any line endings
//! (CR, LF, CRLF), sometimes MLLP framing bytes, a byte order mark, blank lines between
//! messages or batch wrappers (FHS/BHS/BTS/FTS). [`split_messages`] returns each message as
//! raw bytes with segments terminated by CR, the way it travels over MLLP. Bytes inside a
//! segment are not touched: character set decoding happens later, on the message.

/// One message found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMessage {
    /// Line (1-based) of the file where the message starts.
    pub line: usize,
    /// The message, segments terminated by CR.
    pub bytes: Vec<u8>,
}

const BATCH_SEGMENTS: [&[u8]; 4] = [b"FHS", b"BHS", b"BTS", b"FTS"];

/// Splits a file into messages. A message starts at each segment named `MSH`. Text before
/// the first MSH that is not a batch segment is kept as a message of its own, so that a
/// caller sending it gets the receiver's verdict instead of silently losing it.
pub fn split_messages(file: &[u8]) -> Vec<FileMessage> {
    let mut messages: Vec<FileMessage> = Vec::new();
    let mut current: Option<FileMessage> = None;
    for (line_number, raw_line) in lines(file) {
        let line = strip_framing(raw_line);
        if line.iter().all(|byte| byte.is_ascii_whitespace()) {
            continue;
        }
        if BATCH_SEGMENTS.iter().any(|name| line.starts_with(name)) {
            continue;
        }
        if line.starts_with(b"MSH") {
            messages.extend(current.take());
            current = Some(FileMessage { line: line_number, bytes: Vec::with_capacity(1024) });
        }
        let message = current.get_or_insert_with(|| FileMessage { line: line_number, bytes: Vec::new() });
        message.bytes.extend_from_slice(line);
        message.bytes.push(b'\r');
    }
    messages.extend(current);
    messages
}

/// Lines with their 1-based numbers; a line ends at LF, CRLF, a lone CR or an MLLP end byte.
fn lines(file: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut rest = file;
    let mut line_number = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        line_number += 1;
        let end = rest.iter().position(|&byte| matches!(byte, b'\n' | b'\r' | 0x1C)).unwrap_or(rest.len());
        let line = &rest[..end];
        let mut next = end;
        if rest.get(next) == Some(&0x1C) {
            next += 1;
        }
        if rest.get(next) == Some(&b'\r') {
            next += 1;
        }
        if rest.get(next) == Some(&b'\n') {
            next += 1;
        }
        rest = &rest[next.min(rest.len())..];
        Some((line_number, line))
    })
}

/// Removes MLLP start bytes, NULs and a UTF-8 byte order mark from the start of a line.
fn strip_framing(line: &[u8]) -> &[u8] {
    let mut rest = line;
    loop {
        if let Some(after) = rest.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
            rest = after;
        } else if let Some((&first, after)) = rest.split_first() {
            if first == 0x0B || first == 0x00 {
                rest = after;
            } else {
                return rest;
            }
        } else {
            return rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_msh_with_any_line_ending() {
        let file = b"MSH|^~\\&|A\r\nPID|1\r\n\r\nMSH|^~\\&|B\nPID|2\nMSH|^~\\&|C\rPID|3";
        let messages = split_messages(file);
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0].bytes, b"MSH|^~\\&|A\rPID|1\r");
        assert_eq!(messages[1].bytes, b"MSH|^~\\&|B\rPID|2\r");
        assert_eq!(messages[1].line, 4);
        assert_eq!(messages[2].bytes, b"MSH|^~\\&|C\rPID|3\r");
    }

    #[test]
    fn strips_mllp_framing_bom_and_batch_wrappers() {
        let file =
            b"\xef\xbb\xbfFHS|^~\\&\rBHS|^~\\&\r\x0bMSH|^~\\&|A\rPID|1\r\x1c\r\x0bMSH|^~\\&|B\r\x1c\rBTS|2\rFTS|1";
        let messages = split_messages(file);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].bytes, b"MSH|^~\\&|A\rPID|1\r");
        assert_eq!(messages[1].bytes, b"MSH|^~\\&|B\r");
    }

    #[test]
    fn keeps_leading_garbage_as_its_own_message() {
        let messages = split_messages(b"hello\nMSH|^~\\&|A\r");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].bytes, b"hello\r");
        assert!(split_messages(b"\n\n").is_empty());
    }

    #[test]
    fn keeps_eight_bit_bytes_untouched() {
        let messages = split_messages(b"MSH|^~\\&|A\nPID|||M\xfcller\n");
        assert_eq!(messages[0].bytes, b"MSH|^~\\&|A\rPID|||M\xfcller\r");
    }
}
