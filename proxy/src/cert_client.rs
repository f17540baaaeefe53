//! The sidecar's mesh identity from the control plane's CA (Istio's pilot-agent model).
//!
//! Without `--cert-dir` but with `--bootstrap-token-file`, the sidecar makes a P-256 key
//! and a CSR for `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, sends it
//! to the control plane (`Certificates.CreateCertificate`) with the token, and uses the
//! chain it gets back as its identity: for mTLS on the data path (through the
//! [`CertSource`] the data path reads, [`ControlPlaneCertSource`]) and as its client
//! certificate towards the control plane.
//!
//! Renewal: at half the certificate's remaining lifetime when it arrived (minus up to 5%
//! jitter, so that sidecars started together do not renew together), with a new key,
//! authenticated by the current certificate over TLS (the token is sent only when the
//! current certificate has expired, or over plaintext where a certificate cannot
//! authenticate). A failed renewal is retried with capped exponential backoff while the
//! current certificate keeps serving; the error shows in `/config_dump`.
//!
//! The returned chain must lead to the root given with `--ca-root` (also over plaintext,
//! where the answer itself is not authenticated), and those roots are the data path's
//! trust bundle; the file is read again at each renewal, so a root rotation reaches the
//! sidecar with the next certificate.
//!
//! [`transport`] builds the connection to the control plane for the discovery stream:
//! `https://` is TLS verified against `--ca-root` (or the `--cert-dir` identity's roots),
//! presenting the sidecar's current certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serin_certs::rustls::pki_types::CertificateDer;
use serin_certs::rustls::pki_types::pem::PemObject;
use serin_certs::rustls::sign::CertifiedKey;
use serin_certs::{
    BundleOptions, CertSource, DEFAULT_TRUST_DOMAIN, DEFAULT_WORKLOAD_LIFETIME, IdentityBundle, IdentityWatcher,
    SpiffeId, WorkloadIdentity, ca_trust_domain, generate_csr,
};
use serin_control_api::client::{CertificateClient, ClientError};
use serin_control_api::transport::{ClientCertFn, ClientTls, Transport};
use tokio::sync::watch;

use crate::state::Shared;
use crate::xds_client::ControlPlaneArgs;

/// The service account used when none is given.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// First delay before retrying a failed request for a certificate; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest delay between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Renewal never comes sooner than this after a certificate arrived.
const MIN_RENEW_DELAY: Duration = Duration::from_millis(500);

/// The options of `serin sidecar` for an identity from the control plane's CA (and TLS to
/// the control plane).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IdentityArgs {
    /// The mesh root certificate(s), PEM: verifies the control plane on `https://`, and the
    /// certificates its CA returns; gives the trust domain.
    #[arg(long = "ca-root", env = "SERIN_CA_ROOT", value_name = "FILE")]
    pub ca_root: Option<PathBuf>,
    /// A file holding a bootstrap token: without `--cert-dir`, the sidecar gets its
    /// certificate from the control plane's CA with it (and renews it there).
    #[arg(long = "bootstrap-token-file", env = "SERIN_BOOTSTRAP_TOKEN_FILE", value_name = "FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// This workload's service account, the `sa` of its SPIFFE ID (default `default`).
    #[arg(long = "service-account", env = "SERIN_SERVICE_ACCOUNT", value_name = "NAME")]
    pub service_account: Option<String>,
    /// The mesh's trust domain (default: the one the `--ca-root` certificate names, else
    /// cluster.local).
    #[arg(long = "trust-domain", env = "SERIN_TRUST_DOMAIN", value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
    /// Lifetime asked for the certificate (the control plane may cut it); default 24h.
    #[arg(long = "cert-ttl", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub cert_ttl: Option<Duration>,
}

impl IdentityArgs {
    fn any_set(&self) -> bool {
        self.ca_root.is_some()
            || self.bootstrap_token_file.is_some()
            || self.service_account.is_some()
            || self.trust_domain.is_some()
            || self.cert_ttl.is_some()
    }
}

/// Reads a PEM file of root certificates.
fn read_roots(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("--ca-root {}", path.display()))?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--ca-root {}: not PEM: {e}", path.display()))?;
    anyhow::ensure!(!roots.is_empty(), "--ca-root {}: no CERTIFICATE block found", path.display());
    Ok(roots)
}

