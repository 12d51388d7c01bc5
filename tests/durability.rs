//! Crash durability of the real binary: every message that got an AA before a SIGKILL (or
//! during a SIGTERM shutdown) is in the journal after a restart, byte for byte.
//!
//! The gateway runs as a child process (`serve` on port 0); its MLLP port is read from the
//! `gateway listening` log line on stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hl7_fhir_gateway::hl7::ack::{read_ack, AckCode};
use hl7_fhir_gateway::mllp::client::{Client, Options};

/// Connections sending at once.
const CONNECTIONS: usize = 6;
/// How long a started gateway gets to log that it listens.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM'd gateway gets to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages acknowledged with AA: control id → exact bytes sent.
type Acknowledged = BTreeMap<String, Vec<u8>>;

/// A `serve` child process and its stderr lines.
struct Gateway {
    child: Child,
    mllp: String,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Gateway {
    /// Starts `serve` on `data_dir` and waits until it logs `gateway listening`.
    fn start(data_dir: &Path) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hl7-fhir-gateway"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--mllp-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .env_remove("HL7GW_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot spawn the gateway binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        // Drains stderr for the whole life of the child, so that logging never blocks it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut gateway = Gateway { child, mllp: String::new(), lines, log: Vec::new() };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match gateway.lines.recv_timeout(remaining) {
                Ok(line) => {
                    let address = listening_address(&line);
                    gateway.log.push(line);
                    if let Some(address) = address {
                        gateway.mllp = address;
                        return gateway;
                    }
                }
                Err(error) => {
                    let _ = gateway.child.kill();
                    let status = gateway.child.wait();
                    panic!(
                        "the gateway did not log `gateway listening` ({error}); exit: {status:?}; log:\n{}",
                        gateway.log.join("\n")
                    );
                }
            }
        }
    }

    /// Every stderr line received so far.
    fn drain_log(&mut self) -> &[String] {
        self.log.extend(self.lines.try_iter());
        &self.log
    }

    /// SIGKILL, then reap.
    fn kill(mut self) {
        self.child.kill().expect("cannot kill the gateway");
        self.child.wait().expect("cannot reap the gateway");
    }

    /// SIGTERM, then wait for the exit (SIGKILL after [`STOP_TIMEOUT`], which fails).
    async fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        let signalled = Command::new("kill").arg(&pid).status().expect("cannot run kill");
        assert!(signalled.success(), "kill {pid} failed: {signalled}");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll the gateway") {
                // Give the reader thread a moment to pass on the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let log = self.drain_log().to_vec();
                return (status, log);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the gateway did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.drain_log().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `127.0.0.1:PORT` from a `gateway listening mllp=127.0.0.1:PORT http=...` line.
fn listening_address(line: &str) -> Option<String> {
    if !line.contains("gateway listening") {
        return None;
    }
    let start = line.find("mllp=")? + "mllp=".len();
    let address: String = line[start..].chars().take_while(|c| !c.is_whitespace()).collect();
    (!address.is_empty()).then_some(address)
}

/// A small xorshift generator seeded from the clock: no extra crates.
struct Random(u64);

