//! The sidecar's mesh identity as the data path uses it: which upstream
//! connections are mutual TLS (DestinationRule `ISTIO_MUTUAL`, or Istio's auto-mTLS
//! when the endpoint carries `security.istio.io/tlsMode: istio`), with which client
//! config, and which server identities are acceptable.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use serin_certs::{ALPN_HTTP11, CertSource, IdentityBundle, SpiffeId, client_config};

use crate::snapshot::{Cluster, ConnectionPool, Endpoint, TlsMode};
use crate::upstream::pool::{PoolError, UpstreamProtocol, UpstreamTls};

/// The endpoint label Istio's injector sets on workloads that have a sidecar.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// The workload certificate source, once `--cert-dir` gave one.
#[derive(Default)]
pub struct MeshIdentity {
    source: OnceLock<Arc<dyn CertSource>>,
    /// An HTTP/1.1-only client config (ALPN `http/1.1`), built per bundle. The bundle
    /// itself is kept (not its address): a freed bundle's address can be reused by
    /// the next one, which would then get the old certificate's config.
    http1: ArcSwapOption<(Arc<IdentityBundle>, Arc<rustls::ClientConfig>)>,
}

impl std::fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshIdentity").field("configured", &self.source.get().is_some()).finish()
    }
}

impl MeshIdentity {
    /// Installs the certificate source (once, at startup).
    pub fn set_source(&self, source: Arc<dyn CertSource>) {
        let _ = self.source.set(source);
    }

    /// The current bundle, if this proxy has an identity.
    pub fn bundle(&self) -> Option<Arc<IdentityBundle>> {
        self.source.get().map(|s| s.current())
    }

