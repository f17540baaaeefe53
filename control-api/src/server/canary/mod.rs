//! Automated canary analysis inside the control plane (Flagger's analysis loop, fed by
//! the sidecars' own per-version figures).
//!
//! - [`spec`]: the `Canary` document (Flagger's `flagger.app/v1beta1`) and the checks
//!   every spec goes through.
//! - [`analysis`]: the analysis as a pure state machine.
//! - the runner: one tokio task per running analysis, owned by the control plane
//!   and ended when it shuts down.
//! - [`CanaryManager`]: starts, lists, shows and aborts analyses
//!   ([`ControlPlane::canaries`](super::ControlPlane::canaries)), and serves them as the
//!   `Canaries` gRPC service.
//!
//! Every decision is persisted atomically in the state folder (`canaries.json`)
//! before its weight is applied. After a restart ([`ControlPlane::start_canaries`](super::ControlPlane::start_canaries),
//! called by `serve`) running analyses resume at their step; a weight recorded and not
//! confirmed is applied again (set-weight is idempotent), so no half-applied weight
//! remains; finished ones stay for `status`.
//!
//! A `Canary` document of the config folder starts its analysis when it first
//! appears or when its spec changes, never again for the same spec (the state
//! folder remembers the spec of each document started). A document whose service
//! has an analysis running from elsewhere (`ctl`, another document) waits until that
//! analysis ends. A changed document stops its own running analysis (ABORTED,
//! weights left) and starts a new one; a document removed leaves its analysis
//! running (abort it with `serin ctl canary abort`).
//!
//! The weights the analysis sets give the canary its step's weight and the stable
//! subset the rest: **any other subset of the route is set to 0** from the first
//! step on (a route `v1=80 v3=20` analysed with canary `v2` becomes `v1=90 v2=10
//! v3=0`), and stays at 0 after promotion or rollback.
//!
//! A manual `set-weight`, `rollback` or `reset-weights` of a service under analysis
//! is noticed at the next interval (the weights are not what the analysis set) and
//! stops the analysis as ABORTED with that reason ("weights changed outside the
//! analysis"); the manual weights stay. One landing between an analysis' decision
//! and its write is caught too: every weight the analysis writes is a
//! compare-and-set on the store ([`Store::set_weights_if`](super::Store::set_weights_if)),
//! written only while the service is at the weights the decision replaces (or
//! already at the decision's own, for a weight applied again after a restart). On a
//! mismatch a step, the first weight or a promotion is not written and the
//! analysis is ABORTED with the manual weights left; the analysis' own rollback
//! (threshold reached, a refused step, `abort --rollback`) is still written, since
//! its evidence stands and stable is the safe direction, unless the canary already
//! has no traffic (then nothing is written); it ends as due (FAILED, or ABORTED for
//! `abort --rollback`), the reason saying what happened.
//!
//! A weight the store refuses (a step or the promotion) fails the analysis and
//! starts a rollback; the reason names the error and the weights in force. A first
//! weight the store refuses fails the analysis with nothing written.
//!
//! Starting and aborting do not depend on the caller staying: `start` creates the
//! analysis and its task together and only waits for the first weight (the task
//! saves the analysis and applies it); `abort` runs as its own task. A `ctl` that
//! goes away mid-way (Ctrl-C, a gRPC deadline) leaves a running analysis, never an
//! entry without a task; an abort landing while the first weight is applied waits
//! until it is, then stops that one task (one task per analysis at any time).
//!
//! A weight is applied only once the decision recording it is saved. When
//! `canaries.json` cannot be written, a first weight is not applied and the analysis
//! ends FAILED (the `start` call returns the error); a later decision waits and is
//! saved again at the next interval (a `save-failed` event), applied only once saved.

pub mod analysis;
mod persist;
mod runner;
mod service;
pub mod spec;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use analysis::{AnalysisState, Figures, Phase};
pub use persist::CANARY_STATE_FILE;
pub use service::CanaryService;
pub use spec::FieldError;

use super::hosts::fqdn;
use super::{Document, Shared, weights};
use crate::pb;

