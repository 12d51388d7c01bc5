//! HL7 v2 syntax: everything the gateway needs to know about the bytes of a v2 message
//! before any mapping happens.
//!
//! - [`charset`]: decode raw bytes by MSH-18 (or a listener default), never substituting
//!   characters; undecodable bytes are an error that names the byte offset.
//! - [`header`]: the MSH segment read into a typed [`Header`], tolerant of damage so that a
//!   best-effort NAK can always be built.
//! - [`ack`]: ACK/NAK builder for original and enhanced acknowledgment mode, with a
//!   version-correct ERR segment.
//! - [`split`]: splitting a file into messages (any line endings, MLLP framing, batch wrappers).
//! - [`structure`]: the acknowledgment path's structure check, equal to hl7-parser's verdict
//!   without building its tree.
//!
//! This module is a leaf: pure, synchronous, and imports nothing from the rest of the crate.

pub mod ack;
pub mod charset;
pub mod header;
pub mod message;
pub mod split;
pub mod structure;

pub use ack::{AckCode, AckOutcome, ErrorDetail, ErrorLocation};
pub use charset::Charset;
pub use header::{Header, Separators};
