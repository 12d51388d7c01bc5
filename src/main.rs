//! Command line of hl7-fhir-gateway: flags, configuration, tracing, wiring. No logic.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hl7_fhir_gateway::commands::admin::{self, AdminClient};
use hl7_fhir_gateway::commands::{convert, health, send};
use hl7_fhir_gateway::config::{self, Overrides};
use hl7_fhir_gateway::mapping::{Engine, Sources};
use hl7_fhir_gateway::mllp::client::Options;
use hl7_fhir_gateway::mllp::tls::ClientTls;
use hl7_fhir_gateway::server::{Gateway, Termination};
use hl7_fhir_gateway::telemetry::{self, LogFormat};

/// Bridges HL7 v2 feeds received over MLLP to FHIR R4.
#[derive(Parser)]
#[command(name = "hl7-fhir-gateway", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: MLLP listener, journal, pipeline, FHIR API, health and metrics.
    Serve(ServeArgs),
    /// Send the messages of one or more files over MLLP and print each acknowledgment.
    Send(SendArgs),
    /// Exit 0 when a running gateway reports ready (for container health checks).
    Health(HealthArgs),
    /// Convert the messages of files to FHIR R4 transaction Bundles (JSON lines on stdout).
    Convert(ConvertArgs),
    /// Compile the mapping files and report every error with file, line and reason.
    CheckMappings(CheckMappingsArgs),
    /// Inspect the message journal of a running gateway and reprocess failed messages.
    Messages(MessagesArgs),
    /// Make a running gateway recompile its mapping files and use them from now on.
    ReloadMappings(AdminArgs),
    /// Inspect the aggregator outbox of a running gateway and requeue dead letters.
    Outbox(OutboxArgs),
}

#[derive(Args)]
struct OutboxArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: OutboxAction,
}

