//! The declarative v2 → FHIR R4 mapping engine. Pure and synchronous: no I/O once loaded.
//!
//! Mapping files (see `mappings/README.md` for the language) are compiled when the engine
//! loads; any problem stops the load with file, line and reason. Converting a message:
//! parse → pick the sender's program (overlay or defaults) → route by MSH-9 and MSH-12 →
//! place and build the resources → add a Provenance naming the source message → validate
//! every resource against the R4 models → a transaction Bundle of PUTs, plus a report.
//!
//! Layout: [`source`] (YAML schema, file loading), [`path`] and [`expr`] (v2 paths and
//! conditions), [`target`] (FHIR element paths), [`primitive`] (text → FHIR primitives,
//! time zones), [`compile`] (checks, overlays), [`program`] (compiled form), [`eval`]
//! (running a map), [`report`].

pub mod compile;
pub mod elements;
pub mod eval;
pub mod expr;
pub mod path;
pub mod primitive;
pub mod program;
pub mod report;
pub mod source;
pub mod target;

use std::path::PathBuf;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::fhir::ids::resource_id;
use crate::fhir::validate::validate_resource;
use crate::hl7::message::Message;
pub use compile::{CompileError, Overlay};
use program::Program;
pub use report::Report;

/// The time zone used when neither an overlay nor the caller names one.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// The `mappings` section of the configuration file.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Site folder of mapping files (messages/, segments/, datatypes/, vocab/, senders/),
    /// applied over the built-in mappings.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// IANA time zone of timestamps without offset, for senders whose overlay names none.
    #[serde(default)]
    pub default_timezone: Option<String>,
}

impl Config {
    /// Checks the section without reading the folder.
    pub fn validate(&self) -> Result<Sources, crate::setting::Invalid> {
        if let Some(zone) = &self.default_timezone {
            if jiff::tz::TimeZone::get(zone).is_err() {
                return Err(crate::setting::Invalid::new(
                    "mappings.default_timezone",
                    format!("`{zone}` is not an IANA time zone (e.g. America/Chicago)"),
                ));
            }
        }
        Ok(Sources {
            without_builtin: false,
            folders: self.dir.iter().cloned().collect(),
            default_timezone: self.default_timezone.clone(),
        })
    }
}

/// Why a message could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The text is not a v2 message.
    #[error("message cannot be parsed: {0}")]
    Parse(#[from] crate::hl7::message::ParseError),
    /// No message map handles this message type.
    #[error("no mapping handles {message_type} (version {version}); add a message map under mappings/messages/")]
    Unrouted {
        /// MSH-9 code^trigger^structure.
        message_type: String,
        /// MSH-12.
        version: String,
    },
    /// A produced resource is not valid R4.
    #[error("{resource}: {reason} (mapping {message_map})")]
    Invalid {
        /// `Type/id`.
        resource: String,
        /// What is wrong.
        reason: String,
        /// Message map used.
        message_map: String,
    },
}

/// A converted message.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The transaction Bundle (R4 JSON).
    pub bundle: Value,
    /// The conversion report.
    pub report: Report,
}

/// Compiled mappings: the defaults and the sender overlays.
#[derive(Debug, Clone)]
pub struct Engine {
    default: Program,
    overlays: Vec<Overlay>,
}

/// Where mappings come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Leave out the built-in mappings (tests of a folder on its own).
    pub without_builtin: bool,
    /// Site folders, applied after the built-in files (same kind and name replaces).
    pub folders: Vec<PathBuf>,
    /// Time zone for senders without one of their own (`UTC` when absent).
    pub default_timezone: Option<String>,
}

impl Engine {
    /// Loads and compiles the mappings.
    pub fn load(sources: &Sources) -> Result<Engine, Vec<CompileError>> {
        let mut files = if sources.without_builtin { Vec::new() } else { source::builtin() };
        for folder in &sources.folders {
            match source::read_folder(folder) {
                Ok(found) => files.extend(found),
                Err(reason) => {
                    return Err(vec![CompileError {
                        origin: program::Origin { file: folder.display().to_string(), line: 0 },
                        reason,
                    }])
                }
            }
        }
        let zone = sources.default_timezone.as_deref().unwrap_or(DEFAULT_TIMEZONE);
        let (default, overlays) = compile::compile(&files, zone)?;
        Ok(Engine { default, overlays })
    }

    /// The built-in mappings only, in UTC.
    pub fn builtin() -> Result<Engine, Vec<CompileError>> {
        Engine::load(&Sources::default())
    }

    /// Number of message maps (for logs).
    pub fn message_map_count(&self) -> usize {
        self.default.messages.len()
    }

