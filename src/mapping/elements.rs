//! Compile-time check that every rule's target names real FHIR R4 elements, so that a
//! typo such as `to: name[+].fmaily` stops startup (and `check-mappings`) with the rule's
//! file and line instead of failing every message at conversion time.
//!
//! There is no element list to consult offline, so the check asks fhir-sdk's R4 models
//! themselves: for each rule it builds a probe resource (a minimal valid skeleton of the
//! resource type, plus the rule's path set to a placeholder value) and round-trips it
//! through the model. The models drop unknown elements silently, so an element missing from
//! the round trip does not exist there. A probe the model refuses outright (the placeholder
//! has the wrong type for an element that does exist) passes: types are checked on real
//! output, by the validation of every converted resource.
//!
//! Datatype maps are probed in a carrier element of that type (HumanName in
//! `Patient.name`, Identifier in `Patient.identifier`, ...); maps of types without a carrier
//! here are not checked.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use super::compile::CompileError;
use super::program::{DatatypeMap, Program, Rule, Transform};
use super::target::{Index, Step, TargetPath};

/// A minimal valid instance of each resource type the mappings produce (the models refuse
/// resources without their mandatory elements). Types not listed start empty.
fn skeleton(resource_type: &str) -> Map<String, Value> {
    let reference = json!({ "reference": "Patient/probe" });
    let concept = json!({ "text": "probe" });
    let mut skeleton = match resource_type {
        "Encounter" => json!({ "status": "unknown", "class": { "code": "AMB" } }),
        "Observation" | "DiagnosticReport" => json!({ "status": "unknown", "code": concept }),
        "ServiceRequest" => json!({ "status": "unknown", "intent": "order", "subject": reference }),
        "Appointment" => json!({ "status": "booked", "participant": [{ "status": "accepted" }] }),
        "Condition" => json!({ "subject": reference }),
        "AllergyIntolerance" | "RelatedPerson" => json!({ "patient": reference }),
        "Procedure" => json!({ "status": "unknown", "subject": reference }),
        "Coverage" => json!({ "status": "active", "beneficiary": reference, "payor": [reference] }),
        "Provenance" => {
            json!({ "target": [reference], "recorded": "2020-01-01T00:00:00Z", "agent": [{ "who": reference }] })
        }
        "Immunization" => json!({
            "status": "completed", "vaccineCode": concept, "patient": reference,
            "occurrenceDateTime": "2020-01-01"
        }),
        "DocumentReference" => {
            json!({ "status": "current", "content": [{ "attachment": { "contentType": "text/plain" } }] })
        }
        "Schedule" => json!({ "actor": [reference] }),
        "Slot" => json!({ "schedule": { "reference": "Schedule/probe" }, "status": "free",
            "start": "2020-01-01T00:00:00Z", "end": "2020-01-01T01:00:00Z" }),
        _ => json!({}),
    };
    let mut object = std::mem::take(skeleton.as_object_mut().expect("every skeleton above is an object"));
    object.insert("resourceType".to_string(), json!(resource_type));
    object
}

/// Where a value of a FHIR datatype can be put to probe its elements.
fn carrier(fhir_type: &str) -> Option<(&'static str, &'static str, Index)> {
    Some(match fhir_type {
        "HumanName" => ("Patient", "name", Index::Append),
        "Identifier" => ("Patient", "identifier", Index::Append),
        "Address" => ("Patient", "address", Index::Append),
        "ContactPoint" => ("Patient", "telecom", Index::Append),
        "CodeableConcept" => ("Observation", "category", Index::Append),
        "Coding" => ("Encounter", "class", Index::None),
        "Quantity" => ("Observation", "valueQuantity", Index::None),
        "Period" => ("Encounter", "period", Index::None),
        "Reference" => ("Observation", "subject", Index::None),
        "Attachment" => ("Patient", "photo", Index::Append),
        "Range" => ("Observation", "valueRange", Index::None),
        "Ratio" => ("Observation", "valueRatio", Index::None),
        "Annotation" => ("Observation", "note", Index::Append),
        _ => return None,
    })
}

/// Every rule target of `program` that names an element that does not exist.
pub fn check(program: &Program) -> Vec<CompileError> {
    let mut checker = Checker { errors: Vec::new(), seen_rules: HashSet::new(), seen_maps: HashSet::new() };
    for message in &program.messages {
        for instance in &message.instances {
            for rule in &instance.rules {
                checker.rule(&instance.resource_type, &instance.resource_type, &[], rule);
            }
        }
    }
    checker.errors
}

struct Checker {
    errors: Vec<CompileError>,
    /// (file, line, target) already probed: overlays and shared maps repeat rules.
    seen_rules: HashSet<(String, u32, String)>,
    seen_maps: HashSet<String>,
}

