//! Black-box tests of the FHIR R4 REST API (`/fhir`) and the operator API's access rules:
//! every interaction, every search feature the README promises and every error status,
//! through the router (`tower::ServiceExt::oneshot`) and, for a representative subset, over
//! real HTTP with `reqwest`.
//!
//! The fixture is a fresh database per test holding a small, realistic set of R4 resources
//! (patients with identifiers, names, telecoms, addresses and birth dates; encounters;
//! laboratory and vital-sign observations; a report, an order, an appointment, a document,
//! a practitioner and a location), some updated to a second version and one deleted.
//! Every FHIR body a test receives is checked to be valid R4 ([`check_r4`]) by the one
//! helper that performs requests.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, Response, StatusCode};
use axum::Router;
use hl7_fhir_gateway::api::{self, admin::AdminState, ApiState};
use hl7_fhir_gateway::auth::{self, Verifier};
use hl7_fhir_gateway::mapping::{Engine, Sources};
use hl7_fhir_gateway::pipeline::{self, Wakeup};
use hl7_fhir_gateway::store::{self, Store};
use hl7_fhir_gateway::telemetry::Metrics;
use serde_json::{json, Value};
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// 2024-06-01T00:00:00Z: when the fixture's first versions are written.
const CREATED_US: i64 = 1_717_200_000_000_000;
/// 2024-06-10T00:00:00Z: when the fixture's second versions (and the deletion) are written.
const UPDATED_US: i64 = 1_717_977_600_000_000;
/// `Last-Modified` of the second versions.
const UPDATED_HTTP: &str = "Mon, 10 Jun 2024 00:00:00 GMT";
/// Observations of `pat-4`, for paging.
const SERIES: usize = 25;

const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

fn patient(id: &str, family: &str, given: &[&str], gender: &str, birth_date: &str, mrn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"use": "usual", "system": MRN, "value": mrn}],
        "active": true,
        "name": [{"use": "official", "family": family, "given": given}],
        "gender": gender,
        "birthDate": birth_date,
    })
}

#[allow(clippy::too_many_arguments)]
fn observation(
    id: &str,
    patient: &str,
    encounter: Option<&str>,
    status: &str,
    category: &str,
    (code, display): (&str, &str),
    effective: &str,
    (value, unit): (f64, &str),
) -> Value {
    let mut observation = json!({
        "resourceType": "Observation",
        "id": id,
        "status": status,
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": effective,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    });
    if let Some(encounter) = encounter {
        observation["encounter"] = json!({"reference": format!("Encounter/{encounter}")});
    }
    observation
}

/// The fixture's first versions, in writing order.
fn resources() -> Vec<Value> {
    let mut jane = patient("pat-1", "Doe", &["Jane", "Q"], "female", "1980-01-02", "MRN001");
    jane["telecom"] = json!([
        {"system": "phone", "value": "217-555-1234", "use": "home"},
        {"system": "email", "value": "jane.doe@example.org"}
    ]);
    jane["address"] = json!([{"use": "home", "line": ["12 Main St"], "city": "Springfield", "state": "IL",
        "postalCode": "62701", "country": "US"}]);
    jane["generalPractitioner"] = json!([{"reference": "Practitioner/prac-1"}]);
    let mut john = patient("pat-2", "Smith", &["John"], "male", "1975-06", "MRN002");
    john["telecom"] = json!([{"system": "phone", "value": "555-0002"}]);
    john["address"] = json!([{"city": "New York", "postalCode": "10001"}]);
    let mut anna = patient("pat-3", "Müller", &["Anna"], "female", "1990-03-15", "MRN003");
    anna["telecom"] = json!([{"system": "email", "value": "anna@example.ch"}]);
    anna["address"] = json!([{"city": "Zürich", "postalCode": "8000", "country": "CH"}]);
    let mark = patient("pat-4", "Doeson", &["Mark"], "male", "2001", "MRN004");
    let gone = patient("pat-del", "Removed", &["Rita"], "female", "1966-06-06", "MRN999");

    let mut resources = vec![
        json!({"resourceType": "Practitioner", "id": "prac-1", "active": true,
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
            "name": [{"family": "Welby", "given": ["Marcus"], "prefix": ["Dr"]}]}),
        json!({"resourceType": "Location", "id": "loc-1", "status": "active", "name": "ICU Room 101",
            "identifier": [{"system": "urn:hosp:location", "value": "ICU-101"}]}),
        jane,
        john,
        anna,
        mark,
        gone,
        json!({"resourceType": "Encounter", "id": "enc-1", "status": "finished",
            "identifier": [{"system": "urn:hosp:visit", "value": "V001"}],
            "class": {"system": ACT_CODE, "code": "IMP", "display": "inpatient encounter"},
            "subject": {"reference": "Patient/pat-1"},
            "participant": [{"individual": {"reference": "Practitioner/prac-1"}}],
            "period": {"start": "2024-01-15T08:00:00Z", "end": "2024-01-20T10:00:00Z"},
            "location": [{"location": {"reference": "Location/loc-1"}}]}),
        json!({"resourceType": "Encounter", "id": "enc-2", "status": "in-progress",
            "identifier": [{"system": "urn:hosp:visit", "value": "V002"}],
            "class": {"system": ACT_CODE, "code": "AMB", "display": "ambulatory"},
            "subject": {"reference": "Patient/pat-1"},
            "period": {"start": "2024-03-01T09:00:00Z"}}),
        json!({"resourceType": "Encounter", "id": "enc-3", "status": "finished",
            "identifier": [{"system": "urn:hosp:visit", "value": "V003"}],
            "class": {"system": ACT_CODE, "code": "EMER", "display": "emergency"},
            "subject": {"reference": "Patient/pat-2"},
            "period": {"start": "2023-11-05T02:00:00Z", "end": "2023-11-05T12:00:00Z"},
            "location": [{"location": {"reference": "Location/loc-1"}}]}),
        observation(
            "obs-glu-1",
            "pat-1",
            Some("enc-1"),
            "final",
            "laboratory",
            ("2345-7", "Glucose"),
            "2024-01-15T11:30:00Z",
            (98.0, "mg/dL"),
        ),
        observation(
            "obs-glu-2",
            "pat-1",
            Some("enc-1"),
            "preliminary",
            "laboratory",
            ("2345-7", "Glucose"),
            "2024-01-16T07:00:00Z",
            (130.0, "mg/dL"),
        ),
        observation(
            "obs-hb",
            "pat-2",
            Some("enc-3"),
            "preliminary",
            "laboratory",
            ("718-7", "Hemoglobin"),
            "2023-11-05T10:00:00Z",
            (13.5, "g/dL"),
        ),
        observation(
            "obs-hr",
            "pat-1",
            Some("enc-2"),
            "amended",
            "vital-signs",
            ("8867-4", "Heart rate"),
            "2024-03-01T09:30:00Z",
            (72.0, "/min"),
        ),
        observation(
            "obs-glu-3",
            "pat-3",
            None,
            "final",
            "laboratory",
            ("2345-7", "Glucose"),
            "2022-06-10T08:00:00Z",
            (5.4, "mmol/L"),
        ),
        json!({"resourceType": "DiagnosticReport", "id": "dr-1", "status": "final",
            "identifier": [{"system": "urn:hosp:report", "value": "RPT-1"}],
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
            "code": {"coding": [{"system": LOINC, "code": "24323-8", "display": "Comprehensive metabolic panel"}]},
            "subject": {"reference": "Patient/pat-1"}, "encounter": {"reference": "Encounter/enc-1"},
            "effectiveDateTime": "2024-01-15T11:30:00Z", "issued": "2024-01-15T12:00:00Z",
            "result": [{"reference": "Observation/obs-glu-1"}, {"reference": "Observation/obs-glu-2"}]}),
        json!({"resourceType": "ServiceRequest", "id": "sr-1", "status": "active", "intent": "order",
            "identifier": [{"system": "urn:hosp:placer", "value": "ORD-1"}],
            "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}]},
            "subject": {"reference": "Patient/pat-1"}, "encounter": {"reference": "Encounter/enc-1"},
            "authoredOn": "2024-01-15T09:00:00Z", "requester": {"reference": "Practitioner/prac-1"}}),
        json!({"resourceType": "Appointment", "id": "appt-1", "status": "booked",
        "identifier": [{"system": "urn:hosp:appointment", "value": "APT-1"}],
        "start": "2024-05-01T09:00:00Z", "end": "2024-05-01T09:30:00Z",
        "participant": [
            {"actor": {"reference": "Patient/pat-2"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/prac-1"}, "status": "accepted"}
        ]}),
        json!({"resourceType": "DocumentReference", "id": "doc-1", "status": "current",
            "identifier": [{"system": "urn:hosp:document", "value": "DOC-1"}],
            "type": {"coding": [{"system": LOINC, "code": "11506-3", "display": "Progress note"}]},
            "subject": {"reference": "Patient/pat-1"}, "date": "2024-01-20T10:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain", "data": "SGVsbG8gd29ybGQ="}}],
            "context": {"encounter": [{"reference": "Encounter/enc-1"}]}}),
    ];
    for index in 0..SERIES {
        let day = jiff::civil::date(2023, 1, 1).checked_add(jiff::Span::new().days(index as i64)).unwrap();
        resources.push(observation(
            &format!("obs-wt-{index:02}"),
            "pat-4",
            None,
            "final",
            "vital-signs",
            ("29463-7", "Body weight"),
            &format!("{day}T08:00:00Z"),
            (60.0 + index as f64 * 0.5, "kg"),
        ));
    }
    resources
}

/// A temporary database with the fixture's resources, and the API over it.
struct Fixture {
    _directory: tempfile::TempDir,
    database: PathBuf,
    router: Router,
}

fn write(database: &Path, resources: &[Value], now_us: i64) {
    let mut connection = hl7_fhir_gateway::db::open(database).unwrap();
    let transaction = connection.transaction().unwrap();
    for (index, resource) in resources.iter().enumerate() {
        store::put(&transaction, resource, now_us + index as i64 * 1_000_000, None).unwrap();
    }
    transaction.commit().unwrap();
}

fn seed(database: &Path) {
    write(database, &resources(), CREATED_US);
    // Second versions: Jane moved; the second glucose became final.
    let mut jane = resources().into_iter().find(|resource| resource["id"] == "pat-1").unwrap();
    jane["address"][0]["line"] = json!(["99 Oak Ave"]);
    jane["address"][0]["postalCode"] = json!("62704");
    let mut glucose = resources().into_iter().find(|resource| resource["id"] == "obs-glu-2").unwrap();
    glucose["status"] = json!("final");
    write(database, &[jane, glucose], UPDATED_US);
    let mut connection = hl7_fhir_gateway::db::open(database).unwrap();
    let transaction = connection.transaction().unwrap();
    assert_eq!(store::delete(&transaction, "Patient", "pat-del", UPDATED_US + 5_000_000, None).unwrap(), Some(2));
    transaction.commit().unwrap();
}

fn state(database: &Path, verifier: Option<Arc<Verifier>>, auth: Option<auth::Settings>, sources: Sources) -> ApiState {
    ApiState {
        store: Store::open(database, 4).unwrap(),
        verifier,
        auth,
        public_url: None,
        scheme: "http",
        metrics: Arc::new(Metrics::new()),
        admin: Arc::new(AdminState {
            database: database.to_path_buf(),
            journal: database.with_file_name(hl7_fhir_gateway::db::JOURNAL_FILE),
            engine: pipeline::shared(Engine::builtin().unwrap()),
            sources,
            wakeup: Arc::new(Wakeup::default()),
            outbox: None,
        }),
    }
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_sources(Sources::default())
    }

    fn with_sources(sources: Sources) -> Fixture {
        let directory = tempfile::tempdir().unwrap();
        let database = directory.path().join("gateway.db");
        seed(&database);
        let router = api::router(state(&database, None, None, sources));
        Fixture { _directory: directory, database, router }
    }
}

