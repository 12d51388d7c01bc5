//! Mapping files → checked [`Program`]s: one for the defaults and one per sender overlay.
//!
//! Every problem is reported with file and line, and all of them are collected before
//! giving up, so an analyst fixes a folder in one pass. Checked here: YAML shape and keys,
//! v2 paths, conditions, FHIR element path syntax, primitive types, that every map,
//! vocabulary and referenced instance exists, resource types, time zones, and that a rule
//! reading several values appends (`[+]`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use jiff::tz::TimeZone;
use serde_saphyr::Spanned;

use super::expr::{Alternative, Condition, ValueExpr};
use super::path::Path;
use super::primitive::Kind;
use super::program::{DatatypeMap, Instance, MessageMap, Origin, Program, Rule, RuleSource, Transform, Vocab};
use super::source::{
    DatatypeFile, InstanceSpec, MessageFile, RuleSpec, SegmentFile, SenderFile, SenderMatch, SourceFile, VocabFile,
    VocabTarget,
};

/// One problem in the mapping files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    /// Where.
    pub origin: Origin,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.origin, self.reason)
    }
}

/// A sender overlay, compiled.
#[derive(Clone, Debug)]
pub struct Overlay {
    /// Name (file name).
    pub name: String,
    /// MSH-3.1 to match, if any.
    pub application: Option<String>,
    /// MSH-4.1 to match, if any.
    pub facility: Option<String>,
    /// The program for this sender.
    pub program: Program,
}

impl Overlay {
    /// True when the overlay applies to this sender.
    pub fn matches(&self, application: &str, facility: &str) -> bool {
        self.application.as_deref().is_none_or(|wanted| wanted.eq_ignore_ascii_case(application))
            && self.facility.as_deref().is_none_or(|wanted| wanted.eq_ignore_ascii_case(facility))
    }
}

/// The parsed (not yet compiled) mapping tree.
#[derive(Clone, Default)]
struct Sources {
    messages: BTreeMap<String, (Origin, MessageFile)>,
    segments: BTreeMap<String, (Origin, SegmentFile)>,
    datatypes: BTreeMap<String, (Origin, DatatypeFile)>,
    vocab: BTreeMap<String, (Origin, VocabFile)>,
    senders: BTreeMap<String, (Origin, SenderFile)>,
}

/// Compiles files (later files override earlier ones of the same kind and name) into the
/// default program and the sender overlays.
pub fn compile(files: &[SourceFile], default_timezone: &str) -> Result<(Program, Vec<Overlay>), Vec<CompileError>> {
    let mut errors = Vec::new();
    let mut sources = Sources::default();
    for file in files {
        parse_file(file, &mut sources, &mut errors);
    }
    let file_origin = |text: &str| Origin { file: text.to_string(), line: 0 };
    let zone = match TimeZone::get(default_timezone) {
        Ok(zone) => zone,
        Err(_) => {
            errors.push(CompileError {
                origin: file_origin("configuration"),
                reason: format!("`{default_timezone}` is not an IANA time zone"),
            });
            TimeZone::UTC
        }
    };
    let default_program = build_program(&sources, zone, default_timezone, &mut errors);
    let mut overlays = Vec::new();
    for (name, (origin, sender)) in &sources.senders {
        let mut overlaid = sources.clone();
        apply_overlay(&mut overlaid, origin, sender, &mut errors);
        let (zone, zone_name) = match &sender.timezone {
            Some(zone_name) => match TimeZone::get(zone_name) {
                Ok(zone) => (zone, zone_name.clone()),
                Err(_) => {
                    errors.push(CompileError {
                        origin: origin.clone(),
                        reason: format!("timezone `{zone_name}` is not an IANA time zone"),
                    });
                    (default_program.timezone.clone(), default_program.timezone_name.clone())
                }
            },
            None => (default_program.timezone.clone(), default_program.timezone_name.clone()),
        };
        let program = build_program(&overlaid, zone, &zone_name, &mut errors);
        let SenderMatch { application, facility } = sender.sender.clone();
        overlays.push(Overlay { name: name.clone(), application, facility, program });
    }
    // Element names are checked once the programs compile; overlays share most rules with
    // the defaults, and the checker skips rules it has seen.
    if errors.is_empty() {
        errors.extend(super::elements::check(&default_program));
        for overlay in &overlays {
            errors.extend(super::elements::check(&overlay.program));
        }
    }
    if errors.is_empty() {
        Ok((default_program, overlays))
    } else {
        Err(errors)
    }
}

