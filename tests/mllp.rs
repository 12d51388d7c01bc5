//! Black-box tests of the MLLP listener over real TCP (and TLS): framing tolerance, every
//! acknowledgment path, enhanced mode, duplicates, the frame limit, character sets, TLS and
//! mutual TLS, the connection limit, the idle timeout, the operator endpoints and graceful
//! shutdown. Each test starts its own gateway on port 0 in a temporary directory and, where
//! it matters, reads the journal back from SQLite after stopping it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hl7_fhir_gateway::commands::health;
use hl7_fhir_gateway::config::Config;
use hl7_fhir_gateway::mllp::client::{Client, Error, Options};
use hl7_fhir_gateway::mllp::codec;
use hl7_fhir_gateway::mllp::tls::ClientTls;
use hl7_fhir_gateway::mllp::TlsConfig;
use hl7_fhir_gateway::server::Gateway;
use tempfile::TempDir;

/// Upper bound for anything a test waits for (an ACK, a close, a metric).
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Default configuration with both listeners on loopback port 0 and the data directory in
/// `directory`.
fn config_in(directory: &Path) -> Config {
    let mut config = Config { data_dir: directory.to_path_buf(), ..Config::default() };
    config.mllp.listen = "127.0.0.1:0".to_string();
    config.http.listen = "127.0.0.1:0".to_string();
    config
}

/// Starts a gateway with `config` (validated); the directory must outlive it.
async fn start_with(config: Config) -> Gateway {
    let settings = config.validate().expect("test settings are valid");
    Gateway::start(settings).await.expect("gateway starts")
}

/// Starts a gateway in a fresh temporary directory after `configure` adjusted the defaults.
async fn start(configure: impl FnOnce(&mut Config)) -> (Gateway, TempDir) {
    let directory = tempfile::tempdir().unwrap();
    let mut config = config_in(directory.path());
    configure(&mut config);
    (start_with(config).await, directory)
}

fn client_options(gateway: &Gateway) -> Options {
    Options { connect_timeout: WAIT, ack_timeout: WAIT, ..Options::plain(gateway.mllp_address.to_string()) }
}

/// A plain MLLP connection to the gateway.
async fn connect(gateway: &Gateway) -> Client {
    Client::connect(&client_options(gateway)).await.expect("connects")
}

/// MLLP framing of one payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    codec::encode(payload)
}

/// Waits for the next ACK and parses it.
async fn receive(client: &mut Client) -> Ack {
    Ack::parse(&client.receive().await.expect("an acknowledgment arrives"))
}

/// Sends a message and parses its ACK.
async fn send(client: &mut Client, message: &[u8]) -> Ack {
    Ack::parse(&client.send(message).await.expect("an acknowledgment arrives"))
}

/// Asserts that the server closes the connection (EOF or reset) without sending anything
/// more, within the client's ack timeout.
async fn expect_closed(client: &mut Client) {
    match client.receive().await {
        Err(Error::Closed) | Err(Error::Io(_)) => {}
        Ok(frame) => panic!("expected the server to close, got a frame: {:?}", String::from_utf8_lossy(&frame)),
        Err(other) => panic!("expected the server to close, got {other}"),
    }
}

/// GETs `path` on the gateway's HTTP listener.
async fn http_get(gateway: &Gateway, path: &str) -> health::Response {
    health::get(&format!("http://{}{path}", gateway.http_address), WAIT).await.expect("http answer")
}

