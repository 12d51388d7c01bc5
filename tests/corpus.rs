//! Regression over the shared corpus (`../shared/corpus`): every message of every file —
//! real feeds, vendor samples and fuzz inputs — gets a well-formed acknowledgment, and the
//! gateway is still ready afterwards.
//!
//! Without the corpus the test is skipped, unless `REQUIRE_SHARED_CORPUS=1` (CI) demands it.

use std::collections::BTreeMap;
use std::time::Duration;

use hl7_fhir_gateway::commands::health;
use hl7_fhir_gateway::config::Config;
use hl7_fhir_gateway::hl7::ack::{read_ack, AckCode};
use hl7_fhir_gateway::hl7::header::Header;
use hl7_fhir_gateway::hl7::split::split_messages;
use hl7_fhir_gateway::mllp::client::{Client, Error, Options};
use hl7_fhir_gateway::server::Gateway;

#[path = "common/shared_corpus.rs"]
mod shared_corpus;

/// The reason an ERR segment gives: ERR-7 (diagnostic), else ERR-3 (code), else ERR-1
/// (the pre-2.5 location and code), with separators removed.
fn err_reason(ack: &str, field_separator: char) -> Option<String> {
    let segment = ack.split(['\r', '\n']).find(|segment| segment.starts_with("ERR"))?;
    let fields: Vec<&str> = segment.split(field_separator).collect();
    [7, 3, 1]
        .iter()
        .filter_map(|&number| fields.get(number))
        .map(|value| value.chars().filter(|c| c.is_alphanumeric() || *c == ' ').collect::<String>())
        .map(|value| value.trim().to_string())
        .find(|value| !value.is_empty())
}

/// Sends one message, reconnecting once if the server had closed the connection.
async fn exchange(client: &mut Option<Client>, options: &Options, message: &[u8]) -> Result<bytes::Bytes, Error> {
    for attempt in 0..2 {
        if client.is_none() {
            *client = Some(Client::connect(options).await?);
        }
        let connection = client.as_mut().expect("connected above");
        match connection.send(message).await {
            Ok(ack) => return Ok(ack),
            Err(error @ (Error::Closed | Error::Io(_))) if attempt == 0 => {
                eprintln!("connection lost ({error}); reconnecting");
                *client = None;
            }
            Err(error) => return Err(error),
        }
    }
    unreachable!("the second attempt returns")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_message_is_acknowledged() {
    let Some(root) = shared_corpus::root_or_skip() else { return };
    let files = shared_corpus::message_files(root);

    let data_dir = tempfile::tempdir().unwrap();
    let mut config = Config { data_dir: data_dir.path().to_path_buf(), ..Config::default() };
    config.mllp.listen = "127.0.0.1:0".to_string();
    config.http.listen = "127.0.0.1:0".to_string();
    let settings = config.validate().expect("test settings are valid");
    let gateway = Gateway::start(settings).await.expect("the gateway starts");
    let options = Options {
        connect_timeout: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(20),
        ..Options::plain(gateway.mllp_address.to_string())
    };

    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut messages = 0usize;
    let mut failures = Vec::new();
    for file in &files {
        let name = file.strip_prefix(root).unwrap_or(file).display().to_string();
        let bytes = std::fs::read(file).unwrap_or_else(|error| panic!("{name}: {error}"));
        let mut split: Vec<Vec<u8>> = split_messages(&bytes).into_iter().map(|message| message.bytes).collect();
        if split.is_empty() {
            split.push(bytes);
        }
        // A new connection per file.
        let mut client = None;
        for (index, message) in split.iter().enumerate() {
            messages += 1;
            let label = format!("{name} #{}", index + 1);
            let ack = match exchange(&mut client, &options, message).await {
                Ok(ack) => ack,
                Err(error) => {
                    failures.push(format!("{label}: no acknowledgment: {error}"));
                    client = None;
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&ack);
            let Some((code, echoed)) = read_ack(&text) else {
                failures.push(format!("{label}: unreadable acknowledgment {text:?}"));
                continue;
            };
            *counts.entry(code.as_str()).or_default() += 1;
            let expected =
                Header::scan(&String::from_utf8_lossy(message)).map(|header| header.control_id).unwrap_or_default();
            if !expected.is_empty() && echoed != expected {
                failures.push(format!("{label}: MSA-2 {echoed:?} but MSH-10 {expected:?}"));
            }
            if !code.is_accept() {
                let separator = Header::scan(&text).map_or('|', |header| header.separators.field);
                if err_reason(&text, separator).is_none() {
                    failures.push(format!("{label}: {} without an ERR reason: {text:?}", code.as_str()));
                }
            }
        }
    }

    let summary: Vec<String> = counts.iter().map(|(code, count)| format!("{code}={count}")).collect();
    eprintln!("corpus: {} files, {messages} messages; {}", files.len(), summary.join(" "));
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));

    let base_url = format!("http://{}", gateway.http_address);
    assert!(health::check(&base_url).await.expect("health endpoint answers"), "gateway not ready after the corpus");

    let count = |code: AckCode| counts.get(code.as_str()).copied().unwrap_or(0);
    assert!(files.len() > 200, "only {} corpus files", files.len());
    assert!(messages > 250, "only {messages} corpus messages");
    let accepted = count(AckCode::AA) + count(AckCode::CA);
    assert!(accepted > 200, "only {accepted} corpus messages accepted");
    gateway.stop().await;
}
