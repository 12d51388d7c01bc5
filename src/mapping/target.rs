//! FHIR element paths (`to:`) and the builder that sets values at them.
//!
//! Syntax: dotted element names, each with an optional index:
//! - `birthDate` — a single element (set, replacing what was there);
//! - `identifier[+]` — append a new item to a repeating element;
//! - `identifier[=]` — the item the latest `[+]` on that element created;
//! - `telecom[2]` — the second item (created if needed).
//!
//! Repeating elements must be written with an index: `name[+].given[+]`.
//!
//! Empty values are never emitted, and nothing is created for them: a `[+]` whose value is
//! empty appends nothing, and a later `[=]` on the same element is skipped too, so a rule
//! never lands on the previous item by accident.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// How a step addresses a repeating element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    /// No index: a single element.
    None,
    /// `[+]`
    Append,
    /// `[=]`
    Current,
    /// `[n]`, 1-based.
    At(usize),
}

/// One step of a target path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Element name.
    pub name: String,
    /// Index.
    pub index: Index,
}

/// A parsed target path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPath {
    /// Steps from the resource (or datatype) root.
    pub steps: Vec<Step>,
}

impl TargetPath {
    /// Parses `a[+].b.c[=]`.
    pub fn parse(text: &str) -> Result<TargetPath, String> {
        let mut steps = Vec::new();
        for part in text.trim().split('.') {
            let (name, index) = match part.find('[') {
                None => (part, Index::None),
                Some(open) => {
                    let inner = part[open + 1..]
                        .strip_suffix(']')
                        .ok_or_else(|| format!("`{text}`: `[` without a closing `]`"))?;
                    let index = match inner {
                        "+" => Index::Append,
                        "=" => Index::Current,
                        number => match number.parse::<usize>() {
                            Ok(position) if position >= 1 => Index::At(position),
                            _ => return Err(format!("`{text}`: index must be +, = or a position (1, 2, ...)")),
                        },
                    };
                    (&part[..open], index)
                }
            };
            let valid_name = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                return Err(format!("`{text}`: `{name}` is not an element name"));
            }
            steps.push(Step { name: name.to_string(), index });
        }
        Ok(TargetPath { steps })
    }

    /// True when the path appends somewhere.
    pub fn appends(&self) -> bool {
        self.steps.iter().any(|step| step.index == Index::Append)
    }
}

/// True for values that must not be emitted.
pub fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.trim().is_empty(),
        Value::Array(items) => items.iter().all(is_empty),
        Value::Object(map) => map.values().all(is_empty),
        _ => false,
    }
}

/// Builds one JSON object (a resource or a datatype value) rule by rule.
#[derive(Debug, Default)]
pub struct Builder {
    /// The object built so far.
    pub root: Map<String, Value>,
    /// For each repeating element (by concrete path), the item its latest `[+]` created,
    /// or `None` when that `[+]` was skipped for an empty value.
    anchors: HashMap<String, Option<usize>>,
}

impl Builder {
    /// A builder starting from `root`.
    pub fn new(root: Map<String, Value>) -> Builder {
        Builder { root, anchors: HashMap::new() }
    }

    /// Sets `value` at `path`. Empty values are skipped (see the module notes). Returns an
    /// error when the path crosses a value of the wrong shape (e.g. `name.given` where
    /// `name` holds text).
    pub fn set(&mut self, path: &TargetPath, value: Value) -> Result<(), String> {
        if is_empty(&value) {
            self.skip(path);
            return Ok(());
        }
        let mut concrete = String::new();
        let mut node: &mut Map<String, Value> = &mut self.root;
        let last = path.steps.len() - 1;
        for (position, step) in path.steps.iter().enumerate() {
            if !concrete.is_empty() {
                concrete.push('.');
            }
            concrete.push_str(&step.name);
            let is_last = position == last;
            if step.index == Index::None {
                if is_last {
                    node.insert(step.name.clone(), value);
                    return Ok(());
                }
                let child = node.entry(step.name.clone()).or_insert_with(|| Value::Object(Map::new()));
                node = child
                    .as_object_mut()
                    .ok_or_else(|| format!("`{concrete}` already holds a value that is not an element"))?;
                continue;
            }
            let item_index = match step.index {
                Index::Append => {
                    let items = array_at(node, &step.name, &concrete)?;
                    items.push(if is_last { Value::Null } else { Value::Object(Map::new()) });
                    let created = items.len() - 1;
                    self.anchors.insert(concrete.clone(), Some(created));
                    created
                }
                Index::Current => match self.anchors.get(&concrete) {
                    Some(Some(current)) => *current,
                    // The [+] it refers to was skipped, or never happened.
                    _ => return Ok(()),
                },
                Index::At(position) => {
                    let items = array_at(node, &step.name, &concrete)?;
                    while items.len() < position {
                        items.push(Value::Object(Map::new()));
                    }
                    position - 1
                }
                Index::None => unreachable!("handled above"),
            };
            concrete.push_str(&format!("[{item_index}]"));
            let items = array_at(node, &step.name, &concrete)?;
            let Some(item) = items.get_mut(item_index) else {
                return Ok(());
            };
            if is_last {
                *item = value;
                return Ok(());
            }
            if item.is_null() {
                *item = Value::Object(Map::new());
            }
            node = item.as_object_mut().ok_or_else(|| format!("`{concrete}` holds a value that is not an element"))?;
        }
        Ok(())
    }

