//! FHIR search over the index tables: parsing a search request into a [`Query`],
//! running it as SQL, `_include`/`_revinclude`, sorting and paging.

use std::collections::HashSet;
use std::fmt::Write as _;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension};
use serde_json::Value;

use super::index::{self, identifier_key, normalize, parse_date_range, parse_reference};
use super::params::{self, ParamType, SearchParam};
use super::{stored_from_row, StoreError, StoredResource};

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
    /// The compiled filter: SQL predicates over `r` (a `resources` row), ANDed, whose
    /// `?N` placeholders are bound to `values`.
    conditions: Vec<String>,
    values: Vec<SqlValue>,
    sort: Vec<SortKey>,
    includes: Vec<Include>,
    revincludes: Vec<Include>,
    /// Parameters used, as given (name, value), for the self and next links.
    canonical: Vec<(String, String)>,
    /// Keyset position from `_page`: the previous page's last sort key values and rid.
    cursor: Option<Cursor>,
}

/// Why a search was refused (HTTP 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .issues.join("; "))]
pub struct SearchError {
    /// One line per problem, naming the parameter.
    pub issues: Vec<String>,
}

/// One `_sort` key.
#[derive(Clone, Debug)]
struct SortKey {
    /// SQL expression of the key over `r` (may contain `?N` bound in `Query::values`).
    expression: String,
    descending: bool,
    /// False for `_id` and `_lastUpdated`, which every resource has: their order needs no
    /// null-first flag, so SQLite can read `resources_by_time` in order and stop after the
    /// page instead of sorting every match.
    nullable: bool,
}

/// One `_include` / `_revinclude`: resources of `source_type` referencing through
/// `param_key`, optionally only to `target_type`.
#[derive(Clone, Debug)]
struct Include {
    source_type: String,
    param_keys: Vec<String>,
    target_type: Option<String>,
    iterate: bool,
}

/// Position after the last entry of a page: its sort key values and rid.
#[derive(Clone, Debug)]
struct Cursor {
    keys: Vec<SqlValue>,
    rid: i64,
}

/// Name of the paging parameter in `next` links.
pub const PAGE_PARAM: &str = "_page";

/// Accumulates SQL placeholders and their values.
#[derive(Default)]
struct Binder {
    values: Vec<SqlValue>,
}

impl Binder {
    fn bind(&mut self, value: impl Into<SqlValue>) -> String {
        self.values.push(value.into());
        format!("?{}", self.values.len())
    }
}

/// A search prefix (`eq`, `lt`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prefix {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Sa,
    Eb,
    Ap,
}

