//! Wiring of a running gateway: database, MLLP listener, pipeline, FHIR API, and the two-stage
//! shutdown. `main` calls [`Gateway::start`]; tests do too, on port 0.
//!
//! Shutdown order: stop accepting MLLP connections → let connections answer the frames they
//! hold (until the grace deadline, then force) → close the journal (its writer commits
//! what is queued and checkpoints) → stop the HTTP server last, so health stays observable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::config::Settings;
use crate::http::{self, Readiness};
use crate::journal::Journal;
use crate::mapping::Engine;
use crate::mllp::ingest::Ingest;
use crate::mllp::listener::{self, Context};
use crate::outbox::Outbox;
use crate::pipeline::{self, Pipeline, Wakeup};
use crate::store::Store;
use crate::telemetry::Metrics;

/// File name of the store database inside the data directory.
pub const DATABASE_FILE: &str = crate::db::STORE_FILE;
/// File name of the journal database inside the data directory.
pub const JOURNAL_FILE: &str = crate::db::JOURNAL_FILE;

/// Read connections the FHIR API may use at once.
pub const STORE_READERS: usize = 16;

/// How long connections get to finish after shutdown begins, by default.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the process runs (not part of the configuration file).
#[derive(Clone, Debug)]
pub struct Options {
    /// Time connections get to answer what they hold once shutdown begins; after it they
    /// are closed.
    pub shutdown_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { shutdown_grace: SHUTDOWN_GRACE }
    }
}

/// A running gateway.
pub struct Gateway {
    /// Bound MLLP address (useful with port 0).
    pub mllp_address: SocketAddr,
    /// Bound HTTP address.
    pub http_address: SocketAddr,
    /// Path of the store database (resources, search indexes, outbox).
    pub database: PathBuf,
    /// Path of the journal database (messages as received, and their status).
    pub journal: PathBuf,
    /// Metrics of this gateway.
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    stopped: tokio::task::JoinHandle<()>,
}

struct GatewayReadiness {
    /// Weak, so that the HTTP server (which lives longest) does not keep the journal open.
    context: std::sync::Weak<Context>,
    shutdown: CancellationToken,
    /// The aggregator push's backlog figure, when push is configured.
    outbox: Option<Arc<crate::outbox::Status>>,
}

impl Readiness for GatewayReadiness {
    fn degraded(&self) -> Option<String> {
        self.outbox.as_ref().and_then(|status| status.degraded())
    }

    fn check(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".to_string());
        }
        let Some(context) = self.context.upgrade() else {
            return Err("shutting down".to_string());
        };
        if !context.ingest.is_ready() {
            return Err("journal is not accepting writes".to_string());
        }
        Ok(())
    }
}

impl Gateway {
    /// Opens the database, binds both listeners and starts serving.
    pub async fn start(settings: Settings) -> anyhow::Result<Gateway> {
        Gateway::start_with(settings, Options::default()).await
    }