// ---------------------------------------------------------------------------------------
// Requests and checks
// ---------------------------------------------------------------------------------------

/// Fails unless `value` survives fhir-sdk's typed R4 model unchanged.
fn check_r4(value: &Value) {
    if let Err(error) = hl7_fhir_gateway::fhir::validate::validate_resource(value) {
        panic!("response is not valid FHIR R4: {error}\n{value:#}");
    }
}

/// A response, with the body decompressed when it was gzip-encoded.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    /// The body as sent (possibly gzip).
    raw: Bytes,
    /// The body after content decoding.
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The JSON body (already validated as R4 when it is a FHIR resource).
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("{}: body is not JSON ({error}): {:?}", self.status, self.body))
    }

    /// Asserts a 200 with a FHIR body and returns it.
    fn ok(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{:?}", String::from_utf8_lossy(&self.body));
        self.json()
    }
}

/// Decodes gzip through tower-http's client-side decompression.
async fn gunzip(raw: Bytes) -> Bytes {
    let service = tower_http::decompression::Decompression::new(tower::service_fn(move |_: Request<Body>| {
        let raw = raw.clone();
        async move {
            let response = Response::builder().header(header::CONTENT_ENCODING, "gzip").body(Body::from(raw));
            Ok::<_, std::convert::Infallible>(response.unwrap())
        }
    }));
    let response = service.oneshot(Request::new(Body::empty())).await.unwrap();
    assert!(response.headers().get(header::CONTENT_ENCODING).is_none(), "not decoded");
    axum::body::to_bytes(Body::new(response.into_body()), usize::MAX).await.unwrap()
}

/// Builds the [`Reply`]: decodes gzip, and checks every FHIR body (R4 validity; an
/// OperationOutcome for every error status).
async fn reply(status: StatusCode, headers: HeaderMap, raw: Bytes) -> Reply {
    let gzip = headers.get(header::CONTENT_ENCODING).is_some_and(|value| value == "gzip");
    let body = if gzip { gunzip(raw.clone()).await } else { raw.clone() };
    let reply = Reply { status, headers, raw, body };
    let fhir = reply.header("content-type").is_some_and(|media| media.starts_with("application/fhir+json"));
    if fhir && !reply.body.is_empty() {
        check_r4(&reply.json());
    }
    if status.is_client_error() || status.is_server_error() {
        assert!(fhir, "{status} without a FHIR body: {:?} {:?}", reply.headers, reply.body);
        assert_eq!(reply.json()["resourceType"], "OperationOutcome", "{status}");
    }
    reply
}

async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = router.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let raw = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    reply(parts.status, parts.headers, raw).await
}

fn request(method: Method, uri: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(body).unwrap()
}

async fn get(router: &Router, uri: &str) -> Reply {
    send(router, request(Method::GET, uri, &[], Body::empty())).await
}

async fn get_with(router: &Router, uri: &str, headers: &[(&str, &str)]) -> Reply {
    send(router, request(Method::GET, uri, headers, Body::empty())).await
}

/// Asserts `reply` is an OperationOutcome error with `status` and returns its issue codes.
fn expect_error(reply: &Reply, status: StatusCode) -> Vec<String> {
    assert_eq!(reply.status, status, "{:?}", String::from_utf8_lossy(&reply.body));
    assert!(reply.header("content-type").unwrap_or("").starts_with("application/fhir+json"));
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let issues = outcome["issue"].as_array().expect("issues");
    assert!(!issues.is_empty());
    assert!(issues.iter().all(|issue| issue["severity"] == "error" && issue["diagnostics"].is_string()));
    issues.iter().map(|issue| issue["code"].as_str().unwrap_or("").to_string()).collect()
}