fn parse_file(file: &SourceFile, sources: &mut Sources, errors: &mut Vec<CompileError>) {
    let origin = Origin { file: file.display.clone(), line: 0 };
    macro_rules! parse_into {
        ($target:expr, $type:ty) => {
            match serde_saphyr::from_str::<$type>(&file.text) {
                Ok(parsed) => {
                    $target.insert(file.name.clone(), (origin.clone(), parsed));
                }
                Err(error) => errors.push(yaml_error(&file.display, &error)),
            }
        };
    }
    match file.kind.as_str() {
        "messages" => parse_into!(sources.messages, MessageFile),
        "segments" => parse_into!(sources.segments, SegmentFile),
        "datatypes" => parse_into!(sources.datatypes, DatatypeFile),
        "vocab" => parse_into!(sources.vocab, VocabFile),
        "senders" => parse_into!(sources.senders, SenderFile),
        other => errors.push(CompileError { origin, reason: format!("unknown mapping folder `{other}`") }),
    }
}

fn yaml_error(file: &str, error: &serde_saphyr::Error) -> CompileError {
    let line = error.location().map_or(0, |location| location.line() as u32);
    let message = error.to_string();
    // The first line of serde-saphyr's message is the reason; the rest repeats the source.
    let reason = message.lines().next().unwrap_or(&message).to_string();
    CompileError { origin: Origin { file: file.to_string(), line }, reason }
}

fn apply_overlay(sources: &mut Sources, origin: &Origin, sender: &SenderFile, errors: &mut Vec<CompileError>) {
    for (vocab_name, entries) in &sender.vocab {
        match sources.vocab.get_mut(vocab_name) {
            Some((_, vocab)) => vocab.map.extend(entries.clone()),
            None => errors.push(CompileError {
                origin: origin.clone(),
                reason: format!("vocab `{vocab_name}` does not exist; overlays add entries to existing vocabularies"),
            }),
        }
    }
    for (segment_name, segment) in &sender.segments {
        sources.segments.insert(segment_name.clone(), (origin.clone(), segment.clone()));
    }
    for added in &sender.instances {
        let line_origin = Origin { file: origin.file.clone(), line: added.referenced.line() as u32 };
        match sources.messages.get_mut(&added.value.message) {
            Some((_, message)) => {
                let mut instance = added.value.instance.clone();
                for rule in &mut instance.rules {
                    rule.value.defined_in = Some(origin.file.clone());
                }
                message.resources.push(Spanned {
                    value: instance,
                    referenced: added.referenced,
                    defined: added.defined,
                })
            }
            None => errors.push(CompileError {
                origin: line_origin,
                reason: format!("message map `{}` does not exist", added.value.message),
            }),
        }
    }
    for extension in &sender.extend {
        let line_origin = Origin { file: origin.file.clone(), line: extension.referenced.line() as u32 };
        let spec = &extension.value;
        let Some((_, message)) = sources.messages.get_mut(&spec.message) else {
            errors.push(CompileError {
                origin: line_origin,
                reason: format!("message map `{}` does not exist", spec.message),
            });
            continue;
        };
        let Some(instance) = message.resources.iter_mut().find(|instance| instance.value.name == spec.instance) else {
            errors.push(CompileError {
                origin: line_origin,
                reason: format!("message map `{}` has no instance `{}`", spec.message, spec.instance),
            });
            continue;
        };
        let rules = &mut instance.value.rules;
        rules.retain(|rule| rule.value.id.as_ref().is_none_or(|id| !spec.remove.contains(id)));
        for rule in &spec.rules {
            let mut rule = rule.clone();
            rule.value.defined_in = Some(origin.file.clone());
            let replaced = rule
                .value
                .id
                .as_ref()
                .and_then(|id| rules.iter().position(|existing| existing.value.id.as_ref() == Some(id)));
            match replaced {
                Some(position) => rules[position] = rule,
                None => rules.push(rule),
            }
        }
    }
}