    /// Like [`Gateway::start`], with process options.
    pub async fn start_with(settings: Settings, options: Options) -> anyhow::Result<Gateway> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("cannot create data directory {}", settings.data_dir.display()))?;
        let database = settings.data_dir.join(DATABASE_FILE);
        let journal_file = settings.data_dir.join(JOURNAL_FILE);
        let engine = Engine::load(&settings.mappings).map_err(|errors| {
            let listing: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("{} mapping error(s):\n{}", errors.len(), listing.join("\n"))
        })?;
        tracing::info!(
            message_maps = engine.message_map_count(),
            sender_overlays = engine.overlays().len(),
            "mappings compiled"
        );
        let engine = pipeline::shared(engine);
        let wakeup = Arc::new(Wakeup::default());
        let notify_pipeline = wakeup.clone();
        let (journal, journal_thread) =
            Journal::open_notifying(&journal_file, Some(Arc::new(move || notify_pipeline.wake())))?;
        let metrics = Arc::new(Metrics::new());
        let outbox = match &settings.aggregator {
            Some(aggregator) => Some(
                Outbox::start(&database, aggregator.clone(), metrics.clone())
                    .context("cannot start the aggregator push")?,
            ),
            None => None,
        };
        let pipeline = Pipeline::start(
            &database,
            journal.clone(),
            engine.clone(),
            wakeup.clone(),
            metrics.clone(),
            outbox.as_ref().map(Outbox::producer),
        )?;
        let store = Store::open(&database, STORE_READERS)?;
        let verifier = match &settings.auth {
            Some(auth) => Some(Arc::new(
                crate::auth::Verifier::load(auth).await.context("cannot load the token verification keys")?,
            )),
            None => None,
        };

        let tls = match &settings.mllp.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(crate::mllp::tls::server_config(tls)?)),
            None => None,
        };
        let mllp_listener = TcpListener::bind(settings.mllp.listen)
            .await
            .with_context(|| format!("cannot listen for mllp on {}", settings.mllp.listen))?;
        let http_listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("cannot listen for http on {}", settings.http.listen))?;
        let mllp_address = mllp_listener.local_addr()?;
        let http_address = http_listener.local_addr()?;

        let ingest = Ingest::new(journal, metrics.clone(), &settings.mllp);
        let context = Arc::new(Context { settings: settings.mllp.clone(), ingest, metrics: metrics.clone(), tls });
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept_loop = tokio::spawn(listener::run(
            mllp_listener,
            context.clone(),
            shutdown.clone(),
            force.clone(),
            connections.clone(),
        ));

        let readiness = Arc::new(GatewayReadiness {
            context: Arc::downgrade(&context),
            shutdown: shutdown.clone(),
            outbox: outbox.as_ref().map(Outbox::status),
        });
        let api_state = api::ApiState {
            store,
            verifier,
            auth: settings.auth.clone(),
            public_url: settings.http.public_url.clone(),
            scheme: if settings.http.tls.is_some() { "https" } else { "http" },
            metrics: metrics.clone(),
            admin: Arc::new(api::admin::AdminState {
                database: database.clone(),
                journal: journal_file.clone(),
                engine,
                sources: settings.mappings.clone(),
                wakeup,
                outbox: outbox.as_ref().map(Outbox::requeue_signal),
            }),
        };
        let router = http::router(http::AppState { metrics: metrics.clone(), readiness }).merge(api::router(api_state));
        let http_stop = CancellationToken::new();
        let http_stop_signal = http_stop.clone();
        let http_server = match &settings.http.tls {
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(crate::mllp::tls::server_config_with_alpn(
                    tls,
                    &[b"h2".to_vec(), b"http/1.1".to_vec()],
                )?);
                let handshake_timeout = Duration::from_secs(tls.handshake_timeout_secs);
                tokio::spawn(http::serve_tls(http_listener, acceptor, handshake_timeout, router, http_stop_signal))
            }
            None => tokio::spawn(async move {
                let served = axum::serve(http_listener, router)
                    .with_graceful_shutdown(async move { http_stop_signal.cancelled().await })
                    .await;
                if let Err(error) = served {
                    tracing::error!(error = %error, "http server failed");
                }
            }),
        };

        let stop_signal = shutdown.clone();
        let stopped = tokio::spawn(async move {
            stop_signal.cancelled().await;
            let _ = accept_loop.await;
            connections.close();
            if tokio::time::timeout(options.shutdown_grace, connections.wait()).await.is_err() {
                tracing::warn!("mllp connections still open after the grace period; closing them");
                force.cancel();
                connections.wait().await;
            }
            drop(context);
            // The pipeline finishes the batch it is on (recording its outcomes through the
            // journal's writer); what it has not claimed stays `accepted` for the next start.
            if tokio::task::spawn_blocking(move || pipeline.stop()).await.is_err() {
                tracing::error!("pipeline did not stop cleanly");
            }
            // With the listener's and the pipeline's handles gone, the writer commits its
            // queue and stops.
            let joined = tokio::task::spawn_blocking(move || journal_thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("journal writer did not stop cleanly");
            }
            // In-flight pushes finish or time out; pending rows wait for the next start.
            if let Some(outbox) = outbox {
                outbox.stop().await;
            }
            http_stop.cancel();
            let _ = http_server.await;
        });

        tracing::info!(mllp = %mllp_address, http = %http_address, database = %database.display(), "gateway listening");
        Ok(Gateway { mllp_address, http_address, database, journal: journal_file, metrics, shutdown, stopped })
    }

    /// Begins shutdown without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits until everything has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.stopped.await;
    }

    /// Waits until a shutdown (begun elsewhere) has completed.
    pub async fn wait(self) {
        let _ = self.stopped.await;
    }
}

/// SIGTERM and SIGINT handlers, installed before the gateway starts so that a signal
/// arriving during startup is not lost (or fatal).
pub struct Termination {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Termination {
    /// Installs the handlers now.
    pub fn install() -> Termination {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let terminate = signal(SignalKind::terminate())
                .map_err(|error| tracing::warn!(error = %error, "cannot listen for SIGTERM"))
                .ok();
            let interrupt = signal(SignalKind::interrupt())
                .map_err(|error| tracing::warn!(error = %error, "cannot listen for SIGINT"))
                .ok();
            Termination { terminate, interrupt }
        }
        #[cfg(not(unix))]
        {
            Termination {}
        }
    }

    /// Resolves on the first SIGTERM or SIGINT.
    pub async fn wait(self) {
        #[cfg(unix)]
        {
            let (mut terminate, mut interrupt) = (self.terminate, self.interrupt);
            let terminated = async {
                match terminate.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let interrupted = async {
                match interrupt.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = terminated => {}
                _ = interrupted => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
