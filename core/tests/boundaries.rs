//! Core's inner boundaries, checked on its source: the modules are private
//! (lib.rs re-exports the surface), no product file grows past 600 lines,
//! and the arbiter stays at most 550. A product file's lines are those
//! before its first top-level `#[cfg(test)]`; test-only files
//! (`tests.rs`, `*_tests.rs`) are not product files.

use std::path::{Path, PathBuf};

/// Most lines of a product file in core.
const MOST: usize = 600;
/// Most lines of `master/arbiter.rs`: the loop only.
const ARBITER_MOST: usize = 550;

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

fn product_lines(text: &str) -> usize {
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .count()
}

#[test]
fn product_files_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    assert!(
        files.len() > 40,
        "found {} files under {}",
        files.len(),
        src.display()
    );
    let mut over = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a readable source file");
        let most = if path.ends_with("master/arbiter.rs") {
            ARBITER_MOST
        } else {
            MOST
        };
        let n = product_lines(&text);
        if n > most {
            over.push(format!("{}: {n} lines (at most {most})", path.display()));
        }
    }
    assert!(over.is_empty(), "{over:#?}");
}

#[test]
fn every_module_is_private() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("core's lib.rs");
    let public: Vec<&str> = lib
        .lines()
        .filter(|l| l.trim_start().starts_with("pub mod"))
        .collect();
    assert!(public.is_empty(), "{public:?}");
}

#[test]
fn counting_stops_at_the_tests() {
    assert_eq!(product_lines("a\nb\n#[cfg(test)]\nmod tests {}\n"), 2);
    assert_eq!(product_lines("a\n    #[cfg(test)]\nb\n"), 3);
}
