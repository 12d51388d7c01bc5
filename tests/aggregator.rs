//! The aggregator push, black-box: a gateway runs in-process (port 0) with its
//! `aggregator` section pointing at a FHIR "aggregator" that runs inside the test (axum on
//! a real socket). The aggregator applies each transaction's PUTs to a map, records what it
//! received, and can answer 503/429 with Retry-After, 400, or 401 on demand, stop
//! listening and come back on the same port, require SMART tokens, or serve HTTPS that
//! requires client certificates.
//!
//! The soak test sends `SOAK_MESSAGES` (default 2000) while the aggregator flaps. The
//! 20,000-message run: `SOAK_MESSAGES=20000 cargo test --release --test aggregator soak`.
//! The throughput figure: `cargo test --test aggregator benchmark -- --ignored --nocapture`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use hl7_fhir_gateway::config::Config;
use hl7_fhir_gateway::mapping::Engine;
use hl7_fhir_gateway::mllp::client::{Client, Options};
use hl7_fhir_gateway::outbox;
use hl7_fhir_gateway::server::Gateway;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request the aggregator accepted.
#[derive(Clone, Debug)]
struct Received {
    version: Version,
    /// (Patient id, sequence number from the given name) of each Patient entry, in order.
    patients: Vec<(String, u64)>,
}

#[derive(Default)]
struct Behaviour {
    /// Answers given (and nothing applied) before normal processing: (status, Retry-After).
    script: VecDeque<(u16, Option<String>)>,
    /// 400 with an OperationOutcome when the body contains this text.
    reject_containing: Option<String>,
    /// When set, only these bearer tokens are accepted.
    valid_tokens: Option<HashSet<String>>,
    /// Answer the next request 401 whatever its token.
    unauthorized_once: bool,
    /// Pause before answering.
    delay: Duration,
}

#[derive(Default)]
struct Recorded {
    resources: BTreeMap<String, Value>,
    accepted: Vec<Received>,
    /// Every request that reached the handler: (time, status answered).
    answered: Vec<(Instant, u16)>,
    tokens_issued: usize,
}

#[derive(Default)]
struct Aggregator {
    behaviour: Mutex<Behaviour>,
    recorded: Mutex<Recorded>,
    public_key_pem: Mutex<Option<String>>,
    token_url: Mutex<String>,
}

fn outcome(text: &str) -> Value {
    json!({ "resourceType": "OperationOutcome", "issue": [{ "severity": "error", "code": "invalid", "diagnostics": text }] })
}

