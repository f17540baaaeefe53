//! Where a sidecar's certificates come from, and their rotation.
//!
//! A [`CertSource`] hands out the current [`IdentityBundle`] (identity + ready rustls configs)
//! and a `watch` channel of new ones. [`IdentityWatcher`] is the file-based source: it polls
//! the identity directory and publishes a new bundle when the files change and validate. A
//! control-plane client (CSR over gRPC, in the `serin` crate) is another `CertSource`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::CertError;
use crate::files;
use crate::tls::{ClientAuth, MESH_ALPN, client_config, server_config};
use crate::workload::{WorkloadIdentity, WorkloadPaths};

/// How the rustls configs of a bundle are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleOptions {
    /// Client-certificate policy of the inbound server config.
    pub client_auth: ClientAuth,
    /// ALPN protocols the server accepts, in order of preference.
    pub server_alpn: Vec<Vec<u8>>,
    /// ALPN protocols the client offers.
    pub client_alpn: Vec<Vec<u8>>,
}

impl Default for BundleOptions {
    /// Client certificates required; `h2` and `http/1.1` both ways.
    fn default() -> Self {
        let alpn: Vec<Vec<u8>> = MESH_ALPN.iter().map(|p| p.to_vec()).collect();
        BundleOptions { client_auth: ClientAuth::Required, server_alpn: alpn.clone(), client_alpn: alpn }
    }
}

/// A workload identity with the rustls configs built from it. Immutable: rotation publishes
/// a new bundle, so connections keep the config they were made with.
#[derive(Debug, Clone)]
pub struct IdentityBundle {
    identity: Arc<WorkloadIdentity>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl IdentityBundle {
    /// Builds the server and client configs for `identity`.
    pub fn new(identity: WorkloadIdentity, options: &BundleOptions) -> Result<Self, CertError> {
        let server_alpn: Vec<&[u8]> = options.server_alpn.iter().map(Vec::as_slice).collect();
        let client_alpn: Vec<&[u8]> = options.client_alpn.iter().map(Vec::as_slice).collect();
        let server = server_config(&identity, options.client_auth, &server_alpn)?;
        let client = client_config(&identity, &client_alpn)?;
        Ok(IdentityBundle { identity: Arc::new(identity), server, client })
    }

    /// The identity.
    pub fn identity(&self) -> &Arc<WorkloadIdentity> {
        &self.identity
    }

    /// The inbound (server) config.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.server
    }

    /// The outbound (client) config.
    pub fn client_config(&self) -> &Arc<ClientConfig> {
        &self.client
    }
}

/// A source of the sidecar's certificates: the one interface the data plane uses, whether the
/// certificates come from files ([`IdentityWatcher`]), a fixed bundle ([`StaticCertSource`])
/// or, later, the control plane's CA.
pub trait CertSource: Send + Sync {
    /// The bundle to use for a new connection now.
    fn current(&self) -> Arc<IdentityBundle>;

    /// A receiver that sees every new bundle (its first value is the current one).
    fn subscribe(&self) -> watch::Receiver<Arc<IdentityBundle>>;

    /// The last failed refresh, if the current bundle is older than a failed attempt.
    fn last_error(&self) -> Option<String> {
        None
    }

    /// Where the certificates come from, for people (`/config_dump`): `files:<dir>`,
    /// `control-plane:<address>`, `static`.
    fn origin(&self) -> String {
        "static".to_string()
    }

    /// When the source will next try to replace the current certificate, if it renews on
    /// its own (a CSR client); `None` for sources that wait for someone else (files).
    fn next_renewal(&self) -> Option<SystemTime> {
        None
    }
}

/// A [`CertSource`] that never changes (tests, one-off tools).
#[derive(Debug)]
pub struct StaticCertSource {
    tx: watch::Sender<Arc<IdentityBundle>>,
}

impl StaticCertSource {
    /// A source always returning `bundle`.
    pub fn new(bundle: IdentityBundle) -> Self {
        StaticCertSource { tx: watch::Sender::new(Arc::new(bundle)) }
    }
}

