//! End to end: HL7 v2 messages sent over MLLP come out of the FHIR API.
//!
//! A gateway runs in-process on loopback port 0. ADT and ORU messages go in over MLLP; the
//! test then searches and reads the resulting resources over HTTP, checks that an A08
//! updates the Patient the A01 created (a second version, same id), that a message the
//! mappings cannot handle is `failed` and can be reprocessed through the admin API, and
//! finally lets a FHIR client library we did not write (`fhir-kit-client`, Node.js) read
//! the same data (skipped, visibly, when it is not installed; `.ci/run` installs it and sets
//! `REQUIRE_FHIR_CLIENT=1`).

use std::path::Path;
use std::time::{Duration, Instant};

use hl7_fhir_gateway::config::Config;
use hl7_fhir_gateway::mllp::client::{Client, Options};
use hl7_fhir_gateway::mllp::tls::{client_config, ClientTls};
use hl7_fhir_gateway::server::Gateway;
use serde_json::Value;

/// How long a message may take from its ACK to being found by a FHIR search.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);

const A01: &str = "MSH|^~\\&|EPIC|GOODHEALTH|GW|GW|202401150830||ADT^A01^ADT_A01|E2E-A01|P|2.5.1\r\
EVN|A01|202401150830\r\
PID|1||E2E-MRN-1^^^GOODHEALTH^MR||Doe^Jane^Q||19800102|F|||12 Main St^^Springfield^IL^62701||^PRN^PH^^^217^5551234\r\
PV1|1|I|ICU^101^A^GOODHEALTH||||1234^Welby^Marcus^^^Dr|||MED||||||||E2E-VISIT-1^^^GOODHEALTH^VN|||||||||||||||||||||||||202401150800\r";

const A08: &str = "MSH|^~\\&|EPIC|GOODHEALTH|GW|GW|202401151000||ADT^A08^ADT_A01|E2E-A08|P|2.5.1\r\
EVN|A08|202401151000\r\
PID|1||E2E-MRN-1^^^GOODHEALTH^MR||Doe^Janet^Q||19800102|F|||99 Oak Ave^^Springfield^IL^62704||^PRN^PH^^^217^5559999\r\
PV1|1|I|ICU^102^A^GOODHEALTH||||1234^Welby^Marcus^^^Dr|||MED||||||||E2E-VISIT-1^^^GOODHEALTH^VN|||||||||||||||||||||||||202401150800\r";

const ORU: &str = "MSH|^~\\&|LAB|GOODHEALTH|GW|GW|202401151200||ORU^R01^ORU_R01|E2E-ORU|P|2.5.1\r\
PID|1||E2E-MRN-1^^^GOODHEALTH^MR||Doe^Janet^Q||19800102|F\r\
OBR|1|ORD-1|FIL-1^LAB|2345-7^Glucose^LN|||202401151130|||||||||||||||202401151150||CH|F\r\
OBX|1|NM|2345-7^Glucose^LN||98|mg/dL^mg/dL^UCUM|70-99|N|||F|||202401151130\r";

/// A message type no mapping handles: it is ACKed (stored) but fails to convert.
const UNMAPPED: &str = "MSH|^~\\&|EPIC|GOODHEALTH|GW|GW|202401151300||ZZZ^Z99|E2E-ZZZ|P|2.5.1\r\
PID|1||E2E-MRN-1^^^GOODHEALTH^MR||Doe^Janet\r";

fn config_in(directory: &Path) -> Config {
    let mut config = Config { data_dir: directory.to_path_buf(), ..Config::default() };
    config.mllp.listen = "127.0.0.1:0".to_string();
    config.http.listen = "127.0.0.1:0".to_string();
    config
}

fn http_client() -> reqwest::Client {
    let tls = client_config(&ClientTls::default()).unwrap();
    reqwest::Client::builder().tls_backend_preconfigured((*tls).clone()).build().unwrap()
}