/// Why a canary call failed.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    /// A spec value that is wrong, by field.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// An analysis already runs on the service.
    #[error("an analysis of {service} is already running ({origin}, at {weight}%); abort it first")]
    AlreadyExists {
        /// The service.
        service: String,
        /// Where the running one came from.
        origin: String,
        /// Its canary weight.
        weight: u32,
    },
    /// No analysis of the service.
    #[error("no canary analysis of {service}")]
    NotFound {
        /// The service asked for.
        service: String,
    },
    /// The service's analysis has ended.
    #[error("the analysis of {service} is not running: {phase:?}")]
    NotRunning {
        /// The service.
        service: String,
        /// Its phase.
        phase: Phase,
    },
    /// Reading or writing the state folder failed.
    #[error("canary state {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A state file this version cannot read.
    #[error("canary state file {} cannot be read: {message}", path.display())]
    BadState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Where the analysis reads a version's figures over a window (the control plane's
/// load aggregates, [`LoadStats`](super::LoadStats); tests give synthetic ones).
pub trait FiguresSource: Send + Sync + 'static {
    /// `version` (a subset) of `service` over the last `window`.
    fn figures(&self, service: &str, version: &str, window: Duration) -> Figures;
}

/// No figures at all: every interval waits for traffic.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFigures;

impl FiguresSource for NoFigures {
    fn figures(&self, _service: &str, version: &str, _window: Duration) -> Figures {
        Figures { version: version.to_string(), ..Figures::default() }
    }
}

impl<F> FiguresSource for F
where
    F: Fn(&str, &str, Duration) -> Figures + Send + Sync + 'static,
{
    fn figures(&self, service: &str, version: &str, window: Duration) -> Figures {
        self(service, version, window)
    }
}

/// The sidecars' load reports, aggregated by the control plane: what the analysis
/// reads by default (the canary's and stable's figures over the interval, every
/// sidecar together; windows in whole seconds).
impl FiguresSource for super::LoadStats {
    fn figures(&self, service: &str, version: &str, window: Duration) -> Figures {
        let f = self.version_window(service, version, window);
        Figures {
            version: version.to_string(),
            requests: f.requests,
            success_percent: f.success_percent,
            p99_ms: f.p99_ms,
        }
    }
}

/// Settings of the analyses.
#[derive(Clone)]
pub struct CanaryOptions {
    /// Where the figures come from.
    pub figures: Arc<dyn FiguresSource>,
    /// How long an applied weight waits for the sidecars' ACKs (default 10 s).
    pub ack_timeout: Duration,
}

impl Default for CanaryOptions {
    fn default() -> CanaryOptions {
        CanaryOptions { figures: Arc::new(NoFigures), ack_timeout: super::DEFAULT_WAIT }
    }
}

impl std::fmt::Debug for CanaryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanaryOptions").field("ack_timeout", &self.ack_timeout).finish_non_exhaustive()
    }
}

/// One analysis (the latest of its service) and its task.
struct Entry {
    state: Mutex<AnalysisState>,
    task: Mutex<Option<Task>>,
    /// Held while an abort (or a changed document) stops the task and changes the
    /// state, so two of them never leave two runners.
    control: tokio::sync::Mutex<()>,
}

struct Task {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl Entry {
    fn new(state: AnalysisState) -> Entry {
        Entry { state: Mutex::new(state), task: Mutex::new(None), control: tokio::sync::Mutex::new(()) }
    }

