//! The analyses on disk: `canaries.json` in the control plane's state folder, next to
//! the store's state file, written atomically (temp file, fsync, rename, fsync of the
//! folder) on every decision.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CanaryError;
use super::analysis::AnalysisState;

/// The file's name inside the state folder.
pub const CANARY_STATE_FILE: &str = "canaries.json";

const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct File1 {
    format: u32,
    canaries: Vec<AnalysisState>,
    /// Canary documents already started: `Canary/namespace/name` → their spec as JSON,
    /// so a document starts again only when its spec changes.
    #[serde(default)]
    documents: BTreeMap<String, String>,
}

/// What the file holds.
#[derive(Debug, Default)]
pub(crate) struct Saved {
    /// Every analysis, the latest per service.
    pub canaries: Vec<AnalysisState>,
    /// Documents started: source → spec JSON.
    pub documents: BTreeMap<String, String>,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(CANARY_STATE_FILE)
}

/// The analyses saved in `dir`; none when there is no file yet.
pub(crate) fn load(dir: &Path) -> Result<Saved, CanaryError> {
    let path = path(dir);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
        Err(source) => return Err(CanaryError::Io { path, source }),
    };
    let file: File1 = serde_json::from_slice(&text)
        .map_err(|e| CanaryError::BadState { path: path.clone(), message: e.to_string() })?;
    if file.format != FORMAT {
        return Err(CanaryError::BadState { path, message: format!("format {} is not {FORMAT}", file.format) });
    }
    Ok(Saved { canaries: file.canaries, documents: file.documents })
}

/// Writes `canaries` to `dir` atomically.
pub(crate) fn save(dir: &Path, saved: Saved) -> Result<(), CanaryError> {
    let path = path(dir);
    let mut body =
        serde_json::to_vec_pretty(&File1 { format: FORMAT, canaries: saved.canaries, documents: saved.documents })
            .map_err(|e| CanaryError::BadState { path: path.clone(), message: e.to_string() })?;
    body.push(b'\n');
    crate::server::persist::write_atomic(dir, CANARY_STATE_FILE, &body)
        .map_err(|(path, source)| CanaryError::Io { path, source })
}
