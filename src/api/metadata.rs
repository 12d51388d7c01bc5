//! `/fhir/metadata` (the CapabilityStatement) and `/fhir/.well-known/smart-configuration`.
//!
//! The CapabilityStatement is generated from what the server really does: the resource
//! types and search parameters come from the store's definitions ([`crate::store::params`]),
//! the interactions are the ones routed in [`super::router`].

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::{fhir_response, ApiError, ApiState, FhirRequest};
use crate::store::params::{self, ParamType};

/// The FHIR version the API speaks and advertises.
pub const FHIR_VERSION: &str = "4.0.1";

/// `GET /fhir/metadata`.
pub async fn capability_statement(State(state): State<ApiState>, request: FhirRequest) -> Response {
    let statement = capability(&request.base, state.auth.is_some());
    let body =
        if request.pretty { serde_json::to_string_pretty(&statement) } else { serde_json::to_string(&statement) };
    fhir_response(StatusCode::OK, body.unwrap_or_default(), "capabilities")
}

/// `GET /fhir/.well-known/smart-configuration` (404 when auth is not configured).
pub async fn smart_configuration(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let Some(settings) = &state.auth else {
        return Err(ApiError::NotFound("auth is not configured on this gateway".to_string()));
    };
    let document = crate::auth::smart_configuration(settings);
    let mut response = fhir_response(StatusCode::OK, document.to_string(), "smart-configuration");
    response
        .headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The CapabilityStatement for an API at `base`.
pub fn capability(base: &str, secured: bool) -> Value {
    let resources: Vec<Value> = params::searchable_types().iter().copied().map(resource_capability).collect();
    let mut rest = json!({
        "mode": "server",
        "documentation": "Read-only FHIR R4 API over the resources converted from HL7 v2 feeds.",
        "resource": resources,
        "interaction": [{ "code": "history-system" }],
    });
    if secured {
        rest["security"] = json!({
            "cors": false,
            "service": [{
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }]
            }],
            "description": "JWT bearer tokens with SMART scopes; see .well-known/smart-configuration"
        });
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": build_date(),
        "publisher": "hl7-fhir-gateway",
        "kind": "instance",
        "software": { "name": "hl7-fhir-gateway", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "hl7-fhir-gateway FHIR API", "url": base },
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    })
}

/// The date of this statement: today, as the server's capabilities are those of the
/// running build and its loaded definitions.
fn build_date() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%d").to_string()
}

fn resource_capability(resource_type: &str) -> Value {
    let definitions = params::for_type(resource_type);
    let mut search_params = vec![
        json!({ "name": "_id", "type": "token", "documentation": "Logical id of the resource" }),
        json!({ "name": "_lastUpdated", "type": "date", "documentation": "When the resource version was stored" }),
    ];
    search_params.extend(
        definitions.iter().map(
            |param| json!({ "name": param.name, "type": param.kind.code(), "documentation": param.documentation }),
        ),
    );
    let includes: Vec<String> = std::iter::once("*".to_string())
        .chain(
            definitions
                .iter()
                .filter(|param| param.kind == ParamType::Reference)
                .map(|param| format!("{resource_type}:{}", param.name)),
        )
        .collect();
    let revincludes: Vec<String> = params::definitions()
        .iter()
        .filter(|param| {
            param.kind == ParamType::Reference && param.targets.iter().any(|target| target == resource_type)
        })
        .map(|param| format!("{}:{}", param.resource_type, param.name))
        .collect();
    let mut capability = json!({
        "type": resource_type,
        "interaction": [
            { "code": "read" },
            { "code": "vread" },
            { "code": "history-instance" },
            { "code": "history-type" },
            { "code": "search-type" }
        ],
        "versioning": "versioned",
        "readHistory": true,
        "updateCreate": false,
        "conditionalRead": "full-support",
        "searchInclude": includes,
        "searchRevInclude": &revincludes,
        "searchParam": search_params,
    });
    // FHIR has no empty arrays: leave the element out when nothing refers to this type.
    if revincludes.is_empty() {
        if let Some(object) = capability.as_object_mut() {
            object.remove("searchRevInclude");
        }
    }
    if resource_type == "Patient" {
        capability["operation"] = json!([{
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"
        }]);
    }
    capability
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_statement_is_valid_r4_and_lists_search_parameters() {
        let statement = capability("http://localhost:8080/fhir", true);
        crate::fhir::validate::validate_resource(&statement).unwrap();
        assert_eq!(statement["fhirVersion"], "4.0.1");
        let patient = statement["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|resource| resource["type"] == "Patient")
            .unwrap();
        let names: Vec<&str> =
            patient["searchParam"].as_array().unwrap().iter().filter_map(|param| param["name"].as_str()).collect();
        for expected in ["_id", "identifier", "family", "birthdate", "gender"] {
            assert!(names.contains(&expected), "Patient lacks {expected}: {names:?}");
        }
        assert!(patient["searchRevInclude"].as_array().unwrap().iter().any(|value| value == "Observation:patient"));
    }
}