    /// This proxy's SPIFFE ID, if it has one.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        self.bundle().map(|b| b.identity().spiffe_id().clone())
    }

    /// The last failed certificate refresh, if any.
    pub fn last_error(&self) -> Option<String> {
        self.source.get().and_then(|s| s.last_error())
    }

    /// Where the certificates come from (`files:<dir>`, `control-plane:<address>`).
    pub fn origin(&self) -> Option<String> {
        self.source.get().map(|s| s.origin())
    }

    /// When the source next renews the certificate by itself, if it does.
    pub fn next_renewal(&self) -> Option<std::time::SystemTime> {
        self.source.get().and_then(|s| s.next_renewal())
    }

    /// How to reach `endpoint` of `cluster`: the protocol, and the mutual-TLS
    /// settings or `None` for plaintext. A plaintext hop speaks `plain` (the
    /// destination port's protocol); a mutual-TLS hop speaks [`mesh_protocol`]'s
    /// choice, and its client offers ALPN `h2` first, or only `http/1.1` for an
    /// HTTP/1.1 hop. `upgrade`: the request is an HTTP/1.1 upgrade (WebSocket);
    /// `in_flight`: the sidecar's requests in flight (for the adaptive hop).
    pub fn upstream_hop(
        &self,
        cluster: &Cluster,
        endpoint: &Arc<Endpoint>,
        plain: UpstreamProtocol,
        upgrade: bool,
        in_flight: usize,
    ) -> Result<(UpstreamProtocol, Option<UpstreamTls>), PoolError> {
        if !wants_mtls(cluster, endpoint) {
            return Ok((plain, None));
        }
        let protocol = mesh_protocol(&cluster.policy.pool, plain, upgrade, is_quiet(in_flight));
        let bundle = self.bundle().ok_or(PoolError::NoIdentity { addr: endpoint.addr })?;
        let config = match protocol {
            UpstreamProtocol::Http1 => self.http1_config(&bundle)?,
            UpstreamProtocol::Http2 => bundle.client_config().clone(),
        };
        // The acceptable identities are worked out when a connection is opened,
        // not for every request that rides a pooled one.
        Ok((protocol, Some(UpstreamTls { config, expected: ExpectedPeer { bundle, endpoint: endpoint.clone() } })))
    }

    fn http1_config(&self, bundle: &Arc<IdentityBundle>) -> Result<Arc<rustls::ClientConfig>, PoolError> {
        if let Some(cached) = self.http1.load().as_ref()
            && Arc::ptr_eq(&cached.0, bundle)
        {
            return Ok(cached.1.clone());
        }
        let config = client_config(bundle.identity(), &[ALPN_HTTP11]).map_err(|e| PoolError::Tls {
            addr: ([0, 0, 0, 0], 0).into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.http1.store(Some(Arc::new((bundle.clone(), config.clone()))));
        Ok(config)
    }
}

/// The identities an upstream sidecar may present: the endpoint's
/// `serviceAccount` in its namespace, in this proxy's trust domain (Istio's
/// client-side SAN check); none listed accepts any identity of the mesh CA.
#[derive(Clone)]
pub struct ExpectedPeer {
    bundle: Arc<IdentityBundle>,
    endpoint: Arc<Endpoint>,
}

impl std::fmt::Debug for ExpectedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

impl ExpectedPeer {
    /// Acceptable SPIFFE IDs; empty accepts any identity of the mesh CA.
    pub fn ids(&self) -> Vec<SpiffeId> {
        let trust_domain = self.bundle.identity().spiffe_id().trust_domain();
        self.endpoint
            .service_account
            .as_deref()
            .and_then(|sa| SpiffeId::new(trust_domain, &self.endpoint.namespace, sa).ok())
            .into_iter()
            .collect()
    }
}

/// Whether connections to `endpoint` are mutual TLS: the DestinationRule's
/// `tls.mode: ISTIO_MUTUAL`, or with no `tls` block, Istio's auto-mTLS (the
/// endpoint has a sidecar). `DISABLE`, `SIMPLE` and `MUTUAL` (TLS origination with
/// your own certificates, not supported yet) stay plaintext.
pub fn wants_mtls(cluster: &Cluster, endpoint: &Endpoint) -> bool {
    match cluster.policy.tls {
        Some(TlsMode::IstioMutual) => true,
        Some(_) => false,
        None => endpoint.label(TLS_MODE_LABEL) == Some("istio"),
    }
}

/// Requests in flight in a sidecar up to which its adaptive mesh hop speaks
/// HTTP/1.1 ([`mesh_protocol`]). Above one, so that the hop does not flap between
/// the protocols at low rates (the rarely used one's code would run cold); low
/// enough that under load every destination, however small its share, rides the
/// batched HTTP/2 connection.
pub const QUIET_REQUESTS: usize = 4;

/// Whether a sidecar with `in_flight` requests (the caller's own included) is quiet
/// enough for the HTTP/1.1 mesh hop.
pub fn is_quiet(in_flight: usize) -> bool {
    in_flight <= QUIET_REQUESTS
}

/// The protocol of a mutual-TLS hop between sidecars.
///
/// - `h2UpgradePolicy: DO_NOT_UPGRADE`, `useClientProtocol`, or an upgrade request
///   (WebSocket): `plain`, the protocol the destination port calls for.
/// - `UPGRADE`, or a request that is HTTP/2 anyway (`plain`): HTTP/2.
/// - Unset or `DEFAULT` (serin's mesh default), for an HTTP/1.1 request: adaptive.
///   HTTP/1.1 while the sidecar is `quiet` ([`is_quiet`]: a few requests in
///   flight): one request per connection at a time costs less CPU and latency
///   without HTTP/2's framing, HPACK and stream task at both ends. HTTP/2 once the
///   sidecar is busier: the requests share one multiplexed connection per
///   destination, whose frames are written and read in batches (fewer system calls,
///   wake-ups and TLS sessions under load).
pub fn mesh_protocol(pool: &ConnectionPool, plain: UpstreamProtocol, upgrade: bool, quiet: bool) -> UpstreamProtocol {
    if upgrade || pool.use_client_protocol || pool.h2_upgrade == Some(false) {
        return plain;
    }
    if pool.h2_upgrade.is_none() && plain == UpstreamProtocol::Http1 && quiet {
        return UpstreamProtocol::Http1;
    }
    UpstreamProtocol::Http2
}

#[cfg(test)]
mod tests {
    use super::{UpstreamProtocol::*, is_quiet, mesh_protocol};
    use crate::snapshot::ConnectionPool;

    fn pool(h2_upgrade: Option<bool>, use_client_protocol: bool) -> ConnectionPool {
        ConnectionPool { h2_upgrade, use_client_protocol, ..ConnectionPool::default() }
    }

    #[test]
    fn the_default_hop_adapts_to_the_sidecars_load() {
        let default = pool(None, false);
        assert_eq!(mesh_protocol(&default, Http1, false, is_quiet(1)), Http1);
        assert_eq!(mesh_protocol(&default, Http1, false, is_quiet(4)), Http1);
        assert_eq!(mesh_protocol(&default, Http1, false, is_quiet(5)), Http2);
        assert_eq!(mesh_protocol(&default, Http2, false, true), Http2, "HTTP/2 requests stay HTTP/2");
        assert_eq!(mesh_protocol(&default, Http1, true, false), Http1, "upgrades go as HTTP/1.1");
    }

    #[test]
    fn the_rule_fixes_the_hop() {
        for quiet in [true, false] {
            assert_eq!(mesh_protocol(&pool(Some(true), false), Http1, false, quiet), Http2, "UPGRADE");
            assert_eq!(mesh_protocol(&pool(Some(false), false), Http1, false, quiet), Http1, "DO_NOT_UPGRADE");
            assert_eq!(mesh_protocol(&pool(Some(true), true), Http1, false, quiet), Http1, "useClientProtocol");
            assert_eq!(mesh_protocol(&pool(Some(true), true), Http2, false, quiet), Http2, "useClientProtocol");
        }
    }
}
