//! Gateway servers: protocol, TLS mode and certificate files, hosts, and the
//! conflicts between servers sharing a port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{FieldOrigin, GatewayOptions, ServerCredentials};
use crate::config::error::Sink;
use crate::config::model::{self, ServerTlsMode, TlsProtocol};
use crate::config::validate::{Origin, fields};
use crate::gateway::hosts::ServerHost;

/// A Gateway resource to serve.
pub(super) struct GatewayRes<'a> {
    pub(super) file: &'a str,
    pub(super) display: String,
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    pub(super) spec: &'a model::Gateway,
}

impl GatewayRes<'_> {
    fn origin(&self, field: &str) -> FieldOrigin {
        FieldOrigin { file: self.file.to_string(), resource: self.display.clone(), field: field.to_string() }
    }
}

/// A VirtualService of the configuration.
pub(super) struct VsRes<'a> {
    pub(super) origin: Origin,
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    pub(super) spec: &'a model::VirtualService,
}

/// A parsed server.
pub(super) struct ServerSpec {
    /// Index into the gateways list.
    pub(super) gateway: usize,
    /// `spec.servers[i]`.
    pub(super) path: String,
    pub(super) port: u16,
    pub(super) kind: ServerKind,
    pub(super) hosts: Vec<ServerHost>,
    /// Route configuration / filter chain name.
    pub(super) name: String,
}

pub(super) enum ServerKind {
    Http { https_redirect: bool },
    Terminate(ServerCredentials),
    Passthrough,
}

impl ServerKind {
    pub(super) fn is_tls(&self) -> bool {
        !matches!(self, ServerKind::Http { .. })
    }
}