impl Checker {
    /// Probes `rule` inside `resource_type` under `prefix` (a datatype's carrier element);
    /// `owner` names the resource or datatype in the error.
    fn rule(&mut self, resource_type: &str, owner: &str, prefix: &[Step], rule: &Rule) {
        let target_text = render(&rule.target);
        let key = (rule.origin.file.clone(), rule.origin.line, format!("{resource_type}:{target_text}"));
        if self.seen_rules.insert(key) {
            let mut steps = prefix.to_vec();
            steps.extend(rule.target.steps.iter().cloned());
            if let Some(lost) = lost_element(resource_type, &steps) {
                // Name the element from the owner's root, without the carrier's prefix.
                let lost = lost.splitn(prefix.len() + 1, '.').last().unwrap_or(&lost).to_string();
                self.errors.push(CompileError {
                    origin: rule.origin.clone(),
                    reason: format!(
                        "`to: {target_text}`: `{lost}` is not an element of {owner} in FHIR R4 \
                         (check the spelling and the FHIR resource or datatype page)"
                    ),
                });
            }
        }
        match &rule.transform {
            Transform::Datatype(map) => self.datatype_map(map),
            Transform::Create(map) => self.created_map(map),
            Transform::Primitive(_) => {}
        }
    }

    fn datatype_map(&mut self, map: &DatatypeMap) {
        if !self.seen_maps.insert(format!("datatype:{}", map.name)) {
            return;
        }
        let Some((resource_type, element, index)) = carrier(&map.fhir_type) else {
            return;
        };
        let prefix = [Step { name: element.to_string(), index }];
        for rule in &map.rules {
            self.rule(resource_type, &map.fhir_type, &prefix, rule);
        }
    }

    fn created_map(&mut self, map: &DatatypeMap) {
        if !self.seen_maps.insert(format!("create:{}", map.name)) {
            return;
        }
        for rule in &map.rules {
            self.rule(&map.fhir_type, &map.fhir_type, &[], rule);
        }
    }
}

fn render(target: &TargetPath) -> String {
    let parts: Vec<String> = target
        .steps
        .iter()
        .map(|step| match step.index {
            Index::None => step.name.clone(),
            Index::Append => format!("{}[+]", step.name),
            Index::Current => format!("{}[=]", step.name),
            Index::At(position) => format!("{}[{position}]", step.name),
        })
        .collect();
    parts.join(".")
}

/// Placeholder values tried at the end of a probe path. The models do not always refuse a
/// value of the wrong type: a choice element (`multipleBirthBoolean`) with a value of another
/// type is dropped as silently as an unknown element. So an element counts as missing only
/// when every placeholder is dropped.
fn placeholders() -> [Value; 8] {
    [
        json!("probe"),
        json!(true),
        json!(1),
        json!(1.5),
        json!("2020-01-01"),
        json!("2020-01-01T00:00:00Z"),
        json!("10:00:00"),
        json!({ "id": "probe" }),
    ]
}

/// The dotted path of the first element of `steps` that does not exist, if any. Each step
/// is probed on its own, from the root: a complex step with `{"id": ...}` (every element
/// may have an id), the last step with every placeholder. A step counts as missing only when
/// every probe drops exactly that step; a probe that makes the model drop an ancestor (a
/// placeholder of the wrong type inside a choice element) says nothing about the step.
/// Results are cached for the process: every engine load asks the same questions.
fn lost_element(resource_type: &str, steps: &[Step]) -> Option<String> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Option<String>>>> =
        std::sync::OnceLock::new();
    let key = format!("{resource_type}:{}", render(&TargetPath { steps: steps.to_vec() }));
    let cache = CACHE.get_or_init(Default::default);
    if let Some(known) = cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&key) {
        return known.clone();
    }
    let mut answer = None;
    for depth in 1..=steps.len() {
        let prefix = &steps[..depth];
        let candidates: Vec<Value> =
            if depth < steps.len() { vec![json!({ "id": "probe" })] } else { placeholders().to_vec() };
        let missing = candidates.into_iter().all(|candidate| {
            lost_with(resource_type, prefix, candidate).is_some_and(|lost| lost.split('.').count() == depth)
        });
        if missing {
            answer = Some(prefix.iter().map(|step| step.name.as_str()).collect::<Vec<_>>().join("."));
            break;
        }
    }
    cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, answer.clone());
    answer
}

/// With one placeholder: `None` when the model kept the path (or refused the probe, which
/// means the element exists with another type), else the first dropped element.
fn lost_with(resource_type: &str, steps: &[Step], placeholder: Value) -> Option<String> {
    let mut probe = Value::Object(skeleton(resource_type));
    place(&mut probe, steps, placeholder);
    let model: fhir_sdk::r4b::resources::Resource = serde_json::from_value(probe.clone()).ok()?;
    let round_trip = serde_json::to_value(&model).ok()?;
    let mut original = &probe;
    let mut kept = &round_trip;
    let mut path = Vec::new();
    for step in steps {
        path.push(step.name.clone());
        let (Some(next_original), Some(next_kept)) = (original.get(&step.name), kept.get(&step.name)) else {
            return Some(path.join("."));
        };
        (original, kept) = match (next_original, next_kept) {
            (Value::Array(left), Value::Array(right)) => match (left.first(), right.first()) {
                (Some(left), Some(right)) => (left, right),
                _ => return None,
            },
            (left, right) => (left, right),
        };
    }
    None
}