/// Polls `/metrics` until it has the exact line `line`; panics after [`WAIT`].
async fn wait_for_metric_line(gateway: &Gateway, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = http_get(gateway, "/metrics").await.body;
        if body.lines().any(|candidate| candidate == line) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("metric line `{line}` never appeared in:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `condition` until it holds; panics with `what` after [`WAIT`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A parsed acknowledgment (field separator `|`, segments ending in CR).
#[derive(Debug)]
struct Ack {
    bytes: Vec<u8>,
    text: String,
}

impl Ack {
    fn parse(bytes: &[u8]) -> Ack {
        Ack { bytes: bytes.to_vec(), text: String::from_utf8_lossy(bytes).into_owned() }
    }

    fn segments(&self) -> Vec<&str> {
        self.text.split('\r').filter(|segment| !segment.is_empty()).collect()
    }

    fn segment(&self, id: &str) -> Option<&str> {
        self.segments().into_iter().find(|segment| segment.starts_with(id))
    }

    /// Field `number` of segment `id`, with HL7 numbering (MSH-1 is the separator itself).
    fn field(&self, id: &str, number: usize) -> String {
        let segment = self.segment(id).unwrap_or_else(|| panic!("no {id} segment in {:?}", self.text));
        if id == "MSH" && number == 1 {
            return "|".to_string();
        }
        let pieces: Vec<&str> = segment.split('|').collect();
        let index = if id == "MSH" { number - 1 } else { number };
        pieces.get(index).map(|piece| piece.to_string()).unwrap_or_default()
    }

    /// MSA-1.
    fn code(&self) -> String {
        self.field("MSA", 1)
    }

    /// MSA-2.
    fn acknowledged_id(&self) -> String {
        self.field("MSA", 2)
    }

    fn has(&self, id: &str) -> bool {
        self.segment(id).is_some()
    }
}

/// A row of the `messages` table.
#[derive(Debug)]
struct Row {
    control_id: String,
    status: String,
    ack_code: String,
    ack: Vec<u8>,
    raw: Vec<u8>,
    duplicates: i64,
    charset: String,
    error: Option<String>,
    raw_truncated: bool,
}

/// Every journal row, in id order, as ingest left it: the pipeline may already have moved an
/// accepted row on to `processed` or `failed` (with its conversion error), which these MLLP
/// tests do not look at, so those read as `accepted` without an error.
fn rows(journal: &Path) -> Vec<Row> {
    let connection = rusqlite::Connection::open(journal).expect("journal database opens");
    let mut statement = connection
        .prepare(
            "SELECT control_id, status, ack_code, ack, raw, duplicates, charset, error, raw_truncated
             FROM messages ORDER BY id",
        )
        .unwrap();
    statement
        .query_map([], |row| {
            Ok(Row {
                control_id: row.get(0)?,
                status: row.get(1)?,
                ack_code: row.get(2)?,
                ack: row.get(3)?,
                raw: row.get(4)?,
                duplicates: row.get(5)?,
                charset: row.get(6)?,
                error: row.get(7)?,
                raw_truncated: row.get(8)?,
            })
        })
        .unwrap()
        .map(|row| {
            let mut row = row.unwrap();
            if row.status == "processed" || row.status == "failed" {
                row.status = "accepted".to_string();
                row.error = None;
            }
            row
        })
        .collect()
}

/// Stops the gateway and returns the journal rows.
async fn stop_and_read(gateway: Gateway) -> Vec<Row> {
    let journal = gateway.journal.clone();
    gateway.stop().await;
    rows(&journal)
}

/// A good v2.5.1 ADT^A01 from EPIC/HOSP with control id `id`.
fn adt(id: &str) -> Vec<u8> {
    format!("MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102030405||ADT^A01^ADT_A01|{id}|P|2.5.1\rEVN|A01|20240102030405\rPID|1||123^^^H^MR||Doe^John\r")
        .into_bytes()
}

fn assert_accepted(ack: &Ack, id: &str) {
    assert_eq!(ack.code(), "AA", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), id, "{:?}", ack.text);
    assert!(!ack.has("ERR"), "{:?}", ack.text);
}

// ---------------------------------------------------------------------------------------
// 1. Framing
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_blanks_and_nuls_before_the_start_byte_are_skipped() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = adt("J1");
    let mut bytes = b"  \r\n\x00\x00\x00some log text\n\t".to_vec();
    bytes.extend(frame(&message));
    client.write_raw(&bytes).await.unwrap();
    assert_accepted(&receive(&mut client).await, "J1");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].raw, message, "only the payload is stored, not the junk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_cr_after_the_end_byte_is_accepted() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let first = adt("NOCR1");
    let mut bytes = vec![codec::START_BLOCK];
    bytes.extend_from_slice(&first);
    bytes.push(codec::END_BLOCK);
    client.write_raw(&bytes).await.unwrap();
    assert_accepted(&receive(&mut client).await, "NOCR1");
    // The connection is still in sync for a normally framed message.
    assert_accepted(&send(&mut client, &adt("NOCR2")).await, "NOCR2");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].raw, first);
    assert_eq!(rows[1].raw, adt("NOCR2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lf_and_crlf_segment_endings_are_accepted_and_stored_exactly() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let lf = adt("LF1").iter().map(|&byte| if byte == b'\r' { b'\n' } else { byte }).collect::<Vec<u8>>();
    let crlf = String::from_utf8(adt("CRLF1")).unwrap().replace('\r', "\r\n").into_bytes();
    assert!(lf.contains(&b'\n') && !lf.contains(&b'\r'));
    assert!(crlf.windows(2).any(|pair| pair == b"\r\n"));
    assert_accepted(&send(&mut client, &lf).await, "LF1");
    assert_accepted(&send(&mut client, &crlf).await, "CRLF1");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].raw, lf);
    assert_eq!(rows[1].raw, crlf);
    assert!(rows.iter().all(|row| row.status == "accepted" && row.ack_code == "AA"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_messages_in_one_write_are_answered_in_order() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    // The middle one has no MSH-9, so it is rejected: order must hold across verdicts.
    let rejected = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102|||P2|P|2.5.1\rPID|1\r".to_vec();
    let messages = [adt("P1"), rejected, adt("P3"), adt("P4")];
    let bytes: Vec<u8> = messages.iter().flat_map(|message| frame(message)).collect();
    client.write_raw(&bytes).await.unwrap();

    let mut answers = Vec::new();
    for _ in 0..messages.len() {
        let ack = receive(&mut client).await;
        answers.push((ack.code(), ack.acknowledged_id()));
    }
    let expected = [("AA", "P1"), ("AR", "P2"), ("AA", "P3"), ("AA", "P4")]
        .map(|(code, id)| (code.to_string(), id.to_string()))
        .to_vec();
    assert_eq!(answers, expected);
    drop(client);

    let rows = stop_and_read(gateway).await;
    let stored: Vec<&[u8]> = rows.iter().map(|row| row.raw.as_slice()).collect();
    let sent: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    assert_eq!(stored, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_split_byte_by_byte_is_reassembled() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = adt("SPLIT1");
    for byte in frame(&message) {
        client.write_raw(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_accepted(&receive(&mut client).await, "SPLIT1");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].raw, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubled_start_byte_is_collapsed() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = adt("DBL1");
    let mut bytes = vec![codec::START_BLOCK];
    bytes.extend(frame(&message));
    client.write_raw(&bytes).await.unwrap();
    assert_accepted(&receive(&mut client).await, "DBL1");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].raw, message, "no stray start byte in the stored payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_restarted_before_its_end_is_abandoned() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let mut bytes = vec![codec::START_BLOCK];
    bytes.extend_from_slice(&adt("LOST1")[..40]);
    bytes.extend(frame(&adt("KEPT1")));
    client.write_raw(&bytes).await.unwrap();
    assert_accepted(&receive(&mut client).await, "KEPT1");
    // Nothing was answered for the abandoned frame: the next ACK is for the next message.
    assert_accepted(&send(&mut client, &adt("KEPT2")).await, "KEPT2");
    drop(client);

    let rows = stop_and_read(gateway).await;
    let ids: Vec<&str> = rows.iter().map(|row| row.control_id.as_str()).collect();
    assert_eq!(ids, ["KEPT1", "KEPT2"]);
}

// ---------------------------------------------------------------------------------------
// 2. Acknowledgment paths
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_message_gets_aa_with_swapped_and_echoed_header() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102030405||ADT^A01^ADT_A01|MSG0001|T|2.5.1\rEVN|A01|20240102030405\rPID|1||123^^^H^MR||Doe^John\r";
    let ack = send(&mut client, message).await;
    assert_accepted(&ack, "MSG0001");
    assert_eq!(ack.field("MSH", 2), "^~\\&");
    assert!(ack.text.starts_with("MSH|^~\\&|"), "{:?}", ack.text);
    assert_eq!(ack.field("MSH", 3), "GW");
    assert_eq!(ack.field("MSH", 4), "CENTRAL");
    assert_eq!(ack.field("MSH", 5), "EPIC");
    assert_eq!(ack.field("MSH", 6), "HOSP");
    let timestamp = ack.field("MSH", 7);
    assert_eq!(timestamp.len(), 19, "YYYYMMDDHHMMSS+ZZZZ: {timestamp}");
    assert!(timestamp[..14].bytes().all(|byte| byte.is_ascii_digit()), "{timestamp}");
    assert_eq!(ack.field("MSH", 9), "ACK^A01^ACK");
    let ack_id = ack.field("MSH", 10);
    assert!(!ack_id.is_empty());
    assert_ne!(ack_id, "MSG0001", "the ACK has a control id of its own");
    assert_eq!(ack.field("MSH", 11), "T", "processing id echoed");
    assert_eq!(ack.field("MSH", 12), "2.5.1", "version echoed");
    assert_eq!(ack.segments().len(), 2, "MSH and MSA only: {:?}", ack.text);

    // A second ACK gets yet another control id.
    let second = send(&mut client, &adt("MSG0002")).await;
    assert_accepted(&second, "MSG0002");
    assert_ne!(second.field("MSH", 10), ack_id);
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].raw, message);
    assert_eq!(rows[0].status, "accepted");
    assert_eq!(rows[0].ack_code, "AA");
    assert_eq!(rows[0].ack, ack.bytes, "the ACK sent is the ACK stored");
    assert_eq!(rows[0].charset, "UNICODE UTF-8");
    assert_eq!(rows[0].error, None);
    assert!(!rows[0].raw_truncated);
}

