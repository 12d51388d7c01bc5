//! Conversion over the shared corpus (`../shared/corpus`): every message of a family that has a
//! message map (MSH-9.1 in [`FAMILIES`], e.g. `ADT`, `ORU`) of every file must convert with the
//! built-in mappings.
//!
//! Three allowances, all visible in the output: lines starting with `#` or `//` are comments in
//! some corpus text files (izgateway's and hapi's `messages.txt`) and are dropped before converting; the fuzz
//! inputs under `BadInputs/` (nHapi's parser fuzzing) may be refused, but must not panic. A
//! message whose bytes contradict the character set it declares (MSH-18 `ASCII` with UTF-8 bytes:
//! the IG's extracted ORM/OML test messages) may be refused when decoding; it is listed too.
//!
//! Without the corpus the test is skipped, unless `REQUIRE_SHARED_CORPUS=1` (CI) demands it.
//! With `HL7GW_EXPORT_RESOURCES=FILE` every produced resource is written to FILE, one JSON
//! per line, for the independent R4 validators (`ci/validate_fhir.sh FILE`).

use std::io::Write;
use std::path::PathBuf;

use hl7_fhir_gateway::commands::convert::decode;
use hl7_fhir_gateway::hl7::header::Header;
use hl7_fhir_gateway::hl7::split::split_messages;
use hl7_fhir_gateway::mapping::Engine;
use serde_json::Value;

#[path = "common/shared_corpus.rs"]
mod shared_corpus;

/// Message types (MSH-9.1) whose every corpus message must convert.
const FAMILIES: &[&str] = &["ADT", "ORU", "ORM", "OML", "SIU", "MDM", "VXU"];

/// Fuzz inputs: refusing them is a correct answer.
fn is_bad_input(name: &str) -> bool {
    name.split(['/', '\\']).any(|part| part == "BadInputs")
}

/// The message without its `#` comment lines (segments end with CR after splitting).
fn without_comments(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut kept = Vec::with_capacity(bytes.len());
    let mut dropped = 0;
    for segment in bytes.split_inclusive(|&byte| byte == b'\r') {
        if segment.starts_with(b"#") || segment.starts_with(b"//") {
            dropped += 1;
        } else {
            kept.extend_from_slice(segment);
        }
    }
    (kept, dropped)
}

/// Why a message was not converted.
enum Refusal {
    /// Its bytes contradict the character set it declares (MSH-18): refusing it is correct.
    Charset(String),
    /// Anything else, a panic included.
    Conversion(String),
}

/// Converts one message; a panic is turned into an error naming it.
fn convert(engine: &Engine, bytes: &[u8]) -> Result<Value, Refusal> {
    // Only bytes that are invalid in the declared charset; an unsupported charset is a failure.
    let text = decode(bytes).map_err(|error| {
        if error.contains("is not valid") {
            Refusal::Charset(error)
        } else {
            Refusal::Conversion(error)
        }
    })?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.convert(&text))) {
        Ok(result) => result.map(|converted| converted.bundle).map_err(|error| Refusal::Conversion(error.to_string())),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            Err(Refusal::Conversion(format!("PANIC in convert: {reason}")))
        }
    }
}

/// The resources of a transaction Bundle's entries.
fn resources(bundle: &Value) -> impl Iterator<Item = &Value> {
    bundle["entry"].as_array().into_iter().flatten().filter_map(|entry| entry.get("resource"))
}

#[test]
fn every_corpus_message_of_a_mapped_family_converts() {
    let Some(root) = shared_corpus::root_or_skip() else { return };
    let engine = Engine::builtin().unwrap_or_else(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("the built-in mappings do not compile:\n{}", lines.join("\n"))
    });
    let export_path = std::env::var_os("HL7GW_EXPORT_RESOURCES").filter(|path| !path.is_empty()).map(PathBuf::from);
    let mut export = export_path.as_ref().map(|path| {
        let file = std::fs::File::create(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        std::io::BufWriter::new(file)
    });

    let files = shared_corpus::message_files(root);
    let (mut messages, mut mapped, mut converted, mut exported, mut comments) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut per_family: std::collections::BTreeMap<&str, (usize, usize)> =
        FAMILIES.iter().map(|family| (*family, (0, 0))).collect();
    let mut failures = Vec::new();
    let mut refused_bad_inputs = Vec::new();
    let mut refused_charset = Vec::new();
    for file in &files {
        let name = file.strip_prefix(root).unwrap_or(file).display().to_string();
        let bytes = std::fs::read(file).unwrap_or_else(|error| panic!("{name}: {error}"));
        for message in split_messages(&bytes) {
            messages += 1;
            let header = Header::scan(&String::from_utf8_lossy(&message.bytes));
            let Some(family) =
                header.as_ref().and_then(|header| FAMILIES.iter().find(|family| **family == header.message_code()))
            else {
                continue;
            };
            mapped += 1;
            per_family.get_mut(family).expect("every family is counted").0 += 1;
            let label = format!("{name}:{}", message.line);
            let (bytes, dropped) = without_comments(&message.bytes);
            comments += dropped;
            match convert(&engine, &bytes) {
                Ok(bundle) => {
                    converted += 1;
                    per_family.get_mut(family).expect("every family is counted").1 += 1;
                    if let Some(export) = export.as_mut() {
                        for resource in resources(&bundle) {
                            serde_json::to_writer(&mut *export, resource).expect("export file is writable");
                            export.write_all(b"\n").expect("export file is writable");
                            exported += 1;
                        }
                    }
                }
                Err(Refusal::Charset(reason)) => refused_charset.push(format!("{label}: {reason}")),
                Err(Refusal::Conversion(reason)) if is_bad_input(&name) && !reason.starts_with("PANIC") => {
                    refused_bad_inputs.push(format!("{label}: {reason}"))
                }
                Err(Refusal::Conversion(reason)) => failures.push(format!("{label}: {reason}")),
            }
        }
    }
    if let Some(mut export) = export {
        export.flush().expect("export file is writable");
        let path = export_path.as_ref().expect("set with the writer").display();
        eprintln!("exported {exported} resources to {path}");
    }
    eprintln!(
        "corpus: {} files, {messages} messages, {mapped} messages of mapped families, {converted} converted, {} failed, \
         {} fuzz inputs refused ({comments} comment lines dropped)",
        files.len(),
        failures.len(),
        refused_bad_inputs.len()
    );
    for (family, (total, ok)) in &per_family {
        eprintln!("  {family}: {ok} / {total} converted");
    }
    for refused in &refused_charset {
        eprintln!("  refused (bytes contradict MSH-18, allowed): {refused}");
    }
    for refused in &refused_bad_inputs {
        eprintln!("  refused (fuzz input, allowed): {refused}");
    }
    for failure in &failures {
        eprintln!("  FAILED: {failure}");
    }
    for (family, (total, _)) in &per_family {
        assert!(*total > 0, "no {family} message found in {}", shared_corpus::CORPUS);
    }
    assert!(
        failures.is_empty(),
        "{} of {mapped} messages of mapped families failed to convert:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