/// Compiles one set of sources into a program.
fn build_program(sources: &Sources, zone: TimeZone, zone_name: &str, errors: &mut Vec<CompileError>) -> Program {
    let mut compiler =
        Compiler { sources, vocab: HashMap::new(), datatypes: HashMap::new(), in_progress: HashSet::new(), errors };
    for name in sources.vocab.keys() {
        compiler.vocab(name);
    }
    for name in sources.datatypes.keys() {
        compiler.datatype(name, &Origin { file: "mappings".into(), line: 0 });
    }
    let mut messages = Vec::new();
    for (name, (origin, file)) in &sources.messages {
        if let Some(map) = compiler.message(name, origin, file) {
            messages.push(map);
        }
    }
    Program { messages, timezone: zone, timezone_name: zone_name.to_string() }
}

struct Compiler<'a> {
    sources: &'a Sources,
    vocab: HashMap<String, Arc<Vocab>>,
    datatypes: HashMap<String, Arc<DatatypeMap>>,
    in_progress: HashSet<String>,
    errors: &'a mut Vec<CompileError>,
}

/// Where a rule is compiled: datatype maps allow relative paths.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RuleContext {
    Segment,
    Datatype,
}

impl Compiler<'_> {
    fn error(&mut self, origin: &Origin, reason: impl Into<String>) {
        self.errors.push(CompileError { origin: origin.clone(), reason: reason.into() });
    }

    fn vocab(&mut self, name: &str) -> Option<Arc<Vocab>> {
        if let Some(found) = self.vocab.get(name) {
            return Some(found.clone());
        }
        let (origin, file) = self.sources.vocab.get(name)?;
        let mut entries = HashMap::new();
        for (source, target) in &file.map {
            let entry = match target {
                VocabTarget::Code(code) => (code.clone(), None),
                VocabTarget::Full { code, display } => (code.clone(), display.clone()),
            };
            entries.insert(source.clone(), entry);
        }
        if file.target.trim().is_empty() {
            self.error(origin, "vocab `target` (the FHIR code system) must not be empty");
        }
        let vocab = Arc::new(Vocab { name: name.to_string(), system: file.target.clone(), entries });
        self.vocab.insert(name.to_string(), vocab.clone());
        Some(vocab)
    }

    fn datatype(&mut self, name: &str, used_at: &Origin) -> Option<Arc<DatatypeMap>> {
        if let Some(found) = self.datatypes.get(name) {
            return Some(found.clone());
        }
        let Some((origin, file)) = self.sources.datatypes.get(name) else {
            self.error(used_at, format!("datatype map `{name}` does not exist (mappings/datatypes/{name}.yaml)"));
            return None;
        };
        if !self.in_progress.insert(name.to_string()) {
            self.error(used_at, format!("datatype map `{name}` uses itself"));
            return None;
        }
        let id_keys = self.value_list(&file.id, origin, RuleContext::Datatype);
        let rules = self.rules(&file.rules, origin, RuleContext::Datatype);
        self.in_progress.remove(name);
        let map = Arc::new(DatatypeMap {
            name: name.to_string(),
            datatype: file.datatype.clone(),
            fhir_type: file.fhir_type.clone(),
            id_keys,
            rules,
            origin: origin.clone(),
        });
        self.datatypes.insert(name.to_string(), map.clone());
        Some(map)
    }

    fn value_list(&mut self, texts: &[String], origin: &Origin, context: RuleContext) -> Vec<ValueExpr> {
        let mut values = Vec::new();
        for text in texts {
            if let Some(value) = self.value_expr(text, origin, context) {
                values.push(value);
            }
        }
        values
    }

    fn value_expr(&mut self, text: &str, origin: &Origin, context: RuleContext) -> Option<ValueExpr> {
        match ValueExpr::parse(text) {
            Ok(value) => {
                let relative = value
                    .alternatives
                    .iter()
                    .any(|alternative| matches!(alternative, Alternative::Path(Path::Relative { .. })));
                if relative && context == RuleContext::Segment {
                    self.error(origin, format!("`{text}`: relative paths (like `1` or `4.2`) belong in datatype maps; write SEG-FIELD.COMPONENT here"));
                    return None;
                }
                Some(value)
            }
            Err(reason) => {
                self.error(origin, reason);
                None
            }
        }
    }

    fn condition(&mut self, text: &str, origin: &Origin) -> Option<Condition> {
        match Condition::parse(text) {
            Ok(condition) => Some(condition),
            Err(reason) => {
                self.error(origin, reason);
                None
            }
        }
    }

    fn rules(&mut self, specs: &[Spanned<RuleSpec>], file_origin: &Origin, context: RuleContext) -> Vec<Rule> {
        let mut rules = Vec::new();
        for spec in specs {
            let file = spec.value.defined_in.clone().unwrap_or_else(|| file_origin.file.clone());
            let origin = Origin { file, line: spec.referenced.line() as u32 };
            if let Some(rule) = self.rule(&spec.value, &origin, context) {
                rules.push(rule);
            }
        }
        rules
    }

    fn rule(&mut self, spec: &RuleSpec, origin: &Origin, context: RuleContext) -> Option<Rule> {
        let errors_before = self.errors.len();
        let target = match super::target::TargetPath::parse(&spec.to) {
            Ok(target) => Some(target),
            Err(reason) => {
                self.error(origin, reason);
                None
            }
        };
        let sources_given = [spec.from.is_some(), spec.value.is_some(), spec.reference.is_some()];
        let source = match (&spec.from, &spec.value, &spec.reference) {
            (Some(from), None, None) => self.value_expr(&from.text(), origin, context).map(RuleSource::From),
            (None, Some(value), None) => Some(RuleSource::Constant(value.clone())),
            (None, None, Some(name)) => Some(RuleSource::Reference(name.clone())),
            _ => {
                let given = sources_given.iter().filter(|given| **given).count();
                self.error(
                    origin,
                    if given == 0 {
                        "a rule needs one of `from`, `value` or `ref`"
                    } else {
                        "a rule takes only one of `from`, `value` and `ref`"
                    },
                );
                None
            }
        };
        if [spec.map.is_some(), spec.create.is_some(), spec.kind.is_some()].iter().filter(|given| **given).count() > 1 {
            self.error(origin, "a rule takes at most one of `as`, `map` and `create`");
        }
        let transform = if let Some(map_name) = &spec.map {
            self.datatype(map_name, origin).map(Transform::Datatype)
        } else if let Some(map_name) = &spec.create {
            let created = self.datatype(map_name, origin);
            if let Some(map) = &created {
                if fhir_sdk::r4b::resources::ResourceType::from_str(&map.fhir_type).is_err() {
                    self.error(
                        origin,
                        format!(
                            "`create: {map_name}` needs a map whose type is a resource; `{}` is not",
                            map.fhir_type
                        ),
                    );
                }
                if map.id_keys.is_empty() {
                    self.error(origin, format!("`create: {map_name}` needs `id:` keys in that datatype map"));
                }
            }
            created.map(Transform::Create)
        } else {
            let kind_name = spec.kind.as_deref().unwrap_or("string");
            match Kind::parse(kind_name) {
                Some(kind) => Some(Transform::Primitive(kind)),
                None => {
                    self.error(origin, format!("`as: {kind_name}` is not a FHIR primitive type (string, code, date, dateTime, instant, decimal, boolean, ...)"));
                    None
                }
            }
        };
        let vocab = match &spec.vocab {
            Some(name) => match self.vocab(name) {
                Some(vocab) => Some(vocab),
                None => {
                    self.error(origin, format!("vocab `{name}` does not exist (mappings/vocab/{name}.yaml)"));
                    None
                }
            },
            None => None,
        };
        if let Some(format) = &spec.format {
            if !format.contains("{}") {
                self.error(origin, "`format` must contain `{}` where the value goes");
            }
        }
        let when = spec.when.as_deref().and_then(|text| self.condition(text, origin));
        if let (Some(RuleSource::From(value)), Some(target)) = (&source, &target) {
            if value.iterates() && !target.appends() {
                self.error(
                    origin,
                    format!(
                        "`{}` reads several values; write the target with `[+]` so each gets its own item",
                        spec.to
                    ),
                );
            }
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Rule {
            origin: origin.clone(),
            id: spec.id.clone(),
            when,
            source: source?,
            transform: transform?,
            vocab,
            format: spec.format.clone(),
            target: target?,
        })
    }

    fn message(&mut self, name: &str, origin: &Origin, file: &MessageFile) -> Option<MessageMap> {
        let errors_before = self.errors.len();
        if file.matches.message_types.is_empty() {
            self.error(origin, "`match.type` needs at least one message type (MSH-9.1)");
        }
        let names: Vec<String> = file.resources.iter().map(|instance| instance.value.name.clone()).collect();
        let mut instances: Vec<Instance> = Vec::new();
        for (position, spanned) in file.resources.iter().enumerate() {
            let spec: &InstanceSpec = &spanned.value;
            let instance_origin = Origin { file: origin.file.clone(), line: spanned.referenced.line() as u32 };
            if names[..position].contains(&spec.name) {
                self.error(&instance_origin, format!("instance `{}` is defined twice", spec.name));
            }
            if fhir_sdk::r4b::resources::ResourceType::from_str(&spec.resource).is_err() {
                self.error(&instance_origin, format!("`{}` is not a FHIR resource type", spec.resource));
            }
            if spec.segment.len() != 3 || !spec.segment.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) {
                self.error(&instance_origin, format!("`{}` is not a segment id", spec.segment));
            }
            let within = match &spec.within {
                Some(parent) => match names[..position].iter().position(|earlier| earlier == parent) {
                    Some(index) => Some(index),
                    None => {
                        self.error(&instance_origin, format!("`within: {parent}` must name an instance defined above"));
                        None
                    }
                },
                None => None,
            };
            if spec.id.is_empty() {
                self.error(&instance_origin, "`id` needs at least one business key expression");
            }
            let id_keys = self.value_list(&spec.id, &instance_origin, RuleContext::Segment);
            let when = spec.when.as_deref().and_then(|text| self.condition(text, &instance_origin));
            let mut rules = Vec::new();
            for map_name in &spec.maps {
                match self.sources.segments.get(map_name) {
                    Some((segment_origin, segment_file)) => {
                        if segment_file.resource != spec.resource {
                            self.error(
                                &instance_origin,
                                format!(
                                    "segment map `{map_name}` writes {}, not {}",
                                    segment_file.resource, spec.resource
                                ),
                            );
                        }
                        rules.extend(self.rules(&segment_file.rules, segment_origin, RuleContext::Segment));
                    }
                    None => self.error(
                        &instance_origin,
                        format!("segment map `{map_name}` does not exist (mappings/segments/{map_name}.yaml)"),
                    ),
                }
            }
            rules.extend(self.rules(&spec.rules, origin, RuleContext::Segment));
            for rule in &rules {
                if let RuleSource::Reference(target_name) = &rule.source {
                    if !names.contains(target_name) {
                        self.error(
                            &rule.origin,
                            format!("`ref: {target_name}`: message map `{name}` has no such instance"),
                        );
                    }
                }
            }
            instances.push(Instance {
                name: spec.name.clone(),
                resource_type: spec.resource.clone(),
                segment: spec.segment.clone(),
                each: spec.each,
                within,
                when,
                id_keys,
                rules,
                origin: instance_origin,
            });
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(MessageMap {
            name: name.to_string(),
            message_types: file.matches.message_types.clone(),
            triggers: file.matches.triggers.clone(),
            structures: file.matches.structures.clone(),
            versions: file.matches.versions.clone(),
            instances,
            origin: origin.clone(),
        })
    }
}