/// `Type/id` of the entries of `bundle` with `search.mode` `mode`, in order.
fn entries(bundle: &Value, mode: &str) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|entry| entry["search"]["mode"] == mode)
                .map(|entry| {
                    format!(
                        "{}/{}",
                        entry["resource"]["resourceType"].as_str().unwrap(),
                        entry["resource"]["id"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Ids of the matches of `bundle`, in order.
fn ids(bundle: &Value) -> Vec<String> {
    entries(bundle, "match").into_iter().map(|entry| entry.split_once('/').unwrap().1.to_string()).collect()
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|link| link["relation"] == relation)?["url"].as_str().map(String::from)
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    ids.sort();
    ids
}

/// The sorted match ids of `GET /fhir/{query}` (which must succeed, with an exact total).
async fn search(router: &Router, query: &str) -> Vec<String> {
    let bundle = get(router, &format!("/fhir/{query}&_count=1000")).await.ok();
    assert_eq!(bundle["type"], "searchset");
    let mut found = ids(&bundle);
    assert_eq!(bundle["total"].as_u64(), Some(found.len() as u64), "{query}");
    found.sort();
    found
}

/// Runs each `(query, expected ids)` case and reports every mismatch at once.
async fn search_cases(router: &Router, cases: &[(&str, &[&str])]) {
    let mut failures = Vec::new();
    for (query, expected) in cases {
        let found = search(router, query).await;
        if found != sorted(expected) {
            failures.push(format!("{query}: expected {expected:?}, got {found:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The path and query of an absolute link from a router response (base `http://localhost`).
fn local(url: &str) -> &str {
    url.strip_prefix("http://localhost").unwrap_or_else(|| panic!("not a local link: {url}"))
}

// ---------------------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn metadata_is_an_r4_capability_statement_of_what_the_server_does() {
    let fixture = Fixture::new();
    let reply = get(&fixture.router, "/fhir/metadata").await;
    let statement = reply.ok();
    assert!(reply.header("content-type").unwrap().starts_with("application/fhir+json"));
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    assert_eq!(statement["kind"], "instance");
    assert!(statement["format"].as_array().unwrap().iter().any(|format| format == "application/fhir+json"));
    let rest = &statement["rest"][0];
    assert_eq!(rest["mode"], "server");
    assert!(rest["interaction"].as_array().unwrap().iter().any(|i| i["code"] == "history-system"));
    let resource = |kind: &str| {
        rest["resource"].as_array().unwrap().iter().find(|resource| resource["type"] == kind).cloned().unwrap()
    };
    for kind in ["Patient", "Encounter", "Observation", "DiagnosticReport", "ServiceRequest", "Appointment"] {
        let resource = resource(kind);
        let interactions: Vec<&str> =
            resource["interaction"].as_array().unwrap().iter().filter_map(|i| i["code"].as_str()).collect();
        for expected in ["read", "vread", "history-instance", "history-type", "search-type"] {
            assert!(interactions.contains(&expected), "{kind} lacks {expected}");
        }
        for write in ["create", "update", "delete", "patch"] {
            assert!(!interactions.contains(&write), "{kind} claims {write}");
        }
    }
    let names = |kind: &str| -> Vec<String> {
        resource(kind)["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|param| param["name"].as_str().unwrap().to_string())
            .collect()
    };
    let promised: &[(&str, &[&str])] = &[
        (
            "Patient",
            &[
                "_id",
                "_lastUpdated",
                "identifier",
                "name",
                "family",
                "given",
                "birthdate",
                "gender",
                "telecom",
                "address-postalcode",
            ],
        ),
        ("Encounter", &["patient", "subject", "status", "class", "date", "identifier", "location"]),
        ("Observation", &["patient", "subject", "code", "category", "date", "status", "encounter", "value-quantity"]),
    ];
    for (kind, expected) in promised {
        let names = names(kind);
        for name in *expected {
            assert!(names.iter().any(|found| found == name), "{kind} lacks {name}");
        }
    }
    assert_eq!(resource("Patient")["operation"][0]["name"], "everything");
    assert!(resource("Encounter")["searchInclude"].as_array().unwrap().iter().any(|i| i == "Encounter:patient"));
    assert!(resource("Patient")["searchRevInclude"].as_array().unwrap().iter().any(|i| i == "Observation:patient"));
}

// ---------------------------------------------------------------------------------------
// read, vread, conditional read
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn read_returns_the_current_version_with_etag_and_last_modified() {
    let fixture = Fixture::new();
    let reply = get(&fixture.router, "/fhir/Patient/pat-1").await;
    let jane = reply.ok();
    assert!(reply.header("content-type").unwrap().starts_with("application/fhir+json"));
    assert_eq!((jane["resourceType"].as_str(), jane["id"].as_str()), (Some("Patient"), Some("pat-1")));
    assert_eq!(jane["meta"]["versionId"], "2");
    assert!(jane["meta"]["lastUpdated"].as_str().unwrap().starts_with("2024-06-10T00:00:00"));
    assert_eq!(jane["address"][0]["postalCode"], "62704");
    assert_eq!(reply.header("etag"), Some("W/\"2\""));
    assert_eq!(reply.header("last-modified"), Some(UPDATED_HTTP));
    let head = send(&fixture.router, request(Method::HEAD, "/fhir/Patient/pat-1", &[], Body::empty())).await;
    assert_eq!((head.status, head.header("etag")), (StatusCode::OK, Some("W/\"2\"")));
    assert!(head.body.is_empty());
    for (path, kind) in [
        ("/fhir/Encounter/enc-1", "Encounter"),
        ("/fhir/Observation/obs-glu-1", "Observation"),
        ("/fhir/DiagnosticReport/dr-1", "DiagnosticReport"),
        ("/fhir/ServiceRequest/sr-1", "ServiceRequest"),
        ("/fhir/Appointment/appt-1", "Appointment"),
        ("/fhir/DocumentReference/doc-1", "DocumentReference"),
        ("/fhir/Practitioner/prac-1", "Practitioner"),
        ("/fhir/Location/loc-1", "Location"),
    ] {
        let reply = get(&fixture.router, path).await;
        assert_eq!(reply.ok()["resourceType"], kind);
        assert_eq!(reply.header("etag"), Some("W/\"1\""), "{path}");
    }
}

#[tokio::test]
async fn read_honours_elements_and_summary() {
    let fixture = Fixture::new();
    let jane = get(&fixture.router, "/fhir/Patient/pat-1?_elements=gender,birthDate").await.ok();
    assert_eq!((jane["gender"].as_str(), jane["birthDate"].as_str()), (Some("female"), Some("1980-01-02")));
    assert!(jane.get("name").is_none() && jane.get("address").is_none());
    assert!(jane["meta"]["tag"].as_array().unwrap().iter().any(|tag| tag["code"] == "SUBSETTED"));
    let summary = get(&fixture.router, "/fhir/Observation/obs-glu-1?_summary=true").await.ok();
    assert_eq!(summary["valueQuantity"]["value"], 98.0);
    expect_error(&get(&fixture.router, "/fhir/Patient/pat-1?_summary=count").await, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn if_none_match_and_if_modified_since_answer_304() {
    let fixture = Fixture::new();
    let read = |headers: &'static [(&'static str, &'static str)]| {
        let router = fixture.router.clone();
        async move { get_with(&router, "/fhir/Patient/pat-1", headers).await }
    };
    for headers in [
        &[("if-none-match", "W/\"2\"")][..],
        &[("if-none-match", "\"2\"")],
        &[("if-none-match", "W/\"1\", W/\"2\"")],
        &[("if-none-match", "*")],
        &[("if-modified-since", UPDATED_HTTP)],
        &[("if-modified-since", "Tue, 11 Jun 2024 08:00:00 GMT")],
    ] {
        let reply = read(headers).await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{headers:?}");
        assert!(reply.body.is_empty(), "{headers:?}");
        assert_eq!(reply.header("etag"), Some("W/\"2\""));
        assert_eq!(reply.header("last-modified"), Some(UPDATED_HTTP));
    }
    for headers in [
        &[("if-none-match", "W/\"1\"")][..],
        &[("if-modified-since", "Sun, 09 Jun 2024 23:59:59 GMT")],
        // If-None-Match wins over If-Modified-Since.
        &[("if-none-match", "W/\"1\""), ("if-modified-since", "Tue, 11 Jun 2024 08:00:00 GMT")],
        // An unparseable date is ignored.
        &[("if-modified-since", "yesterday")],
    ] {
        let reply = read(headers).await;
        assert_eq!(reply.ok()["id"], "pat-1", "{headers:?}");
    }
    // vread is conditional too.
    let reply = get_with(&fixture.router, "/fhir/Patient/pat-1/_history/1", &[("if-none-match", "W/\"1\"")]).await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn vread_returns_each_version() {
    let fixture = Fixture::new();
    let first = get(&fixture.router, "/fhir/Patient/pat-1/_history/1").await;
    let body = first.ok();
    assert_eq!(
        (body["meta"]["versionId"].as_str(), body["address"][0]["postalCode"].as_str()),
        (Some("1"), Some("62701"))
    );
    assert_eq!(first.header("etag"), Some("W/\"1\""));
    assert_eq!(first.header("last-modified"), Some("Sat, 01 Jun 2024 00:00:02 GMT"));
    let second = get(&fixture.router, "/fhir/Patient/pat-1/_history/2").await.ok();
    assert_eq!(second["address"][0]["postalCode"], "62704");
    assert_eq!(get(&fixture.router, "/fhir/Observation/obs-glu-2/_history/1").await.ok()["status"], "preliminary");
    assert_eq!(get(&fixture.router, "/fhir/Observation/obs-glu-2/_history/2").await.ok()["status"], "final");
    for missing in
        ["/fhir/Patient/pat-1/_history/3", "/fhir/Patient/pat-1/_history/0", "/fhir/Patient/pat-1/_history/x"]
    {
        assert_eq!(expect_error(&get(&fixture.router, missing).await, StatusCode::NOT_FOUND), ["not-found"]);
    }
}

#[tokio::test]
async fn deleted_resources_are_gone_but_their_old_versions_remain() {
    let fixture = Fixture::new();
    assert_eq!(expect_error(&get(&fixture.router, "/fhir/Patient/pat-del").await, StatusCode::GONE), ["deleted"]);
    expect_error(&get(&fixture.router, "/fhir/Patient/pat-del/_history/2").await, StatusCode::GONE);
    assert_eq!(get(&fixture.router, "/fhir/Patient/pat-del/_history/1").await.ok()["name"][0]["family"], "Removed");
    assert!(search(&fixture.router, "Patient?family=removed").await.is_empty());
    assert!(search(&fixture.router, "Patient?_id=pat-del").await.is_empty());
}

// ---------------------------------------------------------------------------------------
// history
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn instance_history_lists_versions_newest_first() {
    let fixture = Fixture::new();
    let bundle = get(&fixture.router, "/fhir/Patient/pat-1/_history").await.ok();
    assert_eq!((bundle["type"].as_str(), bundle["total"].as_u64()), (Some("history"), Some(2)));
    let entries = bundle["entry"].as_array().unwrap();
    let versions: Vec<&str> = entries.iter().map(|e| e["resource"]["meta"]["versionId"].as_str().unwrap()).collect();
    assert_eq!(versions, ["2", "1"]);
    assert_eq!(entries[0]["request"], json!({"method": "PUT", "url": "Patient/pat-1"}));
    assert_eq!(entries[0]["response"]["status"], "200 OK");
    assert_eq!(entries[0]["response"]["etag"], "W/\"2\"");
    assert_eq!(entries[1]["response"]["status"], "201 Created");
    assert_eq!(entries[0]["fullUrl"], "http://localhost/fhir/Patient/pat-1");

    let deleted = get(&fixture.router, "/fhir/Patient/pat-del/_history").await.ok();
    assert_eq!(deleted["total"], 2);
    assert_eq!(deleted["entry"][0]["request"]["method"], "DELETE");
    assert!(deleted["entry"][0].get("resource").is_none());
    assert_eq!(deleted["entry"][1]["resource"]["id"], "pat-del");

    expect_error(&get(&fixture.router, "/fhir/Patient/nobody/_history").await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn type_and_system_history_page_through_every_version_once() {
    let fixture = Fixture::new();
    let patients = get(&fixture.router, "/fhir/Patient/_history").await.ok();
    // Five patients, one update, one deletion.
    assert_eq!(patients["total"], 7);
    assert!(patients["entry"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["request"]["url"].as_str().unwrap().starts_with("Patient/")));

    let versions = resources().len() + 3;
    let mut url = "/fhir/_history?_count=10".to_string();
    let mut seen = Vec::new();
    let mut previous_time = String::from("9999");
    loop {
        let page = get(&fixture.router, &url).await.ok();
        assert_eq!(page["total"].as_u64(), Some(versions as u64));
        for entry in page["entry"].as_array().unwrap() {
            let response = &entry["response"];
            let time = response["lastModified"].as_str().unwrap().to_string();
            assert!(time <= previous_time, "not newest first: {time} after {previous_time}");
            previous_time = time;
            seen.push(format!("{} {}", entry["request"]["url"].as_str().unwrap(), response["etag"].as_str().unwrap()));
        }
        match link(&page, "next") {
            Some(next) => url = local(&next).to_string(),
            None => break,
        }
        assert!(seen.len() <= versions);
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (versions, versions), "{seen:?}");

    // _since is kept by the paging links.
    let mut url = "/fhir/Observation/_history?_since=2024-06-01T00:00:20Z&_count=4".to_string();
    let mut walked = 0;
    let total = loop {
        let page = get(&fixture.router, &url).await.ok();
        walked += page["entry"].as_array().map_or(0, Vec::len);
        match link(&page, "next") {
            Some(next) => {
                assert!(next.contains("_since="), "{next}");
                url = local(&next).to_string();
            }
            None => break page["total"].as_u64().unwrap(),
        }
    };
    assert_eq!(walked as u64, total);
    assert!(total > 4 && total < (SERIES + 6) as u64, "{total}");

    let since = get(&fixture.router, "/fhir/_history?_since=2024-06-10").await.ok();
    let mut changed: Vec<String> =
        since["entry"].as_array().unwrap().iter().map(|e| e["request"]["url"].as_str().unwrap().to_string()).collect();
    changed.sort();
    assert_eq!(changed, ["Observation/obs-glu-2", "Patient/pat-1", "Patient/pat-del"]);
    let previous = get(&fixture.router, "/fhir/Patient/_history?_count=2&_offset=2").await.ok();
    assert!(link(&previous, "previous").unwrap().contains("_offset=0"));

    expect_error(&get(&fixture.router, "/fhir/_history?_count=abc").await, StatusCode::BAD_REQUEST);
    expect_error(&get(&fixture.router, "/fhir/_history?_since=soon").await, StatusCode::BAD_REQUEST);
    expect_error(&get(&fixture.router, "/fhir/Nothing/_history").await, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------
// search: the interaction
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn search_by_get_returns_a_searchset_with_self_link_and_full_urls() {
    let fixture = Fixture::new();
    let reply = get(&fixture.router, "/fhir/Patient?family=doe&_sort=family").await;
    let bundle = reply.ok();
    assert!(reply.header("content-type").unwrap().starts_with("application/fhir+json"));
    assert_eq!((bundle["type"].as_str(), bundle["total"].as_u64()), (Some("searchset"), Some(2)));
    assert_eq!(ids(&bundle), ["pat-1", "pat-4"]);
    assert_eq!(link(&bundle, "self").unwrap(), "http://localhost/fhir/Patient?_sort=family&family=doe");
    assert!(link(&bundle, "next").is_none());
    assert_eq!(bundle["entry"][0]["fullUrl"], "http://localhost/fhir/Patient/pat-1");
    // The Host header names the base of every link.
    let hosted = get_with(&fixture.router, "/fhir/Patient?_id=pat-2", &[("host", "fhir.example.org:8443")]).await.ok();
    assert_eq!(hosted["entry"][0]["fullUrl"], "http://fhir.example.org:8443/fhir/Patient/pat-2");
    // No match: an empty searchset.
    let empty = get(&fixture.router, "/fhir/Patient?family=nobody").await.ok();
    assert_eq!(empty["total"], 0);
    assert!(empty.get("entry").is_none());
}

#[tokio::test]
async fn search_by_post_form_equals_search_by_get() {
    let fixture = Fixture::new();
    let form = |uri: &str, body: &'static str| {
        request(Method::POST, uri, &[("content-type", "application/x-www-form-urlencoded")], Body::from(body))
    };
    let posted = send(&fixture.router, form("/fhir/Patient/_search", "family=doe&_sort=-birthdate")).await.ok();
    let got = get(&fixture.router, "/fhir/Patient?family=doe&_sort=-birthdate").await.ok();
    assert_eq!(ids(&posted), ids(&got));
    assert_eq!(ids(&posted), ["pat-4", "pat-1"]);
    assert_eq!(link(&posted, "self"), link(&got, "self"));
    // URL parameters count too; the charset parameter of the media type is fine.
    let combined = send(
        &fixture.router,
        request(
            Method::POST,
            "/fhir/Patient/_search?gender=male",
            &[("content-type", "application/x-www-form-urlencoded; charset=utf-8")],
            Body::from("family=doe"),
        ),
    )
    .await
    .ok();
    assert_eq!(ids(&combined), ["pat-4"]);
    let encoded =
        send(&fixture.router, form("/fhir/Observation/_search", "code=http%3A%2F%2Floinc.org%7C718-7")).await.ok();
    assert_eq!(ids(&encoded), ["obs-hb"]);
    // Without a body, everything.
    let everything =
        send(&fixture.router, request(Method::POST, "/fhir/Patient/_search", &[], Body::empty())).await.ok();
    assert_eq!(everything["total"], 4);
    // A body that is not a form: 415.
    let json_body =
        request(Method::POST, "/fhir/Patient/_search", &[("content-type", "application/json")], Body::from("{}"));
    assert_eq!(
        expect_error(&send(&fixture.router, json_body).await, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ["not-supported"]
    );
}

// ---------------------------------------------------------------------------------------
// search: parameters per resource type
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn patient_search_parameters() {
    let fixture = Fixture::new();
    search_cases(
        &fixture.router,
        &[
            ("Patient?identifier=MRN002", &["pat-2"]),
            ("Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|MRN001", &["pat-1"]),
            ("Patient?identifier=urn:other|MRN001", &[]),
            ("Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|", &["pat-1", "pat-2", "pat-3", "pat-4"]),
            ("Patient?name=jane", &["pat-1"]),
            ("Patient?name=DOE", &["pat-1", "pat-4"]),
            ("Patient?family=smi", &["pat-2"]),
            ("Patient?family=muller", &["pat-3"]),
            ("Patient?family=M%C3%BCller", &["pat-3"]),
            ("Patient?given=j", &["pat-1", "pat-2"]),
            ("Patient?given=anna", &["pat-3"]),
            ("Patient?birthdate=1980-01-02", &["pat-1"]),
            ("Patient?gender=female", &["pat-1", "pat-3"]),
            ("Patient?telecom=217-555-1234", &["pat-1"]),
            ("Patient?telecom=phone|555-0002", &["pat-2"]),
            ("Patient?telecom=email|anna@example.ch", &["pat-3"]),
            ("Patient?address-postalcode=62704", &["pat-1"]),
            // Indexes follow updates: the first version's postal code no longer matches.
            ("Patient?address-postalcode=62701", &[]),
            ("Patient?address-postalcode=100", &["pat-2"]),
            ("Patient?family=doe&gender=male", &["pat-4"]),
            ("Patient?family=smith,muller", &["pat-2", "pat-3"]),
        ],
    )
    .await;
}

#[tokio::test]
async fn encounter_search_parameters() {
    let fixture = Fixture::new();
    search_cases(
        &fixture.router,
        &[
            ("Encounter?patient=pat-1", &["enc-1", "enc-2"]),
            ("Encounter?patient=Patient/pat-2", &["enc-3"]),
            ("Encounter?subject=Patient/pat-1", &["enc-1", "enc-2"]),
            ("Encounter?subject=pat-2", &["enc-3"]),
            ("Encounter?subject:Patient=pat-2", &["enc-3"]),
            ("Encounter?status=finished", &["enc-1", "enc-3"]),
            ("Encounter?status=in-progress", &["enc-2"]),
            ("Encounter?class=AMB", &["enc-2"]),
            ("Encounter?class=http://terminology.hl7.org/CodeSystem/v3-ActCode|IMP", &["enc-1"]),
            ("Encounter?date=2024-01", &["enc-1"]),
            ("Encounter?date=2024-01-17", &[]),
            ("Encounter?date=ge2024-02", &["enc-2"]),
            ("Encounter?date=gt2030", &["enc-2"]),
            ("Encounter?date=lt2024", &["enc-3"]),
            ("Encounter?identifier=V002", &["enc-2"]),
            ("Encounter?identifier=urn:hosp:visit|V003", &["enc-3"]),
            ("Encounter?location=Location/loc-1", &["enc-1", "enc-3"]),
            ("Encounter?location=loc-1&patient=pat-1", &["enc-1"]),
        ],
    )
    .await;
}

#[tokio::test]
async fn observation_search_parameters() {
    let fixture = Fixture::new();
    search_cases(
        &fixture.router,
        &[
            ("Observation?patient=pat-1", &["obs-glu-1", "obs-glu-2", "obs-hr"]),
            ("Observation?patient=Patient/pat-3", &["obs-glu-3"]),
            ("Observation?subject=Patient/pat-2", &["obs-hb"]),
            ("Observation?code=http://loinc.org|2345-7", &["obs-glu-1", "obs-glu-2", "obs-glu-3"]),
            ("Observation?code=718-7", &["obs-hb"]),
            ("Observation?code=http://snomed.info/sct|2345-7", &[]),
            ("Observation?category=laboratory&patient=pat-1", &["obs-glu-1", "obs-glu-2"]),
            (
                "Observation?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs&patient=pat-1",
                &["obs-hr"],
            ),
            ("Observation?date=2024-01-15", &["obs-glu-1"]),
            ("Observation?date=2024-01&code=2345-7", &["obs-glu-1", "obs-glu-2"]),
            ("Observation?status=preliminary", &["obs-hb"]),
            ("Observation?status=amended", &["obs-hr"]),
            ("Observation?encounter=Encounter/enc-1", &["obs-glu-1", "obs-glu-2"]),
            ("Observation?encounter=enc-3", &["obs-hb"]),
            ("Observation?value-quantity=98", &["obs-glu-1"]),
            ("Observation?value-quantity=gt100", &["obs-glu-2"]),
            ("Observation?value-quantity=130|http://unitsofmeasure.org|mg/dL", &["obs-glu-2"]),
            ("Observation?value-quantity=130||mg/dL", &["obs-glu-2"]),
            ("Observation?value-quantity=130||kg", &[]),
            ("Observation?value-quantity=lt10", &["obs-glu-3"]),
            ("Observation?value-quantity=5.4", &["obs-glu-3"]),
            ("Observation?value-quantity=le13.5&value-quantity=ge13.5", &["obs-hb"]),
        ],
    )
    .await;
}

#[tokio::test]
async fn report_order_appointment_and_document_search_parameters() {
    let fixture = Fixture::new();
    search_cases(
        &fixture.router,
        &[
            ("DiagnosticReport?patient=pat-1", &["dr-1"]),
            ("DiagnosticReport?subject=Patient/pat-2", &[]),
            ("DiagnosticReport?code=http://loinc.org|24323-8", &["dr-1"]),
            ("DiagnosticReport?status=final", &["dr-1"]),
            ("DiagnosticReport?category=LAB", &["dr-1"]),
            ("DiagnosticReport?date=2024-01-15", &["dr-1"]),
            ("DiagnosticReport?encounter=enc-1", &["dr-1"]),
            ("DiagnosticReport?result=Observation/obs-glu-2", &["dr-1"]),
            ("DiagnosticReport?identifier=urn:hosp:report|RPT-1", &["dr-1"]),
            ("ServiceRequest?patient=pat-1", &["sr-1"]),
            ("ServiceRequest?status=active", &["sr-1"]),
            ("ServiceRequest?status=completed", &[]),
            ("ServiceRequest?intent=order", &["sr-1"]),
            ("ServiceRequest?code=2345-7", &["sr-1"]),
            ("ServiceRequest?authored=2024-01-15", &["sr-1"]),
            ("ServiceRequest?identifier=ORD-1", &["sr-1"]),
            ("ServiceRequest?requester=Practitioner/prac-1", &["sr-1"]),
            ("ServiceRequest?encounter=enc-1", &["sr-1"]),
            ("Appointment?patient=pat-2", &["appt-1"]),
            ("Appointment?patient=pat-1", &[]),
            ("Appointment?actor=Practitioner/prac-1", &["appt-1"]),
            ("Appointment?practitioner=prac-1", &["appt-1"]),
            ("Appointment?status=booked", &["appt-1"]),
            ("Appointment?date=2024-05-01", &["appt-1"]),
            ("Appointment?date=gt2024-05-01", &[]),
            ("Appointment?identifier=APT-1", &["appt-1"]),
            ("DocumentReference?patient=pat-1", &["doc-1"]),
            ("DocumentReference?subject=Patient/pat-1", &["doc-1"]),
            ("DocumentReference?type=http://loinc.org|11506-3", &["doc-1"]),
            ("DocumentReference?status=current", &["doc-1"]),
            ("DocumentReference?date=ge2024-01", &["doc-1"]),
            ("DocumentReference?encounter=Encounter/enc-1", &["doc-1"]),
            ("DocumentReference?identifier=urn:hosp:document|DOC-1", &["doc-1"]),
            ("Practitioner?identifier=1234567893", &["prac-1"]),
            ("Practitioner?name=welby", &["prac-1"]),
            ("Location?name=icu", &["loc-1"]),
        ],
    )
    .await;
}

#[tokio::test]
async fn id_and_last_updated() {
    let fixture = Fixture::new();
    search_cases(
        &fixture.router,
        &[
            ("Patient?_id=pat-1", &["pat-1"]),
            ("Patient?_id=pat-1,pat-3,nobody", &["pat-1", "pat-3"]),
            ("Observation?_id=pat-1", &[]),
            ("Patient?_lastUpdated=ge2024-06-10", &["pat-1"]),
            ("Patient?_lastUpdated=lt2024-06-10", &["pat-2", "pat-3", "pat-4"]),
            ("Patient?_lastUpdated=2024-06", &["pat-1", "pat-2", "pat-3", "pat-4"]),
            ("Patient?_lastUpdated=2024-06-01", &["pat-2", "pat-3", "pat-4"]),
            ("Observation?_lastUpdated=gt2024-06-09&_id=obs-glu-1,obs-glu-2", &["obs-glu-2"]),
            ("Patient?_lastUpdated=gt2100", &[]),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// search: modifiers, prefixes, references, chains
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn string_and_token_modifiers() {
    let fixture = Fixture::new();
    search_cases(
        &fixture.router,
        &[
            ("Patient?family:exact=Doe", &["pat-1"]),
            ("Patient?family:exact=doe", &[]),
            ("Patient?family:exact=Doeso", &[]),
            ("Patient?family:exact=M%C3%BCller", &["pat-3"]),
            ("Patient?family:contains=eso", &["pat-4"]),
            ("Patient?family:contains=ULL", &["pat-3"]),
            ("Patient?name:contains=ark", &["pat-4"]),
            ("Patient?telecom:missing=true", &["pat-4"]),
            ("Patient?telecom:missing=false", &["pat-1", "pat-2", "pat-3"]),
            ("Patient?address-postalcode:missing=true", &["pat-4"]),
            ("Patient?birthdate:missing=false", &["pat-1", "pat-2", "pat-3", "pat-4"]),
            ("Encounter?location:missing=true", &["enc-2"]),
            ("Encounter?location:missing=false", &["enc-1", "enc-3"]),
            ("Observation?code:not=http://loinc.org|2345-7&patient=pat-1", &["obs-hr"]),
            ("Observation?encounter:missing=true&code=2345-7", &["obs-glu-3"]),
            ("Patient?gender:not=female", &["pat-2", "pat-4"]),
            ("Observation?status:not=final&category=laboratory", &["obs-hb"]),
            ("Observation?code:text=hemo", &["obs-hb"]),
        ],
    )
    .await;
}

#[tokio::test]
async fn date_prefixes_with_partial_dates() {
    let fixture = Fixture::new();
    // Birth dates: pat-1 1980-01-02, pat-2 1975-06, pat-3 1990-03-15, pat-4 2001.
    search_cases(
        &fixture.router,
        &[
            ("Patient?birthdate=1975", &["pat-2"]),
            ("Patient?birthdate=1975-06-15", &[]),
            ("Patient?birthdate=eq1980", &["pat-1"]),
            ("Patient?birthdate=eq1980-01", &["pat-1"]),
            ("Patient?birthdate=ne1980", &["pat-2", "pat-3", "pat-4"]),
            ("Patient?birthdate=lt1980", &["pat-2"]),
            ("Patient?birthdate=gt1990-03", &["pat-4"]),
            ("Patient?birthdate=le1980-01-02", &["pat-1", "pat-2"]),
            ("Patient?birthdate=ge1990-03-15", &["pat-3", "pat-4"]),
            ("Patient?birthdate=sa1975-06", &["pat-1", "pat-3", "pat-4"]),
            ("Patient?birthdate=eb2001", &["pat-1", "pat-2", "pat-3"]),
            ("Patient?birthdate=ap1990-03-15", &["pat-3"]),
            ("Patient?birthdate=ap2001-06", &["pat-4"]),
            ("Patient?birthdate=ge1976&birthdate=lt1991", &["pat-1", "pat-3"]),
            ("Patient?birthdate=1975,2001", &["pat-2", "pat-4"]),
            ("Observation?date=ge2024-01-16T00:00:00Z&patient=pat-1", &["obs-glu-2", "obs-hr"]),
            ("Observation?date=lt2024-01-15T11:30:00Z&patient=pat-1", &[]),
            ("Observation?date=le2024-01-15T11:30:00Z&patient=pat-1", &["obs-glu-1"]),
            ("Observation?date=2024-01-15T12:30:00%2B01:00", &["obs-glu-1"]),
        ],
    )
    .await;
}

#[tokio::test]
async fn references_by_id_type_and_chain() {
    let fixture = Fixture::new();
    search_cases(
        &fixture.router,
        &[
            ("Observation?subject=pat-2", &["obs-hb"]),
            ("Observation?subject=Patient/pat-2", &["obs-hb"]),
            ("Observation?subject=http://elsewhere.example/fhir/Patient/pat-2", &["obs-hb"]),
            ("Observation?patient.identifier=urn:oid:1.2.36.146.595.217.0.1|MRN002", &["obs-hb"]),
            ("Encounter?patient.identifier=MRN001", &["enc-1", "enc-2"]),
            ("Encounter?subject:Patient.name=smith", &["enc-3"]),
            ("Encounter?location.name=icu", &["enc-1", "enc-3"]),
            ("DiagnosticReport?result.code=718-7", &[]),
            ("DiagnosticReport?result.code=2345-7", &["dr-1"]),
            ("Observation?encounter.status=in-progress", &["obs-hr"]),
            ("Observation?patient.identifier=MRN404", &[]),
            ("Observation?patient._id=pat-3", &["obs-glu-3"]),
            ("Observation?subject:identifier=MRN001", &[]),
        ],
    )
    .await;
}

#[tokio::test]
async fn include_and_revinclude() {
    let fixture = Fixture::new();
    let bundle =
        get(&fixture.router, "/fhir/Encounter?_id=enc-1&_include=Encounter:patient&_include=Encounter:location")
            .await
            .ok();
    assert_eq!(entries(&bundle, "match"), ["Encounter/enc-1"]);
    let mut included = entries(&bundle, "include");
    included.sort();
    assert_eq!(included, ["Location/loc-1", "Patient/pat-1"]);
    assert_eq!(bundle["total"], 1, "includes are not counted");

    let bundle = get(&fixture.router, "/fhir/Observation?_id=obs-glu-1&_include=*").await.ok();
    let mut included = entries(&bundle, "include");
    included.sort();
    assert_eq!(included, ["Encounter/enc-1", "Patient/pat-1"]);

    let bundle =
        get(&fixture.router, "/fhir/Patient?_id=pat-2&_revinclude=Observation:patient&_revinclude=Encounter:subject")
            .await
            .ok();
    assert_eq!(entries(&bundle, "match"), ["Patient/pat-2"]);
    let mut included = entries(&bundle, "include");
    included.sort();
    assert_eq!(included, ["Encounter/enc-3", "Observation/obs-hb"]);

    // Iterate: the observations' encounter, then that encounter's location.
    let bundle = get(
        &fixture.router,
        "/fhir/Observation?_id=obs-hb&_include=Observation:encounter&_include:iterate=Encounter:location",
    )
    .await
    .ok();
    let mut included = entries(&bundle, "include");
    included.sort();
    assert_eq!(included, ["Encounter/enc-3", "Location/loc-1"]);

    // A resource is never both a match and an include, nor included twice.
    let bundle = get(
        &fixture.router,
        "/fhir/Observation?patient=pat-1&_include=Observation:patient&_include=Observation:subject",
    )
    .await
    .ok();
    assert_eq!(entries(&bundle, "include"), ["Patient/pat-1"]);
}

#[tokio::test]
async fn sort_ascending_descending_and_by_several_keys() {
    let fixture = Fixture::new();
    let order = |query: &'static str| {
        let router = fixture.router.clone();
        async move { ids(&get(&router, &format!("/fhir/{query}")).await.ok()) }
    };
    assert_eq!(order("Patient?_sort=birthdate").await, ["pat-2", "pat-1", "pat-3", "pat-4"]);
    assert_eq!(order("Patient?_sort=-birthdate").await, ["pat-4", "pat-3", "pat-1", "pat-2"]);
    assert_eq!(order("Patient?_sort=family").await, ["pat-1", "pat-4", "pat-3", "pat-2"]);
    assert_eq!(order("Patient?_sort=gender,-birthdate").await, ["pat-3", "pat-1", "pat-4", "pat-2"]);
    assert_eq!(order("Patient?_sort=-_id").await, ["pat-4", "pat-3", "pat-2", "pat-1"]);
    assert_eq!(order("Patient?_sort=-_lastUpdated,_id").await, ["pat-1", "pat-4", "pat-3", "pat-2"]);
    assert_eq!(order("Observation?patient=pat-1&_sort=-date").await, ["obs-hr", "obs-glu-2", "obs-glu-1"]);
    assert_eq!(order("Observation?code=2345-7&_sort=value-quantity").await, ["obs-glu-3", "obs-glu-1", "obs-glu-2"]);
}

/// Follows `next` from `start` to the end; returns the match ids in order and the number
/// of pages. `between` runs after the first page.
async fn walk(router: &Router, start: &str, page_size: usize, between: impl FnOnce()) -> (Vec<String>, usize) {
    let mut url = start.to_string();
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut between = Some(between);
    loop {
        let page = get(router, &url).await.ok();
        let found = ids(&page);
        assert!(found.len() <= page_size, "{url}: {} entries", found.len());
        seen.extend(found);
        pages += 1;
        if let Some(between) = between.take() {
            between();
        }
        match link(&page, "next") {
            Some(next) => {
                assert!(next.starts_with("http://localhost/fhir/"), "{next}");
                url = local(&next).to_string();
            }
            None => break,
        }
        assert!(pages < 100, "runaway paging");
    }
    (seen, pages)
}

#[tokio::test]
async fn count_and_next_links_return_every_match_exactly_once() {
    let fixture = Fixture::new();
    let expected: Vec<String> = (0..SERIES).map(|index| format!("obs-wt-{index:02}")).collect();
    // Unsorted (storage order), ascending and descending by date, and with a search.
    for (start, order) in [
        ("/fhir/Observation?patient=pat-4&_count=7", expected.clone()),
        ("/fhir/Observation?patient=pat-4&_count=7&_sort=date", expected.clone()),
        ("/fhir/Observation?code=29463-7&_count=4&_sort=-date", expected.iter().rev().cloned().collect()),
        ("/fhir/Observation?patient=pat-4&_count=1000", expected.clone()),
    ] {
        let size: usize = start.rsplit("_count=").next().unwrap().split('&').next().unwrap().parse().unwrap();
        let (seen, pages) = walk(&fixture.router, start, size, || {}).await;
        assert_eq!(seen, order, "{start}");
        assert_eq!(pages, SERIES.div_ceil(size), "{start}");
    }
    // Total on every page, the page size in next links.
    let first = get(&fixture.router, "/fhir/Observation?patient=pat-4&_count=10").await.ok();
    assert_eq!(first["total"], SERIES);
    let next = link(&first, "next").unwrap();
    assert!(next.contains("_count=10") && next.contains("patient=pat-4"), "{next}");
    // The default page size is 20.
    let default = get(&fixture.router, "/fhir/Observation?patient=pat-4").await.ok();
    assert_eq!(ids(&default).len(), 20);
    // _count=0: only the total.
    let none = get(&fixture.router, "/fhir/Observation?patient=pat-4&_count=0").await.ok();
    assert_eq!((none["total"].as_u64(), none.get("entry")), (Some(SERIES as u64), None));
}

#[tokio::test]
async fn next_links_are_stable_while_resources_are_stored() {
    let fixture = Fixture::new();
    let database = fixture.database.clone();
    let insert = move || {
        // Sorts first by date and comes last by storage order: neither shifts the walk.
        let early = observation(
            "obs-wt-early",
            "pat-4",
            None,
            "final",
            "vital-signs",
            ("29463-7", "Body weight"),
            "2022-12-01T08:00:00Z",
            (59.0, "kg"),
        );
        write(&database, &[early], UPDATED_US + 60_000_000);
    };
    let (seen, _) = walk(&fixture.router, "/fhir/Observation?patient=pat-4&_count=6&_sort=date", 6, insert).await;
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "duplicates: {seen:?}");
    let expected: Vec<String> = (0..SERIES).map(|index| format!("obs-wt-{index:02}")).collect();
    assert_eq!(seen, expected);
    // A new walk sees the new resource first.
    let again = get(&fixture.router, "/fhir/Observation?patient=pat-4&_count=1&_sort=date").await.ok();
    assert_eq!(ids(&again), ["obs-wt-early"]);
}

#[tokio::test]
async fn summary_count_elements_and_total() {
    let fixture = Fixture::new();
    let count = get(&fixture.router, "/fhir/Observation?patient=pat-4&_summary=count").await.ok();
    assert_eq!(count["total"], SERIES);
    assert!(count.get("entry").is_none());

    let subset = get(&fixture.router, "/fhir/Patient?_id=pat-1,pat-2&_elements=gender,birthDate").await.ok();
    assert_eq!(ids(&subset), ["pat-1", "pat-2"]);
    for entry in subset["entry"].as_array().unwrap() {
        let resource = &entry["resource"];
        assert!(resource["gender"].is_string() && resource["birthDate"].is_string());
        assert!(resource.get("name").is_none() && resource.get("identifier").is_none());
        assert!(resource["meta"]["tag"].as_array().unwrap().iter().any(|tag| tag["code"] == "SUBSETTED"));
    }
    assert!(link(&subset, "self").unwrap().contains("_elements=gender,birthDate"));

    let summary = get(&fixture.router, "/fhir/Patient?_id=pat-1&_summary=true").await.ok();
    assert!(summary["entry"][0]["resource"]["name"].is_array());

    let without = get(&fixture.router, "/fhir/Patient?_total=none&_count=2").await.ok();
    assert!(without.get("total").is_none());
    assert_eq!(ids(&without).len(), 2);
    assert!(link(&without, "next").is_some());
    let accurate = get(&fixture.router, "/fhir/Patient?_total=accurate&_count=2").await.ok();
    assert_eq!(accurate["total"], 4);
}

#[tokio::test]
async fn unknown_parameters_are_warned_about_or_refused_under_strict_handling() {
    let fixture = Fixture::new();
    let bundle = get(&fixture.router, "/fhir/Patient?family=doe&shoe-size=44&family:fuzzy=x").await.ok();
    assert_eq!(ids(&bundle), ["pat-1", "pat-4"]);
    assert_eq!(bundle["total"], 2);
    let outcomes: Vec<&Value> =
        bundle["entry"].as_array().unwrap().iter().filter(|entry| entry["search"]["mode"] == "outcome").collect();
    assert_eq!(outcomes.len(), 1);
    let outcome = &outcomes[0]["resource"];
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let issues = outcome["issue"].as_array().unwrap();
    assert_eq!(issues.len(), 2);
    assert!(issues.iter().all(|issue| issue["severity"] == "warning"));
    assert!(issues.iter().any(|issue| issue["diagnostics"].as_str().unwrap().contains("shoe-size")));
    assert!(!link(&bundle, "self").unwrap().contains("shoe-size"));

    let strict =
        get_with(&fixture.router, "/fhir/Patient?family=doe&shoe-size=44", &[("prefer", "handling=strict")]).await;
    let codes = expect_error(&strict, StatusCode::BAD_REQUEST);
    assert_eq!(codes, ["invalid"]);
    assert!(strict.json()["issue"][0]["diagnostics"].as_str().unwrap().contains("shoe-size"));
    let lenient = get_with(&fixture.router, "/fhir/Patient?shoe-size=44", &[("prefer", "handling=lenient")]).await.ok();
    assert_eq!(lenient["total"], 4);
    // Known parameters pass strict handling.
    let fine =
        get_with(&fixture.router, "/fhir/Patient?family=doe", &[("prefer", "return=minimal, handling=strict")]).await;
    assert_eq!(ids(&fine.ok()), ["pat-1", "pat-4"]);
}

// ---------------------------------------------------------------------------------------
// $everything
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn patient_everything_returns_the_compartment_paged() {
    let fixture = Fixture::new();
    let expected = sorted(&[
        "Patient/pat-1",
        "Encounter/enc-1",
        "Encounter/enc-2",
        "Observation/obs-glu-1",
        "Observation/obs-glu-2",
        "Observation/obs-hr",
        "DiagnosticReport/dr-1",
        "ServiceRequest/sr-1",
        "DocumentReference/doc-1",
    ]);
    let bundle = get(&fixture.router, "/fhir/Patient/pat-1/$everything").await.ok();
    assert_eq!((bundle["type"].as_str(), bundle["total"].as_u64()), (Some("searchset"), Some(expected.len() as u64)));
    let mut all = entries(&bundle, "match");
    all.sort();
    assert_eq!(all, expected);

    let mut url = "/fhir/Patient/pat-1/$everything?_count=4".to_string();
    let mut seen = Vec::new();
    loop {
        let page = get(&fixture.router, &url).await.ok();
        assert!(entries(&page, "match").len() <= 4);
        seen.extend(entries(&page, "match"));
        match link(&page, "next") {
            Some(next) => url = local(&next).to_string(),
            None => break,
        }
        assert!(seen.len() <= expected.len());
    }
    seen.sort();
    assert_eq!(seen, expected);

    let posted =
        send(&fixture.router, request(Method::POST, "/fhir/Patient/pat-2/$everything", &[], Body::empty())).await;
    let mut found = entries(&posted.ok(), "match");
    found.sort();
    assert_eq!(found, ["Appointment/appt-1", "Encounter/enc-3", "Observation/obs-hb", "Patient/pat-2"]);

    expect_error(&get(&fixture.router, "/fhir/Patient/nobody/$everything").await, StatusCode::NOT_FOUND);
    expect_error(&get(&fixture.router, "/fhir/Patient/pat-1/$nothing").await, StatusCode::NOT_FOUND);
    expect_error(&get(&fixture.router, "/fhir/Observation/obs-hb/$everything").await, StatusCode::NOT_FOUND);
    let delete = request(Method::DELETE, "/fhir/Patient/pat-1/$everything", &[], Body::empty());
    expect_error(&send(&fixture.router, delete).await, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn patient_everything_refuses_a_bad_paging_token_with_400() {
    let fixture = Fixture::new();
    let reply = get(&fixture.router, "/fhir/Patient/pat-1/$everything?_page=not-a-token").await;
    assert_eq!(expect_error(&reply, StatusCode::BAD_REQUEST), ["invalid"]);
    expect_error(&get(&fixture.router, "/fhir/Patient/pat-1/$everything?_count=lots").await, StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------
// Formats, compression
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn json_is_negotiated_by_accept_and_format() {
    let fixture = Fixture::new();
    for (uri, accept) in [
        ("/fhir/Patient/pat-1", Some("application/fhir+json")),
        ("/fhir/Patient/pat-1", Some("application/json")),
        ("/fhir/Patient/pat-1", Some("application/fhir+json;fhirVersion=4.0")),
        ("/fhir/Patient/pat-1", Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")),
        ("/fhir/Patient/pat-1?_format=json", None),
        ("/fhir/Patient/pat-1?_format=application/fhir%2Bjson", None),
        // An unencoded `+` in a query string decodes to a space.
        ("/fhir/Patient/pat-1?_format=application/fhir+json", None),
        ("/fhir/Patient/pat-1?_format=application/json", None),
        ("/fhir/Patient?_id=pat-1&_format=json", None),
        ("/fhir/metadata?_format=json", None),
        // _format wins over Accept.
        ("/fhir/Patient/pat-1?_format=json", Some("application/fhir+xml")),
    ] {
        let headers: Vec<(&str, &str)> = accept.into_iter().map(|accept| ("accept", accept)).collect();
        let reply = get_with(&fixture.router, uri, &headers).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri} {accept:?}: {:?}", reply.body);
        assert_eq!(reply.header("content-type"), Some("application/fhir+json; charset=utf-8"));
    }
    let pretty = get(&fixture.router, "/fhir/Patient/pat-1?_pretty=true").await;
    assert!(std::str::from_utf8(&pretty.body).unwrap().contains("\n  \"resourceType\": \"Patient\""));
    assert_eq!(pretty.ok()["id"], "pat-1");
}

#[tokio::test]
async fn xml_is_not_acceptable() {
    let fixture = Fixture::new();
    for (uri, accept) in [
        ("/fhir/Patient/pat-1", Some("application/fhir+xml")),
        ("/fhir/Patient?family=doe", Some("application/xml, text/xml")),
        ("/fhir/Patient/pat-1?_format=xml", None),
        ("/fhir/Patient/pat-1?_format=application/fhir%2Bxml", None),
        ("/fhir/Patient/pat-1/_history", Some("text/turtle")),
    ] {
        let headers: Vec<(&str, &str)> = accept.into_iter().map(|accept| ("accept", accept)).collect();
        let reply = get_with(&fixture.router, uri, &headers).await;
        assert_eq!(expect_error(&reply, StatusCode::NOT_ACCEPTABLE), ["not-supported"], "{uri}");
    }
}

#[tokio::test]
async fn responses_are_gzipped_when_the_client_accepts_it() {
    let fixture = Fixture::new();
    for uri in ["/fhir/Observation?patient=pat-4", "/fhir/metadata", "/fhir/Patient?_count=50"] {
        let reply = get_with(&fixture.router, uri, &[("accept-encoding", "gzip")]).await;
        assert_eq!(reply.header("content-encoding"), Some("gzip"), "{uri}");
        assert_eq!(&reply.raw[..2], &[0x1f, 0x8b], "{uri}: not gzip");
        assert!(reply.json()["resourceType"].is_string());
        let plain = get(&fixture.router, uri).await;
        assert!(plain.header("content-encoding").is_none());
        assert_eq!(plain.status, reply.status);
        assert!(plain.raw.len() >= api::COMPRESS_FROM_BYTES as usize, "{uri}");
    }
    // Small bodies cost more to compress than they would save: sent as they are.
    for uri in ["/fhir/Patient/pat-1", "/fhir/Patient/nobody"] {
        let reply = get_with(&fixture.router, uri, &[("accept-encoding", "gzip")]).await;
        assert!(reply.header("content-encoding").is_none(), "{uri}");
        assert!(reply.raw.len() < api::COMPRESS_FROM_BYTES as usize, "{uri}");
        assert!(reply.json()["resourceType"].is_string());
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_requests_are_400() {
    let fixture = Fixture::new();
    for uri in [
        "/fhir/Patient/bad_id",
        "/fhir/Patient/bad_id/_history",
        "/fhir/Patient/bad_id/_history/1",
        "/fhir/Patient?birthdate=1990-13",
        "/fhir/Patient?birthdate=xx1990",
        "/fhir/Observation?value-quantity=gtabc",
        "/fhir/Patient?_count=-1",
        "/fhir/Patient?_summary=maybe",
        "/fhir/Patient?_total=some",
        "/fhir/Patient?telecom:missing=perhaps",
        "/fhir/Patient?_page=zz",
        "/fhir/Patient?_lastUpdated=yesterday",
        "/fhir/Observation?subject=Patient/p1/x/",
    ] {
        let reply = get(&fixture.router, uri).await;
        assert_eq!(expect_error(&reply, StatusCode::BAD_REQUEST)[0], "invalid", "{uri}");
    }
    // A paging token from another search (two sort keys against one) is refused.
    let first = get(&fixture.router, "/fhir/Patient?_sort=family&_count=1").await.ok();
    let next = link(&first, "next").unwrap();
    let token = next.split("_page=").nth(1).unwrap();
    let reply = get(&fixture.router, &format!("/fhir/Patient?_sort=family,birthdate&_page={token}")).await;
    expect_error(&reply, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn path_segments_that_are_not_utf8_are_400_operation_outcomes() {
    let fixture = Fixture::new();
    let reply = get(&fixture.router, "/fhir/Patient/%FF%FE").await;
    expect_error(&reply, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_types_resources_and_endpoints_are_404() {
    let fixture = Fixture::new();
    for uri in [
        "/fhir/Patient/nobody",
        "/fhir/Unicorn/1",
        "/fhir/Unicorn?name=x",
        "/fhir/Unicorn/_history",
        "/fhir/Patient/pat-1/_history/99",
        "/fhir/Patient/pat-1/whatever",
        "/fhir/Patient/pat-1/_history/1/extra",
        "/fhir",
        "/fhir/.well-known/smart-configuration",
        "/nothing-here",
    ] {
        assert_eq!(expect_error(&get(&fixture.router, uri).await, StatusCode::NOT_FOUND), ["not-found"], "{uri}");
    }
}

#[tokio::test]
async fn writes_are_405() {
    let fixture = Fixture::new();
    let json_body = || Body::from(json!({"resourceType": "Patient", "id": "pat-1"}).to_string());
    for (method, uri) in [
        (Method::POST, "/fhir/Patient"),
        (Method::PUT, "/fhir/Patient/pat-1"),
        (Method::PATCH, "/fhir/Patient/pat-1"),
        (Method::DELETE, "/fhir/Patient/pat-1"),
        (Method::DELETE, "/fhir/Patient?family=doe"),
        (Method::POST, "/fhir"),
        (Method::POST, "/fhir/"),
        (Method::PUT, "/fhir/Patient/pat-1/_history/1"),
        (Method::DELETE, "/fhir/Patient/pat-1/_history"),
        (Method::DELETE, "/fhir/Patient/_history"),
        (Method::POST, "/fhir/_history"),
    ] {
        let reply = send(
            &fixture.router,
            request(method.clone(), uri, &[("content-type", "application/fhir+json")], json_body()),
        )
        .await;
        assert_eq!(expect_error(&reply, StatusCode::METHOD_NOT_ALLOWED), ["not-supported"], "{method} {uri}");
    }
    // Nothing was written.
    assert_eq!(get(&fixture.router, "/fhir/Patient/pat-1").await.header("etag"), Some("W/\"2\""));
}

#[tokio::test]
async fn admin_routes_answer_wrong_methods_with_405_operation_outcomes() {
    let fixture = Fixture::new();
    let reply = send(&fixture.router, request(Method::DELETE, "/admin/messages", &[], Body::empty())).await;
    expect_error(&reply, StatusCode::METHOD_NOT_ALLOWED);
    let reply = send(&fixture.router, request(Method::GET, "/admin/mappings/reload", &[], Body::empty())).await;
    expect_error(&reply, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn mapping_reload_that_does_not_compile_is_422() {
    let fixture = Fixture::with_sources(Sources {
        folders: vec![PathBuf::from("/nonexistent/hl7gw-mappings")],
        ..Sources::default()
    });
    let reply = send(&fixture.router, request(Method::POST, "/admin/mappings/reload", &[], Body::empty())).await;
    assert_eq!(expect_error(&reply, StatusCode::UNPROCESSABLE_ENTITY), ["processing"]);
    // The working mappings stay; with good sources the reload succeeds.
    let fixture = Fixture::new();
    let reply = send(&fixture.router, request(Method::POST, "/admin/mappings/reload", &[], Body::empty())).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["reloaded"], true);
}

// ---------------------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------------------

const ISSUER: &str = "https://idp.example.org";
const AUDIENCE: &str = "https://gateway.example.org/fhir";

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// An ES256 key pair: the signing key and the public JWK.
fn ec_key(kid: &str) -> (jsonwebtoken::EncodingKey, Value) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
        "x": base64url(&raw[1..33]), "y": base64url(&raw[33..])});
    (jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(), jwk)
}

/// The fixture behind a verifier that trusts one key.
struct Secured {
    fixture: Fixture,
    key: jsonwebtoken::EncodingKey,
}

impl Secured {
    async fn new() -> Secured {
        let fixture = Fixture::new();
        let (key, jwk) = ec_key("gw-test");
        let jwks = fixture._directory.path().join("jwks.json");
        std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
        let config = auth::Config {
            issuer: ISSUER.to_string(),
            audience: AUDIENCE.to_string(),
            jwks_file: Some(jwks),
            jwks_url: None,
            jwks_ca_file: None,
            clock_skew_seconds: None,
            admin_scope: None,
            token_endpoint: Some("https://idp.example.org/token".to_string()),
            authorization_endpoint: None,
            capabilities: None,
        };
        let settings = config.validate().unwrap();
        let verifier = Verifier::load(&settings).await.unwrap();
        let router =
            api::router(state(&fixture.database, Some(Arc::new(verifier)), Some(settings), Sources::default()));
        Secured { fixture: Fixture { router, ..fixture }, key }
    }

    fn token_with(&self, key: &jsonwebtoken::EncodingKey, scope: &str, patient: Option<&str>) -> String {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let mut claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "app-user", "client_id": "test-app",
            "iat": now, "exp": now + 300, "scope": scope});
        if let Some(patient) = patient {
            claims["patient"] = json!(patient);
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("gw-test".to_string());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn token(&self, scope: &str, patient: Option<&str>) -> String {
        self.token_with(&self.key, scope, patient)
    }

    async fn get_as(&self, token: &str, uri: &str) -> Reply {
        let bearer = format!("Bearer {token}");
        get_with(&self.fixture.router, uri, &[("authorization", bearer.as_str())]).await
    }
}

#[tokio::test]
async fn without_a_valid_token_requests_are_401_with_www_authenticate() {
    let secured = Secured::new().await;
    let router = &secured.fixture.router;
    for uri in ["/fhir/Patient/pat-1", "/fhir/Patient?family=doe", "/fhir/_history", "/admin/messages/stats"] {
        let reply = get(router, uri).await;
        assert_eq!(expect_error(&reply, StatusCode::UNAUTHORIZED), ["login"], "{uri}");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    let basic = get_with(router, "/fhir/Patient/pat-1", &[("authorization", "Basic dXNlcjpwYXNz")]).await;
    expect_error(&basic, StatusCode::UNAUTHORIZED);
    for bad in ["not-a-jwt", "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"] {
        let reply = secured.get_as(bad, "/fhir/Patient/pat-1").await;
        expect_error(&reply, StatusCode::UNAUTHORIZED);
        assert!(reply.header("www-authenticate").unwrap().contains("invalid_token"), "{bad}");
    }
    // Signed by a key the issuer does not publish.
    let (stranger, _) = ec_key("gw-test");
    let forged = secured.token_with(&stranger, "system/*.read", None);
    let reply = secured.get_as(&forged, "/fhir/Patient/pat-1").await;
    expect_error(&reply, StatusCode::UNAUTHORIZED);
    assert!(reply.header("www-authenticate").unwrap().contains("invalid_token"));
}

#[tokio::test]
async fn metadata_and_smart_configuration_are_public() {
    let secured = Secured::new().await;
    let statement = get(&secured.fixture.router, "/fhir/metadata").await.ok();
    assert_eq!(statement["rest"][0]["security"]["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let smart = get(&secured.fixture.router, "/fhir/.well-known/smart-configuration").await;
    assert_eq!(smart.status, StatusCode::OK);
    assert_eq!(smart.json()["token_endpoint"], "https://idp.example.org/token");
}

#[tokio::test]
async fn system_scopes_read_and_search_everything_but_not_admin() {
    let secured = Secured::new().await;
    let token = secured.token("system/*.read", None);
    assert_eq!(secured.get_as(&token, "/fhir/Patient/pat-2").await.ok()["id"], "pat-2");
    assert_eq!(secured.get_as(&token, "/fhir/Patient").await.ok()["total"], 4);
    assert_eq!(secured.get_as(&token, "/fhir/_history?_count=1").await.status, StatusCode::OK);
    let everything = secured.get_as(&token, "/fhir/Patient/pat-2/$everything").await.ok();
    assert_eq!(everything["total"], 4);
    let admin = secured.get_as(&token, "/admin/messages/stats").await;
    assert_eq!(expect_error(&admin, StatusCode::FORBIDDEN), ["forbidden"]);
    let operator = secured.token("system/*.read hl7gw/admin", None);
    let stats = secured.get_as(&operator, "/admin/messages/stats").await;
    assert_eq!(stats.status, StatusCode::OK);
    assert!(stats.json()["status_counts"].is_object());
    // v2 scopes: `s` without `r` searches but cannot read.
    let search_only = secured.token("system/Patient.s", None);
    assert_eq!(secured.get_as(&search_only, "/fhir/Patient?_id=pat-1").await.ok()["total"], 1);
    expect_error(&secured.get_as(&search_only, "/fhir/Patient/pat-1").await, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn patient_scopes_see_only_their_patients_compartment() {
    let secured = Secured::new().await;
    let token = secured.token("patient/*.read", Some("pat-1"));
    assert_eq!(secured.get_as(&token, "/fhir/Patient/pat-1").await.ok()["id"], "pat-1");
    assert_eq!(secured.get_as(&token, "/fhir/Observation/obs-glu-1").await.ok()["id"], "obs-glu-1");
    assert_eq!(secured.get_as(&token, "/fhir/Patient/pat-1/_history/1").await.ok()["id"], "pat-1");
    assert_eq!(secured.get_as(&token, "/fhir/Patient/pat-1/_history").await.ok()["total"], 2);
    // Another patient and their data do not exist for this token.
    for uri in [
        "/fhir/Patient/pat-2",
        "/fhir/Observation/obs-hb",
        "/fhir/Encounter/enc-3",
        "/fhir/Appointment/appt-1",
        "/fhir/Patient/pat-2/_history/1",
        "/fhir/Patient/pat-2/_history",
    ] {
        assert_eq!(expect_error(&secured.get_as(&token, uri).await, StatusCode::NOT_FOUND), ["not-found"], "{uri}");
    }
    // Searches are restricted to the compartment.
    let patients = secured.get_as(&token, "/fhir/Patient").await.ok();
    assert_eq!(ids(&patients), ["pat-1"]);
    let observations = secured.get_as(&token, "/fhir/Observation?_count=100").await.ok();
    let mut found = ids(&observations);
    found.sort();
    assert_eq!(found, ["obs-glu-1", "obs-glu-2", "obs-hr"]);
    assert_eq!(observations["total"], 3);
    assert_eq!(secured.get_as(&token, "/fhir/Observation?patient=pat-2").await.ok()["total"], 0);
    assert_eq!(secured.get_as(&token, "/fhir/Observation?code=718-7").await.ok()["total"], 0);
    let included = secured
        .get_as(&token, "/fhir/Encounter?_revinclude=Observation:encounter&_include=Encounter:patient")
        .await
        .ok();
    let mut all: Vec<String> = entries(&included, "match").into_iter().chain(entries(&included, "include")).collect();
    all.sort();
    assert!(
        !all.iter().any(|entry| entry.contains("pat-2") || entry.contains("obs-hb") || entry.contains("enc-3")),
        "{all:?}"
    );
    assert!(all.contains(&"Patient/pat-1".to_string()));
    let everything = secured.get_as(&token, "/fhir/Patient/pat-1/$everything").await.ok();
    assert_eq!(everything["total"], 9);
    // Type and system history would list other patients' data.
    expect_error(&secured.get_as(&token, "/fhir/Observation/_history").await, StatusCode::FORBIDDEN);
    expect_error(&secured.get_as(&token, "/fhir/_history").await, StatusCode::FORBIDDEN);
    // A patient scope without a patient claim grants nothing.
    let unbound = secured.token("patient/*.read", None);
    expect_error(&secured.get_as(&unbound, "/fhir/Patient/pat-1").await, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn another_patients_everything_is_404_for_a_patient_token() {
    let secured = Secured::new().await;
    let token = secured.token("patient/*.read", Some("pat-1"));
    let reply = secured.get_as(&token, "/fhir/Patient/pat-2/$everything").await;
    assert_eq!(expect_error(&reply, StatusCode::NOT_FOUND), ["not-found"]);
}

#[tokio::test]
async fn a_scope_for_one_type_forbids_the_others() {
    let secured = Secured::new().await;
    let token = secured.token("patient/Observation.rs", Some("pat-1"));
    assert_eq!(
        expect_error(&secured.get_as(&token, "/fhir/Patient/pat-1").await, StatusCode::FORBIDDEN),
        ["forbidden"]
    );
    expect_error(&secured.get_as(&token, "/fhir/Patient?_id=pat-1").await, StatusCode::FORBIDDEN);
    expect_error(&secured.get_as(&token, "/fhir/Encounter/enc-1").await, StatusCode::FORBIDDEN);
    let observations = secured.get_as(&token, "/fhir/Observation?code=2345-7").await.ok();
    let mut found = ids(&observations);
    found.sort();
    assert_eq!(found, ["obs-glu-1", "obs-glu-2"]);
    // Includes of types the token cannot read are left out.
    let included = secured.get_as(&token, "/fhir/Observation?_id=obs-glu-1&_include=Observation:patient").await.ok();
    assert!(entries(&included, "include").is_empty());
    assert_eq!(secured.get_as(&token, "/fhir/Observation/obs-glu-1").await.ok()["id"], "obs-glu-1");
    let admin = secured.get_as(&token, "/admin/messages").await;
    expect_error(&admin, StatusCode::FORBIDDEN);
}

// ---------------------------------------------------------------------------------------
// Over HTTP
// ---------------------------------------------------------------------------------------

/// Serves `router` on a loopback port; returns the base URL (`http://127.0.0.1:port`).
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{address}")
}

fn http_client() -> reqwest::Client {
    let tls = hl7_fhir_gateway::mllp::tls::client_config(&Default::default()).unwrap();
    reqwest::Client::builder().tls_backend_preconfigured((*tls).clone()).build().unwrap()
}

async fn http(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let mut headers = HeaderMap::new();
    for (name, value) in response.headers() {
        headers.append(name.clone(), value.clone());
    }
    let raw = response.bytes().await.unwrap();
    reply(status, headers, raw).await
}

#[tokio::test]
async fn http_read_with_etag_and_conditional_requests() {
    let fixture = Fixture::new();
    let base = serve(fixture.router.clone()).await;
    let client = http_client();
    let url = format!("{base}/fhir/Patient/pat-1");
    let first = http(client.get(&url).header("accept", "application/fhir+json")).await;
    assert_eq!(first.ok()["id"], "pat-1");
    let etag = first.header("etag").unwrap().to_string();
    assert_eq!(etag, "W/\"2\"");
    let last_modified = first.header("last-modified").unwrap().to_string();
    let again = http(client.get(&url).header("if-none-match", &etag)).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    let since = http(client.get(&url).header("if-modified-since", &last_modified)).await;
    assert_eq!(since.status, StatusCode::NOT_MODIFIED);
    let vread = http(client.get(format!("{base}/fhir/Patient/pat-1/_history/1"))).await;
    assert_eq!(vread.ok()["meta"]["versionId"], "1");
    let history = http(client.get(format!("{base}/fhir/Patient/pat-1/_history"))).await.ok();
    assert_eq!(history["entry"][0]["fullUrl"], format!("{base}/fhir/Patient/pat-1"));
    let metadata = http(client.get(format!("{base}/fhir/metadata"))).await.ok();
    assert_eq!(metadata["fhirVersion"], "4.0.1");
}

#[tokio::test]
async fn http_search_follows_next_links_to_the_end() {
    let fixture = Fixture::new();
    let base = serve(fixture.router.clone()).await;
    let client = http_client();
    let mut url = format!("{base}/fhir/Observation?patient=Patient/pat-4&_sort=-date&_count=6");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = http(client.get(&url)).await.ok();
        assert_eq!(page["total"], SERIES);
        seen.extend(ids(&page));
        pages += 1;
        match link(&page, "next") {
            Some(next) => {
                assert!(next.starts_with(&base), "{next}");
                url = next;
            }
            None => break,
        }
        assert!(pages < 50);
    }
    let expected: Vec<String> = (0..SERIES).rev().map(|index| format!("obs-wt-{index:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, SERIES.div_ceil(6));
    let posted = http(
        client
            .post(format!("{base}/fhir/Encounter/_search"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("patient.identifier=MRN001&_sort=date"),
    )
    .await
    .ok();
    assert_eq!(ids(&posted), ["enc-1", "enc-2"]);
}

#[tokio::test]
async fn http_gzip_when_accepted() {
    let fixture = Fixture::new();
    let base = serve(fixture.router.clone()).await;
    let client = http_client();
    let reply =
        http(client.get(format!("{base}/fhir/Observation?patient=pat-4")).header("accept-encoding", "gzip")).await;
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(&reply.raw[..2], &[0x1f, 0x8b]);
    assert!(reply.raw.len() < reply.body.len());
    assert_eq!(ids(&reply.ok()).len(), 20);
    let identity = http(client.get(format!("{base}/fhir/Observation?patient=pat-4"))).await;
    assert!(identity.header("content-encoding").is_none());
}

#[tokio::test]
async fn http_errors_are_operation_outcomes_with_their_status() {
    let fixture = Fixture::new();
    let base = serve(fixture.router.clone()).await;
    let client = http_client();
    let cases = [
        (client.get(format!("{base}/fhir/Patient?birthdate=1990-13")), StatusCode::BAD_REQUEST),
        (client.get(format!("{base}/fhir/Patient/nobody")), StatusCode::NOT_FOUND),
        (client.put(format!("{base}/fhir/Patient/pat-1")).body("{}"), StatusCode::METHOD_NOT_ALLOWED),
        (
            client.get(format!("{base}/fhir/Patient/pat-1")).header("accept", "application/fhir+xml"),
            StatusCode::NOT_ACCEPTABLE,
        ),
        (client.get(format!("{base}/fhir/Patient/pat-del")), StatusCode::GONE),
        (
            client.post(format!("{base}/fhir/Patient/_search")).header("content-type", "text/plain").body("family=doe"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ];
    for (request, status) in cases {
        let reply = http(request).await;
        expect_error(&reply, status);
    }
    let secured = Secured::new().await;
    let base = serve(secured.fixture.router.clone()).await;
    let unauthorized = http(client.get(format!("{base}/fhir/Patient/pat-1"))).await;
    expect_error(&unauthorized, StatusCode::UNAUTHORIZED);
    assert_eq!(unauthorized.header("www-authenticate"), Some("Bearer"));
    let token = secured.token("patient/Observation.rs", Some("pat-1"));
    let forbidden = http(client.get(format!("{base}/fhir/Patient/pat-1")).bearer_auth(&token)).await;
    expect_error(&forbidden, StatusCode::FORBIDDEN);
    let allowed = http(client.get(format!("{base}/fhir/Observation/obs-glu-1")).bearer_auth(&token)).await;
    assert_eq!(allowed.ok()["id"], "obs-glu-1");
}

#[tokio::test]
async fn a_patient_token_never_sees_an_earlier_version_that_belonged_to_another_patient() {
    let secured = Secured::new().await;
    // Filed under John first, corrected to Jane.
    let mut moved = observation(
        "obs-moved",
        "pat-2",
        None,
        "final",
        "laboratory",
        ("2345-7", "Glucose"),
        "2024-02-01T08:00:00Z",
        (101.0, "mg/dL"),
    );
    write(&secured.fixture.database, std::slice::from_ref(&moved), UPDATED_US + 100_000_000);
    moved["subject"] = json!({"reference": "Patient/pat-1"});
    write(&secured.fixture.database, &[moved], UPDATED_US + 200_000_000);

    let jane = secured.token("patient/*.read", Some("pat-1"));
    assert_eq!(secured.get_as(&jane, "/fhir/Observation/obs-moved").await.ok()["meta"]["versionId"], "2");
    assert_eq!(
        secured.get_as(&jane, "/fhir/Observation/obs-moved/_history/2").await.ok()["subject"]["reference"],
        "Patient/pat-1"
    );
    expect_error(&secured.get_as(&jane, "/fhir/Observation/obs-moved/_history/1").await, StatusCode::NOT_FOUND);
    let history = secured.get_as(&jane, "/fhir/Observation/obs-moved/_history").await.ok();
    assert_eq!(history["total"], 1);
    assert_eq!(history["entry"].as_array().unwrap().len(), 1);
    assert_eq!(history["entry"][0]["resource"]["meta"]["versionId"], "2");
    // With full access, both versions.
    let system = secured.token("system/*.read", None);
    assert_eq!(secured.get_as(&system, "/fhir/Observation/obs-moved/_history").await.ok()["total"], 2);
    assert_eq!(
        secured.get_as(&system, "/fhir/Observation/obs-moved/_history/1").await.ok()["subject"]["reference"],
        "Patient/pat-2"
    );
    // Jane's own record keeps its full history.
    assert_eq!(secured.get_as(&jane, "/fhir/Patient/pat-1/_history").await.ok()["total"], 2);
}