    fn state(&self) -> MutexGuard<'_, AnalysisState> {
        // Every change is made whole under the lock, so a poisoned one is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn task(&self) -> MutexGuard<'_, Option<Task>> {
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The control plane's canary analyses: one per service at a time, the latest kept
/// per service once finished.
pub struct CanaryManager {
    shared: Arc<Shared>,
    options: RwLock<CanaryOptions>,
    entries: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Canary documents started: source → spec JSON.
    documents: Mutex<BTreeMap<String, String>>,
    started: Mutex<bool>,
    /// The task following the Canary documents.
    watcher: Mutex<Option<JoinHandle<()>>>,
    save_lock: tokio::sync::Mutex<()>,
    /// Bumped when an analysis ends (a waiting document may start).
    ended: watch::Sender<u64>,
}

impl std::fmt::Debug for CanaryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services: Vec<String> = self.lock_entries().keys().cloned().collect();
        f.debug_struct("CanaryManager").field("services", &services).finish_non_exhaustive()
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The key of a service: its FQDN read in `default`.
fn key(service: &str) -> String {
    fqdn(service.trim(), "default")
}

/// Resolves `spec` against the mesh documents: the service must have subsets and a
/// route to split, the subsets must exist (see [`spec::resolve`]).
pub(crate) fn resolve_against(docs: &[Document], spec: pb::CanarySpec) -> Result<pb::CanarySpec, FieldError> {
    spec::check_values(&spec, spec::Source::of(&spec))?;
    let subsets = weights::subsets(docs, &spec.service).map_err(|e| spec::service_error(&spec, e.to_string()))?;
    if weights::current(docs, &spec.service).is_empty() {
        let message =
            format!("no VirtualService route sends traffic only to {}, so there is no split to set", spec.service);
        return Err(spec::service_error(&spec, message));
    }
    spec::resolve(spec, &subsets.names, &subsets.stable)
}

impl CanaryManager {
    pub(crate) fn new(shared: Arc<Shared>, options: CanaryOptions) -> CanaryManager {
        CanaryManager {
            shared,
            options: RwLock::new(options),
            entries: Mutex::new(BTreeMap::new()),
            documents: Mutex::new(BTreeMap::new()),
            started: Mutex::new(false),
            watcher: Mutex::new(None),
            save_lock: tokio::sync::Mutex::new(()),
            ended: watch::Sender::new(0),
        }
    }