fn split_prefix(value: &str) -> (Prefix, &str) {
    let prefixes = [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("lt", Prefix::Lt),
        ("gt", Prefix::Gt),
        ("le", Prefix::Le),
        ("ge", Prefix::Ge),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    for (text, prefix) in prefixes {
        if let Some(rest) = value.strip_prefix(text) {
            return (prefix, rest);
        }
    }
    (Prefix::Eq, value)
}

/// Splits at unescaped `separator`, removing FHIR escapes (`\,`, `\|`, `\$`, `\\`).
fn split_escaped(value: &str, separator: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next) if next == separator => {
                    if let Some(last) = parts.last_mut() {
                        last.push(next);
                    }
                }
                Some(next) => {
                    if let Some(last) = parts.last_mut() {
                        last.push('\\');
                        last.push(next);
                    }
                }
                None => {
                    if let Some(last) = parts.last_mut() {
                        last.push('\\');
                    }
                }
            }
        } else if c == separator {
            parts.push(String::new());
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

fn unescape(value: &str) -> String {
    value.replace("\\|", "|").replace("\\$", "$").replace("\\\\", "\\")
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

const DAY_US: i64 = 86_400_000_000;

/// The SQL condition of one date comparison over the inclusive columns `low`/`high`.
fn date_condition(binder: &mut Binder, prefix: Prefix, (sl, sh): (i64, i64), low: &str, high: &str) -> String {
    match prefix {
        Prefix::Eq => {
            // `low <= sh` is implied (low <= high <= sh) but bounds the index range on low.
            let (sl, sh) = (binder.bind(sl), binder.bind(sh));
            format!("({low} >= {sl} AND {low} <= {sh} AND {high} <= {sh})")
        }
        Prefix::Ne => format!("NOT ({low} >= {} AND {high} <= {})", binder.bind(sl), binder.bind(sh)),
        Prefix::Lt => format!("{low} < {}", binder.bind(sl)),
        Prefix::Gt => format!("{high} > {}", binder.bind(sh)),
        Prefix::Le => format!("{low} <= {}", binder.bind(sh)),
        Prefix::Ge => format!("{high} >= {}", binder.bind(sl)),
        Prefix::Sa => format!("{low} > {}", binder.bind(sh)),
        Prefix::Eb => format!("{high} < {}", binder.bind(sl)),
        Prefix::Ap => {
            // Approximately: within 10% of the distance to now, at least a day.
            let margin = (now_us().saturating_sub(sl).saturating_abs() / 10).max(DAY_US);
            format!(
                "({low} <= {} AND {high} >= {})",
                binder.bind(sh.saturating_add(margin)),
                binder.bind(sl.saturating_sub(margin))
            )
        }
    }
}

/// The SQL condition of one number comparison over `column`; `eq` honours the value's
/// implied precision (`5.4` matches [5.35, 5.45)).
fn number_condition(binder: &mut Binder, prefix: Prefix, text: &str, column: &str) -> Option<String> {
    let value: f64 = text.parse().ok().filter(|value: &f64| value.is_finite())?;
    let decimals = match text.split_once('.') {
        Some((_, fraction)) if !fraction.contains(['e', 'E']) => fraction.len() as i32,
        _ => 0,
    };
    let half = 0.5 * 10f64.powi(-decimals);
    Some(match prefix {
        Prefix::Eq => {
            format!("({column} >= {} AND {column} < {})", binder.bind(value - half), binder.bind(value + half))
        }
        Prefix::Ne => {
            format!("NOT ({column} >= {} AND {column} < {})", binder.bind(value - half), binder.bind(value + half))
        }
        Prefix::Lt | Prefix::Eb => format!("{column} < {}", binder.bind(value)),
        Prefix::Gt | Prefix::Sa => format!("{column} > {}", binder.bind(value)),
        Prefix::Le => format!("{column} <= {}", binder.bind(value)),
        Prefix::Ge => format!("{column} >= {}", binder.bind(value)),
        Prefix::Ap => {
            let margin = (value.abs() * 0.1).max(half);
            format!("({column} >= {} AND {column} <= {})", binder.bind(value - margin), binder.bind(value + margin))
        }
    })
}

/// Upper bound for a starts-with range scan over UTF-8 text.
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

/// Parsing state: collects problems, warnings and the compiled conditions.
struct Parser<'a> {
    resource_type: &'a str,
    handling: Handling,
    binder: Binder,
    issues: Vec<String>,
    warnings: Vec<String>,
}

/// Result of compiling one parameter: a condition, an ignored parameter or an error.
enum Compiled {
    Condition(String),
    Unsupported(String),
    Malformed(String),
}

impl Parser<'_> {
    fn unsupported(&mut self, message: String) {
        match self.handling {
            Handling::Lenient => self.warnings.push(format!("{message}; ignored")),
            Handling::Strict => self.issues.push(message),
        }
    }

    /// Compiles `name` (with modifier and chain) = `value` for a resource of
    /// `resource_type` whose `resources` row is aliased `alias`.
    fn condition(&mut self, resource_type: &str, alias: &str, name: &str, value: &str, depth: usize) -> Compiled {
        let (head, chain) = match name.split_once('.') {
            Some((head, chain)) => (head, Some(chain)),
            None => (name, None),
        };
        let (param_name, modifier) = match head.split_once(':') {
            Some((param_name, modifier)) => (param_name, Some(modifier)),
            None => (head, None),
        };
        if let Some(chain) = chain {
            return self.chain(resource_type, alias, param_name, modifier, chain, value, depth);
        }
        if modifier == Some("missing") {
            let missing = match value {
                "true" => true,
                "false" => false,
                _ => return Compiled::Malformed(format!("{name}: `{value}` is not true or false")),
            };
            let (table, key) = match param_name {
                "_id" | "_lastUpdated" => return Compiled::Condition(if missing { "0" } else { "1" }.into()),
                _ => match params::find(resource_type, param_name) {
                    Some(param) => (table_of(param.kind), index::key(resource_type, param_name)),
                    None => return Compiled::Unsupported(format!("unknown parameter `{name}` for {resource_type}")),
                },
            };
            let key = self.binder.bind(key);
            let operator = if missing { "NOT IN" } else { "IN" };
            return Compiled::Condition(format!(
                "{alias}.rid {operator} (SELECT rid FROM {table} WHERE param = {key})"
            ));
        }
        let values = split_escaped(value, ',');
        match param_name {
            "_id" => {
                if modifier.is_some() {
                    return Compiled::Unsupported(format!("modifier `{name}` is not supported"));
                }
                let list: Vec<String> = values.into_iter().map(|id| self.binder.bind(id)).collect();
                return Compiled::Condition(format!("{alias}.id IN ({})", list.join(", ")));
            }
            "_lastUpdated" => {
                if modifier.is_some() {
                    return Compiled::Unsupported(format!("modifier `{name}` is not supported"));
                }
                let column = format!("{alias}.last_updated_us");
                let mut alternatives = Vec::new();
                for value in &values {
                    let (prefix, date) = split_prefix(value);
                    let Some(range) = parse_date_range(date) else {
                        return Compiled::Malformed(format!("{name}: `{value}` is not a valid date"));
                    };
                    alternatives.push(date_condition(&mut self.binder, prefix, range, &column, &column));
                }
                return Compiled::Condition(format!("({})", alternatives.join(" OR ")));
            }
            _ => {}
        }
        let Some(param) = params::find(resource_type, param_name) else {
            return Compiled::Unsupported(format!("unknown parameter `{name}` for {resource_type}"));
        };
        self.typed(param, alias, name, modifier, &values)
    }

    fn typed(
        &mut self,
        param: &SearchParam,
        alias: &str,
        name: &str,
        modifier: Option<&str>,
        values: &[String],
    ) -> Compiled {
        let resource_type = param.resource_type.as_str();
        let key = index::key(resource_type, &param.name);
        let mut alternatives = Vec::new();
        let mut table = table_of(param.kind);
        let mut negate = false;
        let mut key_binding = None;
        match param.kind {
            ParamType::String => {
                for value in values {
                    let condition = match modifier {
                        None => {
                            let norm = normalize(value);
                            let end = prefix_end(&norm);
                            format!("(norm >= {} AND norm < {})", self.binder.bind(norm), self.binder.bind(end))
                        }
                        Some("exact") => format!(
                            "(norm = {} AND exact = {})",
                            self.binder.bind(normalize(value)),
                            self.binder.bind(value.clone())
                        ),
                        Some("contains") => format!("instr(norm, {}) > 0", self.binder.bind(normalize(value))),
                        Some(other) => return Compiled::Unsupported(format!("modifier `:{other}` of `{name}`")),
                    };
                    alternatives.push(condition);
                }
            }
            ParamType::Token | ParamType::Uri => {
                match modifier {
                    None => {}
                    Some("not") => negate = true,
                    Some("text") if param.kind == ParamType::Token => {}
                    Some(other) => return Compiled::Unsupported(format!("modifier `:{other}` of `{name}`")),
                }
                for value in values {
                    if modifier == Some("text") {
                        alternatives.push(format!("instr(text, {}) > 0", self.binder.bind(normalize(value))));
                    } else {
                        alternatives.push(self.token(value));
                    }
                }
            }
            ParamType::Date => {
                if let Some(other) = modifier {
                    return Compiled::Unsupported(format!("modifier `:{other}` of `{name}`"));
                }
                for value in values {
                    let (prefix, date) = split_prefix(value);
                    let Some(range) = parse_date_range(date) else {
                        return Compiled::Malformed(format!("{name}: `{value}` is not a valid date"));
                    };
                    alternatives.push(date_condition(&mut self.binder, prefix, range, "low", "high"));
                }
            }
            ParamType::Number | ParamType::Quantity => {
                if let Some(other) = modifier {
                    return Compiled::Unsupported(format!("modifier `:{other}` of `{name}`"));
                }
                for value in values {
                    let parts = split_escaped(value, '|');
                    let (prefix, number) = split_prefix(&parts[0]);
                    let Some(mut condition) = number_condition(&mut self.binder, prefix, number, "value") else {
                        return Compiled::Malformed(format!("{name}: `{value}` is not a valid number"));
                    };
                    if param.kind == ParamType::Quantity {
                        if let Some(system) = parts.get(1).filter(|system| !system.is_empty()) {
                            let _ = write!(condition, " AND system = {}", self.binder.bind(system.clone()));
                        }
                        if let Some(code) = parts.get(2).filter(|code| !code.is_empty()) {
                            let _ = write!(condition, " AND code = {}", self.binder.bind(code.clone()));
                        }
                    }
                    alternatives.push(format!("({condition})"));
                }
            }
            ParamType::Reference => {
                let target_type = match modifier {
                    None => None,
                    Some("identifier") => {
                        table = "idx_token";
                        key_binding = Some(self.binder.bind(identifier_key(resource_type, &param.name)));
                        for value in values {
                            alternatives.push(self.token(value));
                        }
                        None
                    }
                    Some(kind) if param.targets.iter().any(|target| target == kind) => Some(kind),
                    Some(other) => return Compiled::Unsupported(format!("modifier `:{other}` of `{name}`")),
                };
                if modifier != Some("identifier") {
                    for value in values {
                        let (kind, id) = match parse_reference(value) {
                            Some((kind, id)) => (Some(kind), id),
                            None if !value.contains('/') && !value.is_empty() => (None, value.as_str()),
                            None => return Compiled::Malformed(format!("{name}: `{value}` is not a reference")),
                        };
                        let kind = match (kind, target_type) {
                            (Some(kind), Some(wanted)) if kind != wanted => {
                                return Compiled::Malformed(format!("{name}: `{value}` is not a {wanted}"))
                            }
                            (Some(kind), _) => Some(kind),
                            (None, wanted) => wanted,
                        };
                        let mut condition = format!("target_id = {}", self.binder.bind(id.to_string()));
                        if let Some(kind) = kind {
                            let _ = write!(condition, " AND target_type = {}", self.binder.bind(kind.to_string()));
                        }
                        alternatives.push(format!("({condition})"));
                    }
                }
            }
        }
        let key = match key_binding {
            Some(binding) => binding,
            None => self.binder.bind(key),
        };
        let operator = if negate { "NOT IN" } else { "IN" };
        // One indexed SELECT per comma-separated value (an OR inside one SELECT would
        // defeat the (param, value) indexes).
        let selects: Vec<String> = alternatives
            .iter()
            .map(|alternative| format!("SELECT rid FROM {table} WHERE param = {key} AND {alternative}"))
            .collect();
        Compiled::Condition(format!("{alias}.rid {operator} ({})", selects.join(" UNION ALL ")))
    }

    /// `code`, `system|code`, `|code` or `system|`.
    fn token(&mut self, value: &str) -> String {
        let parts = split_escaped(value, '|');
        match parts.as_slice() {
            [code] => format!("code = {}", self.binder.bind(unescape(code))),
            [system, code] if system.is_empty() => {
                format!("(system IS NULL AND code = {})", self.binder.bind(unescape(code)))
            }
            [system, code] if code.is_empty() => format!("system = {}", self.binder.bind(unescape(system))),
            [system, code, ..] => format!(
                "(system = {} AND code = {})",
                self.binder.bind(unescape(system)),
                self.binder.bind(unescape(code))
            ),
            [] => "0".into(),
        }
    }

    /// `patient.identifier=...`, `subject:Patient.name=...`: resources whose reference
    /// `param_name` points to a current resource matching the chained parameter.
    #[allow(clippy::too_many_arguments)]
    fn chain(
        &mut self,
        resource_type: &str,
        alias: &str,
        param_name: &str,
        modifier: Option<&str>,
        chain: &str,
        value: &str,
        depth: usize,
    ) -> Compiled {
        if depth > 0 {
            return Compiled::Unsupported(format!("chain `{param_name}.{chain}` deeper than one level"));
        }
        let Some(param) = params::find(resource_type, param_name).filter(|param| param.kind == ParamType::Reference)
        else {
            return Compiled::Unsupported(format!("`{param_name}` is not a reference parameter of {resource_type}"));
        };
        let chained_name = chain.split([':', '.']).next().unwrap_or("");
        let targets: Vec<&str> = match modifier {
            Some(kind) if param.targets.iter().any(|target| target == kind) => vec![kind],
            Some(other) => return Compiled::Unsupported(format!("modifier `:{other}` of `{param_name}`")),
            None => param
                .targets
                .iter()
                .map(String::as_str)
                .filter(|target| {
                    matches!(chained_name, "_id" | "_lastUpdated") || params::find(target, chained_name).is_some()
                })
                .collect(),
        };
        if targets.is_empty() {
            return Compiled::Unsupported(format!(
                "chained parameter `{chain}` is unknown for the targets of `{param_name}`"
            ));
        }
        let key = self.binder.bind(index::key(resource_type, &param.name));
        let mut branches = Vec::new();
        for target in targets {
            let inner = match self.condition(target, "t", chain, value, depth + 1) {
                Compiled::Condition(inner) => inner,
                other => return other,
            };
            let target_binding = self.binder.bind(target.to_string());
            // Driven from the matching targets, then their referrers by the target index
            // (CROSS JOIN fixes that loop order in SQLite).
            branches.push(format!(
                "SELECT ref.rid FROM resources t
                 CROSS JOIN idx_reference ref ON ref.target_id = t.id AND ref.target_type = t.type AND ref.param = {key}
                 WHERE t.type = {target_binding} AND t.deleted = 0 AND {inner}"
            ));
        }
        Compiled::Condition(format!("{alias}.rid IN ({})", branches.join(" UNION ALL ")))
    }

    fn sort_key(&mut self, name: &str) -> Option<SortKey> {
        let (descending, name) = match name.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        let expression = match name {
            "_id" => return Some(SortKey { expression: "r.id".to_string(), descending, nullable: false }),
            "_lastUpdated" => {
                return Some(SortKey { expression: "r.last_updated_us".to_string(), descending, nullable: false })
            }
            _ => {
                let param = params::find(self.resource_type, name)?;
                let aggregate = if descending { "MAX" } else { "MIN" };
                let (column, table) = match param.kind {
                    ParamType::String => ("norm", "idx_string"),
                    ParamType::Token | ParamType::Uri => ("code", "idx_token"),
                    ParamType::Date if descending => ("high", "idx_date"),
                    ParamType::Date => ("low", "idx_date"),
                    ParamType::Reference => ("target_type || '/' || target_id", "idx_reference"),
                    ParamType::Number | ParamType::Quantity => ("value", "idx_number"),
                };
                let key = self.binder.bind(index::key(self.resource_type, name));
                // INDEXED BY: without it SQLite's min/max optimisation walks the whole
                // (param, value) index for every row.
                format!(
                    "(SELECT {aggregate}({column}) FROM {table} s INDEXED BY {table}_by_resource
                      WHERE s.rid = r.rid AND s.param = {key})"
                )
            }
        };
        Some(SortKey { expression, descending, nullable: true })
    }

    fn include(&mut self, name: &str, value: &str, reverse: bool) -> Option<Include> {
        let iterate = name.ends_with(":iterate") || name.ends_with(":recurse");
        let parts: Vec<&str> = value.split(':').collect();
        let (source_type, param_name, target_type) = match parts.as_slice() {
            ["*"] if !reverse => (self.resource_type, "*", None),
            [source, param] => (*source, *param, None),
            [source, param, target] => (*source, *param, Some(target.to_string())),
            _ => return None,
        };
        let param_keys: Vec<String> = if param_name == "*" {
            params::for_type(source_type)
                .into_iter()
                .filter(|param| param.kind == ParamType::Reference)
                .map(|param| index::key(source_type, &param.name))
                .collect()
        } else {
            let param = params::find(source_type, param_name).filter(|param| param.kind == ParamType::Reference)?;
            vec![index::key(source_type, &param.name)]
        };
        if !reverse && source_type != self.resource_type && !iterate {
            return None;
        }
        Some(Include { source_type: source_type.to_string(), param_keys, target_type, iterate })
    }
}