async fn transaction(
    State(aggregator): State<Arc<Aggregator>>,
    version: Version,
    headers: HeaderMap,
    body: String,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or("").to_string();
    let delay = aggregator.behaviour.lock().unwrap().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let answer = |status: u16, extra: Option<(&'static str, String)>, body: Value| {
        aggregator.recorded.lock().unwrap().answered.push((Instant::now(), status));
        let mut response = (StatusCode::from_u16(status).unwrap(), body.to_string()).into_response();
        response.headers_mut().insert("content-type", "application/fhir+json".parse().unwrap());
        if let Some((name, value)) = extra {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        response
    };
    assert_eq!(header("content-type"), "application/fhir+json; fhirVersion=4.0");
    assert_eq!(header("accept"), "application/fhir+json; fhirVersion=4.0");
    assert!(header("x-request-id").starts_with("hl7gw-outbox-"));
    assert_eq!(header("x-request-id"), header("idempotency-key"));
    {
        let mut behaviour = aggregator.behaviour.lock().unwrap();
        if behaviour.unauthorized_once {
            behaviour.unauthorized_once = false;
            drop(behaviour);
            return answer(401, None, outcome("token revoked"));
        }
        if let Some(valid) = &behaviour.valid_tokens {
            let token = header("authorization").strip_prefix("Bearer ").unwrap_or("").to_string();
            if !valid.contains(&token) {
                drop(behaviour);
                return answer(401, None, outcome("unknown token"));
            }
        }
        if let Some((status, retry_after)) = behaviour.script.pop_front() {
            drop(behaviour);
            return answer(status, retry_after.map(|value| ("retry-after", value)), outcome("scripted"));
        }
        if behaviour.reject_containing.as_ref().is_some_and(|text| body.contains(text.as_str())) {
            drop(behaviour);
            return answer(400, None, outcome("Patient.identifier is not acceptable"));
        }
    }
    let bundle: Value = serde_json::from_str(&body).expect("the body is JSON");
    assert_eq!(bundle["type"], "transaction");
    let mut seen = HashSet::new();
    let mut patients = Vec::new();
    let mut responses = Vec::new();
    let mut recorded = aggregator.recorded.lock().unwrap();
    for entry in bundle["entry"].as_array().unwrap() {
        assert_eq!(entry["request"]["method"], "PUT");
        let url = entry["request"]["url"].as_str().unwrap().to_string();
        assert!(seen.insert(url.clone()), "a transaction touches {url} twice");
        let resource = entry["resource"].clone();
        if resource["resourceType"] == "Patient" {
            let given = resource["name"][0]["given"][0].as_str().unwrap_or("S0");
            let sequence = given.trim_start_matches('S').parse().unwrap_or(0);
            patients.push((resource["id"].as_str().unwrap().to_string(), sequence));
        }
        recorded.resources.insert(url, resource);
        responses.push(json!({ "response": { "status": "200 OK" } }));
    }
    recorded.accepted.push(Received { version, patients });
    drop(recorded);
    answer(200, None, json!({ "resourceType": "Bundle", "type": "transaction-response", "entry": responses }))
}

/// Token endpoint: checks the client assertion against the registered public key.
async fn token(State(aggregator): State<Arc<Aggregator>>, body: String) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_str(&body).unwrap();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_assertion_type"], "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    assert_eq!(form["scope"], "system/*.write");
    let pem = aggregator.public_key_pem.lock().unwrap().clone().unwrap();
    let key = jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES384);
    let token_url = aggregator.token_url.lock().unwrap().clone();
    validation.set_audience(&[token_url.as_str()]);
    validation.set_issuer(&["gateway-test"]);
    let decoded = match jsonwebtoken::decode::<Value>(&form["client_assertion"], &key, &validation) {
        Ok(decoded) => decoded,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({ "error": "invalid_client", "detail": error.to_string() }).to_string(),
            )
                .into_response()
        }
    };
    assert_eq!(decoded.claims["sub"], "gateway-test");
    assert!(decoded.claims["exp"].as_u64().unwrap() <= decoded.claims["iat"].as_u64().unwrap() + 300);
    let mut recorded = aggregator.recorded.lock().unwrap();
    recorded.tokens_issued += 1;
    let token = format!("token-{}", recorded.tokens_issued);
    drop(recorded);
    aggregator.behaviour.lock().unwrap().valid_tokens.get_or_insert_with(HashSet::new).insert(token.clone());
    axum::Json(json!({ "access_token": token, "token_type": "bearer", "expires_in": 2, "scope": "system/*.write" }))
        .into_response()
}

fn app(aggregator: Arc<Aggregator>) -> Router {
    Router::new().route("/fhir", post(transaction)).route("/token", post(token)).with_state(aggregator)
}

