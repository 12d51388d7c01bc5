//! `search` (GET `/fhir/{type}?...` and POST `/fhir/{type}/_search`) and
//! `Patient/{id}/$everything`.
//!
//! Unknown parameters are ignored and reported in an OperationOutcome entry of the Bundle
//! (`search.mode = outcome`), or refused with 400 under `Prefer: handling=strict`. A
//! patient-level token searches only inside its patient's compartment.

use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::Response;

use super::render::{self, Entry, Link, Subset};
use super::{check_id, check_type, fhir_response, require, ApiError, ApiState, FhirRequest, Params};
use crate::auth::Access;
use crate::store::search::{self, Handling, Page, Summary};
use crate::store::StoreError;

/// Largest `_search` form body accepted.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// `GET /fhir/{type}?...`.
pub async fn search_get(
    State(state): State<ApiState>,
    request: FhirRequest,
    Path(resource_type): Path<String>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    run(state, request, resource_type, params).await
}

/// `POST /fhir/{type}/_search` with an `application/x-www-form-urlencoded` body; URL
/// parameters count too.
pub async fn search_post(
    State(state): State<ApiState>,
    request: FhirRequest,
    Path(resource_type): Path<String>,
    Params(mut params): Params,
    body: Request,
) -> Result<Response, ApiError> {
    let content_type =
        body.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("").to_string();
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let bytes = axum::body::to_bytes(body.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|_| ApiError::BadRequest(vec![format!("the _search body is larger than {MAX_FORM_BYTES} bytes")]))?;
    if !bytes.is_empty() || !media.is_empty() {
        if media != "application/x-www-form-urlencoded" {
            return Err(ApiError::UnsupportedMediaType(format!(
                "POST _search needs Content-Type application/x-www-form-urlencoded, not `{content_type}`"
            )));
        }
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::BadRequest(vec!["the _search body is not UTF-8".to_string()]))?;
        let form = serde_urlencoded::from_str::<Vec<(String, String)>>(text)
            .map_err(|error| ApiError::BadRequest(vec![format!("the _search body cannot be decoded: {error}")]))?;
        params.extend(form);
    }
    run(state, request, resource_type, params).await
}

async fn run(
    state: ApiState,
    request: FhirRequest,
    resource_type: String,
    params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let access = require(request.grant.can_search(&resource_type), || format!("searching {resource_type}"))?;
    let handling = if request.strict { Handling::Strict } else { Handling::Lenient };
    let mut query =
        search::parse(&resource_type, &params, handling).map_err(|error| ApiError::BadRequest(error.issues))?;
    if let Access::Patient(patient) = access {
        query.compartment = Some(patient);
    }
    let subset = Subset { summary: query.summary, elements: query.elements.clone() };
    let running = query.clone();
    let page = state.store.read(move |connection| search::execute(connection, &running)).await?;
    let type_url = format!("{}/{resource_type}", request.base);
    let mut links = vec![Link { relation: "self", url: with_query(&type_url, &query.self_link()) }];
    if let Some(next) = &page.next {
        links.push(Link { relation: "next", url: with_query(&type_url, next) });
    }
    let outcome =
        (!query.warnings.is_empty()).then(|| super::operation_outcome("warning", "not-supported", &query.warnings));
    let body = if query.summary == Some(Summary::Count) {
        render::bundle("searchset", &request.base, page.total, &links, &[], outcome.as_ref(), &subset)
    } else {
        searchset(&request, &page, &links, outcome.as_ref(), &subset)
    };
    Ok(fhir_response(StatusCode::OK, render::finish(body, request.pretty), "search"))
}

fn with_query(url: &str, query: &str) -> String {
    if query.is_empty() {
        url.to_string()
    } else {
        format!("{url}?{query}")
    }
}

/// A searchset Bundle of a page; included resources the caller may not read are left out.
fn searchset(
    request: &FhirRequest,
    page: &Page,
    links: &[Link],
    outcome: Option<&serde_json::Value>,
    subset: &Subset,
) -> String {
    let mut entries: Vec<Entry<'_>> =
        page.matches.iter().map(|resource| Entry { resource, search_mode: Some("match") }).collect();
    entries.extend(
        page.included
            .iter()
            .filter(|resource| request.grant.can_read(&resource.resource_type) != Access::Denied)
            .map(|resource| Entry { resource, search_mode: Some("include") }),
    );
    render::bundle("searchset", &request.base, page.total, links, &entries, outcome, subset)
}

/// `/fhir/{type}/{id}/{operation}`: only `Patient/{id}/$everything` (GET or POST) exists.
pub async fn operation(
    State(state): State<ApiState>,
    method: Method,
    request: FhirRequest,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    if resource_type != "Patient" || operation != "$everything" {
        check_type(&resource_type)?;
        return Err(ApiError::NotFound(format!("{resource_type} has no operation or path `{operation}`")));
    }
    if method != Method::GET && method != Method::POST {
        return Err(ApiError::MethodNotAllowed(format!("$everything is invoked with GET or POST, not {method}")));
    }
    check_id(&id)?;
    match request.grant.can_read("Patient") {
        Access::All => {}
        Access::Patient(patient) if patient == id => {}
        // Another patient does not exist for a patient-level token, as on a read.
        Access::Patient(_) => return Err(ApiError::NotFound(format!("Patient/{id} is not known"))),
        Access::Denied => {
            return Err(ApiError::Forbidden(format!("the token's scopes do not allow reading Patient/{id}")))
        }
    }
    let mut count = search::DEFAULT_COUNT;
    let mut page_token: Option<String> = None;
    for (name, value) in &params {
        match name.as_str() {
            "_count" => {
                count = value
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest(vec![format!("_count={value} is not a number")]))?
                    .clamp(1, search::MAX_COUNT)
            }
            "_page" => page_token = Some(value.clone()),
            _ => {}
        }
    }
    let patient = id.clone();
    let page = state
        .store
        .read(move |connection| {
            let current = crate::store::read(connection, "Patient", &patient)?;
            match current {
                Some(found) if !found.deleted => {
                    search::everything(connection, &patient, count, page_token.as_deref()).map(Some)
                }
                _ => Ok(None),
            }
        })
        .await
        .map_err(|error| match error {
            // The only malformed input of a read is a `_page` that is not a paging token.
            StoreError::Malformed(message) => ApiError::BadRequest(vec![message]),
            other => ApiError::from(other),
        })?;
    let Some(mut page) = page else {
        return Err(ApiError::NotFound(format!("Patient/{id} is not known")));
    };
    page.matches.retain(|resource| request.grant.can_read(&resource.resource_type) != Access::Denied);
    let url = format!("{}/Patient/{id}/$everything", request.base);
    let mut links = vec![Link { relation: "self", url: format!("{url}?_count={count}") }];
    if let Some(next) = &page.next {
        links.push(Link { relation: "next", url: with_query(&url, next) });
    }
    let body = searchset(&request, &page, &links, None, &Subset::default());
    Ok(fhir_response(StatusCode::OK, render::finish(body, request.pretty), "everything"))
}
