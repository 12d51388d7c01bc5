//! MLLP load generator in Rust, for measuring the gateway's durable ingest past the ceiling of
//! `../shared/bench/loadgen.py` (a Python client that itself tops out near 10,000 msg/s on the
//! project's 2-core machine). Same rules as that tool, so the figures compare:
//!
//! - `-c` connections share `-n` messages; each connection sends one message and waits for its
//!   ACK before the next (window 1);
//! - every message gets a unique MSH-10 (and a fresh MSH-7); an ACK counts only when MSA-1 is
//!   AA or CA and MSA-2 echoes the MSH-10 sent;
//! - loopback targets only; bounded by `--max-seconds` per run and `--ack-timeout` per ACK;
//! - `--repeat R` runs R times and prints the medians (with `--json`, one JSON summary line).
//!
//! The client runs on one thread (like the Python tool), so it uses at most one core.
//!
//! `--serve-ack` turns it into the other end instead: a server on `127.0.0.1:PORT` that
//! answers every frame with a fixed AA echoing its MSH-10, parsing and storing nothing, on
//! the runtime's worker threads. It measures what the machine allows a Rust MLLP server
//! (the Python `raw_ack_server.py` is slower than the Rust client at 8 connections).
//!
//! ```sh
//! cargo build --release --bin mllp-load
//! target/release/mllp-load --port 2575 -c 8 -n 20000 --repeat 3 \
//!     --message-file benches/adt_a01_1k.hl7
//! ```

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    host: IpAddr,
    port: u16,
    connections: usize,
    total: usize,
    message_file: Option<String>,
    repeat: usize,
    label: String,
    json: bool,
    max_seconds: u64,
    ack_timeout: Duration,
    serve_ack: bool,
}

const USAGE: &str = "usage: mllp-load --port PORT [--host 127.0.0.1] [-c CONNECTIONS] [-n TOTAL] \
[--message-file FILE] [--repeat R] [--label L] [--json] [--max-seconds S] [--ack-timeout SECONDS]\n\
       mllp-load --serve-ack --port PORT [--max-seconds S]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        host: IpAddr::from([127, 0, 0, 1]),
        port: 0,
        connections: 1,
        total: 5000,
        message_file: None,
        repeat: 1,
        label: "server".to_string(),
        json: false,
        max_seconds: 120,
        ack_timeout: Duration::from_secs(10),
        serve_ack: false,
    };
    let mut items = std::env::args().skip(1);
    while let Some(flag) = items.next() {
        let mut value = || items.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        let number = |text: String| text.parse::<u64>().map_err(|_| format!("{flag}: `{text}` is not a number"));
        match flag.as_str() {
            "--host" => args.host = value()?.parse().map_err(|_| format!("{flag}: not an IP address"))?,
            "--port" => args.port = number(value()?)? as u16,
            "-c" | "--connections" => args.connections = number(value()?)?.max(1) as usize,
            "-n" | "--total" => args.total = number(value()?)?.max(1) as usize,
            "--message-file" => args.message_file = Some(value()?),
            "--repeat" => args.repeat = number(value()?)?.max(1) as usize,
            "--label" => args.label = value()?,
            "--json" => args.json = true,
            "--serve-ack" => args.serve_ack = true,
            "--max-seconds" => args.max_seconds = number(value()?)?,
            "--ack-timeout" => args.ack_timeout = Duration::from_secs(number(value()?)?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if args.port == 0 {
        return Err(format!("--port is required\n{USAGE}"));
    }
    if !args.host.is_loopback() {
        return Err(format!("{} is not a loopback address: this tool only loads the local machine", args.host));
    }
    Ok(args)
}

const SAMPLE: &str = "MSH|^~\\&|LOADGEN|BENCH|GW|GW|20240101000000||ADT^A01^ADT_A01|0|P|2.5.1\r\
EVN|A01|20240101000000\rPID|1||MRN-1^^^BENCH^MR||Doe^Jane||19800101|F\rPV1|1|I|W^1^A\r";

/// The message's segments with `\r` separators, split around MSH-7 and MSH-10 so that each
/// message can be stamped with its own values.
struct Template {
    segments: Vec<String>,
}

impl Template {
    fn load(path: Option<&str>) -> Result<Template, String> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|error| format!("{path}: {error}"))?,
            None => SAMPLE.to_string(),
        };
        let text = text.trim_start_matches('\u{feff}').replace("\r\n", "\r").replace('\n', "\r");
        let segments: Vec<String> =
            text.split('\r').filter(|segment| !segment.trim().is_empty()).map(str::to_string).collect();
        match segments.first() {
            Some(msh) if msh.starts_with("MSH|") && msh.split('|').count() >= 12 => Ok(Template { segments }),
            _ => Err("the message file must start with an MSH segment of at least 12 fields".to_string()),
        }
    }

    fn render(&self, timestamp: &str, control_id: &str) -> Vec<u8> {
        let mut fields: Vec<&str> = self.segments[0].split('|').collect();
        fields[6] = timestamp;
        fields[9] = control_id;
        let mut frame = vec![0x0b];
        frame.extend_from_slice(fields.join("|").as_bytes());
        for segment in &self.segments[1..] {
            frame.push(b'\r');
            frame.extend_from_slice(segment.as_bytes());
        }
        frame.extend_from_slice(b"\r\x1c\r");
        frame
    }
}

