//! `convert`: converts the messages of files to FHIR R4 transaction Bundles, one JSON line
//! per message on stdout, with no server and no database. Failures name the file, the line
//! where the message starts, its MSH-10 and the reason, on stderr.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;

use crate::hl7::charset::{self, Charset};
use crate::hl7::header::Header;
use crate::hl7::split::split_messages;
use crate::mapping::Engine;

/// Counts of a `convert` run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Messages converted.
    pub converted: usize,
    /// Messages that failed.
    pub failed: usize,
}

/// Decodes a message by its MSH-18 (UTF-8 when it declares nothing).
pub fn decode(raw: &[u8]) -> Result<String, String> {
    let charset = charset::message_charset(raw, Charset::Utf8).map_err(|unsupported| unsupported.to_string())?;
    charset.decode(raw).map(Cow::into_owned).map_err(|error| error.to_string())
}

/// Converts every message of every file. Bundles go to `output`; failures and, with
/// `report`, conversion reports go to `diagnostics`.
pub fn run(
    engine: &Engine,
    files: &[PathBuf],
    report: bool,
    output: &mut impl Write,
    diagnostics: &mut impl Write,
) -> std::io::Result<Summary> {
    let mut summary = Summary::default();
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(error) => {
                writeln!(diagnostics, "{}: cannot read: {error}", file.display())?;
                summary.failed += 1;
                continue;
            }
        };
        let messages = split_messages(&bytes);
        if messages.is_empty() {
            writeln!(diagnostics, "{}: no message found", file.display())?;
            summary.failed += 1;
        }
        for message in messages {
            let text = decode(&message.bytes);
            let control_id = Header::scan(&String::from_utf8_lossy(&message.bytes))
                .map(|header| header.control_id)
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| "(no MSH-10)".to_string());
            let label = format!("{}:{} message {control_id}", file.display(), message.line);
            let converted = text.and_then(|text| engine.convert(&text).map_err(|error| error.to_string()));
            match converted {
                Ok(converted) => {
                    serde_json::to_writer(&mut *output, &converted.bundle)?;
                    writeln!(output)?;
                    summary.converted += 1;
                    if report {
                        writeln!(diagnostics, "== {label}")?;
                        write!(diagnostics, "{}", converted.report)?;
                    }
                }
                Err(reason) => {
                    writeln!(diagnostics, "{label}: {reason}")?;
                    summary.failed += 1;
                }
            }
        }
    }
    Ok(summary)
}
