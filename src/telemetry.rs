//! Logging and metrics: every metric the gateway exports is defined here, with its help text.
//!
//! Logs never carry message payloads or patient identifiers unless the operator starts the
//! gateway with `--log-phi` ([`set_log_phi`]); what is logged by default is routing data:
//! sender (MSH-3/MSH-4), message type, control id, peer address, sizes and outcomes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

static LOG_PHI: AtomicBool = AtomicBool::new(false);

/// Allows payloads to be written to logs. Only `serve --log-phi` calls this.
pub fn set_log_phi(enabled: bool) {
    LOG_PHI.store(enabled, Ordering::Relaxed);
}

/// True when the operator allowed payloads in logs.
pub fn log_phi() -> bool {
    LOG_PHI.load(Ordering::Relaxed)
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber, writing to stderr. The filter comes from
/// `RUST_LOG` when set, `info` otherwise.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colours);
    // A second installation (tests) is not an error worth stopping for.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Labels of per-message counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// `ADT^A01` (MSH-9.1^MSH-9.2).
    pub message_type: String,
    /// `MSH-3^MSH-4`.
    pub sender: String,
}

/// Labels of refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `ADT^A01`.
    pub message_type: String,
    /// `MSH-3^MSH-4`.
    pub sender: String,
    /// MSA-1 code sent (AE, AR, CE, CR).
    pub code: String,
}

/// Labels of pipeline outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `processed`, or the failure kind (`decode`, `parse`, `unrouted`, `invalid`).
    pub outcome: String,
}

/// Labels of FHIR API requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `read`, `vread`, `search`, `history`, `capabilities`, `everything`, `admin`, ...
    pub interaction: &'static str,
    /// HTTP status code.
    pub status: u16,
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_micros() as i64)
}

/// An instant in microseconds since the epoch as RFC 3339 UTC (`2026-11-29T20:18:23.123456Z`).
pub fn rfc3339_us(us: i64) -> String {
    jiff::Timestamp::from_microsecond(us).map_or_else(|_| us.to_string(), |timestamp| timestamp.to_string())
}

/// Most distinct label values kept per label; further values are counted as `other`, so
/// that a sender inventing MSH-3 values cannot exhaust memory.
const MAX_LABEL_VALUES: usize = 1000;

