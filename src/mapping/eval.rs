//! Runs a compiled message map over a parsed message: places the instances (which segment
//! occurrence each resource comes from), gives each its deterministic id, then applies the
//! rules. Pure: no I/O, no clock, no randomness, so the same message always gives the same
//! resources.
//!
//! Scope of a path: the instance's own segment name means its own occurrence; another
//! segment name is looked for first in the instance's group (the segments after its own, up
//! to the next occurrence of its segment or the end of its parent's group), then in the
//! whole message.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::expr::{Alternative, CountTarget, Lookup, ValueExpr};
use super::path::{Path, Selector};
use super::program::{DatatypeMap, Instance, MessageMap, Program, Rule, RuleSource, Transform};
use super::report::{Failure, Report, VocabularyMiss};
use super::target::{is_empty, Builder};
use crate::fhir::ids::resource_id;
use crate::hl7::message::{Message, HL7_NULL};

/// A position in the message: a field repetition, a component or a subcomponent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Node {
    segment: usize,
    field: usize,
    repetition: usize,
    component: Option<usize>,
    subcomponent: Option<usize>,
}

/// What a value expression yielded.
#[derive(Clone, Debug)]
enum Item {
    Node(Node),
    Text(String),
}

/// An instance placed on a segment occurrence.
#[derive(Clone, Debug)]
struct Placed {
    instance: usize,
    segment: usize,
    block_end: usize,
    parent: Option<usize>,
    id: String,
}

/// A resource created by a `create:` rule.
struct Created {
    resource_type: String,
    id: String,
    body: Map<String, Value>,
}

/// Shared state of one conversion.
struct Run<'a> {
    program: &'a Program,
    map: &'a MessageMap,
    message: &'a Message,
    used: RefCell<BTreeSet<(usize, usize)>>,
    report: RefCell<Report>,
    placed: Vec<Placed>,
    created: RefCell<Vec<Created>>,
}

/// Where paths are resolved: an instance's segment and group, and for datatype maps the
/// value the map works on.
#[derive(Clone, Copy)]
struct Scope<'r, 'a> {
    run: &'r Run<'a>,
    placed: usize,
    node: Option<Node>,
}

/// Result of converting one message: resources in order (instances, then created ones).
pub struct Output {
    /// Resources as JSON objects.
    pub resources: Vec<Value>,
    /// What the analyst should know.
    pub report: Report,
}

/// Converts `message` with `map`.
pub fn run(program: &Program, map: &MessageMap, message: &Message) -> Output {
    let mut run = Run {
        program,
        map,
        message,
        used: RefCell::new(BTreeSet::new()),
        report: RefCell::new(Report {
            message_map: map.name.clone(),
            timezone: program.timezone_name.clone(),
            ..Report::default()
        }),
        placed: Vec::new(),
        created: RefCell::new(Vec::new()),
    };
    run.place_instances();
    let mut resources = Vec::new();
    for placed_index in 0..run.placed.len() {
        resources.push(run.build(placed_index));
    }
    let mut seen: BTreeSet<(String, String)> =
        resources.iter().map(|resource| (text_of(&resource["resourceType"]), text_of(&resource["id"]))).collect();
    for created in run.created.take() {
        if seen.insert((created.resource_type.clone(), created.id.clone())) {
            let mut body = Map::new();
            body.insert("resourceType".into(), Value::String(created.resource_type));
            body.insert("id".into(), Value::String(created.id));
            body.extend(created.body);
            resources.push(Value::Object(body));
        }
    }
    run.report_unused();
    Output { resources, report: run.report.into_inner() }
}

