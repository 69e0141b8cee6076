//! The documents agree with the code they describe: the README's code map is
//! the folder tree of `src/`. (The reference tables of `docs/` — settings,
//! reason codes, warning codes, metrics — are checked by the unit tests of the
//! modules that define them.)

use std::collections::BTreeSet;
use std::path::Path;

const README: &str = include_str!("../README.md");

/// The `src/` files the README's code map names, as paths below `src/`.
fn mapped_files() -> BTreeSet<String> {
    let map = README
        .split("## Code map")
        .nth(1)
        .and_then(|rest| rest.split("```text\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the README has a code map in a text block");
    let mut files = BTreeSet::new();
    // The folders open at each depth (two spaces per level under `src/`).
    let mut folders: Vec<String> = Vec::new();
    for line in map.lines() {
        let Some(entry) = line.split_whitespace().next() else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            if entry != "src/" {
                break;
            }
            continue;
        }
        // A description lines up in a column far to the right: not an entry.
        if indent % 2 != 0 || indent > 2 * (folders.len() + 1) {
            continue;
        }
        folders.truncate(indent / 2 - 1);
        if entry.ends_with('/') {
            folders.push(entry.to_owned());
        } else {
            files.insert(format!("{}{entry}", folders.concat()));
        }
    }
    files
}

fn source_files(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            source_files(&path, &format!("{prefix}{name}/"), out);
        } else if name != "mod.rs" {
            out.insert(format!("{prefix}{name}"));
        }
    }
}

#[test]
fn the_readme_code_map_is_the_folder_tree() {
    let mut actual = BTreeSet::new();
    source_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut actual,
    );
    assert_eq!(
        mapped_files(),
        actual,
        "README.md's code map and src/ differ"
    );
}

#[test]
fn every_module_says_what_it_is_for() {
    let mut files = BTreeSet::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    source_files(&src, "", &mut files);
    for dir in [
        "broker",
        "config",
        "decision",
        "media",
        "preview",
        "service",
        "telemetry",
    ] {
        files.insert(format!("{dir}/mod.rs"));
    }
    for file in files {
        let text = std::fs::read_to_string(src.join(&file)).unwrap();
        // The page's files open with their own language's comment.
        let opening = match file.rsplit_once('.').map(|(_, ext)| ext) {
            Some("js") => "// ",
            Some("css") => "/* ",
            Some("html") => "<!doctype html>\n<!-- ",
            _ => "//! ",
        };
        assert!(
            text.starts_with(opening),
            "src/{file} does not open with a {opening:?} comment saying what it is for"
        );
    }
}

/// Every test the docs name as holding a promise exists.
#[test]
fn the_tests_named_in_the_docs_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let mut named = 0;
    for cell in doc.split('`') {
        let Some((file, test)) = cell.split_once("::") else {
            continue;
        };
        if !(file.starts_with("tests/") || file.starts_with("src/")) || !file.ends_with(".rs") {
            continue;
        }
        let code = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("docs/operations.md names {file}: {e}"));
        assert!(
            code.contains(&format!("fn {test}(")),
            "docs/operations.md names {file}::{test}, which does not exist"
        );
        named += 1;
    }
    assert!(named >= 30, "only {named} tests named");
}

/// The alert rules match the queues by name (RabbitMQ's exporter labels them
/// so): each name they use is the default of its setting, and each queue an
/// alert watches is named. A renamed default fails here until the rules
/// follow; deployments that rename a queue edit the rules (docs/metrics.md).
#[test]
fn the_alert_rules_name_the_default_queues() {
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules/lesson-replay.yml"),
    )
    .unwrap();
    let named: BTreeSet<&str> = rules
        .split("queue=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    let defaults = lesson_replay::config::settings::Config::default();
    let watched: BTreeSet<&str> = [
        defaults.work_queue.as_str(),
        defaults.parking_queue.as_str(),
        defaults.records_queue.as_str(),
    ]
    .into();
    assert_eq!(named, watched);
}
