//! The control plane's state on disk: the weights set through the API and the
//! version counters. Written atomically (temp file, fsync, rename, fsync of the
//! folder) before an API call returns.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;

/// The state file's name inside the state folder.
pub const STATE_FILE: &str = "control-plane-state.json";

/// The current format of the state file.
const FORMAT: u32 = 1;

/// Weights set through the API for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Override {
    /// The service as the caller named it.
    pub service: String,
    /// Subset → percentage.
    pub weights: BTreeMap<String, u32>,
    /// `set-weight` or `rollback`.
    pub source: String,
    /// When it was set, Unix milliseconds.
    pub set_at_unix_ms: i64,
}

/// A type's version and the hash of the content it was given to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct VersionEntry {
    pub version: u64,
    pub hash: u64,
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct State {
    pub format: u32,
    /// Short type name (`routes`, …) → version.
    pub versions: BTreeMap<String, VersionEntry>,
    /// API overrides in the order they were set (a later one wins).
    pub overrides: Vec<Override>,
}

/// The state file path of a state folder.
pub(crate) fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Reads the state of `dir`; the default state when there is no file yet.
pub(crate) fn load(dir: &Path) -> Result<State, StoreError> {
    let path = state_path(dir);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State { format: FORMAT, ..State::default() }),
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| StoreError::BadState { path: path.clone(), message: e.to_string() })?;
    if state.format != FORMAT {
        return Err(StoreError::BadState { path, message: format!("format {} is not {FORMAT}", state.format) });
    }
    Ok(state)
}

/// Writes `state` to `dir` atomically: a temp file written and fsynced, renamed over
/// the state file, then the folder fsynced so the rename itself is durable.
pub(crate) fn save(dir: &Path, state: &State) -> Result<(), StoreError> {
    let path = state_path(dir);
    let mut body = serde_json::to_vec_pretty(state)
        .map_err(|e| StoreError::BadState { path: path.clone(), message: e.to_string() })?;
    body.push(b'\n');
    write_atomic(dir, STATE_FILE, &body).map_err(|(path, source)| StoreError::Io { path, source })
}

/// Writes `body` to `dir/name` atomically: a temp file written and fsynced, renamed
/// over the file, then the folder fsynced so the rename itself is durable. On error,
/// the path that failed and why.
pub(crate) fn write_atomic(dir: &Path, name: &str, body: &[u8]) -> Result<(), (PathBuf, std::io::Error)> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |e| (path, e)
    };
    fs::create_dir_all(dir).map_err(at(dir))?;
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp"));
    {
        let mut file = File::create(&temp).map_err(at(&temp))?;
        file.write_all(body).map_err(at(&temp))?;
        file.sync_all().map_err(at(&temp))?;
    }
    fs::rename(&temp, &path).map_err(at(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))?;
    Ok(())
}

impl State {
    /// A fresh state of the current format.
    pub(crate) fn new() -> State {
        State { format: FORMAT, ..State::default() }
    }
}