/// Sends `message` and checks an AR whose v2.5+ ERR names `location` and `code`.
async fn expect_modern_reject(
    client: &mut Client,
    message: &[u8],
    control_id: &str,
    location: &str,
    code: &str,
) -> Ack {
    let ack = send(client, message).await;
    assert_eq!(ack.code(), "AR", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), control_id, "{:?}", ack.text);
    assert_eq!(ack.field("ERR", 1), "", "ERR-1 is withdrawn from v2.5: {:?}", ack.text);
    assert_eq!(ack.field("ERR", 2), location, "{:?}", ack.text);
    assert!(ack.field("ERR", 3).starts_with(&format!("{code}^")), "{:?}", ack.text);
    assert!(ack.field("ERR", 3).ends_with("^HL70357"), "{:?}", ack.text);
    assert_eq!(ack.field("ERR", 4), "E", "{:?}", ack.text);
    assert!(!ack.field("ERR", 7).is_empty(), "{:?}", ack.text);
    assert_eq!(ack.field("MSA", 3), "", "no MSA-3 from v2.5: {:?}", ack.text);
    ack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_control_id_is_rejected_with_101() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102||ADT^A01||P|2.5.1\rPID|1\r";
    let ack = expect_modern_reject(&mut client, message, "", "MSH^1^10", "101").await;
    assert_eq!(ack.field("ERR", 3), "101^Required field missing^HL70357");
    assert_eq!(ack.field("ERR", 7), "MSH-10 message control id is missing");
    assert_eq!(ack.field("MSH", 5), "EPIC", "a NAK is still addressed to the sender");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "refused");
    assert_eq!(rows[0].ack_code, "AR");
    assert_eq!(rows[0].raw, message);
    assert_eq!(rows[0].error.as_deref(), Some("MSH-10 message control id is missing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_message_type_is_rejected_with_101() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102|||NOTYPE1|P|2.5.1\rPID|1\r";
    let ack = expect_modern_reject(&mut client, message, "NOTYPE1", "MSH^1^9", "101").await;
    assert_eq!(ack.field("ERR", 7), "MSH-9 message type is missing");
    assert_eq!(ack.field("MSH", 9), "ACK", "no trigger event to echo");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "refused");
    assert_eq!(rows[0].control_id, "NOTYPE1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_version_is_rejected_with_203() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102||ADT^A01|V99|P|9.9\rPID|1\r";
    let ack = expect_modern_reject(&mut client, message, "V99", "MSH^1^12", "203").await;
    assert_eq!(ack.field("ERR", 3), "203^Unsupported version id^HL70357");
    assert_eq!(ack.field("MSH", 12), "9.9", "the version is echoed even when refused");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].status.as_str(), rows[0].ack_code.as_str()), ("refused", "AR"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_without_msh_is_rejected() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let ack = expect_modern_reject(&mut client, b"hello", "", "MSH^1^", "100").await;
    assert_eq!(ack.field("ERR", 7), "message does not start with an MSH segment");
    assert_eq!(ack.field("MSH", 9), "ACK");
    assert_eq!(ack.field("MSH", 12), "2.5.1", "defaults when there is no header");
    // The connection keeps working afterwards.
    assert_accepted(&send(&mut client, &adt("AFTER1")).await, "AFTER1");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].raw, b"hello");
    assert_eq!(rows[0].status, "refused");
    assert_eq!(rows[0].control_id, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_without_msh18_gets_ae_naming_the_byte_offset() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102||ADT^A01|U1|P|2.5.1\rPID|1||123^^^H^MR||M\xfcller^Hans\r";
    let offset = message.iter().position(|&byte| byte == 0xFC).unwrap();
    let ack = send(&mut client, message).await;
    assert_eq!(ack.code(), "AE", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), "U1");
    assert_eq!(ack.field("ERR", 2), "PID^1^5", "{:?}", ack.text);
    assert_eq!(ack.field("ERR", 3), "102^Data type error^HL70357");
    assert_eq!(ack.field("ERR", 4), "E");
    assert_eq!(ack.field("ERR", 7), format!("byte offset {offset} is not valid UNICODE UTF-8"));
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].raw, message, "the undecodable bytes are kept as they came");
    assert_eq!((rows[0].status.as_str(), rows[0].ack_code.as_str()), ("refused", "AE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_version_nak_uses_err_1_and_msa_3() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|LAB|H|GW|C|20240102||ORU^R01|OLD1|P|2.3\rPID|1||1||M\xfcller\r";
    let offset = message.iter().position(|&byte| byte == 0xFC).unwrap();
    let ack = send(&mut client, message).await;
    assert_eq!(ack.code(), "AE", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), "OLD1");
    assert_eq!(ack.field("MSA", 3), format!("byte offset {offset} is not valid UNICODE UTF-8"));
    assert_eq!(ack.field("ERR", 1), "PID^1^5^102&Data type error&HL70357", "{:?}", ack.text);
    assert_eq!(ack.field("ERR", 2), "", "no ERR-2 before v2.5");
    assert_eq!(ack.field("MSH", 9), "ACK^R01", "v2.3 message type has two components");
    assert_eq!(ack.field("MSH", 12), "2.3");

    // And a legacy AR.
    let rejected = b"MSH|^~\\&|LAB|H|GW|C|20240102||ORU^R01||P|2.3\rPID|1\r";
    let ack = send(&mut client, rejected).await;
    assert_eq!(ack.code(), "AR", "{:?}", ack.text);
    assert_eq!(ack.field("MSA", 3), "MSH-10 message control id is missing");
    assert_eq!(ack.field("ERR", 1), "MSH^1^10^101&Required field missing&HL70357");
    drop(client);
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Enhanced acknowledgment mode
// ---------------------------------------------------------------------------------------

/// A v2.5.1 message in enhanced mode with MSH-15 = `accept` and MSH-16 = NE.
fn enhanced(id: &str, accept: &str) -> Vec<u8> {
    format!("MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A01|{id}|P|2.5.1|||{accept}|NE\rPID|1||1\r").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_mode_accept_is_ca() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let ack = send(&mut client, &enhanced("E1", "AL")).await;
    assert_eq!(ack.code(), "CA", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), "E1");
    assert!(!ack.has("ERR"));
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!((rows[0].status.as_str(), rows[0].ack_code.as_str()), ("accepted", "CA"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_mode_errors_are_ce_and_cr() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let content_error = b"MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A01|E2|P|2.5.1|||AL|NE\rPID|1||1||M\xfcller\r";
    let ack = send(&mut client, content_error).await;
    assert_eq!(ack.code(), "CE", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), "E2");
    assert!(ack.field("ERR", 3).starts_with("102^"), "{:?}", ack.text);

    let rejected = b"MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A01|E3|P|9.9|||AL|NE\rPID|1\r";
    let ack = send(&mut client, rejected).await;
    assert_eq!(ack.code(), "CR", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), "E3");
    assert_eq!(ack.field("ERR", 2), "MSH^1^12");
    assert!(ack.field("ERR", 3).starts_with("203^"), "{:?}", ack.text);
    drop(client);

    let rows = stop_and_read(gateway).await;
    let codes: Vec<(&str, &str)> = rows.iter().map(|row| (row.status.as_str(), row.ack_code.as_str())).collect();
    assert_eq!(codes, [("refused", "CE"), ("refused", "CR")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honoured_msh15_sends_no_ack_for_ne_and_for_er_on_success() {
    let (gateway, _directory) = start(|config| config.mllp.honor_accept_ack_type = true).await;
    let mut client = connect(&gateway).await;
    // NE: stored, not answered.
    client.write_raw(&frame(&enhanced("NE1", "NE"))).await.unwrap();
    // ER and accepted: stored, not answered.
    client.write_raw(&frame(&enhanced("ER1", "ER"))).await.unwrap();
    // ER with an error: answered CE.
    let er_error = b"MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A01|ER2|P|2.5.1|||ER|NE\rPID|1||1||M\xfcller\r";
    client.write_raw(&frame(er_error)).await.unwrap();
    let ack = receive(&mut client).await;
    assert_eq!((ack.code(), ack.acknowledged_id()), ("CE".to_string(), "ER2".to_string()), "{:?}", ack.text);
    // An original-mode message on the same connection gets its own ACK next.
    assert_accepted(&send(&mut client, &adt("ORIG1")).await, "ORIG1");
    drop(client);

    let rows = stop_and_read(gateway).await;
    let summary: Vec<(&str, &str, &str, usize)> = rows
        .iter()
        .map(|row| (row.control_id.as_str(), row.status.as_str(), row.ack_code.as_str(), row.ack.len()))
        .collect();
    assert_eq!(summary.len(), 4, "{summary:?}");
    assert_eq!(summary[0], ("NE1", "accepted", "CA", 0), "stored although not answered");
    assert_eq!(summary[1], ("ER1", "accepted", "CA", 0));
    assert_eq!((summary[2].0, summary[2].1, summary[2].2), ("ER2", "refused", "CE"));
    assert_eq!((summary[3].0, summary[3].1, summary[3].2), ("ORIG1", "accepted", "AA"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ne_is_answered_ca_by_default() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let ack = send(&mut client, &enhanced("NE2", "NE")).await;
    assert_eq!((ack.code(), ack.acknowledged_id()), ("CA".to_string(), "NE2".to_string()), "{:?}", ack.text);
    drop(client);
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. Duplicates
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_resend_gets_the_original_ack_and_is_stored_once() {
    let (gateway, _directory) = start(|_| {}).await;
    let message = adt("DUP1");
    let mut first_connection = connect(&gateway).await;
    let first = first_connection.send(&message).await.unwrap();
    drop(first_connection);
    // The sender reconnects and sends the same message again.
    let mut second_connection = connect(&gateway).await;
    let second = second_connection.send(&message).await.unwrap();
    assert_eq!(second, first, "a duplicate is answered with the original ACK, byte for byte");
    assert_accepted(&Ack::parse(&second), "DUP1");

    // Same sender and MSH-10, other content: a new message with an ACK of its own.
    let changed = String::from_utf8(message.clone()).unwrap().replace("Doe^John", "Doe^Jane").into_bytes();
    let third = second_connection.send(&changed).await.unwrap();
    assert_accepted(&Ack::parse(&third), "DUP1");
    assert_ne!(third, first);
    drop(second_connection);
    wait_for_metric_line(&gateway, "hl7gw_mllp_duplicates_total{message_type=\"ADT^A01\",sender=\"EPIC^HOSP\"} 1")
        .await;

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].raw, message);
    assert_eq!(rows[0].duplicates, 1);
    assert_eq!(rows[0].ack, first);
    assert_eq!(rows[1].raw, changed);
    assert_eq!(rows[1].duplicates, 0);
    assert_eq!(rows[1].control_id, "DUP1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_not_deduplicated() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102||ADT^A01|R1|P|9.9\rPID|1\r";
    let first = send(&mut client, message).await;
    let second = send(&mut client, message).await;
    assert_eq!((first.code(), second.code()), ("AR".to_string(), "AR".to_string()));
    assert_ne!(first.field("MSH", 10), second.field("MSH", 10), "each refusal is answered afresh");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|row| row.status == "refused" && row.duplicates == 0));
}

// ---------------------------------------------------------------------------------------
// 5. Oversize frames
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_gets_ar_then_the_connection_is_closed() {
    let (gateway, _directory) = start(|config| config.mllp.max_frame_bytes = 2048).await;
    let mut client = connect(&gateway).await;
    let mut message = b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102||ADT^A01|BIG1|P|2.5.1\rPID|1||".to_vec();
    message.resize(4999, b'X');
    message.push(b'\r');
    assert_eq!(message.len(), 5000);
    client.write_raw(&frame(&message)).await.unwrap();

    let ack = receive(&mut client).await;
    assert_eq!(ack.code(), "AR", "{:?}", ack.text);
    assert_eq!(ack.acknowledged_id(), "BIG1", "the NAK is addressed from the frame's start");
    assert_eq!(ack.field("MSH", 5), "EPIC");
    assert_eq!(ack.field("ERR", 2), "MSH^1^");
    assert!(ack.field("ERR", 3).starts_with("207^"), "{:?}", ack.text);
    assert!(ack.field("ERR", 7).starts_with("message exceeds the 2048 byte limit ("), "{:?}", ack.text);
    expect_closed(&mut client).await;
    drop(client);
    wait_for_metric_line(&gateway, "hl7gw_mllp_oversize_frames_total 1").await;

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(row.raw_truncated);
    assert_eq!((row.status.as_str(), row.ack_code.as_str()), ("refused", "AR"));
    assert_eq!(row.control_id, "BIG1");
    assert!(row.raw.len() > 2048 && row.raw.len() <= message.len(), "{} bytes kept", row.raw.len());
    assert!(message.starts_with(&row.raw), "the kept bytes are the start of the frame");
    assert_eq!(row.ack, ack.bytes);
}

// ---------------------------------------------------------------------------------------
// 6. Character sets
// ---------------------------------------------------------------------------------------

const LATIN1_DECLARED: &[u8] =
    b"MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A08|L1|P|2.5||||||8859/1\rPID|1||1||M\xfcller^Anna\r";
const LATIN1_UNDECLARED: &[u8] = b"MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A08|L2|P|2.5\rPID|1||1||M\xfcller^Anna\r";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_latin1_is_accepted_and_stored_byte_for_byte() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let ack = send(&mut client, LATIN1_DECLARED).await;
    assert_accepted(&ack, "L1");
    assert_eq!(ack.field("MSH", 18), "8859/1", "MSH-18 is echoed: {:?}", ack.text);
    assert_eq!(ack.field("MSH", 17), "");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].raw, LATIN1_DECLARED);
    assert_eq!(rows[0].charset, "8859/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_latin1_under_the_utf8_default_gets_ae() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    let offset = LATIN1_UNDECLARED.iter().position(|&byte| byte == 0xFC).unwrap();
    let ack = send(&mut client, LATIN1_UNDECLARED).await;
    assert_eq!((ack.code(), ack.acknowledged_id()), ("AE".to_string(), "L2".to_string()), "{:?}", ack.text);
    assert_eq!(ack.field("ERR", 2), "PID^1^5");
    assert_eq!(ack.field("ERR", 7), format!("byte offset {offset} is not valid UNICODE UTF-8"));
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows[0].raw, LATIN1_UNDECLARED);
    assert_eq!(rows[0].charset, "UNICODE UTF-8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_latin1_under_a_windows_1252_default_is_accepted() {
    let (gateway, _directory) = start(|config| config.mllp.default_charset = "windows-1252".to_string()).await;
    let mut client = connect(&gateway).await;
    assert_accepted(&send(&mut client, LATIN1_UNDECLARED).await, "L2");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].raw, LATIN1_UNDECLARED);
    assert_eq!(rows[0].charset, "windows-1252");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_utf8_with_invalid_bytes_gets_ae() {
    // Even a permissive default does not override an explicit declaration.
    let (gateway, _directory) = start(|config| config.mllp.default_charset = "windows-1252".to_string()).await;
    let mut client = connect(&gateway).await;
    let message = b"MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A08|U8|P|2.5||||||UNICODE UTF-8\rPID|1||1||M\xfcller^Anna\r";
    let offset = message.iter().position(|&byte| byte == 0xFC).unwrap();
    let ack = send(&mut client, message).await;
    assert_eq!((ack.code(), ack.acknowledged_id()), ("AE".to_string(), "U8".to_string()), "{:?}", ack.text);
    assert_eq!(ack.field("ERR", 7), format!("byte offset {offset} is not valid UNICODE UTF-8"));
    assert_eq!(ack.field("MSH", 18), "UNICODE UTF-8");

    // Valid UTF-8 declared as such is accepted.
    let good = "MSH|^~\\&|APP|FAC|GW|C|20240101||ADT^A08|U9|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller^Anna\r";
    assert_accepted(&send(&mut client, good.as_bytes()).await, "U9");
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].raw, good.as_bytes());
    assert_eq!(rows[1].charset, "UNICODE UTF-8");
}

