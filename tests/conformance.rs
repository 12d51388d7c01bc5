//! Golden conversion cases: every folder under `conformance/` is one case (see
//! `conformance/README.md`). Its `input.hl7` is converted with the built-in mappings (plus the
//! case's own `mappings/` folder and `timezone`, when present) and the Bundle must equal
//! `expected.json` exactly, or the conversion must fail with the text of `expected-error.txt`.
//!
//! `UPDATE_GOLDEN=1 cargo test --test conformance` rewrites every `expected.json` from the
//! current output; review the change with `git diff conformance/` before committing it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hl7_fhir_gateway::commands::convert::decode;
use hl7_fhir_gateway::hl7::split::split_messages;
use hl7_fhir_gateway::mapping::{Engine, Sources};
use serde_json::Value;

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance");

/// What a case folder may hold; anything else is a typo worth failing on.
const KNOWN_ENTRIES: [&str; 6] =
    ["input.hl7", "expected.json", "expected-error.txt", "case.md", "mappings", "timezone"];

/// Differences shown per failing case.
const SHOWN_DIFFERENCES: usize = 12;

fn update_golden() -> bool {
    std::env::var("UPDATE_GOLDEN").is_ok_and(|value| value == "1")
}

/// The case folders, sorted by name.
fn case_folders(root: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(root).unwrap_or_else(|error| panic!("{}: {error}", root.display()));
    let mut folders: Vec<PathBuf> =
        entries.map(|entry| entry.expect("readable directory entry").path()).filter(|path| path.is_dir()).collect();
    folders.sort();
    folders
}

/// Reads an optional text file; a file that exists but cannot be read is a failure.
fn optional_text(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(format!("cannot read {}: {error}", path.display())),
    }
}

/// The one-line note of a case.
fn check_note(case: &Path) -> Result<(), String> {
    let note = optional_text(&case.join("case.md"))?.ok_or("case.md is missing")?;
    let lines: Vec<&str> = note.lines().filter(|line| !line.trim().is_empty()).collect();
    match lines.len() {
        1 => Ok(()),
        0 => Err("case.md is empty: say in one line what the case proves".to_string()),
        count => Err(format!("case.md has {count} lines; it must be one line saying what the case proves")),
    }
}

fn check_entries(case: &Path) -> Result<(), String> {
    let mut unknown = Vec::new();
    for entry in std::fs::read_dir(case).map_err(|error| error.to_string())? {
        let name = entry.map_err(|error| error.to_string())?.file_name().to_string_lossy().into_owned();
        if !KNOWN_ENTRIES.contains(&name.as_str()) {
            unknown.push(name);
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    Err(format!("unexpected entries {unknown:?} (a case holds only {KNOWN_ENTRIES:?})"))
}

/// The engine of a case: built-ins, plus its `mappings/` folder and `timezone`.
fn engine_for(case: &Path) -> Result<Engine, String> {
    let overlay = case.join("mappings");
    let timezone = optional_text(&case.join("timezone"))?.map(|zone| zone.trim().to_string());
    let sources = Sources {
        without_builtin: false,
        folders: if overlay.is_dir() { vec![overlay] } else { Vec::new() },
        default_timezone: timezone,
    };
    Engine::load(&sources).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        format!("mappings do not compile:\n    {}", lines.join("\n    "))
    })
}

/// The message of `input.hl7`, line endings normalized to CR and decoded by its MSH-18.
fn read_input(case: &Path) -> Result<String, String> {
    let path = case.join("input.hl7");
    let bytes = std::fs::read(&path).map_err(|error| format!("cannot read input.hl7: {error}"))?;
    let mut messages = split_messages(&bytes);
    if messages.len() != 1 {
        return Err(format!("input.hl7 must hold exactly one message, found {}", messages.len()));
    }
    decode(&messages.remove(0).bytes).map_err(|reason| format!("input.hl7 cannot be decoded: {reason}"))
}

