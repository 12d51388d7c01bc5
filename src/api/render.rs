//! Turning stored resources into response bodies: searchset and history Bundles, the
//! `_elements` and `_summary` subsets, pretty printing, and HTTP dates.
//!
//! Stored bodies are already complete JSON (with `meta.versionId` and `meta.lastUpdated`),
//! so Bundles are assembled as text around them; a body is parsed only when a subset or
//! pretty printing is asked for.

use serde_json::{json, Map, Value};

use crate::store::search::Summary;
use crate::store::StoredResource;

/// The tag a server puts on a resource it returns incompletely (`_elements`, `_summary`).
const SUBSETTED: (&str, &str) = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED");

/// Elements every subset keeps.
const ALWAYS: [&str; 4] = ["resourceType", "id", "meta", "implicitRules"];

/// Which part of each resource to return.
#[derive(Clone, Debug, Default)]
pub struct Subset {
    /// `_summary`.
    pub summary: Option<Summary>,
    /// `_elements`.
    pub elements: Option<Vec<String>>,
}

impl Subset {
    /// True when resources are returned whole.
    pub fn is_whole(&self) -> bool {
        self.elements.is_none() && matches!(self.summary, None | Some(Summary::False))
    }
}

/// The body of `resource` restricted to `subset`.
pub fn subset_body(body: &str, subset: &Subset) -> String {
    if subset.is_whole() {
        return body.to_string();
    }
    let Ok(Value::Object(mut resource)) = serde_json::from_str::<Value>(body) else {
        return body.to_string();
    };
    let resource_type = resource.get("resourceType").and_then(Value::as_str).unwrap_or("").to_string();
    let keep: Box<dyn Fn(&str) -> bool> = match (&subset.elements, subset.summary) {
        (Some(elements), _) => {
            let elements: Vec<String> = elements.iter().map(|element| element.trim().to_string()).collect();
            Box::new(move |key: &str| ALWAYS.contains(&key) || elements.iter().any(|element| element == key))
        }
        (None, Some(Summary::Text)) => Box::new(|key: &str| ALWAYS.contains(&key) || key == "text"),
        (None, Some(Summary::Data)) => Box::new(|key: &str| key != "text"),
        (None, _) => {
            let summary = summary_elements(&resource_type);
            Box::new(move |key: &str| {
                ALWAYS.contains(&key) || summary.iter().any(|element| choice_matches(element, key))
            })
        }
    };
    resource.retain(|key, _| keep(key));
    let meta = resource.entry("meta").or_insert_with(|| json!({}));
    if let Value::Object(meta) = meta {
        let tags = meta.entry("tag").or_insert_with(|| json!([]));
        if let Value::Array(tags) = tags {
            tags.push(json!({ "system": SUBSETTED.0, "code": SUBSETTED.1 }));
        }
    }
    Value::Object(resource).to_string()
}

/// `value[x]` matches `valueQuantity`, `valueString`...
fn choice_matches(element: &str, key: &str) -> bool {
    match element.strip_suffix("[x]") {
        Some(stem) => key.starts_with(stem) && key[stem.len()..].starts_with(|c: char| c.is_ascii_uppercase()),
        None => element == key,
    }
}

/// The elements R4 marks `isSummary` for the types the gateway produces (top level only).
/// Types not listed keep their identifying elements and status.
fn summary_elements(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Patient" => &[
            "identifier",
            "active",
            "name",
            "telecom",
            "gender",
            "birthDate",
            "deceased[x]",
            "address",
            "managingOrganization",
            "link",
        ],
        "Encounter" => &[
            "identifier",
            "status",
            "class",
            "type",
            "serviceType",
            "priority",
            "subject",
            "episodeOfCare",
            "basedOn",
            "participant",
            "appointment",
            "period",
            "reasonCode",
            "reasonReference",
            "diagnosis",
            "account",
            "location",
            "serviceProvider",
            "partOf",
        ],
        "Observation" => &[
            "identifier",
            "basedOn",
            "partOf",
            "status",
            "category",
            "code",
            "subject",
            "focus",
            "encounter",
            "effective[x]",
            "issued",
            "performer",
            "value[x]",
            "hasMember",
            "derivedFrom",
        ],
        "DiagnosticReport" => &[
            "identifier",
            "basedOn",
            "status",
            "category",
            "code",
            "subject",
            "encounter",
            "effective[x]",
            "issued",
            "performer",
            "resultsInterpreter",
            "specimen",
            "result",
            "imagingStudy",
            "conclusionCode",
        ],
        "ServiceRequest" => &[
            "identifier",
            "instantiatesCanonical",
            "basedOn",
            "replaces",
            "requisition",
            "status",
            "intent",
            "category",
            "priority",
            "doNotPerform",
            "code",
            "subject",
            "encounter",
            "occurrence[x]",
            "asNeeded[x]",
            "authoredOn",
            "requester",
            "performer",
            "locationCode",
            "locationReference",
            "reasonCode",
            "reasonReference",
        ],
        "Practitioner" => &["identifier", "active", "name", "telecom", "address", "gender", "birthDate"],
        "Organization" => &["identifier", "active", "type", "name", "alias", "partOf"],
        "Location" => &[
            "identifier",
            "status",
            "operationalStatus",
            "name",
            "alias",
            "mode",
            "type",
            "physicalType",
            "managingOrganization",
            "partOf",
        ],
        _ => &[
            "identifier",
            "status",
            "category",
            "code",
            "subject",
            "patient",
            "encounter",
            "date",
            "period",
            "name",
            "type",
        ],
    }
}

