//! Search parameter definitions, kept as data in `search-parameters.yaml` beside this file
//! and embedded in the binary, and the extraction of index values from a resource by
//! their expressions.
//!
//! The file is a YAML list of `{resource, name, type, expression, target, documentation}`
//! entries taken from the FHIR R4 specification. Expressions use the FHIRPath subset of
//! [`super::fhirpath`]; an entry the subset cannot compile is skipped at run time and fails
//! the `every_definition_compiles` test, so a bad edit never reaches a release unnoticed.
//! Changing a definition changes what new writes index; existing rows are rebuilt by
//! [`super::reindex`].

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use super::fhirpath::{Expression, ExpressionError};

/// The definitions file, embedded.
pub const DEFINITIONS_YAML: &str = include_str!("search-parameters.yaml");
/// The type of a search parameter (FHIR R4 `SearchParamType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    /// `token`.
    Token,
    /// `string`.
    String,
    /// `date`.
    Date,
    /// `reference`.
    Reference,
    /// `quantity`.
    Quantity,
    /// `number`.
    Number,
    /// `uri`.
    Uri,
}

impl ParamType {
    /// The FHIR code (`token`, `string`, ...).
    pub fn code(self) -> &'static str {
        match self {
            ParamType::Token => "token",
            ParamType::String => "string",
            ParamType::Date => "date",
            ParamType::Reference => "reference",
            ParamType::Quantity => "quantity",
            ParamType::Number => "number",
            ParamType::Uri => "uri",
        }
    }
}

/// One search parameter of one resource type.
#[derive(Clone, Debug)]
pub struct SearchParam {
    /// Resource type it applies to.
    pub resource_type: String,
    /// Name used in the query string (`family`, `patient`, ...).
    pub name: String,
    /// Type.
    pub kind: ParamType,
    /// FHIRPath-subset expression selecting the indexed values.
    pub expression: String,
    /// For references: the resource types it may point to.
    pub targets: Vec<String>,
    /// What it searches, for the CapabilityStatement.
    pub documentation: String,
}

#[derive(Deserialize)]
struct Entry {
    resource: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    expression: String,
    #[serde(default)]
    target: Vec<String>,
    #[serde(default)]
    documentation: String,
}

/// Parses a definitions file; errors name the offending entry.
pub fn parse_definitions(yaml: &str) -> Result<Vec<SearchParam>, String> {
    let entries: Vec<Entry> = serde_saphyr::from_str(yaml).map_err(|error| error.to_string())?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let kind = match entry.kind.as_str() {
            "token" => ParamType::Token,
            "string" => ParamType::String,
            "date" => ParamType::Date,
            "reference" => ParamType::Reference,
            "quantity" => ParamType::Quantity,
            "number" => ParamType::Number,
            "uri" => ParamType::Uri,
            other => return Err(format!("{}.{}: unknown type `{other}`", entry.resource, entry.name)),
        };
        if kind == ParamType::Reference && entry.target.is_empty() {
            return Err(format!("{}.{}: a reference needs `target`", entry.resource, entry.name));
        }
        let documentation = if entry.documentation.is_empty() {
            format!("{} {} ({})", entry.resource, entry.name, entry.expression)
        } else {
            entry.documentation
        };
        out.push(SearchParam {
            resource_type: entry.resource,
            name: entry.name,
            kind,
            expression: entry.expression,
            targets: entry.target,
            documentation,
        });
    }
    Ok(out)
}

/// Every definition, in file order.
pub fn definitions() -> &'static [SearchParam] {
    static DEFINITIONS: OnceLock<Vec<SearchParam>> = OnceLock::new();
    DEFINITIONS.get_or_init(|| parse_definitions(DEFINITIONS_YAML).unwrap_or_default())
}

/// Compiles every definition's expression; the errors of those that do not compile.
pub fn check_definitions() -> Vec<ExpressionError> {
    definitions().iter().filter_map(|param| Expression::compile(&param.expression).err()).collect()
}

