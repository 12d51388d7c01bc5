//! Parse + map throughput: `Engine::convert` (parse, route, map, R4 validation, Bundle) per
//! message, reported in messages per second.
//!
//! Input: the ADT messages of the shared corpus (`../shared/corpus`) that the built-in mappings
//! convert; without the corpus, `benches/adt_a01_1k.hl7`. Run with
//! `cargo bench --bench parse_map` (add `-- --quick` for a short run).
//!
//! The `ack_path` group times what an MLLP connection computes per message before the journal
//! write (`-- ack_path` runs only it).
//!
//! The `structure_check` group times the structure check of the MLLP acknowledgment path on
//! `benches/adt_a01_1k.hl7`: the full `hl7-parser` parse, which that path used alone before,
//! against `hl7::structure::check`, which now answers first (`-- structure_check` runs only it).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hl7_fhir_gateway::commands::convert::decode;
use hl7_fhir_gateway::hl7::ack::{build_ack, AckOutcome};
use hl7_fhir_gateway::hl7::charset::Charset;
use hl7_fhir_gateway::hl7::header::Header;
use hl7_fhir_gateway::hl7::split::split_messages;
use hl7_fhir_gateway::hl7::structure;
use hl7_fhir_gateway::mapping::Engine;
use hl7_fhir_gateway::mllp::ingest::examine;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus");
const FALLBACK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/adt_a01_1k.hl7");

/// Message files of a folder tree (expected outputs and notes left out).
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut directories = vec![root.to_path_buf()];
    while let Some(directory) = directories.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else { continue };
        for path in entries.filter_map(|entry| entry.ok().map(|entry| entry.path())) {
            let skipped = path
                .extension()
                .and_then(|extension| extension.to_str())
                .is_some_and(|extension| ["fhir", "json", "md"].contains(&extension.to_ascii_lowercase().as_str()));
            if path.is_dir() {
                directories.push(path);
            } else if !skipped {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The decoded ADT messages of `files` that `engine` converts, and how many were left out.
fn adt_messages(engine: &Engine, files: &[PathBuf]) -> (Vec<String>, usize) {
    let mut messages = Vec::new();
    let mut left_out = 0;
    for file in files {
        let Ok(bytes) = std::fs::read(file) else { continue };
        for message in split_messages(&bytes) {
            let bytes: Vec<u8> = message
                .bytes
                .split_inclusive(|&byte| byte == b'\r')
                .filter(|segment| !segment.starts_with(b"#"))
                .flatten()
                .copied()
                .collect();
            let is_adt =
                Header::scan(&String::from_utf8_lossy(&bytes)).is_some_and(|header| header.message_code() == "ADT");
            if !is_adt {
                continue;
            }
            match decode(&bytes) {
                Ok(text) if engine.convert(&text).is_ok() => messages.push(text),
                _ => left_out += 1,
            }
        }
    }
    (messages, left_out)
}

fn parse_map(criterion: &mut Criterion) {
    let engine = match Engine::builtin() {
        Ok(engine) => engine,
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("the built-in mappings do not compile:\n{}", lines.join("\n"));
        }
    };
    let corpus = Path::new(CORPUS);
    let (mut messages, mut left_out, mut source) = (Vec::new(), 0, "benches/adt_a01_1k.hl7");
    if corpus.is_dir() {
        (messages, left_out) = adt_messages(&engine, &files_under(corpus));
        source = "../shared/corpus ADT messages";
    }
    if messages.is_empty() {
        (messages, left_out) = adt_messages(&engine, &[PathBuf::from(FALLBACK)]);
        source = "benches/adt_a01_1k.hl7";
    }
    assert!(!messages.is_empty(), "no convertible ADT message in {source}");
    let bytes: usize = messages.iter().map(String::len).sum();
    eprintln!(
        "parse_map: {} messages ({bytes} bytes) from {source}; {left_out} ADT messages left out (conversion failed)",
        messages.len()
    );

    let mut group = criterion.benchmark_group("parse_map");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("convert_adt", |bencher| {
        bencher.iter(|| {
            for message in &messages {
                black_box(engine.convert(black_box(message)).expect("converted while loading"));
            }
        })
    });
    group.finish();
}

/// `hl7-parser` against [`structure::check`] on the text `mllp::ingest` gives them: one
/// decoded, trimmed message per element.
fn structure_check(criterion: &mut Criterion) {
    let bytes = std::fs::read(FALLBACK).unwrap_or_else(|error| panic!("{FALLBACK}: {error}"));
    let messages: Vec<String> =
        split_messages(&bytes).iter().map(|message| String::from_utf8_lossy(&message.bytes).into_owned()).collect();
    let texts: Vec<&str> = messages.iter().map(|message| structure::trim(message)).collect();
    assert!(!texts.is_empty(), "no message in {FALLBACK}");
    for text in &texts {
        let parsed = hl7_parser::Message::parse_with_lenient_newlines(text, true).is_ok();
        assert!(parsed && structure::check(text).is_ok(), "both checks must accept the messages of {FALLBACK}");
    }

    let mut group = criterion.benchmark_group("structure_check");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(texts.len() as u64));
    group.bench_function("hl7_parser", |bencher| {
        bencher.iter(|| {
            for text in &texts {
                black_box(hl7_parser::Message::parse_with_lenient_newlines(black_box(text), true).is_ok());
            }
        })
    });
    group.bench_function("fast_check", |bencher| {
        bencher.iter(|| {
            for text in &texts {
                black_box(structure::check(black_box(text)).is_ok());
            }
        })
    });
    group.finish();
}

/// What an MLLP connection computes for each message before it journals it: `examine`
/// (decode by MSH-18, header, structure check) and the ACK, built and encoded.
fn ack_path(criterion: &mut Criterion) {
    let bytes = std::fs::read(FALLBACK).unwrap_or_else(|error| panic!("{FALLBACK}: {error}"));
    let messages: Vec<Vec<u8>> = split_messages(&bytes).into_iter().map(|message| message.bytes.to_vec()).collect();
    assert!(!messages.is_empty(), "no message in {FALLBACK}");

    let mut group = criterion.benchmark_group("ack_path");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("examine_and_ack", |bencher| {
        bencher.iter(|| {
            for raw in &messages {
                let examined = examine(black_box(raw), Charset::Utf8);
                assert!(matches!(examined.outcome, AckOutcome::Accepted), "{FALLBACK} must be accepted");
                let text = build_ack(&examined.header, &examined.outcome, "GW1", "20261130160000+0000");
                black_box(examined.charset.encode_owned(text));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, parse_map, structure_check, ack_path);
criterion_main!(benches);