// ---------------------------------------------------------------------------------------
// 7. TLS and mutual TLS
// ---------------------------------------------------------------------------------------

/// PEM files of a test PKI.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_client_cert: PathBuf,
    rogue_client_key: PathBuf,
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    (certificate, rcgen::Issuer::new(params, key))
}

/// A leaf certificate for `localhost` signed by `issuer`; returns (certificate, key) PEM.
fn new_leaf(
    name: &str,
    purpose: rcgen::ExtendedKeyUsagePurpose,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, issuer).unwrap();
    (certificate.pem(), key.serialize_pem())
}

fn write_pki(directory: &Path) -> Pki {
    let (ca, issuer) = new_ca("Test CA");
    let (_rogue_ca, rogue_issuer) = new_ca("Rogue CA");
    let (server_cert, server_key) = new_leaf("gateway", rcgen::ExtendedKeyUsagePurpose::ServerAuth, &issuer);
    let (client_cert, client_key) = new_leaf("emr", rcgen::ExtendedKeyUsagePurpose::ClientAuth, &issuer);
    let (rogue_cert, rogue_key) = new_leaf("rogue", rcgen::ExtendedKeyUsagePurpose::ClientAuth, &rogue_issuer);
    let write = |name: &str, text: &str| {
        let path = directory.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
        rogue_client_cert: write("rogue.pem", &rogue_cert),
        rogue_client_key: write("rogue.key", &rogue_key),
    }
}