fn table_of(kind: ParamType) -> &'static str {
    match kind {
        ParamType::String => "idx_string",
        ParamType::Token | ParamType::Uri => "idx_token",
        ParamType::Date => "idx_date",
        ParamType::Reference => "idx_reference",
        ParamType::Number | ParamType::Quantity => "idx_number",
    }
}

/// Parses `params` (decoded name/value pairs, in order, repeats allowed) for a search of
/// `resource_type`.
pub fn parse(resource_type: &str, params: &[(String, String)], handling: Handling) -> Result<Query, SearchError> {
    let mut parser =
        Parser { resource_type, handling, binder: Binder::default(), issues: Vec::new(), warnings: Vec::new() };
    let mut query = Query {
        resource_type: resource_type.to_string(),
        count: DEFAULT_COUNT,
        summary: None,
        elements: None,
        total: Total::Accurate,
        warnings: Vec::new(),
        compartment: None,
        conditions: Vec::new(),
        values: Vec::new(),
        sort: Vec::new(),
        includes: Vec::new(),
        revincludes: Vec::new(),
        canonical: Vec::new(),
        cursor: None,
    };
    let mut page = None;
    for (name, value) in params {
        let name = name.trim();
        if value.is_empty() && name != "_page" {
            continue;
        }
        let mut used = true;
        match name {
            "_format" | "_pretty" => used = false,
            PAGE_PARAM => {
                page = Some(value.clone());
                used = false;
            }
            "_count" => match value.trim().parse::<usize>() {
                Ok(count) => query.count = count.min(MAX_COUNT),
                Err(_) => parser.issues.push(format!("_count: `{value}` is not a non-negative integer")),
            },
            "_summary" => {
                query.summary = Some(match value.as_str() {
                    "count" => Summary::Count,
                    "true" => Summary::True,
                    "text" => Summary::Text,
                    "data" => Summary::Data,
                    "false" => Summary::False,
                    _ => {
                        parser.issues.push(format!("_summary: `{value}` is not count, true, text, data or false"));
                        continue;
                    }
                })
            }
            "_total" => {
                query.total = match value.as_str() {
                    "none" => Total::None,
                    "estimate" => Total::Estimate,
                    "accurate" => Total::Accurate,
                    _ => {
                        parser.issues.push(format!("_total: `{value}` is not none, estimate or accurate"));
                        continue;
                    }
                }
            }
            "_elements" => {
                let elements: Vec<String> =
                    value.split(',').map(str::trim).filter(|element| !element.is_empty()).map(String::from).collect();
                query.elements.get_or_insert_with(Vec::new).extend(elements);
            }
            "_sort" => {
                // Only the keys that are used go to the self link.
                let mut valid = Vec::new();
                for key in value.split(',').map(str::trim).filter(|key| !key.is_empty()) {
                    match parser.sort_key(key) {
                        Some(sort) => {
                            query.sort.push(sort);
                            valid.push(key);
                        }
                        None => parser.unsupported(format!("_sort: unknown parameter `{key}` for {resource_type}")),
                    }
                }
                if !valid.is_empty() {
                    query.canonical.push((name.to_string(), valid.join(",")));
                }
                used = false;
            }
            _ if name.starts_with("_include") || name.starts_with("_revinclude") => {
                let reverse = name.starts_with("_revinclude");
                let base = if reverse { "_revinclude" } else { "_include" };
                let modifier_ok = matches!(&name[base.len()..], "" | ":iterate" | ":recurse");
                match parser.include(name, value, reverse).filter(|_| modifier_ok) {
                    Some(include) if reverse => query.revincludes.push(include),
                    Some(include) => query.includes.push(include),
                    None => {
                        parser.unsupported(format!("{name}: `{value}` is not a supported include"));
                        used = false;
                    }
                }
            }
            _ => match parser.condition(resource_type, "r", name, value, 0) {
                Compiled::Condition(condition) => query.conditions.push(condition),
                Compiled::Unsupported(message) => {
                    parser.unsupported(message);
                    used = false;
                }
                Compiled::Malformed(message) => parser.issues.push(message),
            },
        }
        if used {
            query.canonical.push((name.to_string(), value.clone()));
        }
    }
    if let Some(page) = page {
        match decode_cursor(&page, query.sort.len()) {
            Some(cursor) => query.cursor = Some(cursor),
            None => parser.issues.push(format!("{PAGE_PARAM}: `{page}` is not a paging token of this search")),
        }
    }
    if !parser.issues.is_empty() {
        return Err(SearchError { issues: parser.issues });
    }
    query.values = parser.binder.values;
    query.warnings = parser.warnings;
    Ok(query)
}

fn encode_cursor(keys: &[SqlValue], rid: i64) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|key| match key {
            SqlValue::Integer(number) => Value::from(*number),
            SqlValue::Real(number) => Value::from(*number),
            SqlValue::Text(text) => Value::from(text.as_str()),
            SqlValue::Null | SqlValue::Blob(_) => Value::Null,
        })
        .collect();
    let text = Value::Array(vec![Value::Array(keys), Value::from(rid)]).to_string();
    text.bytes().map(|byte| format!("{byte:02x}")).collect()
}