impl Random {
    fn from_clock(salt: u64) -> Random {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_nanos() as u64);
        Random((nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// A delay between 150 ms and 900 ms.
fn random_delay(salt: u64) -> Duration {
    Duration::from_millis(150 + Random::from_clock(salt).below(750))
}

/// A distinct ADT^A01 of about 1 KiB with CR segment separators.
fn adt_message(control_id: &str, random: &mut Random) -> Vec<u8> {
    const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,;:-+=()";
    let mut filler = |length: usize| -> String {
        (0..length).map(|_| char::from(LETTERS[random.below(LETTERS.len() as u64) as usize])).collect()
    };
    let mrn = filler(8).replace(' ', "0");
    let family = filler(10);
    let mut message = format!(
        "MSH|^~\\&|DURABILITY|TESTHOSP|GW|CENTRAL|20240102030405||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
         EVN|A01|20240102030405\r\
         PID|1||{mrn}^^^TESTHOSP^MR||{family}^John^Q||19700101|M|||1 Main St^^Springfield^IL^62701\r\
         PV1|1|I|WARD^101^A|||||||MED\r"
    );
    let mut note = 1;
    while message.len() < 1000 {
        let text = filler(120);
        message.push_str(&format!("NTE|{note}||{text}\r"));
        note += 1;
    }
    message.into_bytes()
}

/// One connection sending messages one after another until `stop` is set or the
/// connection fails; returns what got an AA. Any other acknowledgment code is a failure.
async fn send_until_failure(
    address: String,
    prefix: String,
    salt: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> Acknowledged {
    let mut acknowledged = Acknowledged::new();
    let options = Options {
        connect_timeout: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(15),
        ..Options::plain(address)
    };
    let Ok(mut client) = Client::connect(&options).await else {
        return acknowledged;
    };
    let mut random = Random::from_clock(salt);
    let mut sequence = 0u32;
    while !stop.load(Ordering::Relaxed) {
        sequence += 1;
        let control_id = format!("{prefix}-{sequence:05}");
        let message = adt_message(&control_id, &mut random);
        let Ok(ack) = client.send(&message).await else {
            break;
        };
        let text = String::from_utf8_lossy(&ack);
        let (code, echoed) =
            read_ack(&text).unwrap_or_else(|| panic!("unreadable acknowledgment for {control_id}: {text:?}"));
        assert_eq!(echoed, control_id, "MSA-2 does not echo MSH-10: {text:?}");
        assert_eq!(code, AckCode::AA, "{control_id} was not accepted: {text:?}");
        acknowledged.insert(control_id, message);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    acknowledged
}

/// Waits (bounded) until the senders got a first acknowledgment, so that a kill after it
/// always has something to prove, however slow the machine.
async fn wait_for_first_ack(progress: &AtomicUsize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts [`CONNECTIONS`] senders against `address`.
fn start_senders(
    address: &str,
    run: &str,
    stop: &Arc<AtomicBool>,
    progress: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Acknowledged>> {
    (0..CONNECTIONS)
        .map(|connection| {
            let prefix = format!("{run}C{connection}");
            let salt = connection as u64 + 1;
            tokio::spawn(send_until_failure(address.to_string(), prefix, salt, stop.clone(), progress.clone()))
        })
        .collect()
}

/// Waits for the senders (bounded) and merges what they got acknowledged.
async fn collect(senders: Vec<tokio::task::JoinHandle<Acknowledged>>) -> Acknowledged {
    let mut all = Acknowledged::new();
    for sender in senders {
        let acknowledged = tokio::time::timeout(Duration::from_secs(30), sender)
            .await
            .expect("a sender did not finish after the gateway went away")
            .expect("a sender panicked");
        all.extend(acknowledged);
    }
    all
}

/// Asserts every acknowledged message is in the journal with its exact bytes, accepted.
fn assert_journaled(database: &Path, acknowledged: &Acknowledged) {
    let connection = rusqlite::Connection::open(database).expect("cannot open the journal database");
    let mut query = connection
        .prepare("SELECT raw, status FROM messages WHERE control_id = ?1")
        .expect("cannot prepare the journal query");
    for (control_id, sent) in acknowledged {
        let rows: Vec<(Vec<u8>, String)> = query
            .query_map([control_id], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("journal query failed")
            .collect::<Result<_, _>>()
            .expect("journal row unreadable");
        assert_eq!(rows.len(), 1, "{control_id} was acknowledged with AA but has {} journal rows", rows.len());
        let (raw, status) = &rows[0];
        assert!(raw == sent, "{control_id}: journal bytes differ from the bytes sent");
        // The pipeline may have moved it on (processed, or failed to convert): anything but
        // refused means it was kept as an accepted message.
        assert!(
            matches!(status.as_str(), "accepted" | "processed" | "failed"),
            "{control_id}: journal status {status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_sigkill() {
    let started = Instant::now();
    let data_dir = tempfile::tempdir().unwrap();
    let database = data_dir.path().join("journal.db");
    let mut acknowledged = Acknowledged::new();
    for cycle in 0..3u64 {
        let gateway = Gateway::start(data_dir.path());
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicUsize::new(0));
        let senders = start_senders(&gateway.mllp, &format!("K{cycle}"), &stop, &progress);
        wait_for_first_ack(&progress).await;
        let delay = random_delay(cycle + 100);
        tokio::time::sleep(delay).await;
        gateway.kill();
        stop.store(true, Ordering::Relaxed);
        let this_cycle = collect(senders).await;
        eprintln!("cycle {cycle}: killed {delay:?} after the first ack; {} messages acknowledged", this_cycle.len());
        assert!(
            !this_cycle.is_empty(),
            "cycle {cycle}: no message was acknowledged before the kill, so the test proves nothing"
        );
        acknowledged.extend(this_cycle);

        // The restart recovers the database (it logs `listening` only after opening it).
        let restarted = Gateway::start(data_dir.path());
        let (status, log) = restarted.terminate().await;
        assert!(
            status.success(),
            "cycle {cycle}: the restarted gateway exited with {status}; log:\n{}",
            log.join("\n")
        );
        assert_journaled(&database, &acknowledged);
    }
    eprintln!("{} acknowledged messages survived 3 kills in {:?}", acknowledged.len(), started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_sending_exits_zero_and_keeps_every_acknowledged_message() {
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(data_dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let senders = start_senders(&gateway.mllp, "T", &stop, &progress);
    wait_for_first_ack(&progress).await;
    tokio::time::sleep(random_delay(7)).await;
    let (status, log) = gateway.terminate().await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = collect(senders).await;
    assert!(status.success(), "the gateway exited with {status} after SIGTERM; log:\n{}", log.join("\n"));
    assert!(
        log.iter().any(|line| line.contains("gateway stopped")),
        "no `gateway stopped` line in the log:\n{}",
        log.join("\n")
    );
    eprintln!("{} messages acknowledged before the SIGTERM shutdown completed", acknowledged.len());
    assert!(!acknowledged.is_empty(), "no message was acknowledged before SIGTERM, so the test proves nothing");
    assert_journaled(&data_dir.path().join("journal.db"), &acknowledged);
}
