//! FHIR search over the index tables: parsing a search request into a [`Query`],
//! running it as SQL, `_include`/`_revinclude`, sorting and paging.

use rusqlite::Connection;

use super::{StoreError, StoredResource};

/// Default page size when `_count` is absent.
pub const DEFAULT_COUNT: usize = 20;
/// Largest page size honoured; larger `_count` values are reduced to it.
pub const MAX_COUNT: usize = 1000;

/// What to do with unknown or unsupported parameters (`Prefer: handling=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Handling {
    /// Ignore them, with a warning in the result Bundle (the default).
    #[default]
    Lenient,
    /// Refuse the search (400).
    Strict,
}

/// `_summary`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summary {
    /// `_summary=count`: only the total.
    Count,
    /// `_summary=true`: summary elements only.
    True,
    /// `_summary=text`.
    Text,
    /// `_summary=data`: without `text`.
    Data,
    /// `_summary=false`.
    False,
}

/// `_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Total {
    /// `_total=none`: no total.
    None,
    /// `_total=estimate`.
    Estimate,
    /// `_total=accurate` (the default).
    #[default]
    Accurate,
}

/// A search request that parsed and is ready to run.
#[derive(Clone, Debug)]
pub struct Query {
    /// The resource type searched.
    pub resource_type: String,
    /// Page size.
    pub count: usize,
    /// `_summary`.
    pub summary: Option<Summary>,
    /// `_elements`, as given.
    pub elements: Option<Vec<String>>,
    /// `_total`.
    pub total: Total,
    /// Parameters that were ignored and why (lenient handling), for an OperationOutcome in
    /// the result Bundle.
    pub warnings: Vec<String>,
    /// When set, only resources in this patient's compartment match (patient-level access).
    pub compartment: Option<String>,
}

/// Why a search was refused (HTTP 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .issues.join("; "))]
pub struct SearchError {
    /// One line per problem, naming the parameter.
    pub issues: Vec<String>,
}

/// Parses `params` (decoded name/value pairs, in order, repeats allowed) for a search of
/// `resource_type`.
pub fn parse(resource_type: &str, params: &[(String, String)], handling: Handling) -> Result<Query, SearchError> {
    let _ = (resource_type, params, handling);
    unimplemented!("search::parse")
}

impl Query {
    /// The canonical query string of this search (for the Bundle's `self` link), without
    /// the leading `?`.
    pub fn self_link(&self) -> String {
        unimplemented!("Query::self_link")
    }
}

/// One page of search results.
#[derive(Clone, Debug)]
pub struct Page {
    /// Total matches (absent for `_total=none`).
    pub total: Option<u64>,
    /// Matching resources of this page, in order.
    pub matches: Vec<StoredResource>,
    /// Resources added by `_include` / `_revinclude` (no duplicates, none of `matches`).
    pub included: Vec<StoredResource>,
    /// Query string (without `?`) of the next page, when there is one.
    pub next: Option<String>,
}

/// Runs a parsed search.
pub fn execute(connection: &Connection, query: &Query) -> Result<Page, StoreError> {
    let _ = (connection, query);
    unimplemented!("search::execute")
}

/// `Patient/{id}/$everything`: the patient and every current resource in its compartment
/// (anything that references it through a reference search parameter), `count` per page;
/// `page` is the opaque token from a previous page's `next`.
pub fn everything(
    connection: &Connection,
    patient_id: &str,
    count: usize,
    page: Option<&str>,
) -> Result<Page, StoreError> {
    let _ = (connection, patient_id, count, page);
    unimplemented!("search::everything")
}

/// True when `Type/id` is the patient `patient_id` or is in its compartment.
pub fn in_compartment(
    connection: &Connection,
    resource_type: &str,
    id: &str,
    patient_id: &str,
) -> Result<bool, StoreError> {
    let _ = (connection, resource_type, id, patient_id);
    unimplemented!("search::in_compartment")
}
