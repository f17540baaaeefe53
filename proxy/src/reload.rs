//! Hot reload of a file or folder configuration.
//!
//! A `notify` watcher on the folder (a file's parent folder, so that editors that
//! replace the file and Kubernetes ConfigMap symlink swaps are seen) wakes the
//! reload task; events are debounced for 100 ms. A 500 ms poll of the files' sizes
//! and modification times backs it up where file events are not delivered. Each
//! reload loads and compiles the whole configuration: success is applied unless
//! its version (content hash) is the one already running; failure is recorded
//! with [`Shared::reject`] and the last good snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{self, ConfigErrors};
use crate::snapshot::{Snapshot, TlsMode};
use crate::state::Shared;

/// Quiet period after a file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Fallback poll interval.
pub const POLL: Duration = Duration::from_millis(500);

/// The `source` label of snapshots loaded from `path`.
pub fn source_label(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new snapshot with this version was applied.
    Applied(String),
    /// The configuration compiled to the version already running.
    Unchanged(String),
    /// The configuration was rejected; the last good snapshot keeps serving.
    Rejected,
}

/// Loads and compiles `path` now and applies it to `shared` (unless unchanged);
/// on failure records the rejection and returns the errors.
pub fn reload_now(path: &Path, shared: &Shared) -> Result<ReloadOutcome, ConfigErrors> {
    let source = source_label(path);
    let result = config::load_path(path).and_then(|set| {
        let snapshot = config::compile(&set, &shared.registry, &source)?;
        if shared.snapshot.load().version != snapshot.version {
            log_not_applied(&set, &snapshot);
        }
        Ok(snapshot)
    });
    match result {
        Ok(snapshot) => {
            if shared.snapshot.load().version == snapshot.version {
                return Ok(ReloadOutcome::Unchanged(snapshot.version));
            }
            let version = snapshot.version.clone();
            shared.apply(snapshot);
            Ok(ReloadOutcome::Applied(version))
        }
        Err(errors) => {
            shared.reject(&source, errors.to_string());
            Err(errors)
        }
    }
}

/// Logs what a config asks for that serin reads but does not enforce yet, so it
/// is never silently ignored: kinds accepted without effect, and DestinationRule
/// TLS modes (mutual TLS between sidecars comes with the identity work).
fn log_not_applied(set: &config::ConfigSet, snapshot: &Snapshot) {
    for warning in &set.warnings {
        tracing::warn!("{warning}");
    }
    let gateways = set.resources.iter().filter(|r| matches!(r.resource, config::model::Resource::Gateway(_))).count();
    if gateways > 0 {
        tracing::warn!(
            gateways,
            "Gateway resources are checked but not served by a sidecar (nor VirtualServices bound only to gateways)"
        );
    }
    let mut hosts: Vec<&str> = snapshot
        .clusters
        .values()
        .filter(|c| c.policy.tls.as_ref().is_some_and(|mode| *mode != TlsMode::Disable))
        .map(|c| c.service.host.as_str())
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    for host in hosts {
        tracing::warn!(%host, "DestinationRule trafficPolicy.tls.mode is read but not applied yet: traffic to this host is plaintext");
    }
}

/// Watches `path` (file or folder) and reloads on change, within about a second.
///
/// `loaded`: the files' [`fingerprint`] taken before the load `shared` already
/// runs; the watch reloads at once if they differ when it starts (an edit made
/// in between gives no file event). `None`: reload at once.
pub fn spawn_watch(path: PathBuf, shared: Arc<Shared>, loaded: Option<Fingerprint>) -> JoinHandle<()> {
    tokio::spawn(watch_loop(path, shared, loaded))
}

async fn watch_loop(path: PathBuf, shared: Arc<Shared>, loaded: Option<Fingerprint>) {
    let (tx, mut rx) = mpsc::channel::<()>(64);
    // Kept alive for the life of the task; `None` = poll only.
    let _watcher = start_watcher(&path, tx);
    let mut last = fingerprint(&path);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut events_open = true;
    // The first pass reloads unless the files are as the running config read them
    // (no re-parse, and no blocking thread, when a sidecar starts).
    let mut first = true;
    loop {
        if std::mem::take(&mut first) {
            if loaded.as_ref() == Some(&last) {
                continue;
            }
        } else {
            tokio::select! {
                event = rx.recv(), if events_open => {
                    if event.is_none() {
                        events_open = false;
                        continue;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = poll.tick() => {
                    if fingerprint(&path) == last {
                        continue;
                    }
                }
            }
        }
        last = fingerprint(&path);
        let (p, s) = (path.clone(), shared.clone());
        match tokio::task::spawn_blocking(move || reload_now(&p, &s)).await {
            Ok(Ok(ReloadOutcome::Applied(version))) => {
                tracing::info!(%version, path = %path.display(), "config reloaded")
            }
            Ok(Ok(_)) => tracing::debug!(path = %path.display(), "config unchanged"),
            Ok(Err(_)) => {} // Shared::reject logged it.
            Err(e) => tracing::error!(error = %e, "config reload task failed"),
        }
    }
}

fn start_watcher(path: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && !matches!(e.kind, notify::EventKind::Access(_))
        {
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "file watcher unavailable; polling every 500 ms");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch folder; polling every 500 ms");
        return None;
    }
    Some(watcher)
}

/// The files of a config path with their sizes and modification times.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Names, sizes and modification times of the configuration files (a file, or
/// the entries of a folder): a change in any of them means "reload".
pub fn fingerprint(path: &Path) -> Fingerprint {
    let files = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                let mut v: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let modified = meta.and_then(|m| m.modified().ok());
            (f, len, modified)
        })
        .collect()
}