/// Reads the bootstrap token (the file's content, trimmed).
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--bootstrap-token-file {}", path.display()))?;
    let token = text.trim().to_string();
    anyhow::ensure!(!token.is_empty(), "--bootstrap-token-file {}: the file is empty", path.display());
    anyhow::ensure!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "--bootstrap-token-file {}: the token must be one word of printable ASCII",
        path.display()
    );
    Ok(token)
}

/// The identity this sidecar asks for.
fn wanted_identity(args: &IdentityArgs, roots: &[CertificateDer<'_>], namespace: &str) -> anyhow::Result<SpiffeId> {
    let trust_domain = match &args.trust_domain {
        Some(td) => td.clone(),
        None => roots.iter().find_map(ca_trust_domain).unwrap_or_else(|| {
            tracing::warn!("the --ca-root certificate names no trust domain; using {DEFAULT_TRUST_DOMAIN}");
            DEFAULT_TRUST_DOMAIN.to_string()
        }),
    };
    let service_account = args.service_account.as_deref().map(str::trim).filter(|s| !s.is_empty());
    SpiffeId::new(&trust_domain, namespace, service_account.unwrap_or(DEFAULT_SERVICE_ACCOUNT))
        .context("the identity to ask the control plane for (--trust-domain, --namespace, --service-account)")
}

/// Checks that the identity options fit together.
pub fn check(cert_dir: Option<&Path>, args: &ControlPlaneArgs) -> anyhow::Result<()> {
    let identity = &args.identity;
    let Some(address) = args.address.as_deref() else {
        anyhow::ensure!(
            !identity.any_set(),
            "--ca-root, --bootstrap-token-file, --service-account, --trust-domain and --cert-ttl need \
             --control-plane ADDR"
        );
        return Ok(());
    };
    if identity.bootstrap_token_file.is_some() {
        if let Some(dir) = cert_dir {
            tracing::warn!(
                cert_dir = %dir.display(),
                "--bootstrap-token-file is unused: the identity comes from --cert-dir"
            );
        } else {
            anyhow::ensure!(
                identity.ca_root.is_some(),
                "--bootstrap-token-file needs --ca-root: the certificate the control plane returns is checked \
                 against it"
            );
        }
    }
    if address.starts_with("https://") {
        anyhow::ensure!(
            identity.ca_root.is_some() || cert_dir.is_some(),
            "--control-plane {address} is TLS: give --ca-root (the mesh root) to verify it"
        );
        anyhow::ensure!(
            cert_dir.is_some() || identity.bootstrap_token_file.is_some(),
            "--control-plane {address} needs credentials: --cert-dir (a mesh certificate) or \
             --bootstrap-token-file (to get one from its CA)"
        );
    }
    Ok(())
}

/// The sidecar's identity source: the `--cert-dir` files (watched), a certificate from
/// the control plane's CA (with a bootstrap token; renewed), or none.
pub async fn identity_source(
    cert_dir: Option<&Path>,
    args: &ControlPlaneArgs,
    namespace: &str,
) -> anyhow::Result<Option<Arc<dyn CertSource>>> {
    check(cert_dir, args)?;
    if let Some(dir) = cert_dir {
        let (watcher, _task) =
            IdentityWatcher::spawn(dir).map_err(|e| anyhow::anyhow!("workload identity in {}: {e}", dir.display()))?;
        let id = watcher.current().identity().spiffe_id().to_string();
        tracing::info!(identity = %id, dir = %dir.display(), "workload identity loaded");
        return Ok(Some(Arc::new(watcher)));
    }
    match (&args.address, &args.identity.bootstrap_token_file) {
        (Some(address), Some(_)) => {
            let node_id = crate::xds_client::node_id(args);
            let source = ControlPlaneCertSource::bootstrap(address, &args.identity, namespace, &node_id).await?;
            Ok(Some(source))
        }
        _ => Ok(None),
    }
}

/// The connection to the control plane for the discovery stream: plaintext for
/// `http://` (or a bare `host:port`); for `https://`, TLS verified against `--ca-root`
/// (else the roots of the sidecar's own identity), presenting the sidecar's current
/// certificate at each connect.
pub fn transport(address: &str, args: &IdentityArgs, shared: &Arc<Shared>) -> anyhow::Result<Transport> {
    if !address.starts_with("https://") {
        return Ok(Transport::new(address, None)?);
    }
    let roots = match &args.ca_root {
        Some(path) => read_roots(path)?,
        None => shared.mesh.bundle().map(|b| b.identity().roots().to_vec()).ok_or_else(|| {
            anyhow::anyhow!("--control-plane {address} is TLS: give --ca-root (the mesh root) to verify it")
        })?,
    };
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let current: ClientCertFn = Arc::new(move || {
        let bundle = weak.upgrade()?.mesh.bundle()?;
        valid_key(bundle.identity())
    });
    Ok(Transport::new(address, Some(ClientTls::new(&roots, Some(current))?))?)
}

/// The identity's key and chain, unless the certificate has expired (the control plane
/// refuses the whole handshake for an invalid client certificate; without one, a token
/// may still authenticate).
fn valid_key(identity: &WorkloadIdentity) -> Option<Arc<CertifiedKey>> {
    (!identity.is_expired_at(SystemTime::now())).then(|| identity.certified_key().clone())
}

/// When to renew a certificate that arrived at `received` and expires at `not_after`:
/// half-way, minus up to 5% of the remaining lifetime as jitter.
fn renewal_time(received: SystemTime, not_after: SystemTime) -> SystemTime {
    let remaining = not_after.duration_since(received).unwrap_or(Duration::ZERO);
    let ratio = 0.5 - rand::random_range(0.0..=0.05);
    received + remaining.mul_f64(ratio).max(MIN_RENEW_DELAY)
}

/// A delay between `d/2` and `d`.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}

/// What `/config_dump` shows of the renewals.
#[derive(Debug, Default)]
struct RenewStatus {
    next_renewal: Option<SystemTime>,
    last_error: Option<String>,
}

/// Everything needed to ask the control plane's CA for a certificate.
#[derive(Clone)]
struct Requester {
    address: String,
    spiffe_id: SpiffeId,
    ca_root: PathBuf,
    token: Option<String>,
    ttl: Duration,
    node_id: String,
}

/// How one request for a certificate failed.
#[derive(Debug)]
enum RequestError {
    /// The control plane refused (bad token, wrong identity, bad CSR): asking again the
    /// same way will not help.
    Refused(String),
    /// Anything else (unreachable, a bad answer): worth retrying.
    Failed(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Refused(e) | RequestError::Failed(e) => f.write_str(e),
        }
    }
}