/// Pretty-prints a JSON text when asked; otherwise returns it unchanged.
pub fn finish(body: String, pretty: bool) -> String {
    if !pretty {
        return body;
    }
    match serde_json::from_str::<Value>(&body) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or(body),
        Err(_) => body,
    }
}

/// One Bundle link.
pub struct Link {
    /// `self`, `next`, `previous`.
    pub relation: &'static str,
    /// Absolute URL.
    pub url: String,
}

/// A Bundle entry to render.
pub struct Entry<'r> {
    /// The version.
    pub resource: &'r StoredResource,
    /// `search.mode` (`match`, `include`) for searchsets; `None` in history Bundles.
    pub search_mode: Option<&'static str>,
}

/// Renders a Bundle of `bundle_type` (`searchset` or `history`) as JSON text.
pub fn bundle(
    bundle_type: &str,
    base: &str,
    total: Option<u64>,
    links: &[Link],
    entries: &[Entry<'_>],
    outcome: Option<&Value>,
    subset: &Subset,
) -> String {
    let mut head = Map::new();
    head.insert("resourceType".into(), json!("Bundle"));
    head.insert("meta".into(), json!({ "lastUpdated": crate::telemetry::rfc3339_us(crate::telemetry::now_us()) }));
    head.insert("type".into(), json!(bundle_type));
    if let Some(total) = total {
        head.insert("total".into(), json!(total));
    }
    if !links.is_empty() {
        head.insert(
            "link".into(),
            Value::Array(links.iter().map(|link| json!({ "relation": link.relation, "url": link.url })).collect()),
        );
    }
    let mut text = Value::Object(head).to_string();
    if entries.is_empty() && outcome.is_none() {
        return text;
    }
    // Reopen the object to append the entries as text around the stored bodies.
    text.pop();
    text.push_str(",\"entry\":[");
    let mut first = true;
    for entry in entries {
        if !first {
            text.push(',');
        }
        first = false;
        push_entry(&mut text, base, bundle_type, entry, subset);
    }
    if let Some(outcome) = outcome {
        if !first {
            text.push(',');
        }
        text.push_str(&json!({ "resource": outcome, "search": { "mode": "outcome" } }).to_string());
    }
    text.push_str("]}");
    text
}

fn push_entry(text: &mut String, base: &str, bundle_type: &str, entry: &Entry<'_>, subset: &Subset) {
    let resource = entry.resource;
    let url = format!("{}/{}", resource.resource_type, resource.id);
    text.push('{');
    text.push_str(&format!("\"fullUrl\":{}", Value::String(format!("{base}/{url}"))));
    if !resource.deleted {
        text.push_str(",\"resource\":");
        if subset.is_whole() {
            text.push_str(&resource.body);
        } else {
            text.push_str(&subset_body(&resource.body, subset));
        }
    }
    if let Some(mode) = entry.search_mode {
        text.push_str(&format!(",\"search\":{{\"mode\":\"{mode}\"}}"));
    }
    if bundle_type == "history" {
        let (method, status) = match (resource.deleted, resource.version) {
            (true, _) => ("DELETE", "204 No Content"),
            (false, 1) => ("PUT", "201 Created"),
            (false, _) => ("PUT", "200 OK"),
        };
        let request = json!({ "method": method, "url": url });
        let response = json!({
            "status": status,
            "etag": etag(resource.version),
            "lastModified": crate::telemetry::rfc3339_us(resource.last_updated_us),
        });
        text.push_str(&format!(",\"request\":{request},\"response\":{response}"));
    }
    text.push('}');
}

/// The weak ETag of a version: `W/"3"`.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// An HTTP date (RFC 9110 IMF-fixdate) for `Last-Modified`, written out directly (every
/// read has one).
pub fn http_date(us: i64) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let Ok(timestamp) = jiff::Timestamp::from_microsecond(us) else { return String::new() };
    let time = jiff::tz::Offset::UTC.to_datetime(timestamp);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[time.weekday().to_monday_zero_offset() as usize],
        time.day(),
        MONTHS[(time.month() - 1) as usize],
        time.year(),
        time.hour(),
        time.minute(),
        time.second()
    )
}