async fn send_all(gateway: &Gateway, messages: &[&str]) {
    let mut client = Client::connect(&Options::plain(gateway.mllp_address.to_string())).await.unwrap();
    for message in messages {
        let ack = client.send(message.as_bytes()).await.unwrap();
        let ack = String::from_utf8_lossy(&ack).into_owned();
        assert!(ack.contains("MSA|AA"), "not accepted: {ack}");
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = http.get(url).header("accept", "application/fhir+json").send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls a search until it has at least `minimum` matches; returns the Bundle and the time
/// it took.
async fn search_until(http: &reqwest::Client, url: &str, minimum: u64) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let (status, bundle) = get_json(http, url).await;
        assert_eq!(status, 200, "{url}: {bundle}");
        if bundle["total"].as_u64().unwrap_or(0) >= minimum {
            return (bundle, started.elapsed());
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{url} never matched: {bundle}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_over_mllp_are_searchable_and_readable() {
    let directory = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config_in(directory.path()).validate().unwrap()).await.unwrap();
    let base = format!("http://{}/fhir", gateway.http_address);
    let http = http_client();

    send_all(&gateway, &[A01]).await;
    let patient_search = format!("{base}/Patient?identifier=E2E-MRN-1");
    let (bundle, took) = search_until(&http, &patient_search, 1).await;
    eprintln!("A01 visible to search {took:?} after its ACK");
    assert!(took <= VISIBLE_WITHIN, "A01 took {took:?} to become searchable");
    let patient_id = bundle["entry"][0]["resource"]["id"].as_str().unwrap().to_string();
    assert_eq!(bundle["entry"][0]["resource"]["name"][0]["given"][0], "Jane");

    // The A08 updates the same Patient: a second version under the same id.
    // The A08 alone first: the ORU's PID updates the Patient again (version 3), so sending
    // both at once could skip the version 2 this checks.
    send_all(&gateway, &[A08]).await;
    let started = Instant::now();
    let patient = loop {
        let (status, patient) = get_json(&http, &format!("{base}/Patient/{patient_id}")).await;
        assert_eq!(status, 200);
        if patient["meta"]["versionId"] == "2" {
            break patient;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "A08 never applied: {patient}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(patient["name"][0]["given"][0], "Janet");
    let (status, first) = get_json(&http, &format!("{base}/Patient/{patient_id}/_history/1")).await;
    assert_eq!(status, 200);
    assert_eq!(first["name"][0]["given"][0], "Jane");

    // The ORU's Observation is found by patient and by code.
    send_all(&gateway, &[ORU]).await;
    let (observations, took) =
        search_until(&http, &format!("{base}/Observation?patient={patient_id}&code=http://loinc.org|2345-7"), 1).await;
    assert!(took <= VISIBLE_WITHIN, "ORU took {took:?} to become searchable");
    assert_eq!(observations["entry"][0]["resource"]["valueQuantity"]["value"], 98);
    let (chained, _) = search_until(&http, &format!("{base}/Observation?patient.identifier=E2E-MRN-1"), 1).await;
    assert_eq!(chained["total"], observations["total"]);

    // A message no mapping handles was ACKed (stored) but failed to convert; the operator
    // sees it and can reprocess it.
    send_all(&gateway, &[UNMAPPED]).await;
    let started = Instant::now();
    let failed = loop {
        let (status, answer) =
            get_json(&http, &format!("http://{}/admin/messages?status=failed", gateway.http_address)).await;
        assert_eq!(status, 200, "{answer}");
        if let Some(message) = answer["messages"].as_array().and_then(|messages| messages.first()).cloned() {
            break message;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the unmapped message never failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(failed["control_id"], "E2E-ZZZ");
    assert!(failed["error"].as_str().unwrap().contains("no mapping handles"), "{failed}");
    let id = failed["id"].as_i64().unwrap();
    let response =
        http.post(format!("http://{}/admin/messages/{id}/reprocess", gateway.http_address)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Still unmapped, so it fails again, with a second attempt counted.
    let started = Instant::now();
    loop {
        let (_, detail) = get_json(&http, &format!("http://{}/admin/messages/{id}", gateway.http_address)).await;
        if detail["attempts"] == 2 && detail["status"] == "failed" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "reprocessing never ran: {detail}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    run_fhir_kit_client(&base, &patient_id).await;
    gateway.stop().await;
}

/// Reads the data with fhir-kit-client (Node.js), a FHIR client we did not write.
async fn run_fhir_kit_client(base: &str, patient_id: &str) {
    let Some(modules) = std::env::var_os("FHIR_KIT_CLIENT_DIR") else {
        assert!(
            std::env::var_os("REQUIRE_FHIR_CLIENT").is_none(),
            "REQUIRE_FHIR_CLIENT is set but FHIR_KIT_CLIENT_DIR (a folder whose node_modules has fhir-kit-client) is not"
        );
        eprintln!("SKIPPED: fhir-kit-client check (set FHIR_KIT_CLIENT_DIR; .ci/run installs it)");
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/fhir_kit_client.mjs");
    let (base, patient_id) = (base.to_string(), patient_id.to_string());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .arg(base)
            .arg(patient_id)
            .env("FHIR_KIT_CLIENT_DIR", &modules)
            .output()
    })
    .await
    .unwrap()
    .expect("cannot run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "fhir-kit-client check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("fhir-kit-client: ok"), "{stdout}");
    eprintln!("{stdout}");
}