/// All metrics of a running gateway.
pub struct Metrics {
    registry: Registry,
    /// `hl7gw_mllp_messages_received_total`.
    pub messages_received: Family<MessageLabels, Counter>,
    /// `hl7gw_mllp_messages_acknowledged_total`: answered AA or CA (durably stored).
    pub messages_acknowledged: Family<MessageLabels, Counter>,
    /// `hl7gw_mllp_messages_refused_total`: answered AE, AR, CE or CR.
    pub messages_refused: Family<RefusedLabels, Counter>,
    /// `hl7gw_mllp_duplicates_total`: answered with the original ACK.
    pub duplicates: Family<MessageLabels, Counter>,
    /// `hl7gw_mllp_ack_latency_seconds`: frame complete → ACK written.
    pub ack_latency: Histogram,
    /// `hl7gw_mllp_open_connections`.
    pub open_connections: Gauge,
    /// `hl7gw_mllp_connections_refused_total`: closed at once because the limit was reached.
    pub connections_refused: Counter,
    /// `hl7gw_mllp_oversize_frames_total`.
    pub oversize_frames: Counter,
    /// `hl7gw_mllp_idle_timeouts_total`.
    pub idle_timeouts: Counter,
    /// `hl7gw_mllp_tls_handshake_failures_total`.
    pub tls_handshake_failures: Counter,
    /// `hl7gw_pipeline_messages_total{outcome}`: messages converted (or failed) by the pipeline.
    pub pipeline_messages: Family<OutcomeLabels, Counter>,
    /// `hl7gw_pipeline_backlog`: accepted messages not yet processed.
    pub pipeline_backlog: Gauge,
    /// `hl7gw_journal_log_backlog`: acknowledged messages not yet copied into `journal.db`.
    pub journal_log_backlog: Gauge,
    /// `hl7gw_pipeline_latency_seconds`: receive → resources stored.
    pub pipeline_latency: Histogram,
    /// `hl7gw_fhir_requests_total{interaction,status}`.
    pub fhir_requests: Family<RequestLabels, Counter>,
    /// `hl7gw_fhir_request_duration_seconds`.
    pub fhir_request_duration: Histogram,
    /// `hl7gw_outbox_depth`: Bundles waiting for delivery.
    pub outbox_depth: Gauge,
    /// `hl7gw_outbox_oldest_undelivered_seconds`: age of the oldest pending Bundle.
    pub outbox_oldest_undelivered_seconds: Gauge,
    /// `hl7gw_outbox_deliveries_total`: messages the aggregator accepted.
    pub outbox_deliveries: Counter,
    /// `hl7gw_outbox_retries_total`: failed attempts that will be retried.
    pub outbox_retries: Counter,
    /// `hl7gw_outbox_dead_letters_total`: messages the aggregator refused.
    pub outbox_dead_letters: Counter,
    /// `hl7gw_outbox_delivery_latency_seconds`: queued → accepted by the aggregator.
    pub outbox_delivery_latency: Histogram,
    seen_label_values: Mutex<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hl7gw");
        let messages_received = Family::<MessageLabels, Counter>::default();
        let messages_acknowledged = Family::<MessageLabels, Counter>::default();
        let messages_refused = Family::<RefusedLabels, Counter>::default();
        let duplicates = Family::<MessageLabels, Counter>::default();
        // 50 µs .. ~1.6 s
        let ack_latency = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16));
        let open_connections = Gauge::default();
        let connections_refused = Counter::default();
        let oversize_frames = Counter::default();
        let idle_timeouts = Counter::default();
        let tls_handshake_failures = Counter::default();
        registry.register("mllp_messages_received", "Messages received over MLLP", messages_received.clone());
        registry.register(
            "mllp_messages_acknowledged",
            "Messages answered AA or CA after being stored durably",
            messages_acknowledged.clone(),
        );
        registry.register("mllp_messages_refused", "Messages answered AE, AR, CE or CR", messages_refused.clone());
        registry.register(
            "mllp_duplicates",
            "Messages recognised as duplicates and answered with the original ACK",
            duplicates.clone(),
        );
        registry.register(
            "mllp_ack_latency_seconds",
            "Time from a complete frame to its ACK being written",
            ack_latency.clone(),
        );
        registry.register("mllp_open_connections", "Open MLLP connections", open_connections.clone());
        registry.register(
            "mllp_connections_refused",
            "Connections closed at once because max_connections was reached",
            connections_refused.clone(),
        );
        registry.register("mllp_oversize_frames", "Frames larger than max_frame_bytes", oversize_frames.clone());
        registry.register("mllp_idle_timeouts", "Connections closed after idle_timeout_secs", idle_timeouts.clone());
        registry.register("mllp_tls_handshake_failures", "Failed TLS handshakes", tls_handshake_failures.clone());
        let pipeline_messages = Family::<OutcomeLabels, Counter>::default();
        let pipeline_backlog = Gauge::default();
        let journal_log_backlog = Gauge::default();
        // 1 ms .. ~65 s
        let pipeline_latency =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17));
        let fhir_requests = Family::<RequestLabels, Counter>::default();
        // 50 µs .. ~1.6 s
        let fhir_request_duration =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "pipeline_messages",
            "Messages the pipeline converted (outcome=processed) or failed (outcome=failure kind)",
            pipeline_messages.clone(),
        );
        registry.register("pipeline_backlog", "Accepted messages waiting to be converted", pipeline_backlog.clone());
        registry.register(
            "journal_log_backlog",
            "Acknowledged messages in the ingest log not yet copied into journal.db",
            journal_log_backlog.clone(),
        );
        registry.register(
            "pipeline_latency_seconds",
            "Time from receiving a message to its resources being stored",
            pipeline_latency.clone(),
        );
        registry.register("fhir_requests", "FHIR API requests by interaction and status", fhir_requests.clone());
        registry.register(
            "fhir_request_duration_seconds",
            "FHIR API request handling time",
            fhir_request_duration.clone(),
        );
        let outbox_depth = Gauge::default();
        let outbox_oldest_undelivered_seconds = Gauge::default();
        let outbox_deliveries = Counter::default();
        let outbox_retries = Counter::default();
        let outbox_dead_letters = Counter::default();
        // 1 ms .. ~65 s
        let outbox_delivery_latency =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17));
        registry.register("outbox_depth", "Bundles waiting for delivery to the aggregator", outbox_depth.clone());
        registry.register(
            "outbox_oldest_undelivered_seconds",
            "Age of the oldest Bundle not yet delivered to the aggregator",
            outbox_oldest_undelivered_seconds.clone(),
        );
        registry.register("outbox_deliveries", "Messages delivered to the aggregator", outbox_deliveries.clone());
        registry.register(
            "outbox_retries",
            "Failed delivery attempts that will be retried (timeouts, connection errors, 5xx, 429)",
            outbox_retries.clone(),
        );
        registry.register(
            "outbox_dead_letters",
            "Messages the aggregator refused (4xx), kept for operators",
            outbox_dead_letters.clone(),
        );
        registry.register(
            "outbox_delivery_latency_seconds",
            "Time from queueing a Bundle to the aggregator accepting it",
            outbox_delivery_latency.clone(),
        );
        Metrics {
            registry,
            outbox_depth,
            outbox_oldest_undelivered_seconds,
            outbox_deliveries,
            outbox_retries,
            outbox_dead_letters,
            outbox_delivery_latency,
            pipeline_messages,
            pipeline_backlog,
            journal_log_backlog,
            pipeline_latency,
            fhir_requests,
            fhir_request_duration,
            messages_received,
            messages_acknowledged,
            messages_refused,
            duplicates,
            ack_latency,
            open_connections,
            connections_refused,
            oversize_frames,
            idle_timeouts,
            tls_handshake_failures,
            seen_label_values: Mutex::new(HashSet::new()),
        }
    }

    /// Labels for a message, with values bounded in length and number.
    pub fn message_labels(&self, message_type: &str, sender: &str) -> MessageLabels {
        MessageLabels { message_type: self.bounded(message_type), sender: self.bounded(sender) }
    }

    fn bounded(&self, value: &str) -> String {
        let clipped: String = value.chars().filter(|c| !c.is_control()).take(64).collect();
        // A poisoned lock only means another thread panicked while inserting; the set is
        // still usable.
        let mut seen = self.seen_label_values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(&clipped) {
            return clipped;
        }
        if seen.len() >= MAX_LABEL_VALUES {
            return "other".to_string();
        }
        seen.insert(clipped.clone());
        clipped
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_with_labels() {
        let metrics = Metrics::new();
        let labels = metrics.message_labels("ADT^A01", "EPIC^HOSP");
        metrics.messages_received.get_or_create(&labels).inc();
        let text = metrics.encode();
        assert!(
            text.contains("hl7gw_mllp_messages_received_total{message_type=\"ADT^A01\",sender=\"EPIC^HOSP\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE hl7gw_mllp_ack_latency_seconds histogram"));
    }

    #[test]
    fn label_values_are_bounded() {
        let metrics = Metrics::new();
        assert_eq!(metrics.bounded(&"x".repeat(100)).len(), 64);
        for index in 0..MAX_LABEL_VALUES {
            metrics.bounded(&index.to_string());
        }
        assert_eq!(metrics.bounded("one too many"), "other");
        assert_eq!(metrics.bounded("5"), "5");
    }
}