fn decode_cursor(token: &str, key_count: usize) -> Option<Cursor> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|index| u8::from_str_radix(&token[index..index + 2], 16).ok()).collect();
    let value: Value = serde_json::from_slice(&bytes?).ok()?;
    let [keys, rid] = value.as_array()?.as_slice() else { return None };
    let keys = keys.as_array()?;
    if keys.len() != key_count {
        return None;
    }
    let keys = keys
        .iter()
        .map(|key| match key {
            Value::Null => Some(SqlValue::Null),
            Value::String(text) => Some(SqlValue::Text(text.clone())),
            Value::Number(number) => match number.as_i64() {
                Some(integer) => Some(SqlValue::Integer(integer)),
                None => number.as_f64().map(SqlValue::Real),
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Cursor { keys, rid: rid.as_i64()? })
}

/// Percent-encodes a query string component (RFC 3986 unreserved characters, `:` and `,`
/// stay as they are).
fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b':' | b',') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

impl Query {
    /// The canonical query string of this search (for the Bundle's `self` link), without
    /// the leading `?`.
    pub fn self_link(&self) -> String {
        let mut pairs: Vec<&(String, String)> = self.canonical.iter().collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs
            .iter()
            .map(|(name, value)| format!("{}={}", encode_component(name), encode_component(value)))
            .collect::<Vec<_>>()
            .join("&")
    }

    fn next_link(&self, token: &str) -> String {
        let link = self.self_link();
        let count = if self.canonical.iter().any(|(name, _)| name == "_count") {
            String::new()
        } else {
            format!("_count={}&", self.count)
        };
        if link.is_empty() {
            format!("{count}{PAGE_PARAM}={token}")
        } else {
            format!("{link}&{count}{PAGE_PARAM}={token}")
        }
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
    run(connection, query, Some(&query.resource_type))
}

/// The SQL of a search: the count statement, the page statement (`count + 1` rows, to
/// know whether there is a next page), and the values both bind to their placeholders.
struct Statements {
    count: String,
    page: String,
    /// The count statement binds the first `count_values` of `values`.
    count_values: usize,
    values: Vec<SqlValue>,
}

/// Compiles `query` over resources of `resource_type` (every type when `None`).
fn statements(query: &Query, resource_type: Option<&str>) -> Statements {
    let mut binder = Binder { values: query.values.clone() };
    let mut conditions = vec!["r.deleted = 0".to_string()];
    if let Some(resource_type) = resource_type {
        conditions.push(format!("r.type = {}", binder.bind(resource_type.to_string())));
    }
    conditions.extend(query.conditions.iter().cloned());
    if let Some(patient) = &query.compartment {
        let id = binder.bind(patient.clone());
        conditions.push(format!(
            "((r.type = 'Patient' AND r.id = {id})
              OR r.rid IN (SELECT rid FROM idx_reference WHERE target_id = {id} AND target_type = 'Patient'))"
        ));
    }
    let filter = conditions.join(" AND ");
    let count = format!("SELECT COUNT(*) FROM resources r WHERE {filter}");
    let count_values = binder.values.len();

    // Sort keys as columns k0.., then the keyset condition after the cursor, then the page.
    let mut columns = String::new();
    let mut order = Vec::new();
    for (index, key) in query.sort.iter().enumerate() {
        let _ = write!(columns, ", {} AS k{index}", key.expression);
        let direction = if key.descending { "DESC" } else { "ASC" };
        if key.nullable {
            order.push(format!("(k{index} IS NULL), k{index} {direction}"));
        } else {
            order.push(format!("k{index} {direction}"));
        }
    }
    order.push("rid ASC".into());
    let mut keyset = String::new();
    if let Some(cursor) = &query.cursor {
        // Lexicographic "after" over (null flag, value) per key, then rid.
        let mut alternatives = Vec::new();
        let mut equal_so_far: Vec<String> = Vec::new();
        for (index, (key, value)) in query.sort.iter().zip(&cursor.keys).enumerate() {
            let is_null = matches!(value, SqlValue::Null);
            if is_null {
                equal_so_far.push(format!("k{index} IS NULL"));
            } else {
                let comparison = if key.descending { "<" } else { ">" };
                let bound = binder.bind(value.clone());
                let mut term = equal_so_far.clone();
                if key.nullable {
                    // Non-null before null: a null key sorts after every value.
                    term.push(format!("(k{index} IS NULL OR k{index} {comparison} {bound})"));
                } else {
                    term.push(format!("k{index} {comparison} {bound}"));
                }
                alternatives.push(format!("({})", term.join(" AND ")));
                equal_so_far.push(format!("k{index} = {bound}"));
            }
        }
        let mut term = equal_so_far;
        term.push(format!("rid > {}", binder.bind(cursor.rid)));
        alternatives.push(format!("({})", term.join(" AND ")));
        keyset = format!("WHERE ({})", alternatives.join(" OR "));
        // A first key that is never null also bounds the range, so that an index on it
        // starts at the cursor instead of at the first page.
        if let (Some(key), Some(value)) = (query.sort.first(), cursor.keys.first()) {
            if !key.nullable && !matches!(value, SqlValue::Null) {
                let comparison = if key.descending { "<=" } else { ">=" };
                let _ = write!(keyset, " AND k0 {comparison} {}", binder.bind(value.clone()));
            }
        }
    }
    let limit = query.count + 1;
    let page = format!(
        "SELECT type, id, version, last_updated_us, deleted, body, rid{keys} FROM (
            SELECT r.type, r.id, r.version, r.last_updated_us, r.deleted, r.body, r.rid AS rid{columns}
            FROM resources r WHERE {filter}
         ) {keyset} ORDER BY {order} LIMIT {limit}",
        keys = (0..query.sort.len()).map(|index| format!(", k{index}")).collect::<String>(),
        order = order.join(", "),
    );
    Statements { count, page, count_values, values: binder.values }
}

/// Runs `query` over resources of `resource_type` (every type when `None`).
fn run(connection: &Connection, query: &Query, resource_type: Option<&str>) -> Result<Page, StoreError> {
    let statements = statements(query, resource_type);
    let total = if query.total == Total::None && query.summary != Some(Summary::Count) {
        None
    } else {
        let count: i64 = connection
            .prepare_cached(&statements.count)?
            .query_row(rusqlite::params_from_iter(&statements.values[..statements.count_values]), |row| row.get(0))?;
        Some(u64::try_from(count).unwrap_or(0))
    };
    if query.count == 0 || query.summary == Some(Summary::Count) {
        return Ok(Page { total, matches: Vec::new(), included: Vec::new(), next: None });
    }

    let mut statement = connection.prepare_cached(&statements.page)?;
    let key_count = query.sort.len();
    let mut rows: Vec<(StoredResource, i64, Vec<SqlValue>)> = statement
        .query_map(rusqlite::params_from_iter(statements.values.iter()), |row| {
            let keys = (0..key_count).map(|index| row.get::<_, SqlValue>(7 + index)).collect::<Result<Vec<_>, _>>()?;
            Ok((stored_from_row(row)?, row.get(6)?, keys))
        })?
        .collect::<Result<_, _>>()?;
    let next = if rows.len() > query.count {
        rows.truncate(query.count);
        rows.last().map(|(_, rid, keys)| query.next_link(&encode_cursor(keys, *rid)))
    } else {
        None
    };
    let page_rids: Vec<i64> = rows.iter().map(|(_, rid, _)| *rid).collect();
    let matches: Vec<StoredResource> = rows.into_iter().map(|(resource, ..)| resource).collect();
    let mut included = includes(connection, query, &matches, &page_rids)?;
    if let Some(patient) = &query.compartment {
        // Patient-level access: never include another patient or their data.
        let mut kept = Vec::with_capacity(included.len());
        for resource in included {
            if patient_visible(connection, &resource, patient)? {
                kept.push(resource);
            }
        }
        included = kept;
    }
    Ok(Page { total, matches, included, next })
}

/// For patient-level access: the patient itself, anything in its compartment, and anything
/// that references no patient at all (practitioners, organizations, locations...).
fn patient_visible(connection: &Connection, resource: &StoredResource, patient_id: &str) -> Result<bool, StoreError> {
    if resource.resource_type == "Patient" {
        return Ok(resource.id == patient_id);
    }
    if in_compartment(connection, &resource.resource_type, &resource.id, patient_id)? {
        return Ok(true);
    }
    let other_patient = connection
        .prepare_cached(
            "SELECT 1 FROM resources r JOIN idx_reference ref ON ref.rid = r.rid
             WHERE r.type = ?1 AND r.id = ?2 AND ref.target_type = 'Patient' LIMIT 1",
        )?
        .query_row(rusqlite::params![resource.resource_type, resource.id], |_| Ok(()))
        .optional()?;
    Ok(other_patient.is_none())
}

