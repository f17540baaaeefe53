//! `ServiceEntry`, `WorkloadEntry` and `Gateway` checks.

use std::collections::BTreeMap;

use super::fields;
use crate::config::error::Sink;
use crate::config::hosts;
use crate::config::model::{self, Resolution};
use crate::security::IpBlock;

/// Port protocols Istio knows (compared case-insensitively).
const PROTOCOLS: [&str; 13] = [
    "HTTP",
    "HTTPS",
    "HTTP2",
    "GRPC",
    "GRPC-WEB",
    "TCP",
    "TLS",
    "MONGO",
    "REDIS",
    "MYSQL",
    "UDP",
    "HBONE",
    "HTTP_PROXY",
];

/// A checked service port.
#[derive(Debug, Clone)]
pub struct CheckedPort {
    pub number: u16,
    pub name: String,
    /// Upper-case protocol (`HTTP` when not given).
    pub protocol: String,
    pub target_port: Option<u16>,
}

/// A checked endpoint: an address with per-port-name overrides.
#[derive(Debug, Clone)]
pub struct CheckedEndpoint {
    /// IP address or (for DNS resolution) a host name.
    pub address: String,
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// WorkloadEntry name, or the address.
    pub workload: String,
    pub namespace: String,
}

/// A checked ServiceEntry.
#[derive(Debug, Clone)]
pub struct CheckedServiceEntry {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    /// Resolved hosts.
    pub hosts: Vec<String>,
    /// Virtual IPs / CIDR blocks (`spec.addresses`): where captured traffic to the service goes.
    pub addresses: Vec<IpBlock>,
    pub ports: Vec<CheckedPort>,
    pub resolution: Resolution,
    pub endpoints: Vec<CheckedEndpoint>,
    /// Labels selecting WorkloadEntries of the same namespace.
    pub selector: Option<BTreeMap<String, String>>,
}

/// Checks a ServiceEntry.
pub fn service_entry(
    se: &model::ServiceEntry,
    namespace: &str,
    name: &str,
    sink: &mut Sink<'_>,
) -> CheckedServiceEntry {
    sink.unsupported(se.subject_alt_names.is_some(), "spec.subjectAltNames", "");
    if se.hosts.is_empty() {
        sink.push("spec.hosts", "at least one host is required");
    }
    let mut hosts_out = Vec::new();
    for (i, h) in se.hosts.iter().enumerate() {
        if sink.check(&format!("spec.hosts[{i}]"), hosts::check_host(h, true)).is_some() {
            if h == "*" {
                sink.push(&format!("spec.hosts[{i}]"), "host `*` is not allowed in a ServiceEntry");
            }
            hosts_out.push(hosts::resolve_host(h, namespace));
        }
    }
    if se.ports.is_empty() {
        sink.push("spec.ports", "at least one port is required");
    }
    let mut ports: Vec<CheckedPort> = Vec::new();
    for (i, p) in se.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let Some(number) = sink.check(&format!("{path}.number"), fields::port(p.number)) else { continue };
        if ports.iter().any(|x| x.number == number) {
            sink.push(&format!("{path}.number"), format!("port {number} is listed twice"));
        }
        if !p.name.is_empty() && ports.iter().any(|x| x.name == p.name) {
            sink.push(&format!("{path}.name"), format!("port name {:?} is used twice", p.name));
        }
        let protocol = p.protocol.clone().unwrap_or_else(|| "HTTP".into()).to_ascii_uppercase();
        if !PROTOCOLS.contains(&protocol.as_str()) {
            sink.push(
                &format!("{path}.protocol"),
                format!("unknown protocol {:?}", p.protocol.as_deref().unwrap_or("")),
            );
        }
        let target_port = p.target_port.and_then(|t| sink.check(&format!("{path}.targetPort"), fields::port(t)));
        ports.push(CheckedPort { number, name: p.name.clone(), protocol, target_port });
    }
    let mut addresses = Vec::new();
    for (i, a) in se.addresses.iter().enumerate() {
        if let Some(block) = sink.check(&format!("spec.addresses[{i}]"), IpBlock::parse(a)) {
            addresses.push(block);
        }
    }
    let resolution = se.resolution.unwrap_or(Resolution::NONE);
    if !se.endpoints.is_empty() && se.workload_selector.is_some() {
        sink.push("spec.workloadSelector", "only one of endpoints and workloadSelector may be set");
    }
    if resolution == Resolution::STATIC && se.endpoints.is_empty() && se.workload_selector.is_none() {
        sink.push("spec.endpoints", "resolution STATIC needs endpoints or a workloadSelector");
    }
    let port_names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
    let mut endpoints = Vec::new();
    for (i, e) in se.endpoints.iter().enumerate() {
        let path = format!("spec.endpoints[{i}]");
        if let Some(ep) = endpoint(e, &path, namespace, None, resolution, &port_names, sink) {
            endpoints.push(ep);
        }
    }
    let selector = se.workload_selector.as_ref().map(|s| s.labels.clone());
    CheckedServiceEntry {
        name: format!("{namespace}/{name}"),
        namespace: namespace.to_string(),
        hosts: hosts_out,
        addresses,
        ports,
        resolution,
        endpoints,
        selector,
    }
}