/// Result of one run.
struct Run {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    /// ACK latencies of the messages that got a good ACK, sorted.
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, fraction: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() as f64 * fraction).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[index]
    }
}

/// Reads one MLLP frame's payload into `frame`; false when the peer closed.
async fn read_frame(stream: &mut TcpStream, buffer: &mut Vec<u8>, frame: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        if let Some(start) = buffer.iter().position(|&byte| byte == 0x0b) {
            if let Some(length) = buffer[start..].windows(2).position(|pair| pair == [0x1c, 0x0d]) {
                frame.clear();
                frame.extend_from_slice(&buffer[start + 1..start + length]);
                buffer.drain(..start + length + 2);
                return Ok(true);
            }
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(false);
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// MSA-1 and MSA-2 of an ACK.
fn msa(ack: &[u8]) -> Option<(String, String)> {
    let text = String::from_utf8_lossy(ack);
    let segment = text.split(['\r', '\n']).find(|segment| segment.starts_with("MSA|"))?;
    let mut fields = segment.split('|').skip(1);
    Some((fields.next()?.to_string(), fields.next().unwrap_or("").to_string()))
}

async fn connection(
    address: SocketAddr,
    template: std::sync::Arc<Template>,
    prefix: String,
    count: usize,
    deadline: Instant,
    ack_timeout: Duration,
) -> (usize, usize, Vec<Duration>) {
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::with_capacity(count));
    let Ok(mut stream) = TcpStream::connect(address).await else {
        return (0, count, latencies);
    };
    let _ = stream.set_nodelay(true);
    let (mut buffer, mut frame) = (Vec::with_capacity(8192), Vec::with_capacity(1024));
    let timestamp = jiff::Zoned::now().strftime("%Y%m%d%H%M%S").to_string();
    for sequence in 0..count {
        if Instant::now() >= deadline {
            errors += count - sequence;
            break;
        }
        let control_id = format!("{prefix}-{sequence}");
        let message = template.render(&timestamp, &control_id);
        let sent = Instant::now();
        if stream.write_all(&message).await.is_err() {
            errors += count - sequence;
            break;
        }
        match tokio::time::timeout(ack_timeout, read_frame(&mut stream, &mut buffer, &mut frame)).await {
            Ok(Ok(true)) => match msa(&frame) {
                Some((code, echoed)) if (code == "AA" || code == "CA") && echoed == control_id => {
                    latencies.push(sent.elapsed());
                    ok += 1;
                }
                _ => errors += 1,
            },
            _ => {
                errors += count - sequence;
                break;
            }
        }
    }
    (ok, errors, latencies)
}

async fn run_once(args: &Args, template: &std::sync::Arc<Template>, run: usize) -> Run {
    let address = SocketAddr::new(args.host, args.port);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_seconds);
    // MSH-10 holds at most 20 characters: label initial, 6 digits of the clock, run, connection, sequence.
    let unique = jiff::Timestamp::now().as_microsecond().rem_euclid(1_000_000);
    let mut tasks = Vec::new();
    for index in 0..args.connections {
        let count = args.total / args.connections + usize::from(index < args.total % args.connections);
        let initial = args.label.chars().next().unwrap_or('L');
        let prefix = format!("{initial}{unique:06}R{run}C{index}");
        tasks.push(tokio::spawn(connection(address, template.clone(), prefix, count, deadline, args.ack_timeout)));
    }
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::with_capacity(args.total));
    for task in tasks {
        let (good, bad, times) = task.await.unwrap_or((0, 0, Vec::new()));
        ok += good;
        errors += bad;
        latencies.extend(times);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Run { ok, errors, elapsed, latencies }
}