    fn lock_entries(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_documents(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        self.documents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the settings (the figures source, the ACK timeout); running analyses
    /// read them at their next interval.
    pub fn set_options(&self, options: CanaryOptions) {
        *self.options.write().unwrap_or_else(|e| e.into_inner()) = options;
    }

    pub(crate) fn options(&self) -> CanaryOptions {
        self.options.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The entry of `service`: by FQDN, else by short name when one service has it.
    fn find(&self, service: &str) -> Option<Arc<Entry>> {
        let entries = self.lock_entries();
        if let Some(e) = entries.get(&key(service)) {
            return Some(Arc::clone(e));
        }
        let short = service.trim().split('.').next().unwrap_or("");
        let mut matches = entries.iter().filter(|(k, _)| k.split('.').next() == Some(short));
        match (matches.next(), matches.next()) {
            (Some((_, e)), None) if !service.contains('.') => Some(Arc::clone(e)),
            _ => None,
        }
    }

    /// Every analysis (running and finished), one per service: the latest.
    pub fn list(&self) -> pb::CanaryList {
        let entries: Vec<Arc<Entry>> = self.lock_entries().values().cloned().collect();
        pb::CanaryList { canaries: entries.iter().map(|e| e.state().to_pb()).collect() }
    }

    /// Where the latest analysis of `service` (short name or FQDN) stands.
    pub fn get(&self, service: &str) -> Option<pb::CanaryStatus> {
        self.find(service).map(|e| e.state().to_pb())
    }

    /// Starts an analysis of `spec` (`source` empty = `ctl`): checked against the
    /// mesh config, refused when one already runs on the service. Returns once the
    /// first step's weight is set and the sidecars answered (PROGRESSING at the first
    /// weight; the `started` event says who confirmed it), or at most the ACK timeout.
    ///
    /// The work does not depend on the caller: the entry and its runner are created
    /// together, without an await in between, and the runner saves the analysis and
    /// applies the first weight; this call only waits for it. A caller that goes away
    /// (a client's Ctrl-C, a gRPC deadline) leaves a running analysis, never an entry
    /// without a task. When the analysis cannot be saved, nothing is applied, the
    /// analysis ends FAILED with the reason, and this returns the error.
    pub async fn start(self: &Arc<Self>, mut spec: pb::CanarySpec) -> Result<pb::CanaryStatus, CanaryError> {
        if spec.source.is_empty() {
            spec.source = "ctl".to_string();
        }
        let spec = self.shared.store.resolve_canary(spec)?;
        // The weights the first step replaces: it is applied only while they hold.
        let before = self.shared.store.weights(&spec.service);
        let (entry, first) = {
            let mut entries = self.lock_entries();
            let k = key(&spec.service);
            if let Some(existing) = entries.get(&k) {
                let s = existing.state();
                if s.running() {
                    return Err(CanaryError::AlreadyExists {
                        service: s.spec.service.clone(),
                        origin: s.spec.source.clone(),
                        weight: s.weight,
                    });
                }
            }
            let entry = Arc::new(Entry::new(AnalysisState::start_from(spec.clone(), now_ms(), before)));
            if spec.source.starts_with("Canary/") {
                let json = spec_json(&entry.state());
                self.lock_documents().insert(spec.source.clone(), json);
            }
            tracing::info!(service = %spec.service, canary = %spec.canary, stable = %spec.stable, source = %spec.source, "canary analysis starting");
            // Under the entries' lock: nobody finds the entry before its task is set.
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.spawn(&entry, false, Some(tx));
            entries.insert(k, Arc::clone(&entry));
            (entry, rx)
        };
        // Sent once the first weight was dealt with; dropped unsent when the runner
        // stopped first (an abort, the control plane closing): the status says.
        if let Ok(Err(e)) = first.await {
            return Err(e);
        }
        let status = entry.state().to_pb();
        Ok(status)
    }

    /// Stops the running analysis of `service`: ABORTED with the weights left as they
    /// are, or, with `rollback`, once the canary's weight 0 was applied and the
    /// sidecars answered. A rollback or promotion already decided and not yet applied
    /// is applied first and the analysis ends as it is due (FAILED, SUCCEEDED).
    ///
    /// Runs as its own task (this call waits for it), so a caller going away mid-way
    /// never leaves the analysis stopped without its task.
    pub async fn abort(self: &Arc<Self>, service: &str, rollback: bool) -> Result<pb::CanaryStatus, CanaryError> {
        let entry = self.find(service).ok_or_else(|| CanaryError::NotFound { service: service.to_string() })?;
        let manager = Arc::clone(self);
        let task = tokio::spawn(async move {
            manager.abort_entry(&entry, rollback, "aborted by `serin ctl canary abort`", true).await
        });
        task.await.map_err(|e| CanaryError::Io {
            path: PathBuf::from(CANARY_STATE_FILE),
            source: std::io::Error::other(format!("the abort did not finish: {e}")),
        })?
    }

    /// Stops `entry`'s task, records the abort and, when a weight is left to apply
    /// (the abort's rollback, or a decision kept), runs it (and, with `wait`, waits
    /// until it is applied). When saving fails, the abort stands in memory and the
    /// error is returned; a weight left to apply waits until it can be saved.
    async fn abort_entry(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        rollback: bool,
        why: &str,
        wait: bool,
    ) -> Result<pb::CanaryStatus, CanaryError> {
        let _control = entry.control.lock().await;
        self.stop_task(entry).await;
        let to_apply = {
            let mut s = entry.state();
            if !s.running() {
                return Err(CanaryError::NotRunning { service: s.spec.service.clone(), phase: s.phase });
            }
            s.abort(now_ms(), rollback, why);
            s.applying.is_some()
        };
        let saved = self.save().await;
        if to_apply {
            self.spawn(entry, saved.is_ok(), None);
        } else {
            self.ended.send_modify(|n| *n += 1);
        }
        saved?;
        if to_apply && wait {
            self.join_task(entry).await;
        }
        let status = entry.state().to_pb();
        Ok(status)
    }

    /// Signals the entry's task to stop and waits until it has.
    async fn stop_task(&self, entry: &Entry) {
        let task = entry.task().take();
        if let Some(task) = task {
            task.stop.send_replace(true);
            let _ = task.handle.await;
        }
    }

    async fn join_task(&self, entry: &Entry) {
        let task = entry.task().take();
        if let Some(task) = task {
            let _ = task.handle.await;
        }
    }

    /// Starts the entry's runner. `intent_saved`: the state as it stands is already in
    /// the state folder (else the runner saves it before applying anything).
    fn spawn(self: &Arc<Self>, entry: &Arc<Entry>, intent_saved: bool, started: Option<runner::Started>) {
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(runner::run(Arc::clone(self), Arc::clone(entry), stop_rx, intent_saved, started));
        let previous = entry.task().replace(Task { stop, handle });
        debug_assert!(previous.as_ref().is_none_or(|t| t.handle.is_finished()), "two runners for one analysis");
    }

    /// Writes every analysis to the state folder (when the store has one).
    pub(crate) async fn save(&self) -> Result<(), CanaryError> {
        let Some(dir) = self.shared.store.state_dir().map(std::path::Path::to_path_buf) else {
            return Ok(());
        };
        let _guard = self.save_lock.lock().await;
        let entries: Vec<Arc<Entry>> = self.lock_entries().values().cloned().collect();
        let saved = persist::Saved {
            canaries: entries.iter().map(|e| e.state().clone()).collect(),
            documents: self.lock_documents().clone(),
        };
        tokio::task::spawn_blocking(move || persist::save(&dir, saved)).await.map_err(|e| CanaryError::Io {
            path: PathBuf::from(CANARY_STATE_FILE),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Loads the persisted analyses, resumes the running ones and starts following the
    /// config folder's Canary documents. Idempotent; needs a tokio runtime.
    pub fn start_all(self: &Arc<Self>) -> Result<(), CanaryError> {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        if *started {
            return Ok(());
        }
        let saved = match self.shared.store.state_dir() {
            Some(dir) => persist::load(dir)?,
            None => persist::Saved::default(),
        };
        *self.lock_documents() = saved.documents;
        let mut resumed = Vec::new();
        {
            let mut entries = self.lock_entries();
            for mut state in saved.canaries {
                if state.running() {
                    state.resumed(now_ms());
                }
                let running = state.running();
                let entry = Arc::new(Entry::new(state));
                let k = key(&entry.state().spec.service);
                entries.insert(k, Arc::clone(&entry));
                if running {
                    resumed.push(entry);
                }
            }
        }
        for entry in &resumed {
            self.spawn(entry, true, None);
        }
        *started = true;
        drop(started);
        let watcher = tokio::spawn(follow_documents(Arc::clone(self), !resumed.is_empty()));
        *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(watcher);
        Ok(())
    }

    /// Waits until every analysis task and the document watcher have ended (they end
    /// once the control plane closes, [`ControlPlane::close_streams`](super::ControlPlane::close_streams)),
    /// so no write of the state folder is in flight. What was recorded is resumed at
    /// the next start.
    pub async fn join(&self) {
        let watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(watcher) = watcher {
            let _ = watcher.await;
        }
        let entries: Vec<Arc<Entry>> = self.lock_entries().values().cloned().collect();
        for entry in entries {
            self.join_task(&entry).await;
        }
    }

    /// Starts the analyses of the store's Canary documents that are new or changed.
    async fn sync_documents(self: &Arc<Self>) {
        for spec in self.shared.store.canaries() {
            let json = spec_json_of(&spec);
            if self.lock_documents().get(&spec.source) == Some(&json) {
                continue;
            }
            if let Some(entry) = self.find(&spec.service) {
                let (running, source) = {
                    let s = entry.state();
                    (s.running(), s.spec.source.clone())
                };
                if running && source == spec.source {
                    let why = format!("{} changed: a new analysis starts", spec.source);
                    match self.abort_entry(&entry, false, &why, false).await {
                        Ok(_) | Err(CanaryError::NotRunning { .. }) => {}
                        Err(e) => tracing::error!(canary = %spec.source, error = %e, "saving the canary state failed"),
                    }
                    // A rollback or promotion already decided is applied first; the
                    // document starts once it has (`ended`).
                    if entry.state().running() {
                        continue;
                    }
                } else if running {
                    tracing::warn!(
                        canary = %spec.source,
                        service = %spec.service,
                        running = %source,
                        "Canary document not started yet: another analysis of the service is running"
                    );
                    continue;
                }
            }
            match self.start(spec.clone()).await {
                Ok(_) => {}
                Err(e) => tracing::error!(canary = %spec.source, error = %e, "Canary document not started"),
            }
        }
    }
}

fn spec_json(state: &AnalysisState) -> String {
    analysis::spec_to_json(&state.spec)
}

fn spec_json_of(spec: &pb::CanarySpec) -> String {
    analysis::spec_to_json(spec)
}

/// Follows the store's Canary documents (and ended analyses, after which a waiting
/// document may start) until the control plane closes.
async fn follow_documents(manager: Arc<CanaryManager>, save_first: bool) {
    if save_first && let Err(e) = manager.save().await {
        tracing::error!(error = %e, "saving the canary state failed");
    }
    let mut docs = manager.shared.store.subscribe_canaries();
    let mut ended = manager.ended.subscribe();
    let mut closing = manager.shared.closing.subscribe();
    loop {
        manager.sync_documents().await;
        tokio::select! {
            changed = docs.changed() => if changed.is_err() { return },
            changed = ended.changed() => if changed.is_err() { return },
            () = super::closed(&mut closing) => return,
        }
    }
}
