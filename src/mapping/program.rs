//! The compiled, checked form of the mapping files: what [`super::eval`] runs.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use jiff::tz::TimeZone;
use serde_json::Value;

use super::expr::{Condition, ValueExpr};
use super::primitive::Kind;
use super::target::TargetPath;

/// Where a rule or map was written: file and line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// File, as shown to the analyst.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: u32,
}

impl fmt::Display for Origin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(formatter, "{}", self.file)
        } else {
            write!(formatter, "{}:{}", self.file, self.line)
        }
    }
}

/// A vocabulary map.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// Name (file name).
    pub name: String,
    /// Target code system.
    pub system: String,
    /// Source code → (target code, display).
    pub entries: HashMap<String, (String, Option<String>)>,
}

impl Vocab {
    /// Translates a code: exact match first, then ignoring case.
    pub fn translate(&self, code: &str) -> Option<&(String, Option<String>)> {
        let code = code.trim();
        self.entries.get(code).or_else(|| {
            self.entries.iter().find(|(source, _)| source.eq_ignore_ascii_case(code)).map(|(_, target)| target)
        })
    }
}

/// What a rule does with the value it read.
#[derive(Clone, Debug)]
pub enum Transform {
    /// Text → primitive.
    Primitive(Kind),
    /// Value → complex FHIR value through a datatype map.
    Datatype(Arc<DatatypeMap>),
    /// Value → a resource of its own through a datatype map; the rule sets a reference.
    Create(Arc<DatatypeMap>),
}

/// Where a rule's value comes from.
#[derive(Clone, Debug)]
pub enum RuleSource {
    /// Read from the message.
    From(ValueExpr),
    /// A constant.
    Constant(Value),
    /// A reference to another instance of the message.
    Reference(String),
}

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Where it was written.
    pub origin: Origin,
    /// Its id, for overlays.
    pub id: Option<String>,
    /// Condition.
    pub when: Option<Condition>,
    /// Value source.
    pub source: RuleSource,
    /// Transformation (for `From` sources).
    pub transform: Transform,
    /// Vocabulary applied to the code.
    pub vocab: Option<Arc<Vocab>>,
    /// Text template with `{}`.
    pub format: Option<String>,
    /// Target element.
    pub target: TargetPath,
}

/// A compiled datatype map.
#[derive(Clone, Debug)]
pub struct DatatypeMap {
    /// Name.
    pub name: String,
    /// v2 datatype.
    pub datatype: String,
    /// FHIR type built (a resource type for maps used with `create:`).
    pub fhir_type: String,
    /// Business key of the created resource.
    pub id_keys: Vec<ValueExpr>,
    /// Rules.
    pub rules: Vec<Rule>,
    /// Where it was written.
    pub origin: Origin,
}

/// A compiled instance of a message map.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Name.
    pub name: String,
    /// Resource type.
    pub resource_type: String,
    /// Source segment.
    pub segment: String,
    /// One per occurrence.
    pub each: bool,
    /// Parent instance index in the message map.
    pub within: Option<usize>,
    /// Condition.
    pub when: Option<Condition>,
    /// Business key.
    pub id_keys: Vec<ValueExpr>,
    /// Rules (segment maps' rules, then the instance's own).
    pub rules: Vec<Rule>,
    /// Where it was written.
    pub origin: Origin,
}

/// A compiled message map.
#[derive(Clone, Debug)]
pub struct MessageMap {
    /// Name.
    pub name: String,
    /// MSH-9.1 values.
    pub message_types: Vec<String>,
    /// MSH-9.2 values (empty: any).
    pub triggers: Vec<String>,
    /// MSH-9.3 values (empty: any).
    pub structures: Vec<String>,
    /// MSH-12 values (empty: any).
    pub versions: Vec<String>,
    /// Instances in order.
    pub instances: Vec<Instance>,
    /// Where it was written.
    pub origin: Origin,
}

impl MessageMap {
    /// True when this map handles the message type, trigger, structure and version.
    pub fn handles(&self, message_type: &str, trigger: &str, structure: &str, version: &str) -> bool {
        let listed = |list: &[String], value: &str| list.is_empty() || list.iter().any(|item| item == value);
        self.message_types.iter().any(|item| item == message_type)
            && listed(&self.triggers, trigger)
            && (structure.is_empty() || listed(&self.structures, structure))
            && listed(&self.versions, version)
    }
}

/// Everything one sender's messages are converted with.
#[derive(Clone, Debug)]
pub struct Program {
    /// Message maps in routing order.
    pub messages: Vec<MessageMap>,
    /// Time zone for timestamps without offset.
    pub timezone: TimeZone,
    /// Name of that zone, for reports.
    pub timezone_name: String,
}

impl Program {
    /// The first message map that handles the message.
    pub fn route(&self, message_type: &str, trigger: &str, structure: &str, version: &str) -> Option<&MessageMap> {
        self.messages.iter().find(|map| map.handles(message_type, trigger, structure, version))
    }
}