/// Starts a TLS gateway; with `mutual`, client certificates signed by the test CA are required.
async fn start_tls(mutual: bool) -> (Gateway, TempDir, Pki) {
    let directory = tempfile::tempdir().unwrap();
    let pki = write_pki(directory.path());
    let mut config = config_in(directory.path());
    config.mllp.tls = Some(TlsConfig {
        cert_file: pki.server_cert.clone(),
        key_file: pki.server_key.clone(),
        client_ca_file: mutual.then(|| pki.ca.clone()),
        handshake_timeout_secs: 5,
    });
    (start_with(config).await, directory, pki)
}

fn tls_options(gateway: &Gateway, tls: ClientTls) -> Options {
    Options { tls: Some(tls), server_name: Some("localhost".to_string()), ..client_options(gateway) }
}

/// Connects and sends one message; any failure on the way is returned.
async fn try_send(options: &Options, message: &[u8]) -> Result<Ack, Error> {
    let mut client = Client::connect(options).await?;
    Ok(Ack::parse(&client.send(message).await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connection_gets_aa() {
    let (gateway, _directory, pki) = start_tls(false).await;
    let options = tls_options(&gateway, ClientTls { ca_file: Some(pki.ca.clone()), ..ClientTls::default() });
    let ack = try_send(&options, &adt("TLS1")).await.expect("tls exchange");
    assert_accepted(&ack, "TLS1");

    // A plain-TCP sender gets nothing from a TLS listener.
    let plain = try_send(&client_options(&gateway), &adt("PLAIN1")).await;
    assert!(matches!(plain, Err(Error::Closed) | Err(Error::Io(_))), "{plain:?}");

    let rows = stop_and_read(gateway).await;
    let ids: Vec<&str> = rows.iter().map(|row| row.control_id.as_str()).collect();
    assert_eq!(ids, ["TLS1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let (gateway, _directory, pki) = start_tls(true).await;
    let with_certificate = ClientTls {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
    };
    let ack = try_send(&tls_options(&gateway, with_certificate), &adt("MTLS1")).await.expect("mutual tls exchange");
    assert_accepted(&ack, "MTLS1");

    let without_certificate = ClientTls { ca_file: Some(pki.ca.clone()), ..ClientTls::default() };
    let refused = try_send(&tls_options(&gateway, without_certificate), &adt("MTLS2")).await;
    assert!(matches!(refused, Err(Error::Connect { .. }) | Err(Error::Io(_)) | Err(Error::Closed)), "{refused:?}");
    wait_until("the handshake failure is counted", || gateway.metrics.tls_handshake_failures.get() == 1).await;

    let rogue = ClientTls {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.rogue_client_cert.clone()),
        key_file: Some(pki.rogue_client_key.clone()),
    };
    let refused = try_send(&tls_options(&gateway, rogue), &adt("MTLS3")).await;
    assert!(matches!(refused, Err(Error::Connect { .. }) | Err(Error::Io(_)) | Err(Error::Closed)), "{refused:?}");
    wait_until("the second handshake failure is counted", || gateway.metrics.tls_handshake_failures.get() == 2).await;

    let rows = stop_and_read(gateway).await;
    let ids: Vec<&str> = rows.iter().map(|row| row.control_id.as_str()).collect();
    assert_eq!(ids, ["MTLS1"], "nothing from the refused clients is stored");
}

// ---------------------------------------------------------------------------------------
// 8–9. Connection limit and idle timeout
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once() {
    let (gateway, _directory) = start(|config| config.mllp.max_connections = 2).await;
    let mut first = connect(&gateway).await;
    let mut second = connect(&gateway).await;
    assert_accepted(&send(&mut first, &adt("C1")).await, "C1");
    assert_accepted(&send(&mut second, &adt("C2")).await, "C2");

    let mut third = connect(&gateway).await;
    third.write_raw(&frame(&adt("C3"))).await.ok();
    expect_closed(&mut third).await;
    drop(third);
    wait_for_metric_line(&gateway, "hl7gw_mllp_connections_refused_total 1").await;

    // Closing one of the first two frees a slot.
    drop(first);
    wait_until("the closed connection is released", || gateway.metrics.open_connections.get() == 1).await;
    // The gauge drops just before the slot is released; give the task a moment to finish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = connect(&gateway).await;
    assert_accepted(&send(&mut fourth, &adt("C4")).await, "C4");
    assert_accepted(&send(&mut second, &adt("C5")).await, "C5");
    wait_for_metric_line(&gateway, "hl7gw_mllp_connections_refused_total 1").await;
    drop(second);
    drop(fourth);

    let rows = stop_and_read(gateway).await;
    let ids: Vec<&str> = rows.iter().map(|row| row.control_id.as_str()).collect();
    assert_eq!(ids, ["C1", "C2", "C4", "C5"], "nothing from the refused connection is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let (gateway, _directory) = start(|config| config.mllp.idle_timeout_secs = 1).await;
    let mut silent = connect(&gateway).await;
    let mut chatty = connect(&gateway).await;
    assert_accepted(&send(&mut chatty, &adt("IDLE1")).await, "IDLE1");
    // Neither sends anything more: both are closed after about a second.
    expect_closed(&mut silent).await;
    expect_closed(&mut chatty).await;
    wait_for_metric_line(&gateway, "hl7gw_mllp_idle_timeouts_total 2").await;
    // The listener itself still accepts.
    let mut fresh = connect(&gateway).await;
    assert_accepted(&send(&mut fresh, &adt("IDLE2")).await, "IDLE2");
    drop(fresh);
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// 10. HTTP endpoints
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_endpoints() {
    let (gateway, _directory) = start(|_| {}).await;
    let live = http_get(&gateway, "/health/live").await;
    assert_eq!(live.status, 200);
    let ready = http_get(&gateway, "/health/ready").await;
    assert_eq!(ready.status, 200);
    let body: serde_json::Value = serde_json::from_str(&ready.body).expect("json body");
    assert_eq!(body, serde_json::json!({ "status": "ready" }));

    let mut client = connect(&gateway).await;
    assert_accepted(&send(&mut client, &adt("H1")).await, "H1");
    let refused = send(&mut client, b"MSH|^~\\&|EPIC|HOSP|GW|CENTRAL|20240102||ADT^A01|H2|P|9.9\r").await;
    assert_eq!(refused.code(), "AR");
    drop(client);

    let labels = "{message_type=\"ADT^A01\",sender=\"EPIC^HOSP\"}";
    wait_for_metric_line(&gateway, &format!("hl7gw_mllp_messages_received_total{labels} 2")).await;
    wait_for_metric_line(&gateway, &format!("hl7gw_mllp_messages_acknowledged_total{labels} 1")).await;
    wait_for_metric_line(
        &gateway,
        "hl7gw_mllp_messages_refused_total{message_type=\"ADT^A01\",sender=\"EPIC^HOSP\",code=\"AR\"} 1",
    )
    .await;
    wait_for_metric_line(&gateway, "hl7gw_mllp_ack_latency_seconds_count 2").await;
    let metrics = http_get(&gateway, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("# TYPE hl7gw_mllp_ack_latency_seconds histogram"), "{}", metrics.body);
    assert!(metrics.body.contains("# TYPE hl7gw_journal_log_backlog gauge"), "{}", metrics.body);
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// 11. Graceful shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_message_sent_before_it_began() {
    let (gateway, _directory) = start(|_| {}).await;
    let mut client = connect(&gateway).await;
    // A first exchange makes sure the connection has been accepted by the listener (a
    // connection still in the kernel's backlog when shutdown begins is reset, not served).
    assert_accepted(&send(&mut client, &adt("SHUT0")).await, "SHUT0");
    let message = adt("SHUT1");
    client.write_raw(&frame(&message)).await.unwrap();
    gateway.begin_shutdown();
    assert_accepted(&receive(&mut client).await, "SHUT1");
    expect_closed(&mut client).await;
    drop(client);

    let rows = stop_and_read(gateway).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].raw, message);
    assert_eq!(rows[1].status, "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_frame_does_not_hold_shutdown_past_the_grace_period() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = config_in(directory.path());
    // Far longer than the bound below: only the forced close can end the connection in time.
    config.mllp.idle_timeout_secs = 120;
    let settings = config.validate().expect("test settings are valid");
    let options = hl7_fhir_gateway::server::Options { shutdown_grace: Duration::from_millis(300) };
    let gateway = Gateway::start_with(settings, options).await.expect("gateway starts");
    let mut client = connect(&gateway).await;
    assert_accepted(&send(&mut client, &adt("GRACE0")).await, "GRACE0");
    // Start a frame and never finish it.
    client.write_raw(b"\x0bMSH|^~\\&|SENDER|FAC|GW|C|20240101||ADT^A01|GRACE1|P|2.5.1\r").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = tokio::time::timeout(Duration::from_secs(30), gateway.stop()).await;
    assert!(stopped.is_ok(), "stop() must close connections once the grace period is over");
    expect_closed(&mut client).await;
}
