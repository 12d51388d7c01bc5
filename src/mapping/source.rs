//! The YAML schema of mapping files, as analysts write them, and where files come from.
//!
//! The folder decides what a file is; the file name (without `.yaml`) is its name:
//! - `messages/NAME.yaml` — a message map: which messages it handles and which resources
//!   it builds;
//! - `segments/NAME.yaml` — a segment map: rules from one segment to one resource;
//! - `datatypes/NAME.yaml` — a datatype map: rules from one v2 datatype to a FHIR type (or
//!   to a resource of its own, for `create:`);
//! - `vocab/NAME.yaml` — a vocabulary map: v2 codes to FHIR codes;
//! - `senders/NAME.yaml` — a sender overlay (see `overlay`).
//!
//! Every struct rejects unknown keys, and rules carry their line for error messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A text or a number in YAML (`from: 1` and `from: "1"` both mean component 1).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    /// Text.
    Text(String),
    /// Whole number.
    Integer(i64),
    /// Decimal (`4.2` = component 4, subcomponent 2).
    Decimal(f64),
    /// true / false.
    Boolean(bool),
}

impl Scalar {
    /// The scalar as text.
    pub fn text(&self) -> String {
        match self {
            Scalar::Text(text) => text.clone(),
            Scalar::Integer(number) => number.to_string(),
            Scalar::Decimal(number) => number.to_string(),
            Scalar::Boolean(flag) => flag.to_string(),
        }
    }
}

/// One rule: where a value comes from, what happens to it, where it goes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Name, so that a sender overlay can replace or remove this rule.
    #[serde(default)]
    pub id: Option<String>,
    /// v2 value: a path, `A | B` alternatives, quoted literals.
    #[serde(default)]
    pub from: Option<Scalar>,
    /// A constant (text, number, boolean, or a YAML mapping for a complex value).
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// A reference to another resource of the message, by instance name.
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    /// FHIR element path, e.g. `identifier[+]`.
    pub to: String,
    /// FHIR primitive type the text becomes (`string` when omitted).
    #[serde(default, rename = "as")]
    pub kind: Option<String>,
    /// Datatype map applied to the value (builds a complex FHIR value).
    #[serde(default)]
    pub map: Option<String>,
    /// Datatype map that creates a resource of its own; the rule sets a reference to it.
    #[serde(default)]
    pub create: Option<String>,
    /// Vocabulary map for the code.
    #[serde(default)]
    pub vocab: Option<String>,
    /// Text template; `{}` stands for the value (`urn:oid:{}`).
    #[serde(default)]
    pub format: Option<String>,
    /// Condition.
    #[serde(default)]
    pub when: Option<String>,
    /// Traceability: the IG mapping row this rule implements, or why it differs.
    #[serde(default)]
    pub ig: Option<String>,
    /// Free comment.
    #[serde(default)]
    pub note: Option<String>,
    /// File the rule was written in, when it differs from the file holding it (rules an
    /// overlay adds to a message map). Not read from YAML.
    #[serde(skip)]
    pub defined_in: Option<String>,
}

/// `match:` of a message map.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// MSH-9.1 values.
    #[serde(rename = "type")]
    pub message_types: Vec<String>,
    /// MSH-9.2 values; empty means any.
    #[serde(default)]
    pub triggers: Vec<String>,
    /// MSH-9.3 values; empty means any.
    #[serde(default)]
    pub structures: Vec<String>,
    /// MSH-12 versions; empty means any.
    #[serde(default)]
    pub versions: Vec<String>,
}

/// One resource a message map builds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Name, used by `ref:` and by overlays.
    pub name: String,
    /// FHIR resource type.
    pub resource: String,
    /// The segment the resource is built from.
    pub segment: String,
    /// One resource per occurrence of the segment (in the parent's group) instead of one
    /// for the first occurrence.
    #[serde(default)]
    pub each: bool,
    /// Parent instance: occurrences are taken from the parent's group (the segments after
    /// the parent's segment, up to its next occurrence), e.g. each OBX within its OBR.
    #[serde(default)]
    pub within: Option<String>,
    /// Condition for building it at all.
    #[serde(default)]
    pub when: Option<String>,
    /// Business key of the id: value expressions, e.g. `[PID-3.4.1 | MSH-4.1, PID-3.1]`.
    pub id: Vec<String>,
    /// Segment maps applied in order.
    #[serde(default)]
    pub maps: Vec<String>,
    /// Rules of this message only, applied after the maps.
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSpec>>,
}

/// A message map file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageFile {
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Which messages it handles.
    #[serde(rename = "match")]
    pub matches: MatchSpec,
    /// The resources it builds, in order.
    pub resources: Vec<Spanned<InstanceSpec>>,
}