impl Requester {
    /// One request: a new key and CSR, sent over TLS presenting `current` (when given and
    /// not expired) or with the token; the answer checked against `--ca-root`.
    async fn request(&self, current: Option<&WorkloadIdentity>) -> Result<IdentityBundle, RequestError> {
        let failed = |e: anyhow::Error| RequestError::Failed(format!("{e:#}"));
        let roots = read_roots(&self.ca_root).map_err(failed)?;
        let tls = self.address.starts_with("https://");
        let client_key = current.and_then(valid_key);
        let transport = if tls {
            let key = client_key.clone();
            let cert: ClientCertFn = Arc::new(move || key.clone());
            let tls = ClientTls::new(&roots, Some(cert)).map_err(|e| failed(e.into()))?;
            Transport::new(&self.address, Some(tls))
        } else {
            Transport::new(&self.address, None)
        }
        .map_err(|e| failed(e.into()))?;
        // Over TLS a valid certificate authenticates a renewal; the token is for first
        // contact, an expired certificate, and plaintext.
        let token = if tls && client_key.is_some() { None } else { self.token.clone() };
        if token.is_none() && client_key.is_none() {
            return Err(RequestError::Refused(
                "no credential left: the certificate has expired and there is no bootstrap token".into(),
            ));
        }
        let csr = tokio::task::spawn_blocking({
            let id = self.spiffe_id.clone();
            move || generate_csr(&id)
        })
        .await
        .map_err(|e| failed(e.into()))?
        .map_err(|e| failed(e.into()))?;
        let mut client = CertificateClient::connect(&transport).await.map_err(|e| failed(e.into()))?.with_token(token);
        let response = client.create_certificate(&csr.csr_pem, self.ttl, &self.node_id).await.map_err(|e| match e {
            ClientError::Rpc(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                ) =>
            {
                RequestError::Refused(format!(
                    "the control plane's CA refused: {} ({:?})",
                    status.message(),
                    status.code()
                ))
            }
            other => RequestError::Failed(other.to_string()),
        })?;
        let roots_pem: String = std::fs::read_to_string(&self.ca_root)
            .with_context(|| format!("--ca-root {}", self.ca_root.display()))
            .map_err(failed)?;
        let identity = WorkloadIdentity::from_pem(
            csr.key_pem.as_bytes(),
            response.cert_chain.concat().as_bytes(),
            roots_pem.as_bytes(),
        )
        .map_err(|e| RequestError::Failed(format!("the certificate the control plane returned is unusable: {e}")))?;
        if identity.spiffe_id() != &self.spiffe_id {
            return Err(RequestError::Failed(format!(
                "the control plane returned a certificate for {}, not {}",
                identity.spiffe_id(),
                self.spiffe_id
            )));
        }
        IdentityBundle::new(identity, &BundleOptions::default()).map_err(|e| failed(e.into()))
    }
}