/// Whether a Gateway's `selector` is satisfied by `labels` (`None`: serve all).
pub(super) fn selected(spec: &model::Gateway, labels: Option<&BTreeMap<String, String>>) -> bool {
    labels.is_none_or(|labels| spec.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Resolves a file named in a Gateway: relative paths are taken from the folder of
/// the file the Gateway came from.
fn resolve_file(gateway_file: &str, named: &str) -> PathBuf {
    let path = Path::new(named);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    Path::new(gateway_file).parent().map_or_else(|| path.to_path_buf(), |dir| dir.join(path))
}

/// Parses one server; errors go to `sink`.
pub(super) fn parse_server(
    gw: &GatewayRes<'_>,
    gateway: usize,
    i: usize,
    server: &model::Server,
    options: &GatewayOptions,
    sink: &mut Sink<'_>,
) -> Option<ServerSpec> {
    let path = format!("spec.servers[{i}]");
    sink.unsupported(server.bind.is_some(), &format!("{path}.bind"), "serin listens on --bind-address / --listen");
    sink.unsupported(server.default_endpoint.is_some(), &format!("{path}.defaultEndpoint"), "");
    sink.unsupported(server.port.target_port.is_some(), &format!("{path}.port.targetPort"), "deprecated in Istio");
    let port = sink.check(&format!("{path}.port.number"), fields::port(server.port.number))?;
    let protocol = server.port.protocol.to_ascii_uppercase();
    let tls = server.tls.as_ref();
    let tls_path = format!("{path}.tls");
    if let Some(t) = tls {
        unsupported_tls_fields(t, &tls_path, sink);
    }
    let mode = tls.and_then(|t| t.mode);
    let kind = match protocol.as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => {
            if let Some(mode) = mode {
                sink.push(&format!("{tls_path}.mode"), format!("tls.mode {mode:?} needs protocol HTTPS or TLS"));
                return None;
            }
            ServerKind::Http { https_redirect: tls.and_then(|t| t.https_redirect).unwrap_or(false) }
        }
        "HTTPS" | "TLS" => {
            let Some(t) = tls else {
                sink.push(
                    &tls_path,
                    format!("a {protocol} server needs tls settings (mode SIMPLE, MUTUAL or PASSTHROUGH)"),
                );
                return None;
            };
            let has_cert = t.server_certificate.is_some() || t.credential_name.is_some();
            match mode {
                Some(ServerTlsMode::PASSTHROUGH) => ServerKind::Passthrough,
                None if !has_cert => ServerKind::Passthrough,
                None => {
                    sink.push(
                        &format!("{tls_path}.mode"),
                        "tls.mode is missing: Istio's default is PASSTHROUGH, which does not use the certificate; \
                         set mode: SIMPLE (or MUTUAL) to terminate TLS",
                    );
                    return None;
                }
                Some(m @ (ServerTlsMode::SIMPLE | ServerTlsMode::MUTUAL)) if protocol == "HTTPS" => {
                    ServerKind::Terminate(credentials(gw, &tls_path, t, m == ServerTlsMode::MUTUAL, options, sink)?)
                }
                Some(ServerTlsMode::SIMPLE | ServerTlsMode::MUTUAL) => {
                    sink.push(
                        &format!("{tls_path}.mode"),
                        "terminating TLS on a TLS server (then routing TCP) is not supported by serin: \
                         use protocol HTTPS, or mode PASSTHROUGH",
                    );
                    return None;
                }
                Some(other) => {
                    sink.push(
                        &format!("{tls_path}.mode"),
                        format!(
                            "tls.mode {other:?} is not supported by serin gateway (SIMPLE, MUTUAL and PASSTHROUGH are)"
                        ),
                    );
                    return None;
                }
            }
        }
        other => {
            sink.push(
                &format!("{path}.port.protocol"),
                format!("protocol {other} is not served by serin gateway (HTTP, HTTP2, GRPC, HTTPS and TLS are)"),
            );
            return None;
        }
    };
    if server.hosts.is_empty() {
        return None; // Reported at load.
    }
    let hosts = server.hosts.iter().map(|h| ServerHost::parse(h, gw.namespace)).collect();
    let port_name = if server.port.name.is_empty() { protocol.to_ascii_lowercase() } else { server.port.name.clone() };
    let name = match &kind {
        ServerKind::Http { .. } => format!("http.{port}"),
        ServerKind::Terminate(_) => format!("https.{port}.{port_name}.{}.{}", gw.name, gw.namespace),
        ServerKind::Passthrough => format!("tls.{port}.{port_name}.{}.{}", gw.name, gw.namespace),
    };
    Some(ServerSpec { gateway, path, port, kind, hosts, name })
}

/// Reports the server TLS fields serin does not implement.
fn unsupported_tls_fields(t: &model::ServerTlsSettings, path: &str, sink: &mut Sink<'_>) {
    let field = |name: &str| format!("{path}.{name}");
    sink.unsupported(t.ca_crl.is_some(), &field("caCrl"), "");
    sink.unsupported(!t.credential_names.is_empty(), &field("credentialNames"), "use credentialName");
    sink.unsupported(!t.tls_certificates.is_empty(), &field("tlsCertificates"), "use serverCertificate/privateKey");
    sink.unsupported(!t.subject_alt_names.is_empty(), &field("subjectAltNames"), "");
    sink.unsupported(!t.verify_certificate_spki.is_empty(), &field("verifyCertificateSpki"), "");
    sink.unsupported(!t.verify_certificate_hash.is_empty(), &field("verifyCertificateHash"), "");
    sink.unsupported(
        !t.cipher_suites.is_empty(),
        &field("cipherSuites"),
        "serin offers a fixed list: AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305",
    );
    if let Some(v) = t.min_protocol_version
        && !matches!(v, TlsProtocol::TLS_AUTO | TlsProtocol::TLSV1_2)
    {
        sink.push(
            &field("minProtocolVersion"),
            format!("{v:?} is not supported by serin (TLS 1.2 and 1.3 are served)"),
        );
    }
    if let Some(v) = t.max_protocol_version
        && !matches!(v, TlsProtocol::TLS_AUTO | TlsProtocol::TLSV1_3)
    {
        sink.push(
            &field("maxProtocolVersion"),
            format!("{v:?} is not supported by serin (TLS 1.2 and 1.3 are served)"),
        );
    }
}

/// The certificate files of a SIMPLE or MUTUAL server.
fn credentials(
    gw: &GatewayRes<'_>,
    tls_path: &str,
    t: &model::ServerTlsSettings,
    mutual: bool,
    options: &GatewayOptions,
    sink: &mut Sink<'_>,
) -> Option<ServerCredentials> {
    let origin = gw.origin(tls_path);
    if !mutual && t.ca_certificates.is_some() {
        sink.push(&format!("{tls_path}.caCertificates"), "caCertificates is only used with mode MUTUAL");
    }
    let file = |named: &str| resolve_file(gw.file, named);
    if let Some(credential) = &t.credential_name {
        if t.server_certificate.is_some() || t.private_key.is_some() {
            sink.push(tls_path, "set either credentialName or serverCertificate/privateKey, not both");
            return None;
        }
        let Some(dir) = &options.credentials_dir else {
            sink.push(
                &format!("{tls_path}.credentialName"),
                "Kubernetes secrets are not available to serin: start `serin gateway` with --credentials-dir D \
                 (files D/<credentialName>/tls.crt, tls.key and, for MUTUAL, ca.crt) or use serverCertificate/privateKey",
            );
            return None;
        };
        if credential.is_empty() || credential.contains('/') || credential.starts_with('.') {
            sink.push(&format!("{tls_path}.credentialName"), format!("invalid credential name {credential:?}"));
            return None;
        }
        let secret = dir.join(credential);
        let client_ca = mutual.then(|| match &t.ca_certificates {
            Some(ca) => file(ca),
            // Istio reads the CA from the same secret, or from `<name>-cacert`.
            None if !secret.join("ca.crt").exists() && dir.join(format!("{credential}-cacert")).is_dir() => {
                dir.join(format!("{credential}-cacert")).join("ca.crt")
            }
            None => secret.join("ca.crt"),
        });
        return Some(ServerCredentials {
            cert: secret.join("tls.crt"),
            key: secret.join("tls.key"),
            client_ca,
            origin: gw.origin(&format!("{tls_path}.credentialName")),
        });
    }
    let (Some(cert), Some(key)) = (&t.server_certificate, &t.private_key) else {
        sink.push(tls_path, "serverCertificate and privateKey (or credentialName) are required for SIMPLE and MUTUAL");
        return None;
    };
    let client_ca = if mutual {
        match &t.ca_certificates {
            Some(ca) => Some(file(ca)),
            None => {
                sink.push(&format!("{tls_path}.caCertificates"), "mode MUTUAL needs caCertificates");
                return None;
            }
        }
    } else {
        None
    };
    Some(ServerCredentials { cert: file(cert), key: file(key), client_ca, origin })
}

/// Errors when `spec` cannot share its port with the servers already parsed: a
/// port is plain HTTP or TLS, and two TLS servers of a port cannot claim one SNI name.
pub(super) fn check_port_conflicts(
    servers: &[ServerSpec],
    spec: &ServerSpec,
    gateways: &[GatewayRes<'_>],
    sink: &mut Sink<'_>,
) {
    for other in servers.iter().filter(|s| s.port == spec.port) {
        let where_ = || format!("{} {}", gateways[other.gateway].display, other.path);
        if other.kind.is_tls() != spec.kind.is_tls() {
            sink.push(
                &format!("{}.port", spec.path),
                format!(
                    "port {} is already a {} port ({}); one port serves either plain HTTP or TLS",
                    spec.port,
                    if other.kind.is_tls() { "TLS" } else { "plain HTTP" },
                    where_()
                ),
            );
            return;
        }
        if !spec.kind.is_tls() {
            continue;
        }
        for h in &spec.hosts {
            if other.hosts.iter().any(|o| o.host == h.host) {
                sink.push(
                    &format!("{}.hosts", spec.path),
                    format!("host {:?} on port {} is already served by {}", h.host, spec.port, where_()),
                );
            }
        }
    }
}
