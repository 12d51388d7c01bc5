//! `send`: an MLLP client for analysts and scripts. Each file may hold one or many
//! messages, with any line endings, MLLP-framed or not. Prints one line per message:
//! `file:line control-id code [reason]`.

use std::io::Write;
use std::path::PathBuf;

use crate::hl7::ack::{read_ack, AckCode};
use crate::hl7::header::Header;
use crate::hl7::split::split_messages;
use crate::mllp::client::{Client, Options};

/// What a run of `send` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Messages answered AA or CA.
    pub accepted: usize,
    /// Messages answered otherwise, or not answered.
    pub not_accepted: usize,
}

/// Sends every message of every file over one connection (reconnecting after a failure)
/// and writes a line per message to `output`.
pub async fn run(files: &[PathBuf], options: &Options, output: &mut impl Write) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut client: Option<Client> = None;
    for file in files {
        let bytes = std::fs::read(file).map_err(|error| anyhow::anyhow!("cannot read {}: {error}", file.display()))?;
        let messages = split_messages(&bytes);
        if messages.is_empty() {
            writeln!(output, "{}: no message found", file.display())?;
            summary.not_accepted += 1;
            continue;
        }
        for message in messages {
            let header = Header::scan(&String::from_utf8_lossy(&message.bytes));
            let control_id = header.map(|header| header.control_id).unwrap_or_default();
            let label = format!("{}:{}", file.display(), message.line);
            let connection = match client.as_mut() {
                Some(connection) => connection,
                None => match Client::connect(options).await {
                    Ok(connected) => client.insert(connected),
                    Err(error) => {
                        writeln!(output, "{label} {control_id} ERROR {error}")?;
                        summary.not_accepted += 1;
                        continue;
                    }
                },
            };
            match connection.send(&message.bytes).await {
                Ok(ack) => {
                    let ack_text = String::from_utf8_lossy(&ack);
                    match read_ack(&ack_text) {
                        Some((code, _)) if code.is_accept() => {
                            summary.accepted += 1;
                            writeln!(output, "{label} {control_id} {}", code.as_str())?;
                        }
                        Some((code, _)) => {
                            summary.not_accepted += 1;
                            writeln!(output, "{label} {control_id} {} {}", code.as_str(), reason(&ack_text, code))?;
                        }
                        None => {
                            summary.not_accepted += 1;
                            writeln!(output, "{label} {control_id} ERROR the answer is not an HL7 acknowledgment")?;
                        }
                    }
                }
                Err(error) => {
                    summary.not_accepted += 1;
                    writeln!(output, "{label} {control_id} ERROR {error}")?;
                    client = None;
                }
            }
        }
    }
    Ok(summary)
}

/// The error text of a NAK: ERR-7 (v2.5+), else MSA-3 (before v2.5), else the ERR-3 or
/// ERR-1 code.
fn reason(ack: &str, code: AckCode) -> String {
    let field_separator = ack.chars().nth(3).unwrap_or('|');
    let field = |segment_id: &str, number: usize| -> Option<String> {
        ack.split(['\r', '\n'])
            .filter_map(|segment| segment.strip_prefix(segment_id))
            .filter_map(|rest| rest.split(field_separator).nth(number))
            .find(|value| !value.is_empty())
            .map(str::to_string)
    };
    field("ERR", 7)
        .or_else(|| field("MSA", 3))
        .or_else(|| field("ERR", 3))
        .or_else(|| field("ERR", 1))
        .unwrap_or_else(|| format!("{} without a reason", code.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_prefers_err_7() {
        let ack =
            "MSH|^~\\&|A\rMSA|AE|1\rERR||PID^1^5|102^Data type error^HL70357|E|||byte offset 9 is not valid ASCII\r";
        assert_eq!(reason(ack, AckCode::AE), "byte offset 9 is not valid ASCII");
        let legacy = "MSH|^~\\&|A\rMSA|AR|1|too big\rERR|MSH^1^0^207&Application internal error&HL70357\r";
        assert_eq!(reason(legacy, AckCode::AR), "too big");
        let bare = "MSH|^~\\&|A\rMSA|AR|1\rERR|MSH^1^0^207&Application internal error&HL70357\r";
        assert_eq!(reason(bare, AckCode::AR), "MSH^1^0^207&Application internal error&HL70357");
    }
}