impl CertSource for StaticCertSource {
    fn current(&self) -> Arc<IdentityBundle> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<IdentityBundle>> {
        self.tx.subscribe()
    }
}

/// Settings of an [`IdentityWatcher`].
#[derive(Debug, Clone)]
pub struct WatcherOptions {
    /// How often the directory is read. Default 500 ms.
    pub poll_interval: Duration,
    /// How bundles are built.
    pub bundle: BundleOptions,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions { poll_interval: Duration::from_millis(500), bundle: BundleOptions::default() }
    }
}

/// What an [`IdentityWatcher`] reports about itself (for `/config_dump` and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatcherStatus {
    /// Bundles published after the first one.
    pub reloads: u64,
    /// The last failed reload, kept until the next successful one.
    pub last_error: Option<String>,
}

/// The file-based [`CertSource`]: watches a workload identity directory (`key.pem`,
/// `cert-chain.pem`, `root-cert.pem`) and publishes a new [`IdentityBundle`] when the files
/// change and load.
///
/// The directory is read every [`WatcherOptions::poll_interval`] and compared by content
/// (which also follows Kubernetes' symlink-swapped secret volumes). A change that does not
/// load keeps the current identity: the error is logged (`tracing` warn) and kept in
/// [`IdentityWatcher::last_error`]. Because the three files are replaced one after another, a
/// failing set is reported only when it stays the same for a second poll; a set in the middle
/// of being written is retried silently. The watcher never panics on file contents.
///
/// Clones share the same task and state. The task ends when every clone and every receiver
/// from [`CertSource::subscribe`] is dropped, or when its `JoinHandle` is aborted.
#[derive(Debug, Clone)]
pub struct IdentityWatcher {
    dir: PathBuf,
    rx: watch::Receiver<Arc<IdentityBundle>>,
    status: Arc<Mutex<WatcherStatus>>,
}

/// The contents of the three files (or the error reading them), with its hash.
struct Snapshot {
    fingerprint: u64,
    contents: Result<[Vec<u8>; 3], String>,
}

fn read_snapshot(paths: &WorkloadPaths) -> Snapshot {
    let contents = (|| {
        Ok::<_, CertError>([
            files::read_file(&paths.key)?,
            files::read_file(&paths.cert_chain)?,
            files::read_file(&paths.root_cert)?,
        ])
    })()
    .map_err(|e| e.to_string());
    let mut hasher = DefaultHasher::new();
    contents.hash(&mut hasher);
    Snapshot { fingerprint: hasher.finish(), contents }
}

fn build(dir: &Path, options: &BundleOptions) -> Result<IdentityBundle, CertError> {
    IdentityBundle::new(WorkloadIdentity::load(dir)?, options)
}

impl IdentityWatcher {
    /// Loads the identity in `dir` (an error here is a startup error naming the file) and
    /// starts watching it with default options. Must be called inside a Tokio runtime.
    pub fn spawn(dir: &Path) -> Result<(IdentityWatcher, JoinHandle<()>), CertError> {
        Self::spawn_with(dir, WatcherOptions::default())
    }