/// Parses an HTTP date (`If-Modified-Since`) to µs since the epoch.
pub fn parse_http_date(text: &str) -> Option<i64> {
    let parsed = jiff::fmt::strtime::parse("%a, %d %b %Y %H:%M:%S GMT", text.trim()).ok()?;
    let datetime = parsed.to_datetime().ok()?;
    let timestamp = datetime.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    Some(timestamp.as_microsecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &str) -> StoredResource {
        StoredResource {
            resource_type: "Patient".into(),
            id: "p1".into(),
            version: 2,
            last_updated_us: 1_700_000_000_000_000,
            deleted: false,
            body: body.into(),
        }
    }

    #[test]
    fn elements_keep_mandatory_and_named_elements_and_tag_the_subset() {
        let body = r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2"},"name":[{"family":"X"}],"gender":"male","birthDate":"2000-01-01"}"#;
        let subset = Subset { summary: None, elements: Some(vec!["gender".into()]) };
        let value: Value = serde_json::from_str(&subset_body(body, &subset)).unwrap();
        assert_eq!(value["gender"], "male");
        assert!(value.get("name").is_none() && value.get("birthDate").is_none());
        assert_eq!(value["meta"]["versionId"], "2");
        assert_eq!(value["meta"]["tag"][0]["code"], "SUBSETTED");
    }

    #[test]
    fn summary_true_keeps_summary_elements_and_choice_types() {
        let body = r#"{"resourceType":"Observation","id":"o","status":"final","code":{"text":"x"},"valueQuantity":{"value":1},"note":[{"text":"n"}],"text":{"status":"generated","div":"<div/>"}}"#;
        let subset = Subset { summary: Some(Summary::True), elements: None };
        let value: Value = serde_json::from_str(&subset_body(body, &subset)).unwrap();
        assert_eq!(value["valueQuantity"]["value"], 1);
        assert!(value.get("note").is_none() && value.get("text").is_none());
        let data = Subset { summary: Some(Summary::Data), elements: None };
        let value: Value = serde_json::from_str(&subset_body(body, &data)).unwrap();
        assert!(value.get("text").is_none() && value.get("note").is_some());
    }

    #[test]
    fn bundles_embed_stored_bodies_as_valid_json() {
        let resource = stored(r#"{"resourceType":"Patient","id":"p1"}"#);
        let entries = [Entry { resource: &resource, search_mode: Some("match") }];
        let links = [Link { relation: "self", url: "http://h/fhir/Patient?_id=p1".into() }];
        let outcome = json!({"resourceType":"OperationOutcome","issue":[]});
        let text = bundle("searchset", "http://h/fhir", Some(1), &links, &entries, Some(&outcome), &Subset::default());
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["entry"][0]["fullUrl"], "http://h/fhir/Patient/p1");
        assert_eq!(value["entry"][0]["resource"]["id"], "p1");
        assert_eq!(value["entry"][1]["search"]["mode"], "outcome");
        assert_eq!(value["total"], 1);

        let history = bundle("history", "http://h/fhir", Some(1), &[], &entries[..1], None, &Subset::default());
        let value: Value = serde_json::from_str(&history).unwrap();
        assert_eq!(value["entry"][0]["response"]["etag"], "W/\"2\"");
        assert_eq!(value["entry"][0]["request"]["method"], "PUT");
    }

    #[test]
    fn http_dates_round_trip() {
        let text = http_date(1_700_000_000_000_000);
        assert_eq!(text, "Tue, 14 Nov 2023 22:13:20 GMT");
        assert_eq!(parse_http_date(&text), Some(1_700_000_000_000_000));
        assert_eq!(parse_http_date("yesterday"), None);
        // Same text as strftime's, across weekdays, months, leap days and years.
        for step in 0..2_000i64 {
            let us = 946_684_800_000_000 + step * 86_413_123_457;
            let expected = jiff::Timestamp::from_microsecond(us).unwrap().strftime("%a, %d %b %Y %H:%M:%S GMT");
            assert_eq!(http_date(us), expected.to_string());
        }
    }
}