/// `_include`: the current resources that resource `?1` references through parameter `?2`
/// (only those of type `?3` unless it is null).
const INCLUDE_SQL: &str = "SELECT t.type, t.id, t.version, t.last_updated_us, t.deleted, t.body, t.rid
    FROM idx_reference ref JOIN resources t ON t.type = ref.target_type AND t.id = ref.target_id
    WHERE ref.rid = ?1 AND ref.param = ?2 AND (?3 IS NULL OR ref.target_type = ?3) AND t.deleted = 0
    ORDER BY t.rid";

/// `_revinclude`: the current resources that reference `?2/?1` through parameter `?3`.
const REVINCLUDE_SQL: &str = "SELECT s.type, s.id, s.version, s.last_updated_us, s.deleted, s.body, s.rid
    FROM idx_reference ref JOIN resources s ON s.rid = ref.rid
    WHERE ref.target_id = ?1 AND ref.target_type = ?2 AND ref.param = ?3 AND s.deleted = 0
    ORDER BY s.rid";

/// `_include` and `_revinclude` for a page: every current resource the page references
/// through the named parameters, and every one referencing the page; repeated over the
/// newly added resources for `:iterate` (bounded).
fn includes(
    connection: &Connection,
    query: &Query,
    matches: &[StoredResource],
    page_rids: &[i64],
) -> Result<Vec<StoredResource>, StoreError> {
    if query.includes.is_empty() && query.revincludes.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<i64> = page_rids.iter().copied().collect();
    let mut included = Vec::new();
    let mut frontier: Vec<(i64, String, String)> = matches
        .iter()
        .zip(page_rids)
        .map(|(resource, rid)| (*rid, resource.resource_type.clone(), resource.id.clone()))
        .collect();
    let mut forward = connection.prepare_cached(INCLUDE_SQL)?;
    let mut reverse = connection.prepare_cached(REVINCLUDE_SQL)?;
    for round in 0..4 {
        let mut added = Vec::new();
        for (rid, resource_type, id) in &frontier {
            for include in query.includes.iter().filter(|include| round == 0 || include.iterate) {
                if &include.source_type != resource_type {
                    continue;
                }
                for key in &include.param_keys {
                    let rows = forward.query_map(rusqlite::params![rid, key, include.target_type], |row| {
                        Ok((stored_from_row(row)?, row.get::<_, i64>(6)?))
                    })?;
                    for row in rows {
                        let (resource, rid) = row?;
                        if seen.insert(rid) {
                            added.push((rid, resource));
                        }
                    }
                }
            }
            for include in query.revincludes.iter().filter(|include| round == 0 || include.iterate) {
                if include.target_type.as_deref().is_some_and(|target| target != resource_type) {
                    continue;
                }
                for key in &include.param_keys {
                    let rows = reverse.query_map(rusqlite::params![id, resource_type, key], |row| {
                        Ok((stored_from_row(row)?, row.get::<_, i64>(6)?))
                    })?;
                    for row in rows {
                        let (resource, rid) = row?;
                        if seen.insert(rid) {
                            added.push((rid, resource));
                        }
                    }
                }
            }
        }
        frontier =
            added.iter().map(|(rid, resource)| (*rid, resource.resource_type.clone(), resource.id.clone())).collect();
        included.extend(added.into_iter().map(|(_, resource)| resource));
        let iterate = query.includes.iter().chain(&query.revincludes).any(|include| include.iterate);
        if !iterate || frontier.is_empty() {
            break;
        }
    }
    Ok(included)
}

/// `Patient/{id}/$everything`: the patient and every current resource in its compartment
/// (anything that references it through a reference search parameter), `count` per page;
/// `page` is the opaque token from a previous page's `next`.
///
/// `next` is `_count={count}&_page={token}`; pass the `_page` value back as `page`. A
/// `page` that is not such a token is [`StoreError::Malformed`].
pub fn everything(
    connection: &Connection,
    patient_id: &str,
    count: usize,
    page: Option<&str>,
) -> Result<Page, StoreError> {
    let mut params = vec![("_count".to_string(), count.min(MAX_COUNT).to_string())];
    if let Some(page) = page {
        params.push((PAGE_PARAM.to_string(), page.to_string()));
    }
    // Only `_count` (valid) and `_page` are given: an error means a bad paging token.
    let mut query =
        parse("Patient", &params, Handling::Strict).map_err(|error| StoreError::Malformed(error.to_string()))?;
    query.compartment = Some(patient_id.to_string());
    run(connection, &query, None)
}

/// Whether resource `?1/?2` references the Patient `?3`. Reads with a patient-level token
/// run it on the async thread, so it starts from the resource's key, never from the
/// patient's (possibly many) referrers.
const IN_COMPARTMENT_SQL: &str = "SELECT 1 FROM resources r JOIN idx_reference ref ON ref.rid = r.rid
    WHERE r.type = ?1 AND r.id = ?2 AND ref.target_id = ?3 AND ref.target_type = 'Patient' LIMIT 1";

