//! Search parameter definitions, kept as data in `search-parameters.yaml` beside this file
//! and embedded in the binary, and the extraction of index values from a resource by
//! their expressions.

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

/// Every definition, in file order.
pub fn definitions() -> &'static [SearchParam] {
    unimplemented!("params::definitions")
}

/// The definitions that apply to `resource_type` (not including `_id`, `_lastUpdated`).
pub fn for_type(resource_type: &str) -> Vec<&'static SearchParam> {
    definitions().iter().filter(|param| param.resource_type == resource_type).collect()
}

/// Resource types that have definitions, sorted.
pub fn searchable_types() -> Vec<&'static str> {
    let mut types: Vec<&'static str> = definitions().iter().map(|param| param.resource_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    types
}
