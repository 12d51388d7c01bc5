//! MLLP framing: bytes ⇄ frames. Knows nothing of HL7.
//!
//! A frame is `0x0B` payload `0x1C 0x0D`. The decoder is tolerant of what real senders do:
//! - junk before the start byte (blanks, NULs, log text, the CR of a previous frame) is
//!   skipped and counted;
//! - doubled start bytes are collapsed;
//! - a missing CR after the end byte is accepted;
//! - a start byte inside an unfinished frame abandons that frame (the sender restarted);
//! - several frames in one read, and one frame split over many reads.
//!
//! It is bounded: a payload longer than `max_frame_bytes` is an [`Oversize`] error that
//! carries the first bytes of the frame, so that the caller can still answer with a NAK
//! addressed to the sender.

use bytes::{Buf, Bytes, BytesMut};

/// Start block byte.
pub const START_BLOCK: u8 = 0x0B;
/// End block byte.
pub const END_BLOCK: u8 = 0x1C;
/// Carriage return that follows the end block byte.
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// How much of an oversize frame is kept to address the NAK and for forensics.
pub const OVERSIZE_PREFIX_BYTES: usize = 64 * 1024;

/// A payload exceeded the configured maximum frame size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversize {
    /// The first bytes of the payload (at most [`OVERSIZE_PREFIX_BYTES`]).
    pub prefix: Bytes,
    /// How many payload bytes had arrived when the limit was passed.
    pub received_bytes: usize,
}

/// Incremental MLLP frame decoder.
#[derive(Debug)]
pub struct Decoder {
    max_frame_bytes: usize,
    /// Bytes of the buffer already searched for an end byte, so a large frame arriving in
    /// many reads is scanned once.
    scanned: usize,
    /// Junk bytes skipped outside frames, for diagnostics.
    skipped_bytes: u64,
    /// Frames abandoned because a new start byte arrived before their end byte.
    abandoned_frames: u64,
}

impl Decoder {
    /// A decoder refusing payloads larger than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Decoder {
        Decoder { max_frame_bytes, scanned: 0, skipped_bytes: 0, abandoned_frames: 0 }
    }

    /// Junk bytes skipped so far.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped_bytes
    }

    /// Frames abandoned so far.
    pub fn abandoned_frames(&self) -> u64 {
        self.abandoned_frames
    }

    /// True when the buffer holds the start of a frame that is not complete yet.
    pub fn in_frame(&self, buffer: &BytesMut) -> bool {
        buffer.first() == Some(&START_BLOCK)
    }

    /// Takes the next complete payload out of `buffer`. `Ok(None)` means more bytes are
    /// needed: a partial frame is not an error.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Bytes>, Oversize> {
        loop {
            // Outside a frame: drop everything before the next start byte.
            if buffer.first() != Some(&START_BLOCK) {
                self.scanned = 0;
                match buffer.iter().position(|&byte| byte == START_BLOCK) {
                    Some(start) => {
                        self.skipped_bytes += start as u64;
                        buffer.advance(start);
                    }
                    None => {
                        self.skipped_bytes += buffer.len() as u64;
                        buffer.clear();
                        return Ok(None);
                    }
                }
            }
            // Collapse doubled start bytes.
            let leading_starts = buffer.iter().take_while(|&&byte| byte == START_BLOCK).count();
            if leading_starts == buffer.len() {
                return Ok(None);
            }
            if leading_starts > 1 {
                buffer.advance(leading_starts - 1);
                self.scanned = 0;
            }

            let search_from = self.scanned.max(1);
            let boundary = buffer[search_from..]
                .iter()
                .position(|&byte| byte == END_BLOCK || byte == START_BLOCK)
                .map(|offset| search_from + offset);
            match boundary {
                Some(end) if buffer[end] == END_BLOCK => {
                    let payload_length = end - 1;
                    if payload_length > self.max_frame_bytes {
                        return Err(self.oversize(buffer, payload_length));
                    }
                    let mut frame = buffer.split_to(end + 1);
                    frame.advance(1);
                    frame.truncate(payload_length);
                    if buffer.first() == Some(&CARRIAGE_RETURN) {
                        buffer.advance(1);
                    }
                    self.scanned = 0;
                    return Ok(Some(frame.freeze()));
                }
                Some(restart) => {
                    // A start byte before the end byte: the sender gave up on that frame.
                    self.abandoned_frames += 1;
                    buffer.advance(restart);
                    self.scanned = 0;
                }
                None => {
                    let payload_length = buffer.len() - 1;
                    if payload_length > self.max_frame_bytes {
                        return Err(self.oversize(buffer, payload_length));
                    }
                    self.scanned = buffer.len();
                    return Ok(None);
                }
            }
        }
    }

    fn oversize(&mut self, buffer: &mut BytesMut, payload_length: usize) -> Oversize {
        let kept = payload_length.min(OVERSIZE_PREFIX_BYTES);
        let prefix = Bytes::copy_from_slice(&buffer[1..1 + kept]);
        buffer.clear();
        self.scanned = 0;
        Oversize { prefix, received_bytes: payload_length }
    }
}

