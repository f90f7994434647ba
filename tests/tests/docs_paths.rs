//! docs/architecture.md's code and crate maps cannot rot: every repository path it names in
//! backticks exists, and every workspace member has a row in its crate map.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use splitvmm_tests::workspace_root;

fn architecture() -> String {
    std::fs::read_to_string(workspace_root().join("docs/architecture.md")).unwrap()
}

/// The text between backticks, in order.
fn backticked(doc: &str) -> Vec<&str> {
    doc.split('`').skip(1).step_by(2).collect()
}

/// `a/{b,c}.rs` -> `a/b.rs`, `a/c.rs` (one brace group at most, as the docs write them).
fn expand(path: &str) -> Vec<String> {
    match (path.find('{'), path.find('}')) {
        (Some(open), Some(close)) if open < close => path[open + 1..close]
            .split(',')
            .map(|alt| format!("{}{alt}{}", &path[..open], &path[close + 1..]))
            .collect(),
        _ => vec![path.to_owned()],
    }
}

/// The workspace members, from the root Cargo.toml.
fn members() -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a members line");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// A backticked word that names a file or folder of this repository: no spaces, no
/// placeholders, and either under a top-level folder of the repository or shaped like a
/// source path (a typo in the first folder must not make a path look like something else).
fn is_repo_path(word: &str, top_level: &[String]) -> bool {
    if word.contains(' ') || word.starts_with('<') || !word.contains('/') {
        return false;
    }
    let word = word.trim_start_matches("./");
    let first = word.split('/').next().unwrap_or_default();
    top_level.iter().any(|t| t == first) || word.ends_with(".rs") || word.ends_with('/')
}

#[test]
fn every_path_in_the_architecture_doc_exists() {
    let root = workspace_root();
    let top_level: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let doc = architecture();
    let mut checked = 0;
    let mut missing = Vec::new();
    for word in backticked(&doc) {
        if !is_repo_path(word, &top_level) {
            continue;
        }
        for path in expand(word.trim_start_matches("./")) {
            checked += 1;
            if !root.join(&path).exists() {
                missing.push(path);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md names missing paths: {missing:?}"
    );
    // The maps name dozens of files; a parser that found none would pass vacuously.
    assert!(
        checked >= 30,
        "only {checked} paths found in docs/architecture.md"
    );
}

#[test]
fn the_crate_map_lists_every_workspace_member() {
    let doc = architecture();
    let members = members();
    assert!(members.len() >= 8, "members: {members:?}");
    let unlisted: Vec<_> = members
        .iter()
        .filter(|m| !doc.contains(&format!("| `{m}` |")))
        .collect();
    assert!(unlisted.is_empty(), "crate map lacks rows for {unlisted:?}");
}

#[test]
fn the_checker_sees_a_missing_path_and_expands_braces() {
    let top_level = vec!["driver-domain".to_owned()];
    assert!(is_repo_path("driver-domain/src/nope.rs", &top_level));
    assert!(is_repo_path("drver-domain/src/typo.rs", &top_level));
    assert!(!is_repo_path("<run_dir>/toolstack.sock", &top_level));
    assert!(!is_repo_path("data/io", &top_level));
    assert_eq!(
        expand("a/{b,c}.rs"),
        vec!["a/b.rs".to_owned(), "a/c.rs".to_owned()]
    );
    assert!(!workspace_root().join("driver-domain/src/nope.rs").exists());
}
