//! The MLLP accept loop and the per-connection task.
//!
//! - At most `max_connections` connections are served; one more is accepted and closed at
//!   once (counted), which tells the sender to retry instead of leaving it waiting.
//! - A connection reads into a buffer bounded by the frame limit, decodes every complete
//!   frame, submits them all to the journal (so pipelined messages share a commit), then
//!   writes their ACKs in order.
//! - A connection idle for `idle_timeout` is closed.
//! - On shutdown the listener stops accepting; each connection answers the frames it has
//!   received in full and closes. A frame still arriving is given until the force deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codec::{self, Decoder};
use super::ingest::Ingest;
use super::Settings;
use crate::telemetry::Metrics;

/// How long a connection holding no partial frame waits, once shutdown has begun, for
/// bytes already sent to it before it closes.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_millis(100);

/// Everything a connection needs.
pub struct Context {
    /// Validated `mllp` settings.
    pub settings: Settings,
    /// Frame → journal → ACK.
    pub ingest: Ingest,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// TLS acceptor when TLS is configured.
    pub tls: Option<TlsAcceptor>,
}

/// Accepts connections until `shutdown` is cancelled. Connection tasks are spawned on
/// `tracker`, so the caller can wait for them to finish.
pub async fn run(
    listener: TcpListener,
    context: Arc<Context>,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(context.settings.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %error, "mllp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            context.metrics.connections_refused.inc();
            tracing::warn!(%peer, limit = context.settings.max_connections, "mllp connection refused: limit reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let context = context.clone();
        let signals = Signals { shutdown: shutdown.clone(), force: force.clone() };
        tracker.spawn(async move {
            serve_connection(stream, peer, context, signals, permit).await;
        });
    }
    tracing::info!("mllp listener stopped accepting");
}

/// The two stages of shutdown, as a connection sees them.
#[derive(Clone)]
struct Signals {
    /// Stop taking new frames once the ones received are answered.
    shutdown: CancellationToken,
    /// Close now, whatever is in flight (the grace period is over).
    force: CancellationToken,
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    context: Arc<Context>,
    signals: Signals,
    _permit: OwnedSemaphorePermit,
) {
    context.metrics.open_connections.inc();
    tracing::debug!(%peer, "mllp connection opened");
    let peer_text = peer.to_string();
    let result = match (&context.tls, &context.settings.tls) {
        (Some(acceptor), Some(tls)) => {
            let timeout = std::time::Duration::from_secs(tls.handshake_timeout_secs);
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => exchange(tls_stream, &peer_text, &context, &signals).await,
                Ok(Err(error)) => {
                    context.metrics.tls_handshake_failures.inc();
                    tracing::warn!(%peer, error = %error, "mllp tls handshake failed");
                    Ok(())
                }
                Err(_) => {
                    context.metrics.tls_handshake_failures.inc();
                    tracing::warn!(%peer, "mllp tls handshake timed out");
                    Ok(())
                }
            }
        }
        _ => exchange(stream, &peer_text, &context, &signals).await,
    };
    if let Err(error) = result {
        tracing::debug!(%peer, error = %error, "mllp connection ended with an error");
    }
    context.metrics.open_connections.dec();
    tracing::debug!(%peer, "mllp connection closed");
}

/// Reads frames and answers them until the peer closes, the idle timeout passes, a frame is
/// oversize, or shutdown begins with no frame half-received.
async fn exchange<S>(mut stream: S, peer: &str, context: &Context, signals: &Signals) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let settings = &context.settings;
    let mut decoder = Decoder::new(settings.max_frame_bytes);
    let mut buffer = BytesMut::with_capacity(16 * 1024);
    let mut frames = Vec::new();
    let mut drained = false;
    loop {
        // Take every complete frame out of the buffer.
        let mut oversize = None;
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    oversize = Some(error);
                    break;
                }
            }
        }
        if !frames.is_empty() {
            answer(&mut stream, peer, context, &mut frames).await?;
        }
        if let Some(oversize) = oversize {
            tracing::warn!(
                peer,
                received_bytes = oversize.received_bytes,
                limit = settings.max_frame_bytes,
                "mllp frame too large; answering AR and closing"
            );
            if let Some(ack) = context.ingest.refuse_oversize(peer, oversize, settings.max_frame_bytes).await {
                stream.write_all(&codec::encode(&ack)).await?;
                stream.flush().await?;
            }
            let _ = stream.shutdown().await;
            return Ok(());
        }
        let in_frame = decoder.in_frame(&buffer);
        if signals.shutdown.is_cancelled() && !in_frame {
            // Bytes the peer sent before shutdown began may not have been read yet (the
            // cancellation can win the race against the socket's readiness): give them one
            // moment to arrive and answer them before closing. Only once: a sender that keeps
            // sending must not keep the connection open through the shutdown.
            if !drained {
                drained = true;
                if let Ok(Ok(read)) = tokio::time::timeout(SHUTDOWN_DRAIN, stream.read_buf(&mut buffer)).await {
                    if read > 0 {
                        continue;
                    }
                }
            }
            let _ = stream.shutdown().await;
            return Ok(());
        }
        let read = tokio::select! {
            _ = signals.shutdown.cancelled(), if !in_frame => continue,
            _ = signals.force.cancelled() => {
                tracing::warn!(peer, in_frame, "mllp connection closed at the end of the shutdown grace period");
                return Ok(());
            }
            read = tokio::time::timeout(settings.idle_timeout, stream.read_buf(&mut buffer)) => read,
        };
        match read {
            Err(_elapsed) => {
                context.metrics.idle_timeouts.inc();
                tracing::info!(peer, in_frame, "mllp connection idle; closing");
                let _ = stream.shutdown().await;
                return Ok(());
            }
            Ok(Ok(0)) => {
                if decoder.in_frame(&buffer) {
                    tracing::warn!(
                        peer,
                        buffered_bytes = buffer.len(),
                        "mllp peer closed inside a frame; the partial message was not acknowledged"
                    );
                }
                return Ok(());
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
        }
    }
}

/// Submits every frame to the journal, then writes each ACK in order once its commit is
/// done.
async fn answer<S>(stream: &mut S, peer: &str, context: &Context, frames: &mut Vec<bytes::Bytes>) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut submitted = Vec::with_capacity(frames.len());
    for frame in frames.drain(..) {
        if crate::telemetry::log_phi() {
            tracing::debug!(peer, payload = %String::from_utf8_lossy(&frame), "mllp frame received");
        }
        submitted.push(context.ingest.submit(peer, frame).await);
    }
    let answered = submitted.len();
    let mut output = Vec::new();
    for item in submitted {
        if let Some(ack) = context.ingest.finish(item).await {
            output.extend_from_slice(&codec::encode(&ack));
        }
    }
    stream.write_all(&output).await?;
    stream.flush().await?;
    let latency = started.elapsed().as_secs_f64();
    for _ in 0..answered {
        context.metrics.ack_latency.observe(latency);
    }
    Ok(())
}