/// Sets `steps` in `probe`: arrays for indexed steps, objects otherwise, `placeholder` at
/// the end. An existing element on the way is replaced.
fn place(probe: &mut Value, steps: &[Step], placeholder: Value) {
    let Some((step, rest)) = steps.split_first() else {
        return;
    };
    let Value::Object(object) = probe else {
        return;
    };
    let child = if rest.is_empty() {
        placeholder
    } else {
        let mut child = json!({});
        place(&mut child, rest, placeholder);
        child
    };
    let value = match step.index {
        Index::None => child,
        _ => Value::Array(vec![child]),
    };
    object.insert(step.name.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> Vec<Step> {
        TargetPath::parse(text).unwrap().steps
    }

    #[test]
    fn every_skeleton_is_accepted_by_the_models() {
        for resource_type in [
            "Patient",
            "Encounter",
            "Observation",
            "DiagnosticReport",
            "ServiceRequest",
            "Appointment",
            "Condition",
            "AllergyIntolerance",
            "RelatedPerson",
            "Procedure",
            "Coverage",
            "Provenance",
            "Immunization",
            "DocumentReference",
            "Schedule",
            "Slot",
            "Practitioner",
            "Organization",
            "Location",
            "Specimen",
        ] {
            let value = Value::Object(skeleton(resource_type));
            crate::fhir::validate::validate_resource(&value).unwrap_or_else(|error| panic!("{resource_type}: {error}"));
        }
    }

    #[test]
    fn real_elements_pass_and_misspelled_ones_are_named() {
        assert_eq!(lost_element("Patient", &path("name[+].family")), None);
        assert_eq!(lost_element("Patient", &path("identifier[+].type.coding[+].code")), None);
        assert_eq!(lost_element("Observation", &path("valueQuantity.unit")), None);
        assert_eq!(lost_element("Encounter", &path("hospitalization.admitSource.text")), None);
        assert_eq!(lost_element("Patient", &path("name[+].fmaily")), Some("name.fmaily".to_string()));
        assert_eq!(lost_element("Patient", &path("nmae[+].family")), Some("nmae".to_string()));
        assert_eq!(
            lost_element("Encounter", &path("hospitalisation.admitSource")),
            Some("hospitalisation".to_string())
        );
        // Elements whose type the first placeholder does not fit, choice elements included.
        assert_eq!(lost_element("Patient", &path("active")), None);
        assert_eq!(lost_element("Patient", &path("multipleBirthBoolean")), None);
        assert_eq!(lost_element("Patient", &path("multipleBirthInteger")), None);
        assert_eq!(lost_element("Patient", &path("deceasedDateTime")), None);
        assert_eq!(lost_element("Observation", &path("effectiveDateTime")), None);
        assert_eq!(lost_element("Observation", &path("valueQuantity.comparator")), None);
        assert_eq!(
            lost_element("Observation", &path("valueQuantity.comparater")),
            Some("valueQuantity.comparater".to_string())
        );
        assert_eq!(lost_element("Patient", &path("multipleBirthText")), Some("multipleBirthText".to_string()));
    }

    #[test]
    fn a_misspelled_element_in_a_site_file_stops_the_load_with_file_and_line() {
        let builtin = crate::mapping::source::builtin();
        let human_name = builtin.iter().find(|file| file.kind == "datatypes" && file.name == "XPN-HumanName").unwrap();
        assert!(human_name.text.contains("to: family"), "the test needs the XPN map's family rule");
        let folder = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(folder.path().join("datatypes")).unwrap();
        let broken = human_name.text.replacen("to: family", "to: fmaily", 1);
        std::fs::write(folder.path().join("datatypes/XPN-HumanName.yaml"), &broken).unwrap();
        let sources = crate::mapping::Sources { folders: vec![folder.path().to_path_buf()], ..Default::default() };
        let errors = crate::mapping::Engine::load(&sources).unwrap_err();
        // The rule's line: its list item starts on the `from:` line just above `to:`.
        let line = broken.lines().position(|line| line.contains("to: fmaily")).unwrap();
        let found = errors.iter().map(ToString::to_string).find(|error| error.contains("fmaily")).unwrap();
        assert!(found.contains(&format!("XPN-HumanName.yaml:{line}:")), "{found}");
        assert!(found.contains("`fmaily` is not an element of HumanName"), "{found}");
    }
}