/// The [`CertSource`] of a sidecar whose certificate comes from the control plane's CA:
/// the current bundle, swapped at each renewal; a renewal task runs while it (or a
/// receiver of it) lives.
#[derive(Debug)]
pub struct ControlPlaneCertSource {
    rx: watch::Receiver<Arc<IdentityBundle>>,
    status: Arc<Mutex<RenewStatus>>,
    origin: String,
}

fn lock(status: &Mutex<RenewStatus>) -> std::sync::MutexGuard<'_, RenewStatus> {
    // Writers replace whole fields, so a poisoned lock still holds usable data.
    status.lock().unwrap_or_else(|e| e.into_inner())
}

impl ControlPlaneCertSource {
    /// Gets a first certificate from the control plane at `address` with the bootstrap
    /// token, then starts renewing it. While the control plane cannot be reached it tries
    /// again (backoff doubling from 1 s to 30 s, with jitter); a refusal (unknown token,
    /// identity not allowed) is an error at once. Must be called inside a tokio runtime.
    pub async fn bootstrap(
        address: &str,
        args: &IdentityArgs,
        namespace: &str,
        node_id: &str,
    ) -> anyhow::Result<Arc<ControlPlaneCertSource>> {
        let ca_root = args.ca_root.clone().context("--bootstrap-token-file needs --ca-root")?;
        let token_file = args.bootstrap_token_file.as_deref().context("no --bootstrap-token-file")?;
        let token = read_token(token_file)?;
        let roots = read_roots(&ca_root)?;
        let spiffe_id = wanted_identity(args, &roots, namespace)?;
        let requester = Requester {
            address: address.to_string(),
            spiffe_id: spiffe_id.clone(),
            ca_root,
            token: Some(token),
            ttl: args.cert_ttl.unwrap_or(DEFAULT_WORKLOAD_LIFETIME),
            node_id: node_id.to_string(),
        };
        tracing::info!(control_plane = %address, identity = %spiffe_id, "asking the control plane's CA for a certificate");
        let mut delay = FIRST_RETRY;
        let bundle = loop {
            match requester.request(None).await {
                Ok(bundle) => break bundle,
                Err(RequestError::Refused(e)) => {
                    anyhow::bail!("getting a certificate for {spiffe_id} from {address}: {e}")
                }
                Err(RequestError::Failed(error)) => {
                    let wait = jitter(delay);
                    tracing::warn!(control_plane = %address, %error, retry_in = ?wait, "getting a certificate failed; retrying");
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
        };
        let identity = bundle.identity().clone();
        tracing::info!(
            identity = %identity.spiffe_id(),
            serial = identity.serial(),
            not_after = %humantime::format_rfc3339_seconds(identity.not_after()),
            control_plane = %address,
            "workload certificate issued by the control plane"
        );
        let (tx, rx) = watch::channel(Arc::new(bundle));
        let status = Arc::new(Mutex::new(RenewStatus::default()));
        let first_renewal = renewal_time(SystemTime::now(), identity.not_after());
        lock(&status).next_renewal = Some(first_renewal);
        tokio::spawn(renew(requester, tx, Arc::clone(&status), first_renewal));
        Ok(Arc::new(ControlPlaneCertSource { rx, status, origin: format!("control-plane:{address}") }))
    }
}

impl CertSource for ControlPlaneCertSource {
    fn current(&self) -> Arc<IdentityBundle> {
        self.rx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<IdentityBundle>> {
        self.rx.clone()
    }

    fn last_error(&self) -> Option<String> {
        lock(&self.status).last_error.clone()
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn next_renewal(&self) -> Option<SystemTime> {
        lock(&self.status).next_renewal
    }
}

/// Renews the certificate at `next`, then at half of each new one's lifetime; retries
/// with backoff while the current certificate keeps serving. Ends when nothing reads the
/// source any more.
async fn renew(
    requester: Requester,
    tx: watch::Sender<Arc<IdentityBundle>>,
    status: Arc<Mutex<RenewStatus>>,
    mut next: SystemTime,
) {
    let mut delay = FIRST_RETRY;
    loop {
        let wait = next.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = tx.closed() => return,
        }
        let current = tx.borrow().identity().clone();
        match requester.request(Some(&current)).await {
            Ok(bundle) => {
                let identity = bundle.identity().clone();
                tx.send_replace(Arc::new(bundle));
                next = renewal_time(SystemTime::now(), identity.not_after());
                delay = FIRST_RETRY;
                let mut s = lock(&status);
                s.last_error = None;
                s.next_renewal = Some(next);
                drop(s);
                tracing::info!(
                    identity = %identity.spiffe_id(),
                    serial = identity.serial(),
                    not_after = %humantime::format_rfc3339_seconds(identity.not_after()),
                    next_renewal = %humantime::format_rfc3339_seconds(next),
                    "workload certificate renewed"
                );
            }
            Err(error) => {
                let wait = jitter(delay);
                delay = (delay * 2).min(MAX_RETRY);
                next = SystemTime::now() + wait;
                let expired = current.is_expired_at(SystemTime::now());
                let text = format!("renewing the certificate failed: {error}");
                if expired {
                    tracing::error!(error = %text, retry_in = ?wait, "the workload certificate has expired");
                } else {
                    tracing::warn!(
                        error = %text,
                        retry_in = ?wait,
                        not_after = %humantime::format_rfc3339_seconds(current.not_after()),
                        "keeping the current certificate"
                    );
                }
                let mut s = lock(&status);
                s.last_error = Some(text);
                s.next_renewal = Some(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        cp: ControlPlaneArgs,
    }

    fn parse(args: &[&str]) -> ControlPlaneArgs {
        let argv = std::iter::once("serin").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.cp).expect("arguments parse")
    }

    #[test]
    fn renewal_is_about_half_way() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for _ in 0..50 {
            let at = renewal_time(now, now + Duration::from_secs(1000));
            assert!(at >= now + Duration::from_secs(450) && at <= now + Duration::from_secs(500), "{at:?}");
        }
        assert_eq!(renewal_time(now, now - Duration::from_secs(5)), now + MIN_RENEW_DELAY);
    }

    #[test]
    fn options_must_fit_together() {
        let err = check(None, &parse(&["--ca-root", "r.pem"])).expect_err("no control plane").to_string();
        assert!(err.contains("need --control-plane"), "{err}");
        let err = check(None, &parse(&["--control-plane", "https://cp:15012", "--bootstrap-token-file", "t"]))
            .expect_err("no root")
            .to_string();
        assert!(err.contains("--ca-root"), "{err}");
        let err = check(None, &parse(&["--control-plane", "https://cp:15012", "--ca-root", "r.pem"]))
            .expect_err("no credentials")
            .to_string();
        assert!(err.contains("--cert-dir") && err.contains("--bootstrap-token-file"), "{err}");
        let ok = parse(&["--control-plane", "https://cp:15012", "--ca-root", "r", "--bootstrap-token-file", "t"]);
        assert!(check(None, &ok).is_ok());
        assert!(check(Some(Path::new("/certs")), &parse(&["--control-plane", "https://cp:15012"])).is_ok());
        assert!(check(None, &parse(&["--control-plane", "cp:15010"])).is_ok());
        let args = parse(&["--control-plane", "cp:15010", "--service-account", "payment", "--cert-ttl", "1h"]);
        assert_eq!(args.identity.service_account.as_deref(), Some("payment"));
        assert_eq!(args.identity.cert_ttl, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn the_identity_comes_from_the_root_the_namespace_and_the_service_account() {
        let ca = serin_certs::Ca::generate("example.org").expect("ca");
        let mut args = IdentityArgs::default();
        let id = wanted_identity(&args, ca.roots(), "shop").expect("id");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/shop/sa/default");
        args.service_account = Some("payment".into());
        args.trust_domain = Some("cluster.local".into());
        let id = wanted_identity(&args, ca.roots(), "shop").expect("id");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/payment");
        args.service_account = Some("bad name".into());
        assert!(wanted_identity(&args, ca.roots(), "shop").is_err());
    }

    #[test]
    fn tokens_are_one_printable_word() {
        let dir = std::env::temp_dir().join(format!("serin-cert-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        std::fs::write(&path, "  abc123 \n").expect("write");
        assert_eq!(read_token(&path).expect("token"), "abc123");
        std::fs::write(&path, "\n").expect("write");
        assert!(read_token(&path).is_err());
        std::fs::write(&path, "two words").expect("write");
        assert!(read_token(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
