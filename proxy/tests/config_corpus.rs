//! Istio compatibility measure: loads every file of the shared Istio corpus
//! (`../shared/istio-corpus/`, 120 real files) and prints how many load and the
//! most common reasons for the rest. Run with `--nocapture` to see the report;
//! skipped (with a note) when the corpus folder is absent.
//!
//! `SERIN_ISTIO_CORPUS=/path` points it at another folder.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serin::config::{self, model::Resource};

fn corpus_dir() -> PathBuf {
    match std::env::var_os("SERIN_ISTIO_CORPUS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-corpus"),
    }
}

/// A short reason for grouping: the field path without indexes, or the message.
fn reason(e: &config::ConfigError) -> String {
    let field: String = e
        .field
        .split('.')
        .filter(|p| !p.is_empty())
        .map(|p| p.split('[').next().unwrap_or(p))
        .collect::<Vec<_>>()
        .join(".");
    let message = e.message.split(" (").next().unwrap_or(&e.message);
    let message = if message.starts_with("unknown field") { "unknown field" } else { message };
    if field.is_empty() { message.to_string() } else { format!("{field}: {message}") }
}

#[test]
fn istio_corpus_share() {
    let dir = corpus_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("note: {} not found; Istio corpus measurement skipped", dir.display());
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut loaded = 0usize;
    let mut loaded_applied = 0usize;
    let mut only_not_applied = 0usize;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = Vec::new();
    for file in &files {
        match config::load_path(file) {
            Ok(set) => {
                loaded += 1;
                if set.resources.iter().all(|r| matches!(r.resource, Resource::NotApplied(_))) {
                    only_not_applied += 1;
                } else {
                    loaded_applied += 1;
                }
            }
            Err(errors) => {
                let mut seen = Vec::new();
                for e in errors.iter() {
                    // Every error names a field, a kind, or a position.
                    assert!(
                        !e.field.is_empty() || e.location.is_some() || e.message.contains("kind"),
                        "unspecific error: {e}"
                    );
                    let r = reason(e);
                    if !seen.contains(&r) {
                        seen.push(r);
                    }
                }
                for r in seen {
                    *reasons.entry(r).or_default() += 1;
                }
                failed.push((file.clone(), errors));
            }
        }
    }
    let total = files.len();
    println!("istio corpus: {loaded}/{total} files load ({:.0}%)", 100.0 * loaded as f64 / total.max(1) as f64);
    println!(
        "  {loaded_applied} with resources serin applies; {only_not_applied} with only kinds accepted but not applied"
    );
    let mut top: Vec<(String, usize)> = reasons.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    println!("top reasons (files):");
    for (r, n) in &top {
        println!("  {n:3}  {r}");
    }
    if std::env::var_os("SERIN_CORPUS_VERBOSE").is_some() {
        for (file, errors) in &failed {
            println!("--- {}", file.display());
            println!("{errors}");
        }
    }
}