#[derive(Subcommand)]
enum OutboxAction {
    /// List outbox rows, newest first: id, message, partition hash, status, attempts, last status, error.
    List {
        /// Only rows with this status: pending, delivered, dead.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Counts per status and the age of the oldest undelivered Bundle.
    Stats,
    /// One row as JSON: Bundle, last error, the aggregator's answer.
    Show {
        /// Outbox id (first column of `outbox list`).
        id: i64,
    },
    /// Deliver rows again (after the cause of a refusal was fixed).
    Requeue {
        /// Outbox ids to requeue.
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        ids: Vec<i64>,
        /// Requeue every dead row.
        #[arg(long)]
        dead: bool,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// Base URL of the gateway's HTTP listener.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    http: String,
    /// File holding a bearer token with the admin scope (when the gateway has auth).
    #[arg(long, env = "HL7GW_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of CAs to trust for an https URL (default: the system's roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

#[derive(Args)]
struct MessagesArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: MessagesAction,
}

#[derive(Subcommand)]
enum MessagesAction {
    /// List messages, newest first: id, received, sender, type, control id, status, attempts, error.
    List {
        /// Only messages with this status: accepted, processed, failed, refused.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Counts per status and the age of the oldest unprocessed message.
    Stats,
    /// One message as JSON: raw text, ACK sent, error, conversion report.
    Show {
        /// Journal id (first column of `messages list`).
        id: i64,
    },
    /// Convert messages again (after fixing and reloading the mappings).
    Reprocess {
        /// Journal ids to reprocess.
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        ids: Vec<i64>,
        /// Reprocess every failed message.
        #[arg(long)]
        failed: bool,
    },
}

#[derive(Args)]
struct ConvertArgs {
    /// Site folder of mapping files, applied over the built-in mappings.
    #[arg(long)]
    mappings: Option<PathBuf>,
    /// IANA time zone of timestamps without offset (for senders whose overlay names none).
    #[arg(long, default_value = "UTC")]
    sender_timezone: String,
    /// Print each message's conversion report (unused fields, failed rules, vocabulary
    /// misses) on stderr.
    #[arg(long)]
    report: bool,
    /// Files with one or more messages (CR, LF or CRLF; MLLP-framed or not).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct CheckMappingsArgs {
    /// Site folder to check together with the built-in mappings.
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// YAML configuration file; without one the embedded defaults apply.
    #[arg(long, env = "HL7GW_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the SQLite database (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// MLLP listen address (overrides `mllp.listen`).
    #[arg(long)]
    mllp_listen: Option<String>,
    /// HTTP listen address (overrides `http.listen`).
    #[arg(long)]
    http_listen: Option<String>,
    /// Site folder of mapping files (overrides `mappings.dir`).
    #[arg(long)]
    mappings: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Write message payloads to the debug log. THIS LOGS PATIENT DATA (PHI); use only
    /// on a test system or with the site's approval.
    #[arg(long)]
    log_phi: bool,
}

#[derive(Args)]
struct SendArgs {
    /// Where to send: HOST:PORT.
    #[arg(long)]
    to: String,
    /// Use TLS.
    #[arg(long)]
    tls: bool,
    /// PEM file of CAs to trust (default: the system's roots).
    #[arg(long, requires = "tls")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for mutual TLS.
    #[arg(long, requires_all = ["tls", "key_file"])]
    cert_file: Option<PathBuf>,
    /// PEM client private key, for mutual TLS.
    #[arg(long, requires_all = ["tls", "cert_file"])]
    key_file: Option<PathBuf>,
    /// Server name to verify, when it differs from the host in --to.
    #[arg(long, requires = "tls")]
    server_name: Option<String>,
    /// Seconds to wait for each acknowledgment.
    #[arg(long, default_value_t = 30)]
    ack_timeout_secs: u64,
    /// Files with one or more messages (CR, LF or CRLF; MLLP-framed or not).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct HealthArgs {
    /// Base URL of the gateway's HTTP listener.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    http: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Send(args) => send_files(args).await,
            Command::Health(args) => check_health(args).await,
            Command::Convert(args) => convert_files(args),
            Command::CheckMappings(args) => check_mappings(args),
            Command::Messages(args) => messages(args).await,
            Command::ReloadMappings(args) => reload_mappings(args).await,
            Command::Outbox(args) => outbox(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let termination = Termination::install();
    telemetry::init_tracing(args.log_format);
    telemetry::set_log_phi(args.log_phi);
    if args.log_phi {
        tracing::warn!("--log-phi is set: message payloads will be written to the debug log");
    }
    let overrides = Overrides {
        data_dir: args.data_dir,
        mllp_listen: args.mllp_listen,
        http_listen: args.http_listen,
        mappings_dir: args.mappings,
    };
    let loaded = config::load(args.config.as_deref(), std::env::vars(), &overrides)?;
    let settings = loaded.validate()?;
    let gateway = Gateway::start(settings).await?;
    termination.wait().await;
    tracing::info!("shutdown requested; answering in-flight messages");
    gateway.stop().await;
    tracing::info!("gateway stopped");
    Ok(ExitCode::SUCCESS)
}

async fn send_files(args: SendArgs) -> anyhow::Result<ExitCode> {
    let tls =
        args.tls.then_some(ClientTls { ca_file: args.ca_file, cert_file: args.cert_file, key_file: args.key_file });
    let options = Options {
        address: args.to,
        tls,
        server_name: args.server_name,
        connect_timeout: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(args.ack_timeout_secs),
    };
    let mut stdout = std::io::stdout().lock();
    let summary = send::run(&args.files, &options, &mut stdout).await?;
    Ok(if summary.not_accepted == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn admin_client(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    let token = args.token_file.as_deref().map(admin::read_token).transpose()?;
    AdminClient::new(admin::Target { base: args.http.clone(), token, ca_file: args.ca_file.clone() })
}

/// `path?limit=N[&status=S]` for the admin list routes.
fn list_path(path: &str, status: Option<String>, limit: usize) -> anyhow::Result<String> {
    let mut query = vec![("limit".to_string(), limit.to_string())];
    if let Some(status) = status {
        query.push(("status".to_string(), status));
    }
    Ok(format!("{path}?{}", serde_urlencoded::to_string(&query)?))
}

/// POSTs `path_of(id)` for each id, printing one line per id; fails if any was refused.
async fn requeue_each(client: &AdminClient, ids: &[i64], path_of: impl Fn(i64) -> String) -> ExitCode {
    let mut problems = 0;
    for &id in ids {
        match client.post(&path_of(id)).await {
            Ok(_) => println!("{id} requeued"),
            Err(error) => {
                problems += 1;
                eprintln!("{id}: {error:#}");
            }
        }
    }
    if problems > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn messages(args: MessagesArgs) -> anyhow::Result<ExitCode> {
    let client = admin_client(&args.admin)?;
    match args.action {
        MessagesAction::List { status, limit } => {
            let answer = client.get(&list_path("/admin/messages", status, limit)?).await?;
            print!("{}", admin::format_list(&answer));
        }
        MessagesAction::Stats => {
            println!("{}", serde_json::to_string_pretty(&client.get("/admin/messages/stats").await?)?);
        }
        MessagesAction::Show { id } => {
            println!("{}", serde_json::to_string_pretty(&client.get(&format!("/admin/messages/{id}")).await?)?);
        }
        MessagesAction::Reprocess { ids, failed } => {
            if failed {
                let answer = client.post("/admin/messages/reprocess?status=failed").await?;
                println!("requeued {}", answer["requeued"]);
            } else {
                return Ok(requeue_each(&client, &ids, |id| format!("/admin/messages/{id}/reprocess")).await);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn outbox(args: OutboxArgs) -> anyhow::Result<ExitCode> {
    let client = admin_client(&args.admin)?;
    match args.action {
        OutboxAction::List { status, limit } => {
            let answer = client.get(&list_path("/admin/outbox", status, limit)?).await?;
            print!("{}", admin::format_outbox_list(&answer));
        }
        OutboxAction::Stats => {
            println!("{}", serde_json::to_string_pretty(&client.get("/admin/outbox/stats").await?)?);
        }
        OutboxAction::Show { id } => {
            println!("{}", serde_json::to_string_pretty(&client.get(&format!("/admin/outbox/{id}")).await?)?);
        }
        OutboxAction::Requeue { ids, dead } => {
            if dead {
                let answer = client.post("/admin/outbox/requeue?status=dead").await?;
                println!("requeued {}", answer["requeued"]);
            } else {
                return Ok(requeue_each(&client, &ids, |id| format!("/admin/outbox/{id}/requeue")).await);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn reload_mappings(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let answer = admin_client(&args)?.post("/admin/mappings/reload").await?;
    println!(
        "mappings reloaded: {} message maps, {} sender overlays",
        answer["message_maps"], answer["sender_overlays"]
    );
    Ok(ExitCode::SUCCESS)
}

fn load_mappings(sources: &Sources) -> anyhow::Result<Engine> {
    Engine::load(sources).map_err(|errors| {
        let listing: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{} mapping error(s):\n{}", errors.len(), listing.join("\n"))
    })
}

fn convert_files(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let sources = Sources {
        without_builtin: false,
        folders: args.mappings.into_iter().collect(),
        default_timezone: Some(args.sender_timezone),
    };
    let engine = load_mappings(&sources)?;
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    let summary = convert::run(&engine, &args.files, args.report, &mut stdout, &mut stderr)?;
    if summary.failed > 0 {
        eprintln!("{} converted, {} failed", summary.converted, summary.failed);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn check_mappings(args: CheckMappingsArgs) -> anyhow::Result<ExitCode> {
    let sources = Sources { without_builtin: false, folders: args.dir.into_iter().collect(), default_timezone: None };
    match Engine::load(&sources) {
        Ok(engine) => {
            println!("ok: {} message maps, {} sender overlays", engine.message_map_count(), engine.overlays().len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            eprintln!("{} error(s)", errors.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn check_health(args: HealthArgs) -> anyhow::Result<ExitCode> {
    if health::check(&args.http).await? {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("not ready: {}", args.http);
        Ok(ExitCode::FAILURE)
    }
}