/// A segment map file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentFile {
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// The segment it reads.
    pub segment: String,
    /// The resource type it writes.
    pub resource: String,
    /// Rules.
    pub rules: Vec<Spanned<RuleSpec>>,
}

/// A datatype map file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatatypeFile {
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// The v2 datatype it reads (documentation and checks).
    pub datatype: String,
    /// The FHIR type it builds.
    #[serde(rename = "type")]
    pub fhir_type: String,
    /// For maps used with `create:`: the business key of the created resource's id.
    #[serde(default)]
    pub id: Vec<String>,
    /// Rules, with paths relative to the value (`1`, `4.2`).
    pub rules: Vec<Spanned<RuleSpec>>,
}

/// A vocabulary target: a code, or a code with a display.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum VocabTarget {
    /// Just the code.
    Code(String),
    /// Code and display.
    Full {
        /// Target code.
        code: String,
        /// Target display.
        #[serde(default)]
        display: Option<String>,
    },
}

/// A vocabulary map file (ConceptMap-like).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocabFile {
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Where the source codes come from (e.g. `HL7 table 0001`).
    #[serde(default)]
    pub source: Option<String>,
    /// The FHIR code system of the targets.
    pub target: String,
    /// Traceability to the IG's vocabulary table.
    #[serde(default)]
    pub ig: Option<String>,
    /// Source code → target.
    pub map: BTreeMap<String, VocabTarget>,
}

/// Which sender an overlay applies to (first components of MSH-3 and MSH-4).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderMatch {
    /// MSH-3.1; absent means any application.
    #[serde(default)]
    pub application: Option<String>,
    /// MSH-4.1; absent means any facility.
    #[serde(default)]
    pub facility: Option<String>,
}

/// Rules an overlay adds to (or replaces in) one instance of one message map.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendSpec {
    /// Message map name.
    pub message: String,
    /// Instance name.
    pub instance: String,
    /// Rules appended; a rule whose `id` matches an existing rule replaces it.
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSpec>>,
    /// Ids of rules to drop.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A sender overlay file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderFile {
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// The sender.
    pub sender: SenderMatch,
    /// IANA time zone of the sender's timestamps without offset.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Vocabulary entries added or overridden, by vocabulary name.
    #[serde(default)]
    pub vocab: BTreeMap<String, BTreeMap<String, VocabTarget>>,
    /// Segment maps of this sender (e.g. for Z-segments), by name; a name that exists in
    /// the defaults replaces that map for this sender.
    #[serde(default)]
    pub segments: BTreeMap<String, SegmentFile>,
    /// Resources added to message maps for this sender.
    #[serde(default)]
    pub instances: Vec<Spanned<AddInstanceSpec>>,
    /// Rules added to instances of message maps.
    #[serde(default)]
    pub extend: Vec<Spanned<ExtendSpec>>,
}

/// An instance an overlay adds to a message map.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddInstanceSpec {
    /// Message map name.
    pub message: String,
    /// The instance.
    #[serde(flatten)]
    pub instance: InstanceSpec,
}

/// One mapping file's text and where it came from.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Path shown in messages, relative to the mapping root (`segments/PID-Patient.yaml`),
    /// prefixed with the folder for site files.
    pub display: String,
    /// `messages`, `segments`, `datatypes`, `vocab` or `senders`.
    pub kind: String,
    /// File name without `.yaml`.
    pub name: String,
    /// The YAML text.
    pub text: String,
}

/// The folders of a mapping tree.
pub const KINDS: [&str; 5] = ["messages", "segments", "datatypes", "vocab", "senders"];

/// Reads every `*.yaml` in the kind folders under `root`, sorted by path.
pub fn read_folder(root: &Path) -> Result<Vec<SourceFile>, String> {
    let mut files = Vec::new();
    if !root.is_dir() {
        return Err(format!("{}: not a folder", root.display()));
    }
    for kind in KINDS {
        let folder = root.join(kind);
        if !folder.is_dir() {
            continue;
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&folder)
            .map_err(|error| format!("{}: {error}", folder.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|extension| extension == "yaml" || extension == "yml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))?;
            let name = path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
            files.push(SourceFile { display: path.display().to_string(), kind: kind.to_string(), name, text });
        }
    }
    Ok(files)
}

/// The mapping files built into the binary (the repository's `mappings/` folder).
pub fn builtin() -> Vec<SourceFile> {
    BUILTIN
        .iter()
        .map(|(relative, text)| {
            let (kind, file) = relative.split_once('/').unwrap_or(("", relative));
            let name = file.trim_end_matches(".yaml").to_string();
            SourceFile { display: format!("mappings/{relative}"), kind: kind.to_string(), name, text: text.to_string() }
        })
        .collect()
}

include!(concat!(env!("OUT_DIR"), "/builtin_mappings.rs"));