type Compiled = HashMap<&'static str, Vec<(&'static SearchParam, Expression)>>;

/// The definitions of `resource_type` with their compiled expressions (those that
/// compile).
pub(crate) fn compiled_for(resource_type: &str) -> &'static [(&'static SearchParam, Expression)] {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    let compiled = COMPILED.get_or_init(|| {
        let mut map: Compiled = HashMap::new();
        for param in definitions() {
            if let Ok(expression) = Expression::compile(&param.expression) {
                map.entry(param.resource_type.as_str()).or_default().push((param, expression));
            }
        }
        map
    });
    compiled.get(resource_type).map(Vec::as_slice).unwrap_or(&[])
}

/// The definition `name` of `resource_type`.
pub fn find(resource_type: &str, name: &str) -> Option<&'static SearchParam> {
    compiled_for(resource_type).iter().map(|(param, _)| *param).find(|param| param.name == name)
}
/// The definitions that apply to `resource_type` (not including `_id`, `_lastUpdated`).
pub fn for_type(resource_type: &str) -> Vec<&'static SearchParam> {
    definitions().iter().filter(|param| param.resource_type == resource_type).collect()
}

/// Resource types that have definitions, sorted. Every FHIR request checks its type
/// against them, so the list is built once.
pub fn searchable_types() -> &'static [&'static str] {
    static TYPES: OnceLock<Vec<&'static str>> = OnceLock::new();
    TYPES.get_or_init(|| {
        let mut types: Vec<&'static str> = definitions().iter().map(|param| param.resource_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        types
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_definition_compiles() {
        let parsed = parse_definitions(DEFINITIONS_YAML).unwrap();
        assert!(parsed.len() > 150, "{} definitions", parsed.len());
        assert_eq!(check_definitions(), vec![]);
        let mut seen = std::collections::HashSet::new();
        for param in definitions() {
            assert!(seen.insert((param.resource_type.as_str(), param.name.as_str())), "duplicate {}", param.name);
            assert!(param.expression.starts_with(param.resource_type.as_str()) || param.expression.starts_with('('));
        }
    }

    #[test]
    fn required_parameters_are_defined() {
        let required: &[(&str, &str)] = &[
            ("Patient", "identifier name family given birthdate gender telecom phone email address address-postalcode address-city active link"),
            ("Encounter", "patient subject status class date identifier location participant practitioner type reason-code service-provider"),
            ("Observation", "patient subject code category date status encounter value-quantity value-string value-concept identifier performer based-on"),
            ("DiagnosticReport", "patient subject code category date status encounter identifier result based-on issued"),
            ("ServiceRequest", "patient subject code status intent identifier encounter authored requester category"),
            ("Appointment", "patient actor date status identifier practitioner location service-type"),
            ("DocumentReference", "patient subject type category date status identifier encounter author"),
        ];
        for (kind, names) in required {
            for name in names.split(' ') {
                assert!(find(kind, name).is_some(), "{kind}.{name}");
            }
        }
        for kind in [
            "Practitioner",
            "Organization",
            "Location",
            "Condition",
            "AllergyIntolerance",
            "Procedure",
            "Immunization",
            "Coverage",
            "RelatedPerson",
            "Specimen",
            "MedicationRequest",
            "Provenance",
            "Schedule",
            "Slot",
            "Account",
            "EpisodeOfCare",
        ] {
            assert!(find(kind, "identifier").is_some() || kind == "Provenance", "{kind}");
        }
    }

    #[test]
    fn bad_definitions_are_refused() {
        assert!(parse_definitions("- {resource: Patient, name: x, type: bogus, expression: Patient.x}").is_err());
        assert!(parse_definitions("- {resource: Patient, name: x, type: reference, expression: Patient.x}").is_err());
        assert!(parse_definitions("- {resource: Patient}").is_err());
    }
}
