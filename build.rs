//! Embeds the default mapping files (`mappings/`) into the binary, so that `serve` and
//! `convert` work with no files beside them.

use std::fmt::Write as _;
use std::path::Path;

const KINDS: [&str; 5] = ["messages", "segments", "datatypes", "vocab", "senders"];

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries = Vec::new();
    for kind in KINDS {
        let folder = root.join(kind);
        println!("cargo:rerun-if-changed={}", folder.display());
        let Ok(read) = std::fs::read_dir(&folder) else { continue };
        let mut files: Vec<_> = read
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|extension| extension == "yaml"))
            .collect();
        files.sort();
        for file in files {
            println!("cargo:rerun-if-changed={}", file.display());
            let name = file.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            entries.push((format!("{kind}/{name}"), file));
        }
    }
    let mut code = String::from(
        "/// Built-in mapping files: (path under `mappings/`, text).\npub const BUILTIN: &[(&str, &str)] = &[\n",
    );
    for (relative, file) in entries {
        let _ = writeln!(code, "    ({relative:?}, include_str!({:?})),", file.display().to_string());
    }
    code.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("builtin_mappings.rs");
    std::fs::write(out, code).expect("OUT_DIR is writable");
}
