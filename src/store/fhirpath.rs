//! The small FHIRPath subset used by search parameter expressions, compiled once and
//! evaluated over a resource's JSON.
//!
//! Supported: dotted paths (`Patient.name.family`) over objects and arrays, `|` unions,
//! `.where(resolve() is Type)` (keeps references pointing to `Type`),
//! `.where(field='literal')` (e.g. `telecom.where(system='phone')`),
//! `(X.value as Quantity)`, `X.value.as(Quantity)` and `X.value.ofType(Quantity)` (the choice
//! element `valueQuantity`). A path naming a choice element without a type
//! (`Observation.effective`) matches every `effective[x]` variant. Anything else is an
//! error at compile time, so a bad definition fails the definitions test.

use serde_json::Value;

/// One step of a compiled path.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// An element by name (or every `name[x]` choice variant when absent).
    Field(String),
    /// Keep references whose target type is this one.
    ResolveIs(String),
    /// Keep objects whose `field` equals the string literal.
    FieldEquals(String, String),
}

/// A compiled expression: a union of paths, each rooted at a resource type.
#[derive(Clone, Debug, PartialEq)]
pub struct Expression {
    paths: Vec<(String, Vec<Step>)>,
}

/// Why an expression did not compile.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported expression `{expression}`: {reason}")]
pub struct ExpressionError {
    /// The expression.
    pub expression: String,
    /// What is wrong.
    pub reason: String,
}

impl Expression {
    /// Compiles `text`.
    pub fn compile(text: &str) -> Result<Expression, ExpressionError> {
        let fail = |reason: String| ExpressionError { expression: text.to_string(), reason };
        let mut paths = Vec::new();
        for part in split_top_level(text, '|').map_err(fail)? {
            paths.push(compile_path(part.trim()).map_err(fail)?);
        }
        if paths.is_empty() {
            return Err(fail("empty".into()));
        }
        Ok(Expression { paths })
    }

    /// The values the expression selects from `resource` (flattened; arrays are expanded).
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<&'a Value> {
        let resource_type = resource.get("resourceType").and_then(Value::as_str).unwrap_or("");
        let mut out = Vec::new();
        for (root, steps) in &self.paths {
            if root != resource_type {
                continue;
            }
            let mut current = vec![resource];
            for step in steps {
                current = apply(step, current);
                if current.is_empty() {
                    break;
                }
            }
            out.extend(current);
        }
        out
    }
}

fn apply<'a>(step: &Step, input: Vec<&'a Value>) -> Vec<&'a Value> {
    let mut out = Vec::new();
    for value in input {
        match step {
            Step::Field(name) => {
                let Some(object) = value.as_object() else { continue };
                match object.get(name.as_str()) {
                    Some(found) => push_flat(&mut out, found),
                    None => {
                        // A choice element named without its type: every `name[x]` variant.
                        for (key, found) in object {
                            if key.len() > name.len()
                                && key.starts_with(name.as_str())
                                && key[name.len()..].starts_with(|c: char| c.is_ascii_uppercase())
                            {
                                push_flat(&mut out, found);
                            }
                        }
                    }
                }
            }
            Step::ResolveIs(target) => {
                let reference = value.get("reference").and_then(Value::as_str).unwrap_or("");
                if crate::store::index::parse_reference(reference).is_some_and(|(kind, _)| kind == target) {
                    out.push(value);
                }
            }
            Step::FieldEquals(field, literal) => {
                if value.get(field.as_str()).and_then(Value::as_str) == Some(literal.as_str()) {
                    out.push(value);
                }
            }
        }
    }
    out
}

fn push_flat<'a>(out: &mut Vec<&'a Value>, value: &'a Value) {
    match value {
        Value::Array(items) => out.extend(items.iter().filter(|item| !item.is_null())),
        Value::Null => {}
        other => out.push(other),
    }
}

