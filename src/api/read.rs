//! `read`, `vread` and the three `history` interactions.
//!
//! Reads answer with `ETag: W/"n"` and `Last-Modified`, and honour `If-None-Match` and
//! `If-Modified-Since` with 304. A deleted resource is 410 Gone; an unknown one 404. With
//! a patient-level token, a resource outside that patient's compartment is 404, as if it
//! did not exist (so that its existence is not disclosed).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::Response;

use super::render::{self, Entry, Link, Subset};
use super::{check_id, check_type, fhir_response, require, ApiError, ApiState, FhirRequest, Params};
use crate::auth::Access;
use crate::store::search::Summary;
use crate::store::{self, HistoryQuery, Store, StoredResource};

/// The conditional headers of a read: `If-None-Match` (every field line) and
/// `If-Modified-Since`.
#[derive(Debug, Default)]
pub struct Validators {
    none_match: Vec<HeaderValue>,
    modified_since: Option<HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for Validators {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Validators {
            none_match: parts.headers.get_all(header::IF_NONE_MATCH).iter().cloned().collect(),
            modified_since: parts.headers.get(header::IF_MODIFIED_SINCE).cloned(),
        })
    }
}

/// `GET /fhir/{type}/{id}`: a lookup by key on the calling thread's connection.
pub async fn read(
    State(store): State<Arc<Store>>,
    request: FhirRequest,
    Path((resource_type, id)): Path<(String, String)>,
    Params(params): Params,
    validators: Validators,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    let access = require(request.grant.can_read(&resource_type), || format!("reading {resource_type}"))?;
    let (lookup_type, lookup_id) = (resource_type.clone(), id.clone());
    let found = store
        .point_read(move |connection| {
            let found = store::read(connection, &lookup_type, &lookup_id)?;
            visible(connection, found, &access)
        })
        .await?;
    let Some(resource) = found else {
        return Err(ApiError::NotFound(format!("{resource_type}/{id} is not known")));
    };
    respond_version(resource, &request, &params, &validators, "read")
}

/// `GET /fhir/{type}/{id}/_history/{version}`: a lookup by key, like [`read`].
pub async fn vread(
    State(store): State<Arc<Store>>,
    request: FhirRequest,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    Params(params): Params,
    validators: Validators,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    let Ok(number) = version.parse::<i64>() else {
        return Err(ApiError::NotFound(format!("{resource_type}/{id} has no version `{version}`")));
    };
    let access = require(request.grant.can_read(&resource_type), || format!("reading {resource_type}"))?;
    let (lookup_type, lookup_id) = (resource_type.clone(), id.clone());
    let found = store
        .point_read(move |connection| {
            let found = store::vread(connection, &lookup_type, &lookup_id, number)?;
            let found = match &access {
                // The current version decides the compartment; an older one must be in it too.
                Access::Patient(patient) => found.filter(|version| version_visible(version, patient)),
                _ => found,
            };
            visible(connection, found, &access)
        })
        .await?;
    let Some(resource) = found else {
        return Err(ApiError::NotFound(format!("{resource_type}/{id} has no version {version}")));
    };
    respond_version(resource, &request, &params, &validators, "vread")
}

/// For a patient-level grant, whether one stored version belongs to the patient: the
/// Patient itself, a version that references it, or a deletion (which carries no data).
/// A resource whose subject changed must not show another patient's earlier version.
fn version_visible(version: &StoredResource, patient: &str) -> bool {
    if version.deleted {
        return true;
    }
    if version.resource_type == "Patient" && version.id == patient {
        return true;
    }
    serde_json::from_str::<serde_json::Value>(&version.body).is_ok_and(|body| references_patient(&body, patient))
}

fn references_patient(value: &serde_json::Value, patient: &str) -> bool {
    match value {
        serde_json::Value::Object(object) => object.iter().any(|(key, value)| {
            let points_here = key == "reference"
                && value.as_str().is_some_and(|reference| {
                    reference.strip_prefix("Patient/").or_else(|| reference.rsplit_once("/Patient/").map(|(_, id)| id))
                        == Some(patient)
                });
            points_here || references_patient(value, patient)
        }),
        serde_json::Value::Array(items) => items.iter().any(|item| references_patient(item, patient)),
        _ => false,
    }
}