/// Wraps a payload in MLLP framing.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(payload.len() + 3);
    framed.push(START_BLOCK);
    framed.extend_from_slice(payload);
    framed.push(END_BLOCK);
    framed.push(CARRIAGE_RETURN);
    framed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut Decoder, buffer: &mut BytesMut) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(buffer).unwrap() {
            frames.push(frame);
        }
        frames
    }

    #[test]
    fn every_split_point_yields_the_same_frames() {
        let stream = [encode(b"MSH|first\r"), b"\r\n  \x00".to_vec(), encode(b"MSH|second")].concat();
        for split in 0..=stream.len() {
            let mut decoder = Decoder::new(1024);
            let mut buffer = BytesMut::from(&stream[..split]);
            let mut frames = decode_all(&mut decoder, &mut buffer);
            buffer.extend_from_slice(&stream[split..]);
            frames.extend(decode_all(&mut decoder, &mut buffer));
            assert_eq!(
                frames,
                vec![Bytes::from_static(b"MSH|first\r"), Bytes::from_static(b"MSH|second")],
                "split at {split}"
            );
        }
    }

    #[test]
    fn byte_by_byte_delivery() {
        let stream = [encode(b"A"), encode(b"B")].concat();
        let mut decoder = Decoder::new(16);
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        for byte in stream {
            buffer.extend_from_slice(&[byte]);
            frames.extend(decode_all(&mut decoder, &mut buffer));
        }
        assert_eq!(frames, vec![Bytes::from_static(b"A"), Bytes::from_static(b"B")]);
    }

    #[test]
    fn tolerates_junk_doubled_start_and_missing_cr() {
        let mut buffer = BytesMut::from(&b"log line\n\x0b\x0bMSH|a\x1c\x0bMSH|b\x1c\r"[..]);
        let mut decoder = Decoder::new(64);
        let frames = decode_all(&mut decoder, &mut buffer);
        assert_eq!(frames, vec![Bytes::from_static(b"MSH|a"), Bytes::from_static(b"MSH|b")]);
        assert_eq!(decoder.skipped_bytes(), 9);
        assert!(buffer.is_empty());
    }

    #[test]
    fn restart_abandons_the_unfinished_frame() {
        let mut buffer = BytesMut::from(&b"\x0bMSH|lost\x0bMSH|kept\x1c\r"[..]);
        let mut decoder = Decoder::new(64);
        assert_eq!(decode_all(&mut decoder, &mut buffer), vec![Bytes::from_static(b"MSH|kept")]);
        assert_eq!(decoder.abandoned_frames(), 1);
    }

    #[test]
    fn oversize_is_detected_before_the_end_byte_arrives() {
        let mut decoder = Decoder::new(8);
        let mut buffer = BytesMut::from(&b"\x0bMSH|0123"[..]);
        assert_eq!(decoder.decode(&mut buffer), Ok(None));
        buffer.extend_from_slice(b"456789");
        let error = decoder.decode(&mut buffer).unwrap_err();
        assert_eq!(error.prefix, Bytes::from_static(b"MSH|0123456789"));
        assert_eq!(error.received_bytes, 14);
    }

    #[test]
    fn exact_limit_is_accepted() {
        let mut decoder = Decoder::new(4);
        let mut buffer = BytesMut::from(&encode(b"1234")[..]);
        assert_eq!(decoder.decode(&mut buffer), Ok(Some(Bytes::from_static(b"1234"))));
    }
}