/// Checks a WorkloadEntry (or a ServiceEntry endpoint, `workload` = None).
pub fn endpoint(
    e: &model::WorkloadEntry,
    path: &str,
    namespace: &str,
    workload: Option<&str>,
    resolution: Resolution,
    port_names: &[&str],
    sink: &mut Sink<'_>,
) -> Option<CheckedEndpoint> {
    let mut ok = true;
    let address = match e.address.as_deref() {
        None | Some("") => {
            sink.push(&format!("{path}.address"), "address is required");
            return None;
        }
        Some(a) if a.starts_with("unix://") => {
            sink.push(&format!("{path}.address"), format!("unix socket address {a:?} is not supported by serin"));
            return None;
        }
        Some(a) => a.to_string(),
    };
    if address.parse::<std::net::IpAddr>().is_err() {
        if resolution == Resolution::STATIC {
            sink.push(
                &format!("{path}.address"),
                format!("address {address:?} must be an IP address with resolution STATIC"),
            );
            ok = false;
        } else if let Err(e) = hosts::check_host(&address, false) {
            sink.push(&format!("{path}.address"), e);
            ok = false;
        }
    }
    let mut ports = BTreeMap::new();
    for (name, number) in &e.ports {
        let field = format!("{path}.ports.{name}");
        if !port_names.is_empty() && !port_names.contains(&name.as_str()) {
            sink.push(&field, format!("no service port is named {name:?} (ports: {})", port_names.join(", ")));
            ok = false;
        }
        match sink.check(&field, fields::port(*number)) {
            Some(p) => {
                ports.insert(name.clone(), p);
            }
            None => ok = false,
        }
    }
    if let Some(w) = e.weight {
        if w > 1 {
            sink.push(
                &format!("{path}.weight"),
                "endpoint weights are not supported by serin (all endpoints weigh the same)",
            );
            ok = false;
        } else if w < 0 {
            sink.push(&format!("{path}.weight"), format!("weight {w} must not be negative"));
            ok = false;
        }
    }
    ok.then(|| CheckedEndpoint {
        workload: workload.map(str::to_string).unwrap_or_else(|| address.clone()),
        address,
        ports,
        labels: e.labels.clone(),
        service_account: e.service_account.clone().filter(|s| !s.is_empty()),
        namespace: namespace.to_string(),
    })
}

/// Checks a WorkloadEntry resource.
pub fn workload_entry(
    we: &model::WorkloadEntry,
    namespace: &str,
    name: &str,
    sink: &mut Sink<'_>,
) -> Option<CheckedEndpoint> {
    endpoint(we, "spec", namespace, Some(name), Resolution::DNS, &[], sink)
}

/// Checks a Gateway (kept in the model; the sidecar snapshot does not use it).
pub fn gateway(gw: &model::Gateway, sink: &mut Sink<'_>) {
    if gw.servers.is_empty() {
        sink.push("spec.servers", "at least one server is required");
    }
    for (i, s) in gw.servers.iter().enumerate() {
        let path = format!("spec.servers[{i}]");
        sink.check(&format!("{path}.port.number"), fields::port(s.port.number));
        if let Some(t) = s.port.target_port {
            sink.check(&format!("{path}.port.targetPort"), fields::port(t));
        }
        if !PROTOCOLS.contains(&s.port.protocol.to_ascii_uppercase().as_str()) {
            sink.push(&format!("{path}.port.protocol"), format!("unknown protocol {:?}", s.port.protocol));
        }
        if s.hosts.is_empty() {
            sink.push(&format!("{path}.hosts"), "at least one host is required");
        }
        for (j, h) in s.hosts.iter().enumerate() {
            // Gateway hosts may carry a namespace: `ns/host`, `./host`, `*/host`.
            let host = h.split_once('/').map_or(h.as_str(), |(_, host)| host);
            sink.check(&format!("{path}.hosts[{j}]"), hosts::check_host(host, true));
        }
    }
}