/// True when `Type/id` is the patient `patient_id` or is in its compartment.
pub fn in_compartment(
    connection: &Connection,
    resource_type: &str,
    id: &str,
    patient_id: &str,
) -> Result<bool, StoreError> {
    if resource_type == "Patient" && id == patient_id {
        return Ok(true);
    }
    let found = connection
        .prepare_cached(IN_COMPARTMENT_SQL)?
        .query_row(rusqlite::params![resource_type, id, patient_id], |_| Ok(()))
        .optional()?;
    Ok(found.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::put;
    use serde_json::json;

    struct Fixture {
        _directory: tempfile::TempDir,
        connection: Connection,
        clock: i64,
    }

    impl Fixture {
        fn new() -> Fixture {
            let directory = tempfile::tempdir().unwrap();
            let connection = crate::db::open(&directory.path().join("gateway.db")).unwrap();
            Fixture { _directory: directory, connection, clock: 1_600_000_000_000_000 }
        }

        fn put(&mut self, resource: Value) {
            self.clock += 1_000_000;
            let transaction = self.connection.transaction().unwrap();
            put(&transaction, &resource, self.clock, None).unwrap();
            transaction.commit().unwrap();
        }

        fn delete(&mut self, resource_type: &str, id: &str) {
            let transaction = self.connection.transaction().unwrap();
            crate::store::delete(&transaction, resource_type, id, self.clock, None).unwrap();
            transaction.commit().unwrap();
        }

        fn query(&self, resource_type: &str, query: &str) -> Result<Query, SearchError> {
            parse(resource_type, &pairs(query), Handling::Strict)
        }

        /// Ids of the first page of `resource_type?query` (strict handling), in order.
        fn ids(&self, resource_type: &str, query: &str) -> Vec<String> {
            let query = self.query(resource_type, query).unwrap_or_else(|error| panic!("{query}: {error}"));
            let page = execute(&self.connection, &query).unwrap();
            page.matches.into_iter().map(|resource| resource.id).collect()
        }
    }

    fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(name), decode(value))
            })
            .collect()
    }

    fn decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut index = 0;
        while index < bytes.len() {
            if bytes[index] == b'%' && index + 2 < bytes.len() + 1 {
                out.push(u8::from_str_radix(&text[index + 1..index + 3], 16).unwrap());
                index += 3;
            } else {
                out.push(bytes[index]);
                index += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn sorted(mut ids: Vec<String>) -> Vec<String> {
        ids.sort();
        ids
    }

    fn fixture() -> Fixture {
        let mut fixture = Fixture::new();
        fixture.put(
            json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "female", "birthDate": "1980-05-17",
            "identifier": [{"system": "urn:mrn", "value": "100"}],
            "name": [{"family": "Müller", "given": ["Anna", "Maria"]}],
            "telecom": [{"system": "phone", "value": "555-1"}, {"system": "email", "value": "anna@example.org"}],
            "address": [{"line": ["1 Main St"], "city": "Zürich", "postalCode": "8000"}]}),
        );
        fixture.put(
            json!({"resourceType": "Patient", "id": "p2", "active": false, "gender": "male", "birthDate": "1990",
            "identifier": [{"system": "urn:mrn", "value": "200"}, {"system": "urn:other", "value": "100"}],
            "name": [{"family": "Smith", "given": ["John"]}]}),
        );
        fixture
            .put(json!({"resourceType": "Patient", "id": "p3", "gender": "male", "birthDate": "1990-02-10T10:30:00Z",
            "name": [{"family": "Smithson", "given": ["Bob"]}]}));
        fixture.put(json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
            "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            "effectiveDateTime": "2020-03-04T10:00:00Z",
            "valueQuantity": {"value": 5.4, "system": "http://unitsofmeasure.org", "code": "mmol/L"}}));
        fixture.put(json!({"resourceType": "Observation", "id": "o2", "status": "preliminary",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}], "text": "Hb"},
            "subject": {"reference": "http://example.org/fhir/Patient/p2", "identifier": {"system": "urn:mrn", "value": "200"}},
            "effectivePeriod": {"start": "2020-03-01", "end": "2020-03-31"},
            "valueQuantity": {"value": 140, "system": "http://unitsofmeasure.org", "code": "g/L"}}));
        fixture.put(json!({"resourceType": "Observation", "id": "o3", "status": "final",
            "code": {"coding": [{"code": "local-1"}]},
            "subject": {"reference": "Group/g1"}, "valueString": "Positive result"}));
        fixture.put(json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
            "subject": {"reference": "Patient/p1"}, "period": {"start": "2020-03-04T09:00:00Z"},
            "location": [{"location": {"reference": "Location/l1"}}]}));
        fixture.put(json!({"resourceType": "Location", "id": "l1", "name": "Ward 1"}));
        fixture
    }

    #[test]
    fn id_and_last_updated() {
        let fixture = fixture();
        assert_eq!(sorted(fixture.ids("Patient", "_id=p1,p3")), vec!["p1", "p3"]);
        assert_eq!(fixture.ids("Patient", "_lastUpdated=gt2100"), Vec::<String>::new());
        assert_eq!(fixture.ids("Patient", "_lastUpdated=ge2020").len(), 3);
        assert_eq!(fixture.ids("Patient", "_lastUpdated=lt2020").len(), 0);
    }

    #[test]
    fn string_modifiers() {
        let mut fixture = fixture();
        assert_eq!(sorted(fixture.ids("Patient", "family=smith")), vec!["p2", "p3"]);
        assert_eq!(fixture.ids("Patient", "family=MULLER"), vec!["p1"]);
        assert_eq!(fixture.ids("Patient", "family:exact=Smith"), vec!["p2"]);
        assert_eq!(fixture.ids("Patient", "family:exact=smith"), Vec::<String>::new());
        assert_eq!(fixture.ids("Patient", "family:contains=THSO"), vec!["p3"]);
        assert_eq!(fixture.ids("Patient", "given=mar"), vec!["p1"]);
        assert_eq!(fixture.ids("Patient", "name=anna"), vec!["p1"]);
        assert_eq!(fixture.ids("Patient", "address=zurich"), vec!["p1"]);
        assert_eq!(fixture.ids("Patient", "address-postalcode=8000"), vec!["p1"]);
        assert_eq!(sorted(fixture.ids("Patient", "address:missing=true")), vec!["p2", "p3"]);
        assert_eq!(fixture.ids("Patient", "address:missing=false"), vec!["p1"]);
        assert_eq!(fixture.ids("Observation", "value-string=pos"), vec!["o3"]);
        // Comma is OR, repetition is AND.
        assert_eq!(sorted(fixture.ids("Patient", "family=muller,smithson")), vec!["p1", "p3"]);
        assert_eq!(fixture.ids("Patient", "family=smith&given=bob"), vec!["p3"]);
        // Deleted resources never match.
        fixture.delete("Patient", "p3");
        assert_eq!(fixture.ids("Patient", "family=smith"), vec!["p2"]);
    }

    #[test]
    fn token_forms_and_modifiers() {
        let fixture = fixture();
        assert_eq!(sorted(fixture.ids("Patient", "identifier=100")), vec!["p1", "p2"]);
        assert_eq!(fixture.ids("Patient", "identifier=urn:mrn|100"), vec!["p1"]);
        assert_eq!(sorted(fixture.ids("Patient", "identifier=urn:mrn|")), vec!["p1", "p2"]);
        assert_eq!(fixture.ids("Observation", "code=|local-1"), vec!["o3"]);
        assert_eq!(fixture.ids("Observation", "code=|2345-7"), Vec::<String>::new());
        assert_eq!(fixture.ids("Observation", "code=http://loinc.org|2345-7"), vec!["o1"]);
        assert_eq!(sorted(fixture.ids("Observation", "status:not=final")), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "code:text=hemo"), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "code:text=hb"), vec!["o2"]);
        assert_eq!(fixture.ids("Patient", "active=true"), vec!["p1"]);
        assert_eq!(fixture.ids("Patient", "active:missing=true"), vec!["p3"]);
        assert_eq!(fixture.ids("Patient", "phone=555-1"), vec!["p1"]);
        assert_eq!(fixture.ids("Patient", "email=anna@example.org"), vec!["p1"]);
        assert_eq!(fixture.ids("Patient", "telecom=phone|555-1"), vec!["p1"]);
        assert_eq!(sorted(fixture.ids("Patient", "gender=male")), vec!["p2", "p3"]);
    }

    #[test]
    fn date_prefixes_with_partial_dates() {
        let fixture = fixture();
        let cases: &[(&str, &[&str])] = &[
            ("birthdate=1990", &["p2", "p3"]),
            ("birthdate=1990-02", &["p3"]),
            ("birthdate=eq1990-02-10", &["p3"]),
            ("birthdate=1990-02-10T10:30Z", &["p3"]),
            ("birthdate=1990-02-10T10:30:00%2B00:00", &["p3"]),
            ("birthdate=1990-02-10T11:30%2B01:00", &["p3"]),
            ("birthdate=1990-02-10T10:31Z", &[]),
            ("birthdate=ne1990", &["p1"]),
            ("birthdate=lt1990", &["p1"]),
            ("birthdate=lt1990-06", &["p1", "p2", "p3"]),
            ("birthdate=gt1985", &["p2", "p3"]),
            ("birthdate=gt1990-02-10", &["p2"]),
            ("birthdate=le1980-05-17", &["p1"]),
            ("birthdate=ge1990-02-10", &["p2", "p3"]),
            ("birthdate=sa1989", &["p2", "p3"]),
            ("birthdate=eb1990-01", &["p1"]),
            ("birthdate=eb1991", &["p1", "p2", "p3"]),
            ("birthdate=ap1980-05-17", &["p1"]),
            ("birthdate=1980,1990-02", &["p1", "p3"]),
            ("birthdate=ge1980&birthdate=lt1990", &["p1"]),
        ];
        for (query, expected) in cases {
            assert_eq!(sorted(fixture.ids("Patient", query)), expected.to_vec(), "{query}");
        }
        // A period: o2 covers March 2020, o1 is one instant in it.
        assert_eq!(sorted(fixture.ids("Observation", "date=2020-03")), vec!["o1", "o2"]);
        assert_eq!(fixture.ids("Observation", "date=2020-03-04"), vec!["o1"]);
        assert_eq!(sorted(fixture.ids("Observation", "date=ge2020-03-15")), vec!["o2"]);
        assert_eq!(sorted(fixture.ids("Observation", "date=le2020-03-02")), vec!["o2"]);
        // An open period end reaches to infinity.
        assert_eq!(fixture.ids("Encounter", "date=gt2030"), vec!["e1"]);
        assert_eq!(fixture.ids("Encounter", "date=lt2020-03-04"), Vec::<String>::new());
    }

    #[test]
    fn quantity_and_number_prefixes() {
        let fixture = fixture();
        assert_eq!(fixture.ids("Observation", "value-quantity=5.4"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=5.44"), Vec::<String>::new());
        assert_eq!(fixture.ids("Observation", "value-quantity=5"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=gt100"), vec!["o2"]);
        assert_eq!(sorted(fixture.ids("Observation", "value-quantity=le140")), vec!["o1", "o2"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=lt140"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=ap150"), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=ne5.4"), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=5.4|http://unitsofmeasure.org|mmol/L"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=5.4||mmol/L"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "value-quantity=5.4||g/L"), Vec::<String>::new());
    }

    #[test]
    fn references_and_chains() {
        let fixture = fixture();
        assert_eq!(fixture.ids("Observation", "subject=Patient/p1"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "subject=p1"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "patient=p2"), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "subject=http://other.org/fhir/Patient/p2"), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "subject:Patient=p1"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "subject:Group=g1"), vec!["o3"]);
        assert_eq!(fixture.ids("Observation", "patient:missing=true"), vec!["o3"]);
        assert_eq!(fixture.ids("Observation", "subject:identifier=urn:mrn|200"), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "patient.identifier=urn:mrn|100"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "subject:Patient.name=smith"), vec!["o2"]);
        assert_eq!(fixture.ids("Observation", "subject.family=muller"), vec!["o1"]);
        assert_eq!(fixture.ids("Observation", "patient._id=p2"), vec!["o2"]);
        assert_eq!(fixture.ids("Encounter", "location.name=ward"), vec!["e1"]);
        assert!(fixture.query("Observation", "subject=Patient/p1/x/").is_err());
    }

    /// SQLite's plan for `sql` with `values` bound: one line per step.
    fn plan(connection: &Connection, sql: &str, values: &[SqlValue]) -> String {
        let mut statement = connection.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let details = statement
            .query_map(rusqlite::params_from_iter(values.iter()), |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        details.join("\n")
    }

    /// The plans of the count and page statements of `resource_type?query`.
    fn search_plans(fixture: &Fixture, resource_type: &str, query: &str) -> [String; 2] {
        let query = fixture.query(resource_type, query).unwrap_or_else(|error| panic!("{query}: {error}"));
        let statements = statements(&query, Some(resource_type));
        [
            plan(&fixture.connection, &statements.count, &statements.values[..statements.count_values]),
            plan(&fixture.connection, &statements.page, &statements.values),
        ]
    }

    fn assert_no_scan(plan: &str, what: &str) {
        assert!(!plan.lines().any(|line| line.trim_start().starts_with("SCAN")), "{what} scans:\n{plan}");
    }

    #[test]
    fn reference_searches_look_up_the_reference_index() {
        let fixture = fixture();
        let by_id = "USING INDEX idx_reference_by_param_id (param=? AND target_id=?)";
        let by_id_and_type = "USING INDEX idx_reference_by_param_id (param=? AND target_id=? AND target_type=?)";
        for (resource_type, query, lookup) in [
            ("Encounter", "patient=p1", by_id),
            ("Observation", "patient=p1", by_id),
            ("Observation", "subject=p1,p2", by_id),
            ("Observation", "subject=Patient/p1", by_id_and_type),
            ("Observation", "subject:Patient=p1", by_id_and_type),
        ] {
            for plan in search_plans(&fixture, resource_type, query) {
                let what = format!("{resource_type}?{query}");
                assert_no_scan(&plan, &what);
                assert!(plan.contains(lookup), "{what} does not use {lookup}:\n{plan}");
            }
        }
        // Chained: the matching patients, then their referrers by parameter, id and type
        // (either index has all three).
        for plan in search_plans(&fixture, "Observation", "patient.identifier=urn:mrn|100") {
            assert_no_scan(&plan, "patient.identifier");
            assert!(plan.contains("idx_token_by_value (param=? AND code=?"), "{plan}");
            let referrers = plan.lines().find(|line| line.contains("SEARCH ref ")).unwrap_or("");
            assert!(
                referrers.ends_with(by_id_and_type)
                    || referrers.ends_with("idx_reference_by_target (target_id=? AND target_type=? AND param=?)"),
                "{plan}"
            );
        }
    }

    #[test]
    fn includes_look_up_the_reference_index() {
        let fixture = fixture();
        let values = |values: &[&str]| values.iter().map(|value| SqlValue::Text(value.to_string())).collect::<Vec<_>>();
        let mut forward = vec![SqlValue::Integer(1)];
        forward.extend(values(&["Observation.patient"]));
        forward.push(SqlValue::Null);
        let include = plan(&fixture.connection, INCLUDE_SQL, &forward);
        assert_no_scan(&include, "_include");
        assert!(include.contains("idx_reference_by_resource (rid=? AND param=?)"), "{include}");
        let reverse = values(&["p1", "Patient", "Observation.patient"]);
        let revinclude = plan(&fixture.connection, REVINCLUDE_SQL, &reverse);
        assert_no_scan(&revinclude, "_revinclude");
        assert!(
            revinclude.contains("idx_reference_by_param_id (param=? AND target_id=? AND target_type=?)")
                || revinclude.contains("idx_reference_by_target (target_id=? AND target_type=? AND param=?)"),
            "{revinclude}"
        );
        // The compartment check of a patient-level read: from the resource's key.
        let check = plan(&fixture.connection, IN_COMPARTMENT_SQL, &values(&["Observation", "o1", "p1"]));
        assert_no_scan(&check, "compartment check");
        assert!(check.starts_with("SEARCH r USING COVERING INDEX sqlite_autoindex_resources_1 (type=? AND id=?)"));
        assert!(check.contains("idx_reference_by_resource (rid=?)"), "{check}");
        // $everything: the patient and what references it.
        let mut query = parse("Patient", &pairs("_count=5"), Handling::Strict).unwrap();
        query.compartment = Some("p1".into());
        let statements = statements(&query, None);
        let everything = plan(&fixture.connection, &statements.page, &statements.values);
        assert_no_scan(&everything, "$everything");
    }

    #[test]
    fn pages_sorted_by_last_updated_are_read_in_index_order() {
        let mut fixture = fixture();
        for query in ["_sort=-_lastUpdated&_count=2", "_sort=_lastUpdated&_count=2"] {
            let [_, page] = search_plans(&fixture, "Patient", query);
            assert!(page.contains("USING INDEX resources_by_time (type=?)"), "{query}:\n{page}");
            // At most the ties of one instant are sorted, never every match.
            assert!(!page.contains("USE TEMP B-TREE FOR ORDER BY"), "{query} sorts every match:\n{page}");
        }
        // A next page starts at its cursor, and paging still returns every patient once.
        let first = execute(&fixture.connection, &fixture.query("Patient", "_sort=-_lastUpdated&_count=2").unwrap());
        let next = first.unwrap().next.unwrap();
        let [_, page] = search_plans(&fixture, "Patient", &next);
        assert!(page.contains("resources_by_time (type=? AND last_updated_us<?)"), "{next}:\n{page}");
        // A patient written meanwhile is newer than the cursor: not on a later page.
        let ids = walk(
            &mut fixture,
            "Patient",
            "_sort=-_lastUpdated&_count=1",
            json!({"resourceType": "Patient", "id": "p9"}),
        );
        assert_eq!(ids, vec!["p3", "p2", "p1"]);
    }

    #[test]
    fn include_and_revinclude() {
        let fixture = fixture();
        let run = |resource_type: &str, query: &str| {
            let query = fixture.query(resource_type, query).unwrap();
            let page = execute(&fixture.connection, &query).unwrap();
            let matches: Vec<String> = page.matches.iter().map(|r| format!("{}/{}", r.resource_type, r.id)).collect();
            let included: Vec<String> = page.included.iter().map(|r| format!("{}/{}", r.resource_type, r.id)).collect();
            (matches, sorted(included))
        };
        assert_eq!(
            run("Observation", "_id=o1&_include=Observation:patient"),
            (vec!["Observation/o1".into()], vec!["Patient/p1".into()])
        );
        assert_eq!(
            run("Observation", "_id=o1,o2&_include=Observation:subject:Patient").1,
            vec!["Patient/p1".to_string(), "Patient/p2".to_string()]
        );
        // `*`: every reference; the Encounter e1 is not stored... it is: include it too.
        assert_eq!(
            run("Observation", "_id=o1&_include=*").1,
            vec!["Encounter/e1".to_string(), "Patient/p1".to_string()]
        );
        assert_eq!(
            run("Patient", "_id=p1&_revinclude=Observation:patient&_revinclude=Encounter:subject").1,
            vec!["Encounter/e1".to_string(), "Observation/o1".to_string()]
        );
        assert_eq!(
            run("Observation", "_id=o1&_include=Observation:encounter&_include:iterate=Encounter:location").1,
            vec!["Encounter/e1".to_string(), "Location/l1".to_string()]
        );
        // Never a match twice.
        assert_eq!(run("Patient", "_id=p1,p2&_include=Patient:link").1, Vec::<String>::new());
    }

    #[test]
    fn sort_ascending_descending_and_multiple_keys() {
        let fixture = fixture();
        assert_eq!(fixture.ids("Patient", "_sort=family"), vec!["p1", "p2", "p3"]);
        assert_eq!(fixture.ids("Patient", "_sort=-family"), vec!["p3", "p2", "p1"]);
        assert_eq!(fixture.ids("Patient", "_sort=gender,-birthdate"), vec!["p1", "p2", "p3"]);
        // Dates sort by their range: ascending by start (1990 starts before 1990-02-10),
        // descending by end (1990 ends after 1990-02-10).
        assert_eq!(fixture.ids("Patient", "_sort=-gender,birthdate"), vec!["p2", "p3", "p1"]);
        assert_eq!(fixture.ids("Patient", "_sort=-_id"), vec!["p3", "p2", "p1"]);
        assert_eq!(fixture.ids("Patient", "_sort=-_lastUpdated"), vec!["p3", "p2", "p1"]);
        // Missing values sort last; ties break by insertion order.
        assert_eq!(fixture.ids("Patient", "_sort=active"), vec!["p2", "p1", "p3"]);
        assert_eq!(fixture.ids("Observation", "_sort=-value-quantity"), vec!["o2", "o1", "o3"]);
        assert_eq!(fixture.ids("Observation", "_sort=status"), vec!["o1", "o3", "o2"]);
    }

    /// Walks every page of `resource_type?query`, inserting a new matching resource after
    /// the first page; returns the ids seen.
    fn walk(fixture: &mut Fixture, resource_type: &str, query: &str, insert: Value) -> Vec<String> {
        let mut seen = Vec::new();
        let mut current = fixture.query(resource_type, query).unwrap();
        let mut pages = 0;
        loop {
            let page = execute(&fixture.connection, &current).unwrap();
            assert!(page.matches.len() <= current.count);
            seen.extend(page.matches.iter().map(|resource| resource.id.clone()));
            pages += 1;
            if pages == 1 {
                fixture.put(insert.clone());
            }
            let Some(next) = page.next else { break };
            assert!(next.contains("_page="), "{next}");
            current = fixture.query(resource_type, &next).unwrap();
            assert!(pages < 100);
        }
        seen
    }

    #[test]
    fn paging_returns_every_match_once() {
        let mut fixture = Fixture::new();
        for index in 0..23 {
            fixture.put(json!({"resourceType": "Patient", "id": format!("p{index:02}"),
                "name": [{"family": format!("Name{}", index % 5)}], "birthDate": format!("19{:02}", 50 + index % 7)}));
        }
        for (query, insert_family) in
            [("_count=5", "Zed"), ("_count=4&_sort=-family,birthdate", "Name3"), ("_count=3&_sort=birthdate", "Aaa")]
        {
            let id = format!("new-{insert_family}");
            let insert =
                json!({"resourceType": "Patient", "id": id, "name": [{"family": insert_family}], "birthDate": "1951"});
            let before: Vec<String> = {
                let query = fixture.query("Patient", &format!("{query}&_count=1000")).unwrap();
                execute(&fixture.connection, &query).unwrap().matches.into_iter().map(|r| r.id).collect()
            };
            let seen = walk(&mut fixture, "Patient", query, insert);
            let unique: HashSet<&String> = seen.iter().collect();
            assert_eq!(unique.len(), seen.len(), "{query}: duplicates in {seen:?}");
            for id in &before {
                assert!(seen.contains(id), "{query}: {id} missing");
            }
            // Order of the walk equals the order of one big page (minus the insertion).
            let walked: Vec<&String> = seen.iter().filter(|id| !id.starts_with("new-")).collect();
            let expected: Vec<&String> = before.iter().filter(|id| !id.starts_with("new-")).collect();
            assert_eq!(walked, expected, "{query}");
        }
    }

    #[test]
    fn count_summary_and_total() {
        let fixture = fixture();
        let run = |query: &str| execute(&fixture.connection, &fixture.query("Patient", query).unwrap()).unwrap();
        let page = run("_summary=count");
        assert_eq!((page.total, page.matches.len(), page.next), (Some(3), 0, None));
        let page = run("_count=0");
        assert_eq!((page.total, page.matches.len()), (Some(3), 0));
        let page = run("_total=none&_count=2");
        assert_eq!((page.total, page.matches.len()), (None, 2));
        assert!(page.next.is_some());
        let page = run("_count=2");
        assert_eq!(page.total, Some(3));
        let query =
            fixture.query("Patient", "_count=5000&_summary=data&_elements=id,name&_format=json&_pretty=true").unwrap();
        assert_eq!(query.count, MAX_COUNT);
        assert_eq!(query.summary, Some(Summary::Data));
        assert_eq!(query.elements, Some(vec!["id".to_string(), "name".to_string()]));
        assert!(query.warnings.is_empty());
        assert_eq!(query.self_link(), "_count=5000&_elements=id,name&_summary=data");
    }

    #[test]
    fn self_link_is_canonical_and_encoded() {
        let query = parse(
            "Observation",
            &pairs("subject=Patient/p1&code=http://loinc.org|1-8&bogus=1&_sort=-date"),
            Handling::Lenient,
        )
        .unwrap();
        assert_eq!(query.self_link(), "_sort=-date&code=http:%2F%2Floinc.org%7C1-8&subject=Patient%2Fp1");
        assert_eq!(query.warnings.len(), 1);
        assert!(query.warnings[0].contains("bogus"));
    }

    #[test]
    fn strict_and_lenient_unknown_parameters() {
        let partial = parse("Patient", &pairs("_sort=family,nope,-_id"), Handling::Lenient).unwrap();
        assert_eq!((partial.self_link().as_str(), partial.warnings.len()), ("_sort=family,-_id", 1));
        let lenient =
            parse("Patient", &pairs("bogus=1&family:fuzzy=x&_include=Nope:x&_sort=nope"), Handling::Lenient).unwrap();
        assert_eq!(lenient.warnings.len(), 4, "{:?}", lenient.warnings);
        assert!(lenient.warnings.iter().any(|warning| warning.contains("bogus")));
        assert!(lenient.warnings.iter().any(|warning| warning.contains("fuzzy")));
        assert_eq!(lenient.self_link(), "");
        for query in ["bogus=1", "family:fuzzy=x", "_sort=nope", "_revinclude=Observation:nope", "gender:below=x"] {
            let error = parse("Patient", &pairs(query), Handling::Strict).unwrap_err();
            assert_eq!(error.issues.len(), 1, "{query}");
        }
    }

    #[test]
    fn malformed_values_are_errors() {
        for (query, needle) in [
            ("birthdate=1990-13", "birthdate"),
            ("birthdate=xx1990", "xx1990"),
            ("_lastUpdated=yesterday", "_lastUpdated"),
            ("_count=-1", "_count"),
            ("_count=many", "many"),
            ("_summary=maybe", "_summary"),
            ("_total=some", "_total"),
            ("active:missing=perhaps", "perhaps"),
            ("_page=zz", "_page"),
        ] {
            for handling in [Handling::Lenient, Handling::Strict] {
                let error = parse("Patient", &pairs(query), handling).unwrap_err();
                assert!(error.to_string().contains(needle), "{query}: {error}");
            }
        }
        let error = parse("Observation", &pairs("value-quantity=gtabc"), Handling::Lenient).unwrap_err();
        assert!(error.to_string().contains("value-quantity"));
    }

    #[test]
    fn compartment_restricts_matches() {
        let fixture = fixture();
        let mut query = fixture.query("Observation", "").unwrap();
        query.compartment = Some("p1".into());
        let ids: Vec<String> =
            execute(&fixture.connection, &query).unwrap().matches.into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec!["o1"]);
        let mut query = fixture.query("Patient", "").unwrap();
        query.compartment = Some("p1".into());
        let page = execute(&fixture.connection, &query).unwrap();
        assert_eq!((page.total, page.matches[0].id.as_str()), (Some(1), "p1"));
        assert!(in_compartment(&fixture.connection, "Observation", "o1", "p1").unwrap());
        assert!(in_compartment(&fixture.connection, "Patient", "p1", "p1").unwrap());
        assert!(!in_compartment(&fixture.connection, "Observation", "o2", "p1").unwrap());
        assert!(!in_compartment(&fixture.connection, "Location", "l1", "p1").unwrap());

        // Includes never reach another patient's data.
        let mut query =
            fixture.query("Observation", "_include=Observation:subject&_include=Observation:encounter").unwrap();
        query.compartment = Some("p2".into());
        let page = execute(&fixture.connection, &query).unwrap();
        let included: Vec<String> = page.included.iter().map(|r| r.id.clone()).collect();
        assert_eq!((page.matches.len(), included), (1, vec!["p2".to_string()]));
        let mut query = fixture.query("Encounter", "_include=Encounter:location").unwrap();
        query.compartment = Some("p1".into());
        let page = execute(&fixture.connection, &query).unwrap();
        assert_eq!(page.included.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["l1"]);
    }

    #[test]
    fn everything_pages_through_the_compartment() {
        let fixture = fixture();
        let first = everything(&fixture.connection, "p1", 2, None).unwrap();
        assert_eq!(first.total, Some(3));
        let mut ids: Vec<String> = first.matches.iter().map(|r| format!("{}/{}", r.resource_type, r.id)).collect();
        let next = first.next.unwrap();
        let token = next.split("_page=").nth(1).unwrap();
        let second = everything(&fixture.connection, "p1", 2, Some(token)).unwrap();
        assert!(second.next.is_none());
        ids.extend(second.matches.iter().map(|r| format!("{}/{}", r.resource_type, r.id)));
        assert_eq!(ids, vec!["Patient/p1", "Observation/o1", "Encounter/e1"]);
        assert!(everything(&fixture.connection, "p1", 2, Some("bad")).is_err());
    }
}
