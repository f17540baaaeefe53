//! Traffic mirroring (`mirror` + `mirrorPercentage`): a copy of the request goes to
//! the mirror cluster with `-shadow` appended to its host; the response is
//! read and dropped, and never delays the real request.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::snapshot::Mirror;
use crate::state::Shared;
use crate::upstream::balance;

use super::call::{RequestBody, UpstreamHead};

/// Sends a shadow copy of the request, if the mirror percentage draws it.
pub fn maybe_send(shared: &Arc<Shared>, mirror: &Mirror, head: &UpstreamHead, body: Bytes) {
    if !super::hit(mirror.percentage) {
        return;
    }
    let Some(endpoint) = balance::pick(&mirror.cluster, None, None) else { return };
    let (host, port) = super::split_host_port(&head.authority, 0);
    let authority = if port == 0 { format!("{host}-shadow") } else { format!("{host}-shadow:{port}") };
    let head = UpstreamHead {
        method: head.method.clone(),
        path: head.path.clone(),
        authority: authority.into(),
        headers: head.headers.clone(),
        protocol: head.protocol,
    };
    let cluster = mirror.cluster.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let mesh = &shared.mesh;
        let (protocol, tls) =
            match mesh.upstream_hop(&cluster, &endpoint, head.protocol, false, shared.drain.in_flight()) {
                Ok(hop) => hop,
                Err(e) => {
                    tracing::debug!(cluster = %cluster.name, error = %e, "mirror: no mutual TLS possible");
                    return;
                }
            };
        let conn = match endpoint.state.pool.checkout(protocol, &cluster.policy.pool, tls.as_ref()).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(cluster = %cluster.name, error = %e, "mirror connect failed");
                return;
            }
        };
        let mut body = RequestBody::Buffered(body);
        let req = super::call::build_request(&head, protocol, &mut body, &endpoint.addr);
        match conn.send(req).await {
            Ok(resp) => {
                let _ = resp.into_body().collect().await;
            }
            Err(e) => tracing::debug!(cluster = %cluster.name, error = %e, "mirror request failed"),
        }
    });
}