/// Splits at `separator` outside parentheses and quotes.
fn split_top_level(text: &str, separator: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut quoted = false;
    let mut start = 0;
    for (index, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced parentheses".into());
                }
            }
            c if c == separator && !quoted && depth == 0 => {
                parts.push(&text[start..index]);
                start = index + c.len_utf8();
            }
            _ => {}
        }
    }
    if depth != 0 || quoted {
        return Err("unbalanced parentheses or quotes".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn compile_path(text: &str) -> Result<(String, Vec<Step>), String> {
    // `(path as Type)` or `path as Type`.
    let inner = match text.strip_prefix('(').and_then(|rest| rest.strip_suffix(')')) {
        Some(inner) if split_top_level(inner, '|').is_ok() => inner.trim(),
        _ => text,
    };
    if let Some((path, kind)) = inner.split_once(" as ") {
        let (root, mut steps) = compile_path(path.trim())?;
        retype_last(&mut steps, kind.trim())?;
        return Ok((root, steps));
    }
    let parts = split_top_level(inner, '.')?;
    let mut parts = parts.into_iter();
    let root = parts.next().unwrap_or("").trim();
    if !is_identifier(root) || !root.starts_with(|c: char| c.is_ascii_uppercase()) {
        return Err(format!("`{root}` is not a resource type"));
    }
    let mut steps = Vec::new();
    for part in parts {
        let part = part.trim();
        if is_identifier(part) {
            steps.push(Step::Field(part.to_string()));
            continue;
        }
        let Some((function, argument)) = part.strip_suffix(')').and_then(|rest| rest.split_once('(')) else {
            return Err(format!("`{part}` is not a supported path step"));
        };
        let argument = argument.trim();
        match function {
            "as" | "ofType" => retype_last(&mut steps, argument)?,
            "where" => {
                if let Some(kind) = argument.strip_prefix("resolve() is ") {
                    let kind = kind.trim();
                    if !is_identifier(kind) {
                        return Err(format!("`{kind}` is not a type"));
                    }
                    steps.push(Step::ResolveIs(kind.to_string()));
                } else if let Some((field, literal)) = argument.split_once('=') {
                    let field = field.trim();
                    let literal = literal.trim();
                    let literal = literal
                        .strip_prefix('\'')
                        .and_then(|rest| rest.strip_suffix('\''))
                        .ok_or_else(|| format!("`{literal}` is not a string literal"))?;
                    if !is_identifier(field) {
                        return Err(format!("`{field}` is not an element name"));
                    }
                    steps.push(Step::FieldEquals(field.to_string(), literal.to_string()));
                } else {
                    return Err(format!("where({argument}) is not supported"));
                }
            }
            other => return Err(format!("function `{other}` is not supported")),
        }
    }
    Ok((root.to_string(), steps))
}

/// `value` + `as Quantity` → `valueQuantity`.
fn retype_last(steps: &mut [Step], kind: &str) -> Result<(), String> {
    if !is_identifier(kind) {
        return Err(format!("`{kind}` is not a type"));
    }
    match steps.last_mut() {
        Some(Step::Field(name)) => {
            let mut chars = kind.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase()).unwrap_or_default();
            name.push(first);
            name.push_str(chars.as_str());
            Ok(())
        }
        _ => Err("a type cast must follow an element name".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_unions_casts_and_filters() {
        let patient = json!({"resourceType": "Patient", "name": [{"family": "Smith", "given": ["A", "B"]}, {"family": "Jones"}],
            "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}]});
        let given = Expression::compile("Patient.name.given").unwrap();
        assert_eq!(given.evaluate(&patient), vec![&json!("A"), &json!("B")]);
        let family = Expression::compile("Patient.name.family | Patient.name.given").unwrap();
        assert_eq!(family.evaluate(&patient).len(), 4);
        let phone = Expression::compile("Patient.telecom.where(system='phone')").unwrap();
        assert_eq!(phone.evaluate(&patient), vec![&json!({"system": "phone", "value": "1"})]);
        let other = json!({"resourceType": "Practitioner", "name": [{"family": "X"}]});
        assert!(family.evaluate(&other).is_empty());

        let observation = json!({"resourceType": "Observation", "valueQuantity": {"value": 1}, "effectivePeriod": {"start": "2020"},
            "subject": {"reference": "Group/1"}});
        for text in
            ["(Observation.value as Quantity)", "Observation.value.as(Quantity)", "Observation.value.ofType(Quantity)"]
        {
            assert_eq!(Expression::compile(text).unwrap().evaluate(&observation), vec![&json!({"value": 1})], "{text}");
        }
        let effective = Expression::compile("Observation.effective").unwrap();
        assert_eq!(effective.evaluate(&observation), vec![&json!({"start": "2020"})]);
        let patient_only = Expression::compile("Observation.subject.where(resolve() is Patient)").unwrap();
        assert!(patient_only.evaluate(&observation).is_empty());
        let any = Expression::compile("Observation.subject.where(resolve() is Group)").unwrap();
        assert_eq!(any.evaluate(&observation).len(), 1);
    }

    #[test]
    fn unknown_syntax_is_an_error() {
        for text in
            ["", "Patient.name.exists()", "Patient.deceased != false", "patient.name", "(Patient.name", "Patient..x"]
        {
            assert!(Expression::compile(text).is_err(), "{text}");
        }
    }
}