/// `--serve-ack`: answers every frame with AA and its MSH-10, until `max_seconds` pass.
async fn serve_ack(args: &Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port)).await?;
    let serve = async {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let (mut buffer, mut frame) = (Vec::with_capacity(8192), Vec::with_capacity(2048));
                while let Ok(true) = read_frame(&mut stream, &mut buffer, &mut frame).await {
                    let text = String::from_utf8_lossy(&frame);
                    let control_id =
                        text.split(['\r', '\n']).next().and_then(|msh| msh.split('|').nth(9)).unwrap_or("");
                    let ack = format!("\x0bMSH|^~\\&|ACK|ACK|||20240101000000||ACK|A{control_id}|P|2.5.1\rMSA|AA|{control_id}\r\x1c\r");
                    if stream.write_all(ack.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(args.max_seconds), serve).await;
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.serve_ack {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
        return match runtime.block_on(serve_ack(&args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("cannot serve on port {}: {error}", args.port);
                std::process::ExitCode::FAILURE
            }
        };
    }
    let template = match Template::load(args.message_file.as_deref()) {
        Ok(template) => std::sync::Arc::new(template),
        Err(message) => {
            eprintln!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let mut runs = Vec::new();
    for index in 0..args.repeat {
        let run = runtime.block_on(run_once(&args, &template, index));
        eprintln!(
            "run {}/{}  c={}: ok {}/{} in {:.3}s = {:.1} msg/s, p50 {:.3} ms, p99 {:.3} ms, errors {}",
            index + 1,
            args.repeat,
            args.connections,
            run.ok,
            args.total,
            run.elapsed.as_secs_f64(),
            run.rate(),
            run.percentile(0.50).as_secs_f64() * 1e3,
            run.percentile(0.99).as_secs_f64() * 1e3,
            run.errors
        );
        runs.push(run);
        std::thread::sleep(Duration::from_millis(500));
    }
    let rate = median(runs.iter().map(Run::rate).collect());
    let p50 = median(runs.iter().map(|run| run.percentile(0.50).as_secs_f64() * 1e3).collect());
    let p99 = median(runs.iter().map(|run| run.percentile(0.99).as_secs_f64() * 1e3).collect());
    let errors_any = runs.iter().any(|run| run.errors > 0);
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "summary": {
                "label": args.label, "connections": args.connections, "total": args.total,
                "median_msgs_per_s": rate, "median_p50_ms": (p50 * 1000.0).round() / 1000.0,
                "median_p99_ms": (p99 * 1000.0).round() / 1000.0, "errors_any": errors_any,
            }})
        );
    } else {
        println!(
            "MEDIAN of {}  c={}: {rate:.1} msg/s, p50 {p50:.3} ms, p99 {p99:.3} ms",
            args.repeat, args.connections
        );
    }
    if errors_any {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