    /// Sender overlays (for logs).
    pub fn overlays(&self) -> &[Overlay] {
        &self.overlays
    }

    /// Converts one decoded message.
    pub fn convert(&self, text: &str) -> Result<Converted, ConvertError> {
        let message = Message::parse(text)?;
        let msh = message.msh();
        let first = |field: usize, component: usize| msh.value(field, 1, component, 1).unwrap_or("").trim().to_string();
        let application = first(3, 1);
        let facility = first(4, 1);
        let program = self
            .overlays
            .iter()
            .find(|overlay| overlay.matches(&application, &facility))
            .map_or(&self.default, |overlay| &overlay.program);
        let (code, trigger, structure, version) = (first(9, 1), first(9, 2), first(9, 3), first(12, 1));
        let Some(map) = program.route(&code, &trigger, &structure, &version) else {
            return Err(ConvertError::Unrouted { message_type: format!("{code}^{trigger}^{structure}"), version });
        };
        let output = eval::run(program, map, &message);
        for resource in &output.resources {
            if let Err(reason) = validate_resource(resource) {
                return Err(ConvertError::Invalid {
                    resource: format!("{}/{}", text_field(resource, "resourceType"), text_field(resource, "id")),
                    reason,
                    message_map: map.name.clone(),
                });
            }
        }
        let bundle = transaction_bundle(&message, text, program, output.resources);
        Ok(Converted { bundle, report: output.report })
    }
}

fn text_field<'v>(resource: &'v Value, key: &str) -> &'v str {
    resource.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Wraps the resources, plus a Provenance naming the source message, in a transaction
/// Bundle of PUTs. Its id derives from the sender, MSH-10 and the message's content.
fn transaction_bundle(message: &Message, text: &str, program: &Program, resources: Vec<Value>) -> Value {
    let msh = message.msh();
    let field = |number: usize, component: usize| msh.value(number, 1, component, 1).unwrap_or("").to_string();
    let content_hash: String =
        Sha256::digest(text.as_bytes()).iter().take(16).map(|byte| format!("{byte:02x}")).collect();
    let message_key = vec![field(3, 1), field(4, 1), field(10, 1), content_hash];
    let recorded = primitive::Kind::Instant.convert(&field(7, 1), &program.timezone).ok();

    let mut entries: Vec<Value> = resources.iter().map(entry).collect();
    if let Some(recorded) = &recorded {
        let targets: Vec<Value> = resources
            .iter()
            .map(|resource| json!({ "reference": format!("{}/{}", text_field(resource, "resourceType"), text_field(resource, "id")) }))
            .collect();
        let sender = format!("{}^{}", field(3, 1), field(4, 1));
        let message_type = format!("{}^{}", field(9, 1), field(9, 2));
        let mut provenance = json!({
            "resourceType": "Provenance",
            "id": resource_id("Provenance", &message_key),
            "target": targets,
            "recorded": recorded,
            "agent": [{
                "type": { "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                    "code": "author"
                }]},
                "who": { "display": sender }
            }],
            "entity": [{
                "role": "source",
                "what": {
                    "display": format!("HL7 v2 {message_type} message {} from {sender}", field(10, 1))
                }
            }]
        });
        // An empty MSH-10 gives no identifier (FHIR has no empty strings).
        if !field(10, 1).is_empty() {
            provenance["entity"][0]["what"]["identifier"] = json!({ "value": field(10, 1) });
        }
        if !field(9, 2).is_empty() {
            provenance["activity"] = json!({ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v2-0003",
                "code": field(9, 2)
            }]});
        }
        if targets_empty(&provenance) {
            if let Some(object) = provenance.as_object_mut() {
                object.remove("target");
            }
        }
        if validate_resource(&provenance).is_ok() {
            entries.push(entry(&provenance));
        }
    }

    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), json!("Bundle"));
    bundle.insert("id".into(), json!(resource_id("Bundle", &message_key)));
    bundle.insert("type".into(), json!("transaction"));
    if let Some(recorded) = recorded {
        bundle.insert("timestamp".into(), json!(recorded));
    }
    bundle.insert("entry".into(), Value::Array(entries));
    Value::Object(bundle)
}

fn targets_empty(provenance: &Value) -> bool {
    provenance.get("target").and_then(Value::as_array).is_none_or(Vec::is_empty)
}

fn entry(resource: &Value) -> Value {
    let resource_type = text_field(resource, "resourceType");
    let id = text_field(resource, "id");
    json!({
        "fullUrl": format!("urn:uuid:{id}"),
        "resource": resource,
        "request": { "method": "PUT", "url": format!("{resource_type}/{id}") }
    })
}