/// True when `end` is before `start` (full date-times compared as instants, partial dates by
/// their common precision).
fn ends_before(start: &str, end: &str) -> bool {
    if let (Ok(start_instant), Ok(end_instant)) = (start.parse::<jiff::Timestamp>(), end.parse::<jiff::Timestamp>()) {
        return end_instant < start_instant;
    }
    let common = start.len().min(end.len()).min(10);
    end[..common] < start[..common]
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

impl<'a> Run<'a> {
    fn place_instances(&mut self) {
        let segments = &self.message.segments;
        for (instance_index, instance) in self.map.instances.iter().enumerate() {
            let parents: Vec<Option<usize>> = match instance.within {
                Some(parent_instance) => self
                    .placed
                    .iter()
                    .enumerate()
                    .filter(|(_, placed)| placed.instance == parent_instance)
                    .map(|(index, _)| Some(index))
                    .collect(),
                None => vec![None],
            };
            for parent in parents {
                let (start, end) = match parent {
                    Some(parent_index) => (self.placed[parent_index].segment + 1, self.placed[parent_index].block_end),
                    None => (0, segments.len()),
                };
                let occurrences: Vec<usize> =
                    (start..end).filter(|index| segments[*index].name == instance.segment).collect();
                let chosen: Vec<usize> =
                    if instance.each { occurrences.clone() } else { occurrences.iter().copied().take(1).collect() };
                for segment in chosen {
                    let block_end = occurrences.iter().copied().find(|later| *later > segment).unwrap_or(end);
                    self.placed.push(Placed {
                        instance: instance_index,
                        segment,
                        block_end,
                        parent,
                        id: String::new(),
                    });
                    let placed_index = self.placed.len() - 1;
                    let scope = Scope { run: self, placed: placed_index, node: None };
                    let keep = instance.when.as_ref().is_none_or(|condition| condition.holds(&scope));
                    if !keep {
                        self.placed.pop();
                        continue;
                    }
                    let id = scope.id_for(&instance.resource_type, &instance.id_keys, &instance.name);
                    self.placed[placed_index].id = id;
                }
            }
        }
    }

    fn instance(&self, placed_index: usize) -> &Instance {
        &self.map.instances[self.placed[placed_index].instance]
    }

    fn build(&self, placed_index: usize) -> Value {
        let instance = self.instance(placed_index);
        let mut root = Map::new();
        root.insert("resourceType".into(), Value::String(instance.resource_type.clone()));
        root.insert("id".into(), Value::String(self.placed[placed_index].id.clone()));
        let mut builder = Builder::new(root);
        let scope = Scope { run: self, placed: placed_index, node: None };
        for rule in &instance.rules {
            scope.apply(rule, &mut builder);
        }
        let mut resource = Value::Object(builder.finish());
        self.keep_periods_ordered(&mut resource, &instance.resource_type, String::new());
        resource
    }

    /// FHIR invariant per-1: a Period's end is not before its start. Senders do get this
    /// wrong (a stale PV1-45); the end is left out and the report says so, rather than
    /// refusing the whole message.
    fn keep_periods_ordered(&self, value: &mut Value, resource_type: &str, path: String) {
        match value {
            Value::Object(map) => {
                let reversed = match (map.get("start").and_then(Value::as_str), map.get("end").and_then(Value::as_str))
                {
                    (Some(start), Some(end)) => ends_before(start, end),
                    _ => false,
                };
                if reversed {
                    let end = map.remove("end").and_then(|end| end.as_str().map(str::to_string)).unwrap_or_default();
                    self.report
                        .borrow_mut()
                        .notes
                        .push(format!("{resource_type}.{path}: end {end} is before start; end left out"));
                }
                for (key, child) in map.iter_mut() {
                    let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    self.keep_periods_ordered(child, resource_type, child_path);
                }
            }
            Value::Array(items) => {
                for item in items.iter_mut() {
                    self.keep_periods_ordered(item, resource_type, path.clone());
                }
            }
            _ => {}
        }
    }

    fn fail(&self, rule: &Rule, reason: String) {
        self.report.borrow_mut().failures.push(Failure { rule: rule.origin.to_string(), reason });
    }

    fn report_unused(&self) {
        let used = self.used.borrow();
        let mut unused = BTreeSet::new();
        for (segment_index, segment) in self.message.segments.iter().enumerate() {
            for (field_index, field) in segment.fields.iter().enumerate() {
                let field_number = field_index + 1;
                // MSH-1/2 are delimiters; MSH-3, 4, 7, 9, 10 and 12 feed routing, the Bundle
                // and the Provenance.
                if segment.name == "MSH" && [1, 2, 3, 4, 7, 9, 10, 12].contains(&field_number) {
                    continue;
                }
                let has_data = field.iter().flatten().flatten().any(|leaf| !leaf.trim().is_empty());
                if has_data && !used.contains(&(segment_index, field_number)) {
                    unused.insert(format!("{}-{field_number}", segment.name));
                }
            }
        }
        self.report.borrow_mut().unused_fields = unused.into_iter().collect();
    }
}

impl<'r, 'a> Scope<'r, 'a> {
    fn message(&self) -> &'a Message {
        self.run.message
    }

    /// Segment indexes a segment name refers to in this scope.
    fn segments(&self, name: &str, occurrence: Selector) -> Vec<usize> {
        let placed = &self.run.placed[self.placed];
        let segments = &self.message().segments;
        let candidates: Vec<usize> = if segments[placed.segment].name == name {
            vec![placed.segment]
        } else {
            let in_group: Vec<usize> =
                (placed.segment + 1..placed.block_end).filter(|index| segments[*index].name == name).collect();
            if in_group.is_empty() {
                (0..segments.len()).filter(|index| segments[*index].name == name).collect()
            } else {
                in_group
            }
        };
        match occurrence {
            Selector::All => candidates,
            Selector::Index(position) => candidates.get(position - 1).copied().into_iter().collect(),
        }
    }

    fn nodes(&self, path: &Path) -> Vec<Node> {
        match path {
            Path::Absolute { segment, occurrence, field, repetition, component, subcomponent } => {
                let mut nodes = Vec::new();
                for segment_index in self.segments(segment, *occurrence) {
                    self.run.used.borrow_mut().insert((segment_index, *field));
                    let count = self.message().segments[segment_index].repetition_count(*field);
                    let repetitions: Vec<usize> = match repetition {
                        Selector::All => (1..=count).collect(),
                        Selector::Index(position) => vec![*position],
                    };
                    for repetition_number in repetitions {
                        nodes.push(Node {
                            segment: segment_index,
                            field: *field,
                            repetition: repetition_number,
                            component: *component,
                            subcomponent: *subcomponent,
                        });
                    }
                }
                nodes
            }
            Path::Relative { first, second } => {
                let Some(base) = self.node else { return Vec::new() };
                let node = match (base.component, base.subcomponent, second) {
                    (None, _, _) => Node { component: Some(*first), subcomponent: *second, ..base },
                    (Some(_), None, None) => Node { subcomponent: Some(*first), ..base },
                    _ => return Vec::new(),
                };
                vec![node]
            }
        }
    }

    fn raw(&self, node: &Node) -> Option<&'a str> {
        self.message().segments[node.segment].value(
            node.field,
            node.repetition,
            node.component.unwrap_or(1),
            node.subcomponent.unwrap_or(1),
        )
    }

    /// True when the node holds data (any non-empty leaf that is not the HL7 null).
    fn has_data(&self, node: &Node) -> bool {
        let segment = &self.message().segments[node.segment];
        let Some(repetition) =
            segment.fields.get(node.field - 1).and_then(|field| field.get(node.repetition.max(1) - 1))
        else {
            return false;
        };
        let valued = |leaf: &String| !leaf.trim().is_empty() && leaf != HL7_NULL;
        match (node.component, node.subcomponent) {
            (None, _) => repetition.iter().flatten().any(valued),
            (Some(component), None) => repetition.get(component - 1).is_some_and(|leaves| leaves.iter().any(valued)),
            (Some(_), Some(_)) => self.raw(node).is_some_and(|leaf| valued(&leaf.to_string())),
        }
    }

    fn text(&self, node: &Node) -> Option<String> {
        let raw = self.raw(node)?;
        if raw.trim().is_empty() || raw == HL7_NULL {
            return None;
        }
        Some(self.message().unescape(raw))
    }

    /// The items of the first alternative that yields data.
    fn items(&self, value: &ValueExpr) -> Vec<Item> {
        for alternative in &value.alternatives {
            match alternative {
                Alternative::Literal(text) if !text.is_empty() => return vec![Item::Text(text.clone())],
                Alternative::Literal(_) => {}
                Alternative::Path(path) => {
                    let nodes: Vec<Item> =
                        self.nodes(path).into_iter().filter(|node| self.has_data(node)).map(Item::Node).collect();
                    if !nodes.is_empty() {
                        return nodes;
                    }
                }
            }
        }
        Vec::new()
    }

    fn item_text(&self, item: &Item) -> Option<String> {
        match item {
            Item::Text(text) => Some(text.clone()),
            Item::Node(node) => self.text(node),
        }
    }

    fn id_for(&self, resource_type: &str, keys: &[ValueExpr], instance_name: &str) -> String {
        let values: Vec<String> = keys
            .iter()
            .map(|key| self.items(key).first().and_then(|item| self.item_text(item)).unwrap_or_default())
            .collect();
        if values.iter().any(|value| !value.trim().is_empty()) {
            return resource_id(resource_type, &values);
        }
        // No business key: an id that is stable for this message only.
        let msh = self.message().msh();
        let field = |number| msh.value(number, 1, 1, 1).unwrap_or("").to_string();
        let segment = self.run.placed[self.placed].segment;
        let node_part =
            self.node.map(|node| format!("{}.{}.{}", node.segment, node.field, node.repetition)).unwrap_or_default();
        self.run.report.borrow_mut().notes.push(format!(
            "{resource_type} `{instance_name}` has no business key value; its id is unique to this message"
        ));
        resource_id(
            resource_type,
            &[field(3), field(4), field(10), instance_name.to_string(), segment.to_string(), node_part],
        )
    }

    fn apply(&self, rule: &Rule, builder: &mut Builder) {
        if let Some(condition) = &rule.when {
            if !condition.holds(self) {
                return;
            }
        }
        let values: Vec<Value> = match &rule.source {
            RuleSource::Constant(constant) => self.constant(rule, constant).into_iter().collect(),
            RuleSource::Reference(name) => self.references(name),
            RuleSource::From(expression) => {
                let items = self.items(expression);
                let mut values = Vec::with_capacity(items.len());
                for item in items {
                    if let Some(value) = self.transform(rule, &item) {
                        values.push(value);
                    }
                }
                values
            }
        };
        if values.is_empty() {
            builder.skip(&rule.target);
        }
        for value in values {
            if let Err(reason) = builder.set(&rule.target, value) {
                self.run.fail(rule, reason);
            }
        }
    }

    fn constant(&self, rule: &Rule, constant: &Value) -> Option<Value> {
        let Value::String(text) = constant else { return Some(constant.clone()) };
        let text = match &rule.format {
            Some(format) => format.replace("{}", text),
            None => text.clone(),
        };
        match &rule.transform {
            Transform::Primitive(kind) => match kind.convert(&text, &self.run.program.timezone) {
                Ok(value) => Some(value),
                Err(reason) => {
                    self.run.fail(rule, reason);
                    None
                }
            },
            _ => Some(Value::String(text)),
        }
    }

    fn references(&self, name: &str) -> Vec<Value> {
        let run = self.run;
        let Some(target_instance) = run.map.instances.iter().position(|instance| instance.name == name) else {
            return Vec::new();
        };
        // An ancestor of this instance wins: the OBR of this OBX.
        let mut ancestor = run.placed[self.placed].parent;
        while let Some(index) = ancestor {
            if run.placed[index].instance == target_instance {
                return vec![reference_to(run, index)];
            }
            ancestor = run.placed[index].parent;
        }
        run.placed
            .iter()
            .enumerate()
            .filter(|(_, placed)| placed.instance == target_instance)
            .map(|(index, _)| reference_to(run, index))
            .collect()
    }

    fn transform(&self, rule: &Rule, item: &Item) -> Option<Value> {
        match &rule.transform {
            Transform::Primitive(kind) => {
                let mut text = self.item_text(item)?;
                if let Some(vocab) = &rule.vocab {
                    match vocab.translate(&text) {
                        Some((code, _)) => text = code.clone(),
                        None => {
                            self.miss(rule, &vocab.name, &text);
                            return None;
                        }
                    }
                }
                if let Some(format) = &rule.format {
                    text = format.replace("{}", &text);
                }
                match kind.convert(&text, &self.run.program.timezone) {
                    Ok(value) => Some(value),
                    Err(reason) => {
                        self.run.fail(rule, format!("{}: {reason}", self.describe(item)));
                        None
                    }
                }
            }
            Transform::Datatype(map) => {
                let Item::Node(node) = item else {
                    self.run.fail(rule, format!("datatype map `{}` needs a message value, not a literal", map.name));
                    return None;
                };
                let mut value = Value::Object(self.apply_datatype(map, *node));
                if let Some(vocab) = &rule.vocab {
                    self.translate_codeable(rule, vocab, &mut value);
                }
                (!is_empty(&value)).then_some(value)
            }
            Transform::Create(map) => {
                let Item::Node(node) = item else {
                    self.run.fail(rule, format!("datatype map `{}` needs a message value, not a literal", map.name));
                    return None;
                };
                let body = self.apply_datatype(map, *node);
                if body.is_empty() {
                    return None;
                }
                let inner = Scope { node: Some(*node), ..*self };
                let id = inner.id_for(&map.fhir_type, &map.id_keys, &map.name);
                let reference = json!({ "reference": format!("{}/{}", map.fhir_type, id) });
                self.run.created.borrow_mut().push(Created { resource_type: map.fhir_type.clone(), id, body });
                Some(reference)
            }
        }
    }

    fn apply_datatype(&self, map: &DatatypeMap, node: Node) -> Map<String, Value> {
        let inner = Scope { node: Some(node), ..*self };
        let mut builder = Builder::default();
        for rule in &map.rules {
            inner.apply(rule, &mut builder);
        }
        builder.finish()
    }

    /// Puts the vocabulary's translation of the first coding in front of the codings.
    fn translate_codeable(&self, rule: &Rule, vocab: &super::program::Vocab, value: &mut Value) {
        let Some(codings) = value.get_mut("coding").and_then(Value::as_array_mut) else { return };
        let Some(code) =
            codings.first().and_then(|coding| coding.get("code")).and_then(Value::as_str).map(str::to_string)
        else {
            return;
        };
        match vocab.translate(&code) {
            Some((target_code, display)) => {
                let mut coding = Map::new();
                coding.insert("system".into(), Value::String(vocab.system.clone()));
                coding.insert("code".into(), Value::String(target_code.clone()));
                if let Some(display) = display {
                    coding.insert("display".into(), Value::String(display.clone()));
                }
                let duplicate = codings.iter().any(|existing| {
                    existing.get("system").and_then(Value::as_str) == Some(vocab.system.as_str())
                        && existing.get("code").and_then(Value::as_str) == Some(target_code.as_str())
                });
                if !duplicate {
                    codings.insert(0, Value::Object(coding));
                }
            }
            None => self.miss(rule, &vocab.name, &code),
        }
    }

    fn miss(&self, rule: &Rule, vocab: &str, code: &str) {
        self.run.report.borrow_mut().vocabulary_misses.push(VocabularyMiss {
            rule: rule.origin.to_string(),
            vocab: vocab.to_string(),
            code: code.to_string(),
        });
    }

    fn describe(&self, item: &Item) -> String {
        match item {
            Item::Text(text) => format!("\"{text}\""),
            Item::Node(node) => {
                let segment = &self.message().segments[node.segment].name;
                let mut text = format!("{segment}-{}", node.field);
                if node.repetition > 1 {
                    text.push_str(&format!("[{}]", node.repetition));
                }
                if let Some(component) = node.component {
                    text.push_str(&format!(".{component}"));
                }
                if let Some(subcomponent) = node.subcomponent {
                    text.push_str(&format!(".{subcomponent}"));
                }
                text
            }
        }
    }
}