    /// As [`IdentityWatcher::spawn`], with options.
    pub fn spawn_with(dir: &Path, options: WatcherOptions) -> Result<(IdentityWatcher, JoinHandle<()>), CertError> {
        let paths = WorkloadPaths::new(dir);
        let first = read_snapshot(&paths);
        let bundle = build(dir, &options.bundle)?;
        let (tx, rx) = watch::channel(Arc::new(bundle));
        let status = Arc::new(Mutex::new(WatcherStatus::default()));
        let watcher = IdentityWatcher { dir: dir.to_path_buf(), rx, status: status.clone() };
        let task = tokio::spawn(run(dir.to_path_buf(), options, tx, status, first.fingerprint));
        Ok((watcher, task))
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last failed reload, if no successful one came after it.
    pub fn last_error(&self) -> Option<String> {
        self.status().last_error
    }

    /// Reload counters and the last error.
    pub fn status(&self) -> WatcherStatus {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl CertSource for IdentityWatcher {
    fn current(&self) -> Arc<IdentityBundle> {
        self.rx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<IdentityBundle>> {
        self.rx.clone()
    }

    fn last_error(&self) -> Option<String> {
        IdentityWatcher::last_error(self)
    }

    fn origin(&self) -> String {
        format!("files:{}", self.dir.display())
    }
}

async fn run(
    dir: PathBuf,
    options: WatcherOptions,
    tx: watch::Sender<Arc<IdentityBundle>>,
    status: Arc<Mutex<WatcherStatus>>,
    mut applied: u64,
) {
    let paths = WorkloadPaths::new(&dir);
    let set_error = |error: Option<String>| {
        let mut status = status.lock().unwrap_or_else(PoisonError::into_inner);
        status.last_error = error;
    };
    // A fingerprint that failed once (maybe mid-write) and one that was reported as failing.
    let mut failed_once: Option<u64> = None;
    let mut reported: Option<u64> = None;
    let mut expiry_reported = false;
    let mut ticker = tokio::time::interval(options.poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tx.closed() => return,
        }
        let poll_paths = paths.clone();
        let poll_dir = dir.clone();
        let bundle_options = options.bundle.clone();
        let known = (applied, reported);
        // File reads and parsing happen off the async worker threads.
        let outcome = tokio::task::spawn_blocking(move || {
            let snapshot = read_snapshot(&poll_paths);
            if snapshot.fingerprint == known.0 || Some(snapshot.fingerprint) == known.1 {
                return (snapshot.fingerprint, None);
            }
            let result = match snapshot.contents {
                Ok(_) => build(&poll_dir, &bundle_options).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            (snapshot.fingerprint, Some(result))
        })
        .await;
        let (fingerprint, result) = match outcome {
            Ok((fingerprint, Some(result))) => (fingerprint, result),
            Ok((fingerprint, None)) => {
                if fingerprint == applied && reported.take().is_some() {
                    // The files went back to the set in use: nothing is wrong any more.
                    failed_once = None;
                    set_error(None);
                }
                check_expiry(&tx, &dir, &mut expiry_reported, &set_error);
                continue;
            }
            Err(join_error) => {
                tracing::error!(dir = %dir.display(), error = %join_error, "certificate reload task failed");
                continue;
            }
        };
        match result {
            Ok(bundle) => {
                let identity = bundle.identity().clone();
                tx.send_replace(Arc::new(bundle));
                applied = fingerprint;
                failed_once = None;
                reported = None;
                expiry_reported = false;
                {
                    let mut status = status.lock().unwrap_or_else(PoisonError::into_inner);
                    status.reloads += 1;
                    status.last_error = None;
                }
                tracing::info!(
                    dir = %dir.display(),
                    spiffe_id = %identity.spiffe_id(),
                    serial = identity.serial(),
                    not_after = %files::rfc3339(identity.not_after()),
                    "workload certificate reloaded"
                );
            }
            Err(error) if failed_once == Some(fingerprint) => {
                reported = Some(fingerprint);
                tracing::warn!(
                    dir = %dir.display(),
                    %error,
                    "workload certificate reload failed; keeping the current certificate"
                );
                set_error(Some(error));
            }
            Err(_) => failed_once = Some(fingerprint),
        }
    }
}

/// Reports once when the current certificate expires with no valid replacement on disk.
fn check_expiry(
    tx: &watch::Sender<Arc<IdentityBundle>>,
    dir: &Path,
    reported: &mut bool,
    set_error: &impl Fn(Option<String>),
) {
    if *reported {
        return;
    }
    let not_after = tx.borrow().identity().not_after();
    if SystemTime::now() > not_after {
        *reported = true;
        let error = format!(
            "{}: the current certificate expired at {} and no valid replacement was found",
            dir.display(),
            files::rfc3339(not_after)
        );
        tracing::error!(%error, "workload certificate expired");
        set_error(Some(error));
    }
}