/// Runs one case. `Ok` carries a note for the summary (e.g. "written").
fn run_case(case: &Path) -> Result<&'static str, String> {
    check_note(case)?;
    check_entries(case)?;
    let expected_error = optional_text(&case.join("expected-error.txt"))?;
    let expected_path = case.join("expected.json");
    if expected_error.is_some() && expected_path.exists() {
        return Err("has both expected.json and expected-error.txt; keep one".to_string());
    }
    let engine = engine_for(case)?;
    let text = read_input(case)?;
    let result = engine.convert(&text);

    if let Some(expected_error) = expected_error {
        let wanted = expected_error.trim();
        if wanted.is_empty() {
            return Err("expected-error.txt is empty".to_string());
        }
        return match result {
            Ok(_) => Err(format!("conversion succeeded but expected-error.txt wants an error containing {wanted:?}")),
            Err(error) if error.to_string().contains(wanted) => Ok("failed as expected"),
            Err(error) => Err(format!("error {:?} does not contain {wanted:?}", error.to_string())),
        };
    }

    let bundle = result.map_err(|error| format!("conversion failed: {error}"))?.bundle;
    if update_golden() {
        let pretty = serde_json::to_string_pretty(&bundle).expect("a Value serializes");
        let previous = optional_text(&expected_path)?;
        if previous.as_deref() == Some(format!("{pretty}\n").as_str()) {
            return Ok("unchanged");
        }
        std::fs::write(&expected_path, format!("{pretty}\n"))
            .map_err(|error| format!("cannot write expected.json: {error}"))?;
        return Ok("written");
    }
    let expected_text = optional_text(&expected_path)?
        .ok_or("expected.json is missing (bless it with UPDATE_GOLDEN=1, then review it)")?;
    let expected: Value =
        serde_json::from_str(&expected_text).map_err(|error| format!("expected.json is not JSON: {error}"))?;
    if expected == bundle {
        return Ok("passed");
    }
    let mut differences = Vec::new();
    diff("", &expected, &bundle, &mut differences);
    let mut message = format!("Bundle differs from expected.json in {} places:", differences.len());
    for difference in differences.iter().take(SHOWN_DIFFERENCES) {
        let _ = write!(message, "\n    {difference}");
    }
    if differences.len() > SHOWN_DIFFERENCES {
        let _ = write!(message, "\n    ... {} more", differences.len() - SHOWN_DIFFERENCES);
    }
    let _ = write!(message, "\n    (UPDATE_GOLDEN=1 rewrites expected.json if the new output is right)");
    Err(message)
}

/// Appends the JSON pointer of every difference between `expected` and `actual`.
fn diff(pointer: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(left), Value::Object(right)) => {
            for (key, value) in left {
                let path = format!("{pointer}/{}", escape_pointer(key));
                match right.get(key) {
                    Some(other) => diff(&path, value, other, out),
                    None => out.push(format!("{path}: expected {}, actual missing", short(value))),
                }
            }
            for (key, value) in right.iter().filter(|(key, _)| !left.contains_key(*key)) {
                out.push(format!("{pointer}/{}: expected missing, actual {}", escape_pointer(key), short(value)));
            }
        }
        (Value::Array(left), Value::Array(right)) if keyed_by_full_url(left) && keyed_by_full_url(right) => {
            // Bundle entries: matched by fullUrl, so that one added resource shows as one
            // difference instead of shifting every entry after it.
            let before = out.len();
            for (index, value) in left.iter().enumerate() {
                let path = format!("{pointer}/{index}");
                match right.iter().find(|other| other["fullUrl"] == value["fullUrl"]) {
                    Some(other) => diff(&path, value, other, out),
                    None => out.push(format!("{path}: expected {}, actual missing", short(value))),
                }
            }
            for (index, value) in right.iter().enumerate() {
                if !left.iter().any(|other| other["fullUrl"] == value["fullUrl"]) {
                    out.push(format!("{pointer}/{index}: expected missing, actual {}", short(value)));
                }
            }
            if out.len() == before && left != right {
                out.push(format!("{pointer}: same entries in another order"));
            }
        }
        (Value::Array(left), Value::Array(right)) => {
            for (index, (value, other)) in left.iter().zip(right).enumerate() {
                diff(&format!("{pointer}/{index}"), value, other, out);
            }
            for (index, value) in left.iter().enumerate().skip(right.len()) {
                out.push(format!("{pointer}/{index}: expected {}, actual missing", short(value)));
            }
            for (index, value) in right.iter().enumerate().skip(left.len()) {
                out.push(format!("{pointer}/{index}: expected missing, actual {}", short(value)));
            }
        }
        _ if expected != actual => {
            let path = if pointer.is_empty() { "/" } else { pointer };
            out.push(format!("{path}: expected {}, actual {}", short(expected), short(actual)));
        }
        _ => {}
    }
}