fn reference_to(run: &Run<'_>, placed_index: usize) -> Value {
    let instance = run.instance(placed_index);
    json!({ "reference": format!("{}/{}", instance.resource_type, run.placed[placed_index].id) })
}

impl Lookup for Scope<'_, '_> {
    fn text(&self, value: &ValueExpr) -> Option<String> {
        self.items(value).first().and_then(|item| self.item_text(item))
    }

    fn valued(&self, value: &ValueExpr) -> bool {
        !self.items(value).is_empty()
    }

    fn is_null(&self, path: &Path) -> bool {
        self.nodes(path).first().and_then(|node| self.raw(node)).is_some_and(|raw| raw == HL7_NULL)
    }

    fn count(&self, target: &CountTarget) -> usize {
        match target {
            CountTarget::Segments(name) => self.segments(name, Selector::All).len(),
            CountTarget::Repetitions(path) => match path {
                Path::Absolute { segment, occurrence, field, .. } => self
                    .segments(segment, *occurrence)
                    .first()
                    .map_or(0, |index| self.message().segments[*index].repetition_count(*field)),
                Path::Relative { .. } => usize::from(self.nodes(path).iter().any(|node| self.has_data(node))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ends_before;

    #[test]
    fn period_order_compares_instants_and_partial_dates() {
        assert!(ends_before("2014-09-12T22:00:00+00:00", "2000-02-06T03:17:26Z"));
        assert!(!ends_before("2024-01-01T10:00:00-05:00", "2024-01-01T15:30:00Z"));
        assert!(ends_before("2024-01-01T10:00:00-05:00", "2024-01-01T14:30:00Z"));
        assert!(ends_before("2024-03", "2024-02-28"));
        assert!(!ends_before("2024", "2024-12-31T00:00:00Z"));
    }
}
