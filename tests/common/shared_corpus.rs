//! The shared sample corpus (`../shared/corpus`) for the tests that read it.
//!
//! A user's fresh clone has no `../shared`: the tests then print `SKIPPED` and pass, unless
//! `REQUIRE_SHARED_CORPUS=1` (set by `.ci/run`) demands that they ran.

use std::path::{Path, PathBuf};

/// Where the corpus is expected.
pub const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/corpus");

/// The corpus folder, or `None` (after printing `SKIPPED`) when it is absent and not
/// required. Panics when it is absent and required.
pub fn root_or_skip() -> Option<&'static Path> {
    let root = Path::new(CORPUS);
    if root.is_dir() {
        return Some(root);
    }
    if std::env::var("REQUIRE_SHARED_CORPUS").is_ok_and(|value| value == "1") {
        panic!("REQUIRE_SHARED_CORPUS=1 but the shared corpus is missing at {CORPUS}");
    }
    eprintln!("SKIPPED: ../shared/corpus not found");
    None
}

/// Every corpus file that may hold messages, sorted: all but expected outputs and notes.
pub fn message_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut directories = vec![root.to_path_buf()];
    while let Some(directory) = directories.pop() {
        let entries = std::fs::read_dir(&directory).unwrap_or_else(|error| panic!("{}: {error}", directory.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                directories.push(path);
                continue;
            }
            let skipped = path
                .extension()
                .and_then(|extension| extension.to_str())
                .is_some_and(|extension| ["fhir", "json", "md"].contains(&extension.to_ascii_lowercase().as_str()));
            if !skipped {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