/// True for a non-empty array of objects with distinct `fullUrl`s (Bundle entries).
fn keyed_by_full_url(items: &[Value]) -> bool {
    let urls: Vec<&str> = items.iter().filter_map(|item| item.get("fullUrl").and_then(Value::as_str)).collect();
    !items.is_empty()
        && urls.len() == items.len()
        && urls.iter().collect::<std::collections::HashSet<_>>().len() == urls.len()
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Compact JSON, cut to a readable length.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= 160 {
        return text;
    }
    let cut: String = text.chars().take(157).collect();
    format!("{cut}...")
}

#[test]
fn conformance_cases() {
    let root = Path::new(CASES);
    let folders = case_folders(root);
    assert!(!folders.is_empty(), "no case folders under {CASES}");

    let mut checked = 0usize;
    let mut failures = Vec::new();
    for case in &folders {
        let name = case.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        checked += 1;
        match run_case(case) {
            Ok(outcome) => eprintln!("conformance/{name}: {outcome}"),
            Err(reason) => {
                eprintln!("conformance/{name}: FAILED");
                failures.push(format!("conformance/{name}: {reason}"));
            }
        }
    }
    eprintln!("conformance: {} cases, {} passed, {} failed", folders.len(), checked - failures.len(), failures.len());
    assert_eq!(checked, folders.len(), "every case folder must be checked");
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), checked, failures.join("\n\n"));
}

#[test]
fn diff_names_json_pointers() {
    let expected = serde_json::json!({"a": [1, {"b/c": "x"}], "d": true});
    let actual = serde_json::json!({"a": [1, {"b/c": "y"}, 3], "e": null});
    let mut out = Vec::new();
    diff("", &expected, &actual, &mut out);
    assert_eq!(
        out,
        [
            "/a/1/b~1c: expected \"x\", actual \"y\"",
            "/a/2: expected missing, actual 3",
            "/d: expected true, actual missing",
            "/e: expected missing, actual null",
        ]
    );
}

#[test]
fn diff_matches_bundle_entries_by_full_url() {
    let entry = |url: &str, value: i64| serde_json::json!({"fullUrl": url, "resource": {"value": value}});
    let expected = serde_json::json!({"entry": [entry("urn:a", 1), entry("urn:c", 3)]});
    let actual = serde_json::json!({"entry": [entry("urn:a", 1), entry("urn:b", 2), entry("urn:c", 4)]});
    let mut out = Vec::new();
    diff("", &expected, &actual, &mut out);
    assert_eq!(
        out,
        [
            "/entry/1/resource/value: expected 3, actual 4",
            "/entry/1: expected missing, actual {\"fullUrl\":\"urn:b\",\"resource\":{\"value\":2}}",
        ]
    );
    let reordered = serde_json::json!({"entry": [entry("urn:c", 3), entry("urn:a", 1)]});
    let mut out = Vec::new();
    diff("", &expected, &reordered, &mut out);
    assert_eq!(out, ["/entry: same entries in another order"]);
}