/// A listening aggregator that can be stopped and started again on the same port.
struct Server {
    aggregator: Arc<Aggregator>,
    address: SocketAddr,
    running: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut server = Server { aggregator: Arc::new(Aggregator::default()), address, running: None };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let router = app(self.aggregator.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).with_graceful_shutdown(async move { signal.cancelled().await }).await;
        });
        self.running = Some((stop, task));
    }

    /// Stops listening (open connections are closed).
    async fn down(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Listens again on the same port.
    async fn up(&mut self) {
        let started = Instant::now();
        let listener = loop {
            match TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(error) => {
                    assert!(started.elapsed() < Duration::from_secs(10), "cannot rebind {}: {error}", self.address);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }

    fn endpoint(&self) -> String {
        format!("http://{}/fhir", self.address)
    }
}

fn aggregator_config(endpoint: &str) -> outbox::Config {
    let mut config = outbox::Config::new(endpoint);
    config.retry.initial_backoff_ms = 50;
    config.retry.max_backoff_secs = 1;
    config.timeout_secs = 5;
    config
}

fn gateway_config(directory: &Path, aggregator: outbox::Config) -> Config {
    let mut config = Config { data_dir: directory.to_path_buf(), ..Config::default() };
    config.mllp.listen = "127.0.0.1:0".to_string();
    config.http.listen = "127.0.0.1:0".to_string();
    config.aggregator = Some(aggregator);
    config
}

async fn start_gateway(directory: &Path, aggregator: outbox::Config) -> Gateway {
    Gateway::start(gateway_config(directory, aggregator).validate().unwrap()).await.unwrap()
}

/// An ADT^A08 for patient `patient`, its `sequence`-th message (the given name carries it).
fn adt(patient: usize, sequence: u64) -> String {
    format!(
        "MSH|^~\\&|EPIC|HOSP|GW|GW|20240115083000+0000||ADT^A08^ADT_A01|C-{patient}-{sequence}|P|2.5.1\r\
EVN|A08|20240115083000+0000\r\
PID|1||MRN-{patient}^^^HOSP^MR||Doe{patient}^S{sequence}||19700304|M\r\
PV1|1|I|W^1^A^HOSP||||||||||||||||V-{patient}^^^HOSP^VN\r"
    )
}

/// Sends messages over `connections` MLLP connections; a patient always uses the same
/// connection, so its messages arrive in order.
async fn send_all(gateway: &Gateway, messages: &[(usize, String)], connections: usize) {
    let lane_count = connections.max(1);
    let mut lanes: Vec<Vec<String>> = vec![Vec::new(); lane_count];
    for (patient, text) in messages {
        lanes[patient % lane_count].push(text.clone());
    }
    let mut tasks = Vec::new();
    for lane in lanes {
        let address = gateway.mllp_address.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&Options::plain(address)).await.unwrap();
            for text in lane {
                let ack = client.send(text.as_bytes()).await.unwrap();
                let ack = String::from_utf8_lossy(&ack).into_owned();
                assert!(ack.contains("MSA|AA"), "not accepted: {ack}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// The state an aggregator reaches by applying every message's conversion once, in order.
fn expected_state(messages: &[(usize, String)]) -> BTreeMap<String, Value> {
    let engine = Engine::builtin().unwrap();
    let mut state = BTreeMap::new();
    for (_, text) in messages {
        let converted = engine.convert(text).unwrap();
        for entry in converted.bundle["entry"].as_array().unwrap() {
            state.insert(entry["request"]["url"].as_str().unwrap().to_string(), entry["resource"].clone());
        }
    }
    state
}

async fn wait_for_state(aggregator: &Aggregator, expected: &BTreeMap<String, Value>, within: Duration) {
    let started = Instant::now();
    loop {
        {
            // Compare in full only once every resource is there: the comparison holds the
            // aggregator's lock, and the benchmark must not measure this test's waiting.
            let recorded = aggregator.recorded.lock().unwrap();
            if recorded.resources.len() == expected.len() && recorded.resources == *expected {
                return;
            }
        }
        if started.elapsed() > within {
            let recorded = aggregator.recorded.lock().unwrap();
            let missing = expected.keys().filter(|key| !recorded.resources.contains_key(*key)).count();
            let differing = expected
                .iter()
                .filter(|(key, value)| recorded.resources.get(*key).is_some_and(|got| got != *value))
                .count();
            panic!("aggregator state never matched: {missing} missing, {differing} differing of {}", expected.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Per patient, the sequence numbers the aggregator accepted never go backwards.
fn assert_ordered_per_patient(aggregator: &Aggregator) {
    let recorded = aggregator.recorded.lock().unwrap();
    let mut last: HashMap<String, u64> = HashMap::new();
    for received in &recorded.accepted {
        for (patient, sequence) in &received.patients {
            let previous = last.insert(patient.clone(), *sequence).unwrap_or(0);
            assert!(*sequence >= previous, "patient {patient}: {sequence} accepted after {previous}");
        }
    }
}

async fn http_json(gateway: &Gateway, method: &str, path: &str) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured((*hl7_fhir_gateway::mllp::tls::client_config(&Default::default()).unwrap()).clone())
        .build()
        .unwrap();
    let url = format!("http://{}{path}", gateway.http_address);
    let request = if method == "POST" { client.post(url) } else { client.get(url) };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn messages_for(patients: usize, per_patient: u64) -> Vec<(usize, String)> {
    let mut messages = Vec::new();
    for sequence in 1..=per_patient {
        for patient in 0..patients {
            messages.push((patient, adt(patient, sequence)));
        }
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_bundle_with_fhir_headers_and_reports_it() {
    let server = Server::start().await;
    let directory = tempfile::tempdir().unwrap();
    let gateway = start_gateway(directory.path(), aggregator_config(&server.endpoint())).await;
    let messages = messages_for(3, 3);
    send_all(&gateway, &messages, 1).await;
    wait_for_state(&server.aggregator, &expected_state(&messages), Duration::from_secs(30)).await;
    assert_ordered_per_patient(&server.aggregator);
    let (status, stats) = http_json(&gateway, "GET", "/admin/outbox/stats").await;
    assert_eq!(status, 200);
    let started = Instant::now();
    loop {
        let (_, stats) = http_json(&gateway, "GET", "/admin/outbox/stats").await;
        if stats["status_counts"]["delivered"] == 9 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stats["status_counts"].is_object());
    let metrics = gateway.metrics.encode();
    assert!(metrics.contains("hl7gw_outbox_deliveries_total 9"), "{metrics}");
    assert!(metrics.contains("hl7gw_outbox_depth"));
    let (status, ready) = http_json(&gateway, "GET", "/health/ready").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_outage_delays_but_loses_nothing_and_keeps_patient_order() {
    let mut server = Server::start().await;
    server.down().await;
    let directory = tempfile::tempdir().unwrap();
    let mut config = aggregator_config(&server.endpoint());
    config.degraded_after_secs = 1;
    let gateway = start_gateway(directory.path(), config).await;
    let messages = messages_for(4, 6);
    send_all(&gateway, &messages, 2).await;
    // Down for a while: retries, and readiness says degraded (200, so ingest continues).
    let started = Instant::now();
    loop {
        let (status, ready) = http_json(&gateway, "GET", "/health/ready").await;
        if ready["status"] == "degraded" {
            assert_eq!(status, 200);
            assert!(ready["reason"].as_str().unwrap().contains("oldest undelivered"));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never degraded: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!gateway.metrics.encode().contains("hl7gw_outbox_retries_total 0"));
    server.up().await;
    wait_for_state(&server.aggregator, &expected_state(&messages), Duration::from_secs(60)).await;
    assert_ordered_per_patient(&server.aggregator);
    let started = Instant::now();
    while http_json(&gateway, "GET", "/health/ready").await.1["status"] != "ready" {
        assert!(started.elapsed() < Duration::from_secs(10), "readiness never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_503_and_429_are_retried_honouring_retry_after() {
    let server = Server::start().await;
    server.aggregator.behaviour.lock().unwrap().script = VecDeque::from([(503, None), (429, Some("1".to_string()))]);
    let directory = tempfile::tempdir().unwrap();
    let gateway = start_gateway(directory.path(), aggregator_config(&server.endpoint())).await;
    let messages = messages_for(1, 1);
    send_all(&gateway, &messages, 1).await;
    wait_for_state(&server.aggregator, &expected_state(&messages), Duration::from_secs(30)).await;
    {
        let recorded = server.aggregator.recorded.lock().unwrap();
        let statuses: Vec<u16> = recorded.answered.iter().map(|(_, status)| *status).collect();
        assert_eq!(statuses, [503, 429, 200]);
        let waited = recorded.answered[2].0 - recorded.answered[1].0;
        assert!(waited >= Duration::from_millis(950), "Retry-After: 1 not honoured: {waited:?}");
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_bundle_is_dead_lettered_then_requeued_and_delivered_after_the_fix() {
    let server = Server::start().await;
    server.aggregator.behaviour.lock().unwrap().reject_containing = Some("\"Doe1\"".to_string());
    let directory = tempfile::tempdir().unwrap();
    let gateway = start_gateway(directory.path(), aggregator_config(&server.endpoint())).await;
    let messages = messages_for(3, 1);
    send_all(&gateway, &messages, 1).await;
    let good: Vec<(usize, String)> = messages.iter().filter(|(patient, _)| *patient != 1).cloned().collect();
    wait_for_state(&server.aggregator, &expected_state(&good), Duration::from_secs(30)).await;
    let started = Instant::now();
    let dead = loop {
        let (status, listed) = http_json(&gateway, "GET", "/admin/outbox?status=dead").await;
        assert_eq!(status, 200);
        if listed["outbox"].as_array().is_some_and(|rows| !rows.is_empty()) {
            break listed["outbox"][0].clone();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "nothing dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead["last_status"], 400);
    let id = dead["id"].as_i64().unwrap();
    let (_, detail) = http_json(&gateway, "GET", &format!("/admin/outbox/{id}")).await;
    assert_eq!(detail["response"]["resourceType"], "OperationOutcome");
    assert_eq!(detail["bundle"]["type"], "transaction");
    assert!(gateway.metrics.encode().contains("hl7gw_outbox_dead_letters_total 1"));
    // The aggregator is fixed; the operator requeues.
    server.aggregator.behaviour.lock().unwrap().reject_containing = None;
    let (status, answer) = http_json(&gateway, "POST", "/admin/outbox/requeue?status=dead").await;
    assert_eq!((status, answer["requeued"].as_i64()), (200, Some(1)));
    wait_for_state(&server.aggregator, &expected_state(&messages), Duration::from_secs(30)).await;
    let (status, _) = http_json(&gateway, "POST", &format!("/admin/outbox/{id}/requeue")).await;
    assert!(status == 200 || status == 422, "requeue of a delivered row answers {status}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_backend_services_tokens_are_obtained_renewed_on_expiry_and_after_a_401() {
    let server = Server::start().await;
    let directory = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let key_file = directory.path().join("client-key.pem");
    std::fs::write(&key_file, pair.serialize_pem()).unwrap();
    *server.aggregator.public_key_pem.lock().unwrap() = Some(pair.public_key_pem());
    let token_url = format!("http://{}/token", server.address);
    *server.aggregator.token_url.lock().unwrap() = token_url.clone();
    server.aggregator.behaviour.lock().unwrap().valid_tokens = Some(HashSet::new());
    let mut config = aggregator_config(&server.endpoint());
    config.auth = Some(outbox::config::AuthConfig {
        smart: Some(outbox::config::SmartConfig {
            token_url,
            client_id: "gateway-test".to_string(),
            private_key_file: key_file,
            algorithm: outbox::config::SmartAlgorithm::ES384,
            scope: "system/*.write".to_string(),
            key_id: Some("k1".to_string()),
        }),
        ..Default::default()
    });
    let gateway = start_gateway(directory.path(), config).await;
    let first = messages_for(1, 1);
    send_all(&gateway, &first, 1).await;
    wait_for_state(&server.aggregator, &expected_state(&first), Duration::from_secs(30)).await;
    assert_eq!(server.aggregator.recorded.lock().unwrap().tokens_issued, 1);
    // The token lives 2 s: after that a new one is fetched before the next push.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut messages = messages_for(1, 2);
    send_all(&gateway, &messages[1..], 1).await;
    wait_for_state(&server.aggregator, &expected_state(&messages), Duration::from_secs(30)).await;
    assert_eq!(server.aggregator.recorded.lock().unwrap().tokens_issued, 2);
    // A 401 with a still-fresh token forces a renewal and the push goes through.
    server.aggregator.behaviour.lock().unwrap().unauthorized_once = true;
    messages.push((0, adt(0, 3)));
    send_all(&gateway, &messages[2..], 1).await;
    wait_for_state(&server.aggregator, &expected_state(&messages), Duration::from_secs(30)).await;
    assert_eq!(server.aggregator.recorded.lock().unwrap().tokens_issued, 3);
    assert!(gateway.metrics.encode().contains("hl7gw_outbox_dead_letters_total 0"));
    gateway.stop().await;
}

fn new_ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "Aggregator test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    (certificate, rcgen::Issuer::new(params, key))
}

fn new_leaf(
    purpose: rcgen::ExtendedKeyUsagePurpose,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    let key = rcgen::KeyPair::generate().unwrap();
    (params.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_custom_ca_over_http2() {
    let directory = tempfile::tempdir().unwrap();
    let (ca, issuer) = new_ca();
    let (server_cert, server_key) = new_leaf(rcgen::ExtendedKeyUsagePurpose::ServerAuth, &issuer);
    let (client_cert, client_key) = new_leaf(rcgen::ExtendedKeyUsagePurpose::ClientAuth, &issuer);
    let write = |name: &str, text: &str| {
        let path = directory.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_file = write("ca.pem", &ca.pem());
    let tls = hl7_fhir_gateway::mllp::TlsConfig {
        cert_file: write("server.pem", &server_cert),
        key_file: write("server.key", &server_key),
        client_ca_file: Some(ca_file.clone()),
        handshake_timeout_secs: 5,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(
        hl7_fhir_gateway::mllp::tls::server_config_with_alpn(&tls, &[b"h2".to_vec(), b"http/1.1".to_vec()]).unwrap(),
    );
    let aggregator = Arc::new(Aggregator::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(hl7_fhir_gateway::http::serve_tls(
        listener,
        acceptor,
        Duration::from_secs(5),
        app(aggregator.clone()),
        stop.clone(),
    ));
    let mut config = aggregator_config(&format!("https://localhost:{port}/fhir"));
    config.tls = Some(outbox::config::TlsConfig {
        ca_file: Some(ca_file),
        cert_file: Some(write("client.pem", &client_cert)),
        key_file: Some(write("client.key", &client_key)),
    });
    let gateway = start_gateway(directory.path(), config).await;
    let messages = messages_for(2, 2);
    send_all(&gateway, &messages, 1).await;
    wait_for_state(&aggregator, &expected_state(&messages), Duration::from_secs(30)).await;
    assert!(aggregator.recorded.lock().unwrap().accepted.iter().all(|received| received.version == Version::HTTP_2));
    gateway.stop().await;

    // Without the client certificate the handshake fails: nothing is delivered, all retried.
    let other = tempfile::tempdir().unwrap();
    let mut config = aggregator_config(&format!("https://localhost:{port}/fhir"));
    config.tls =
        Some(outbox::config::TlsConfig { ca_file: Some(directory.path().join("ca.pem")), ..Default::default() });
    let gateway = start_gateway(other.path(), config).await;
    let before = aggregator.recorded.lock().unwrap().accepted.len();
    send_all(&gateway, &[(7, adt(7, 1))], 1).await;
    let started = Instant::now();
    while gateway.metrics.encode().contains("hl7gw_outbox_retries_total 0") {
        assert!(started.elapsed() < Duration::from_secs(20), "no retry without a client certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(aggregator.recorded.lock().unwrap().accepted.len(), before);
    gateway.stop().await;
    stop.cancel();
    let _ = serving.await;
}

/// Sends `SOAK_MESSAGES` across many patients while the aggregator goes down and up and
/// answers 503s; then the aggregator's state must equal converting every message once.
/// The real binary as a child process, on a config file; its MLLP address comes from the
/// `gateway listening` log line.
struct ChildGateway {
    child: std::process::Child,
    mllp: String,
}

impl ChildGateway {
    fn start(config: &Path) -> ChildGateway {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hl7-fhir-gateway"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("HL7GW_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot spawn the gateway binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = std::sync::mpsc::channel::<String>();
        // Drains stderr for the child's whole life, so that logging never blocks it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway did not log `gateway listening`");
            };
            if let (true, Some(start)) = (line.contains("gateway listening"), line.find("mllp=")) {
                let mllp: String = line[start + 5..].chars().take_while(|c| !c.is_whitespace()).collect();
                return ChildGateway { child, mllp };
            }
        }
    }

    fn kill(mut self) {
        self.child.kill().expect("cannot kill the gateway");
        self.child.wait().expect("cannot reap the gateway");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_delivery_loses_nothing_and_repeats_are_harmless() {
    let server = Server::start().await;
    // Slow answers keep deliveries in flight when the gateway is killed.
    server.aggregator.behaviour.lock().unwrap().delay = Duration::from_millis(300);
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\ndata_dir: {}\nmllp:\n  listen: 127.0.0.1:0\nhttp:\n  listen: 127.0.0.1:0\n\
             aggregator:\n  endpoint: {}\n  max_in_flight: 4\n  retry:\n    initial_backoff_ms: 50\n    max_backoff_secs: 1\n",
            directory.path().join("data").display(),
            server.endpoint()
        ),
    )
    .unwrap();
    let messages = messages_for(8, 3);
    let gateway = ChildGateway::start(&config);
    let mut client = Client::connect(&Options::plain(gateway.mllp.clone())).await.unwrap();
    for (_, text) in &messages {
        let ack = String::from_utf8_lossy(&client.send(text.as_bytes()).await.unwrap()).into_owned();
        assert!(ack.contains("MSA|AA"), "not accepted: {ack}");
    }
    // Kill once the aggregator has started answering (deliveries are under way), before it
    // can have received everything.
    let started = Instant::now();
    while server.aggregator.recorded.lock().unwrap().answered.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "no delivery ever reached the aggregator");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gateway.kill();
    let before_restart = server.aggregator.recorded.lock().unwrap().resources.len();
    let expected = expected_state(&messages);
    assert!(before_restart < expected.len(), "everything was delivered before the kill; the test proves nothing");

    server.aggregator.behaviour.lock().unwrap().delay = Duration::ZERO;
    let restarted = ChildGateway::start(&config);
    wait_for_state(&server.aggregator, &expected, Duration::from_secs(60)).await;
    assert_ordered_per_patient(&server.aggregator);
    restarted.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_a_flapping_aggregator() {
    let total: usize = std::env::var("SOAK_MESSAGES").ok().and_then(|value| value.parse().ok()).unwrap_or(2000);
    let deadline =
        Duration::from_secs(std::env::var("SOAK_DEADLINE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(600));
    let patients = (total / 10).clamp(1, 2000);
    let per_patient = total.div_ceil(patients) as u64;
    let messages: Vec<(usize, String)> = messages_for(patients, per_patient).into_iter().take(total).collect();
    let server = Arc::new(tokio::sync::Mutex::new(Server::start().await));
    let aggregator = server.lock().await.aggregator.clone();
    let endpoint = server.lock().await.endpoint();
    let directory = tempfile::tempdir().unwrap();
    let gateway = start_gateway(directory.path(), aggregator_config(&endpoint)).await;
    let started = Instant::now();
    let flapping = CancellationToken::new();
    let flapper = {
        let (server, flapping, aggregator) = (server.clone(), flapping.clone(), aggregator.clone());
        tokio::spawn(async move {
            let mut round = 0u32;
            while !flapping.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(700)).await;
                round += 1;
                if round.is_multiple_of(3) {
                    server.lock().await.down().await;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    server.lock().await.up().await;
                } else {
                    let mut behaviour = aggregator.behaviour.lock().unwrap();
                    behaviour.script.extend([(503, None), (503, None), (429, Some("0".to_string()))]);
                }
            }
        })
    };
    send_all(&gateway, &messages, 4).await;
    let sent_in = started.elapsed();
    // Flap a little longer after the last message, then let it settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    flapping.cancel();
    flapper.await.unwrap();
    let expected = expected_state(&messages);
    let remaining = deadline.saturating_sub(started.elapsed());
    wait_for_state(&aggregator, &expected, remaining).await;
    let delivered_in = started.elapsed();
    assert_ordered_per_patient(&aggregator);
    let requests = aggregator.recorded.lock().unwrap().accepted.len();
    eprintln!(
        "soak: {total} messages for {patients} patients sent in {sent_in:?}, all delivered in {delivered_in:?} \
         ({requests} accepted requests)"
    );
    gateway.stop().await;
}

/// Delivered Bundles per second to a local aggregator that answers at once. The messages
/// are ingested while the aggregator is down, then it comes up and the drain is timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn benchmark_delivered_bundles_per_second() {
    let total: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|value| value.parse().ok()).unwrap_or(5000);
    let patients = std::env::var("BENCH_PATIENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(total);
    let per_patient = total.div_ceil(patients) as u64;
    let messages: Vec<(usize, String)> = messages_for(patients, per_patient).into_iter().take(total).collect();
    let mut server = Server::start().await;
    server.down().await;
    let directory = tempfile::tempdir().unwrap();
    let gateway = start_gateway(directory.path(), aggregator_config(&server.endpoint())).await;
    send_all(&gateway, &messages, 4).await;
    // Wait until the pipeline has queued every message.
    let database = gateway.database.clone();
    loop {
        let connection = rusqlite::Connection::open(&database).unwrap();
        let queued: i64 = connection.query_row("SELECT count(*) FROM outbox", [], |row| row.get(0)).unwrap();
        if queued as usize >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the backoff of the failed attempts run out before timing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.up().await;
    let started = Instant::now();
    wait_for_state(&server.aggregator, &expected_state(&messages), Duration::from_secs(900)).await;
    let took = started.elapsed();
    let requests = server.aggregator.recorded.lock().unwrap().accepted.len();
    eprintln!(
        "benchmark: {total} messages ({patients} patients) delivered in {took:?}: {:.0} messages/s in {requests} \
         requests ({:.0} requests/s)",
        total as f64 / took.as_secs_f64(),
        requests as f64 / took.as_secs_f64()
    );
    gateway.stop().await;
}