    /// Records that a rule produced nothing for `path`: the first `[+]` on the way is
    /// marked skipped, so a later `[=]` on that element does not land on an older item.
    pub fn skip(&mut self, path: &TargetPath) {
        let mut concrete = String::new();
        for step in &path.steps {
            if !concrete.is_empty() {
                concrete.push('.');
            }
            concrete.push_str(&step.name);
            match step.index {
                Index::None => {}
                Index::Append => {
                    self.anchors.insert(concrete, None);
                    return;
                }
                Index::Current => match self.anchors.get(&concrete) {
                    Some(Some(current)) => concrete.push_str(&format!("[{current}]")),
                    _ => return,
                },
                Index::At(position) => concrete.push_str(&format!("[{}]", position - 1)),
            }
        }
    }

    /// The finished object, with empty elements removed.
    pub fn finish(self) -> Map<String, Value> {
        let mut root = Value::Object(self.root);
        prune(&mut root);
        match root {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

fn array_at<'a>(node: &'a mut Map<String, Value>, name: &str, concrete: &str) -> Result<&'a mut Vec<Value>, String> {
    node.entry(name.to_string())
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| format!("`{concrete}` is used both with and without an index"))
}

/// Removes nulls, blank strings, empty objects and arrays, recursively.
pub fn prune(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for child in map.values_mut() {
                prune(child);
            }
            map.retain(|_, child| !is_empty(child));
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                prune(item);
            }
            items.retain(|item| !is_empty(item));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(builder: &mut Builder, path: &str, value: Value) {
        builder.set(&TargetPath::parse(path).unwrap(), value).unwrap();
    }

    #[test]
    fn appends_and_refers_to_the_current_item() {
        let mut builder = Builder::default();
        set(&mut builder, "identifier[+].value", json!("123"));
        set(&mut builder, "identifier[=].system", json!("urn:oid:1.2"));
        set(&mut builder, "identifier[+].value", json!("456"));
        set(&mut builder, "name[+]", json!({"family": "Doe"}));
        set(&mut builder, "birthDate", json!("1970"));
        assert_eq!(
            Value::Object(builder.finish()),
            json!({
                "identifier": [{"value": "123", "system": "urn:oid:1.2"}, {"value": "456"}],
                "name": [{"family": "Doe"}],
                "birthDate": "1970"
            })
        );
    }

    #[test]
    fn empty_values_create_nothing_and_skip_their_current() {
        let mut builder = Builder::default();
        set(&mut builder, "telecom[+].value", json!("555"));
        set(&mut builder, "telecom[+].value", json!(""));
        set(&mut builder, "telecom[=].use", json!("home"));
        set(&mut builder, "contact[2].name", json!({"family": ""}));
        assert_eq!(Value::Object(builder.finish()), json!({"telecom": [{"value": "555"}]}));
    }

    #[test]
    fn a_skipped_nested_append_is_not_reused() {
        let mut builder = Builder::default();
        set(&mut builder, "hospitalization.origin[+].display", json!("A"));
        set(&mut builder, "hospitalization.origin[+].display", json!(""));
        set(&mut builder, "hospitalization.origin[=].reference", json!("Location/1"));
        builder.skip(&TargetPath::parse("participant[+].individual").unwrap());
        set(&mut builder, "participant[=].type[+].text", json!("attending"));
        assert_eq!(Value::Object(builder.finish()), json!({"hospitalization": {"origin": [{"display": "A"}]}}));
    }

    #[test]
    fn positional_index_and_shape_errors() {
        let mut builder = Builder::default();
        set(&mut builder, "extension[2].url", json!("x"));
        let error = builder.set(&TargetPath::parse("extension.url").unwrap(), json!("y")).unwrap_err();
        assert!(error.contains("not an element"), "{error}");
        assert_eq!(Value::Object(builder.finish()), json!({"extension": [{"url": "x"}]}));
    }

    #[test]
    fn parse_errors() {
        assert!(TargetPath::parse("name[x]").unwrap_err().contains("index"));
        assert!(TargetPath::parse("1name").unwrap_err().contains("element name"));
        assert!(TargetPath::parse("name[+").unwrap_err().contains("closing"));
    }
}