/// Hides a resource outside the caller's patient compartment.
fn visible(
    connection: &rusqlite::Connection,
    found: Option<StoredResource>,
    access: &Access,
) -> Result<Option<StoredResource>, store::StoreError> {
    match (found, access) {
        (Some(resource), Access::Patient(patient)) => {
            let inside =
                crate::store::search::in_compartment(connection, &resource.resource_type, &resource.id, patient)?;
            Ok(inside.then_some(resource))
        }
        (found, _) => Ok(found),
    }
}

fn respond_version(
    resource: StoredResource,
    request: &FhirRequest,
    params: &[(String, String)],
    validators: &Validators,
    interaction: &'static str,
) -> Result<Response, ApiError> {
    if resource.deleted {
        return Err(ApiError::Gone(format!(
            "{}/{} was deleted (version {})",
            resource.resource_type, resource.id, resource.version
        )));
    }
    let etag = render::etag(resource.version);
    let last_modified = render::http_date(resource.last_updated_us);
    if not_modified(validators, &etag, resource.last_updated_us) {
        let mut response = fhir_response(StatusCode::NOT_MODIFIED, String::new(), interaction);
        set_validators(&mut response, etag, last_modified);
        return Ok(response);
    }
    let subset = subset_of(params)?;
    // The stored body already carries meta.versionId and meta.lastUpdated: a whole
    // resource is sent as stored.
    let body = if subset.is_whole() { resource.body } else { render::subset_body(&resource.body, &subset) };
    let mut response = fhir_response(StatusCode::OK, render::finish(body, request.pretty), interaction);
    set_validators(&mut response, etag, last_modified);
    Ok(response)
}

