//! Helpers shared by the tests that run `serin` as a real process: a temporary
//! folder, ANSI-free log lines, and `key=value` fields of the `fmt` log format.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty folder whose name starts with `serin-<prefix>-`.
    pub fn new(prefix: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("serin-{prefix}-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes ANSI escape sequences (colours), in case the log has them.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value` fields of a log line (plain fmt format).
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// The socket address in field `key` (also as tracing's `Some(addr)`).
pub fn addr_field(fields: &HashMap<String, String>, key: &str) -> SocketAddr {
    let raw = fields.get(key).unwrap_or_else(|| panic!("no {key} in {fields:?}"));
    let raw = raw.strip_prefix("Some(").and_then(|r| r.strip_suffix(')')).unwrap_or(raw);
    raw.parse().unwrap_or_else(|e| panic!("{key}={raw}: {e}"))
}