fn set_validators(response: &mut Response, etag: String, last_modified: String) {
    if let Ok(value) = HeaderValue::try_from(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::try_from(last_modified) {
        response.headers_mut().insert(header::LAST_MODIFIED, value);
    }
}

/// `If-None-Match` (weak comparison, `*` matches) wins over `If-Modified-Since`.
fn not_modified(validators: &Validators, etag: &str, last_updated_us: i64) -> bool {
    let mut tags = validators
        .none_match
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .peekable();
    if tags.peek().is_some() {
        let bare = etag.trim_start_matches("W/");
        return tags.any(|tag| tag == "*" || tag.trim_start_matches("W/") == bare);
    }
    let since =
        validators.modified_since.as_ref().and_then(|value| value.to_str().ok()).and_then(render::parse_http_date);
    // HTTP dates have whole seconds: modified only if later than the second given.
    since.is_some_and(|since| last_updated_us / 1_000_000 <= since / 1_000_000)
}

/// `_summary` and `_elements` on a read.
fn subset_of(params: &[(String, String)]) -> Result<Subset, ApiError> {
    let mut subset = Subset::default();
    for (name, value) in params {
        match name.as_str() {
            "_elements" => subset.elements = Some(value.split(',').map(|element| element.trim().to_string()).collect()),
            "_summary" => {
                subset.summary = Some(match value.as_str() {
                    "true" => Summary::True,
                    "text" => Summary::Text,
                    "data" => Summary::Data,
                    "false" => Summary::False,
                    other => {
                        return Err(ApiError::BadRequest(vec![format!(
                            "_summary={other} is not valid on a read (true, text, data, false)"
                        )]))
                    }
                })
            }
            _ => {}
        }
    }
    Ok(subset)
}

/// `GET /fhir/_history`.
pub async fn system_history(
    State(state): State<ApiState>,
    request: FhirRequest,
    Params(params): Params,
) -> Result<Response, ApiError> {
    if !matches!(request.grant.can_read("*"), Access::All) {
        return Err(ApiError::Forbidden("system history needs read access to every resource type".to_string()));
    }
    history(state, request, params, None, None).await
}

/// `GET /fhir/{type}/_history`.
pub async fn type_history(
    State(state): State<ApiState>,
    request: FhirRequest,
    Path(resource_type): Path<String>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    if !matches!(request.grant.can_read(&resource_type), Access::All) {
        return Err(ApiError::Forbidden(format!("type history needs read access to all {resource_type} resources")));
    }
    history(state, request, params, Some(resource_type), None).await
}

/// `GET /fhir/{type}/{id}/_history`.
pub async fn instance_history(
    State(state): State<ApiState>,
    request: FhirRequest,
    Path((resource_type, id)): Path<(String, String)>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    let access = require(request.grant.can_read(&resource_type), || format!("reading {resource_type}"))?;
    let (lookup_type, lookup_id) = (resource_type.clone(), id.clone());
    let current = state
        .store
        .read(move |connection| {
            let found = store::read(connection, &lookup_type, &lookup_id)?;
            visible(connection, found, &access)
        })
        .await?;
    if current.is_none() {
        return Err(ApiError::NotFound(format!("{resource_type}/{id} is not known")));
    }
    history(state, request, params, Some(resource_type), Some(id)).await
}

/// Runs a history query; with a patient-level grant (instance history only), the versions
/// outside the patient's compartment are left out before paging.
fn history_page(
    connection: &rusqlite::Connection,
    query: &HistoryQuery,
    patient: Option<&str>,
) -> Result<store::HistoryPage, store::StoreError> {
    let Some(patient) = patient else {
        return store::history(connection, query);
    };
    // One resource's versions: few enough to filter whole.
    let all = store::history(connection, &HistoryQuery { count: usize::MAX >> 1, offset: 0, ..query.clone() })?;
    let kept: Vec<StoredResource> =
        all.versions.into_iter().filter(|version| version_visible(version, patient)).collect();
    let total = kept.len() as u64;
    let versions = kept.into_iter().skip(query.offset).take(query.count).collect();
    Ok(store::HistoryPage { total, versions })
}

async fn history(
    state: ApiState,
    request: FhirRequest,
    params: Vec<(String, String)>,
    resource_type: Option<String>,
    id: Option<String>,
) -> Result<Response, ApiError> {
    let mut query = HistoryQuery {
        resource_type: resource_type.clone(),
        id: id.clone(),
        count: crate::store::search::DEFAULT_COUNT,
        ..HistoryQuery::default()
    };
    let mut problems = Vec::new();
    for (name, value) in &params {
        match name.as_str() {
            "_count" => match value.parse::<usize>() {
                Ok(count) => query.count = count.min(crate::store::search::MAX_COUNT),
                Err(_) => problems.push(format!("_count={value} is not a number")),
            },
            "_offset" => match value.parse::<usize>() {
                Ok(offset) => query.offset = offset,
                Err(_) => problems.push(format!("_offset={value} is not a number")),
            },
            "_since" => match parse_instant(value) {
                Some(us) => query.since_us = Some(us),
                None => problems.push(format!("_since={value} is not an instant (e.g. 2024-01-31T10:00:00Z)")),
            },
            "_format" | "_pretty" => {}
            other if request.strict => problems.push(format!("{other} is not supported on history")),
            _ => {}
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::BadRequest(problems));
    }
    let page_query = query.clone();
    let patient = match (&id, &resource_type) {
        (Some(_), Some(resource_type)) => match request.grant.can_read(resource_type) {
            Access::Patient(patient) => Some(patient),
            _ => None,
        },
        _ => None,
    };
    let page = state.store.read(move |connection| history_page(connection, &page_query, patient.as_deref())).await?;
    let path = match (&resource_type, &id) {
        (Some(resource_type), Some(id)) => format!("{}/{resource_type}/{id}/_history", request.base),
        (Some(resource_type), None) => format!("{}/{resource_type}/_history", request.base),
        _ => format!("{}/_history", request.base),
    };
    let link = |offset: usize| {
        let mut pairs =
            vec![("_count".to_string(), query.count.to_string()), ("_offset".to_string(), offset.to_string())];
        if let Some(since) = query.since_us {
            pairs.push(("_since".to_string(), crate::telemetry::rfc3339_us(since)));
        }
        format!("{path}?{}", serde_urlencoded::to_string(&pairs).unwrap_or_default())
    };
    let mut links = vec![Link { relation: "self", url: link(query.offset) }];
    if (query.offset + page.versions.len()) < page.total as usize && !page.versions.is_empty() {
        links.push(Link { relation: "next", url: link(query.offset + page.versions.len()) });
    }
    if query.offset > 0 {
        links.push(Link { relation: "previous", url: link(query.offset.saturating_sub(query.count)) });
    }
    let entries: Vec<Entry<'_>> = page.versions.iter().map(|resource| Entry { resource, search_mode: None }).collect();
    let body = render::bundle("history", &request.base, Some(page.total), &links, &entries, None, &Subset::default());
    Ok(fhir_response(StatusCode::OK, render::finish(body, request.pretty), "history"))
}

/// An instant or date for `_since` (`2024-01-31`, `2024-01-31T10:00:00Z`, with offset).
fn parse_instant(text: &str) -> Option<i64> {
    if let Ok(timestamp) = text.parse::<jiff::Timestamp>() {
        return Some(timestamp.as_microsecond());
    }
    let date = text.parse::<jiff::civil::Date>().ok()?;
    Some(date.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp().as_microsecond())
}
