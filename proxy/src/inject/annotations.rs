//! The pod annotations `inject` reads: Istio's `traffic.sidecar.istio.io/*`
//! (mapped to `serin iptables` flags) and the `sidecar.istio.io/proxy*` resource
//! overrides. An interception annotation serin cannot honour is an error naming it,
//! never silently dropped: a pod that asked for a port to be left alone must not
//! have it captured.

use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;
use serin_control_api::yaml::{Mapping, Yaml};

/// Istio's opt-out: `sidecar.istio.io/inject: "false"` (label or annotation).
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Prefix of Istio's interception annotations.
pub const TRAFFIC_PREFIX: &str = "traffic.sidecar.istio.io/";
/// Prefix of Istio's sidecar annotations.
pub const SIDECAR_PREFIX: &str = "sidecar.istio.io/";

/// What an interception annotation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    /// Comma-separated ports (1-65535).
    Ports,
    /// `*` or comma-separated ports.
    PortsOrStar,
    /// Comma-separated CIDRs (IPv4 or IPv6).
    Cidrs,
    /// `*` or comma-separated CIDRs.
    CidrsOrStar,
}

/// One `traffic.sidecar.istio.io/*` annotation and the `serin iptables` flag it sets.
struct TrafficAnnotation {
    name: &'static str,
    flag: &'static str,
    kind: ValueKind,
    /// The flag's value when the annotation is absent (`None`: flag left out).
    default: Option<&'static str>,
}

/// The interception annotations serin honours, in the order their flags are written.
const TRAFFIC: &[TrafficAnnotation] = &[
    TrafficAnnotation { name: "includeOutboundIPRanges", flag: "-i", kind: ValueKind::CidrsOrStar, default: Some("*") },
    TrafficAnnotation { name: "excludeOutboundIPRanges", flag: "-x", kind: ValueKind::Cidrs, default: None },
    TrafficAnnotation { name: "includeInboundPorts", flag: "-b", kind: ValueKind::PortsOrStar, default: Some("*") },
    TrafficAnnotation { name: "excludeInboundPorts", flag: "-d", kind: ValueKind::Ports, default: None },
    TrafficAnnotation { name: "excludeOutboundPorts", flag: "-o", kind: ValueKind::Ports, default: None },
    TrafficAnnotation { name: "includeOutboundPorts", flag: "-q", kind: ValueKind::Ports, default: None },
];

/// The `sidecar.istio.io/*` resource overrides: annotation → (section, resource).
const RESOURCES: &[(&str, &str, &str)] = &[
    ("proxyCPU", "requests", "cpu"),
    ("proxyMemory", "requests", "memory"),
    ("proxyCPULimit", "limits", "cpu"),
    ("proxyMemoryLimit", "limits", "memory"),
];

/// `sidecar.istio.io/*` annotations that are about injection itself and need no action here.
const SIDECAR_HANDLED: &[&str] = &["inject", "status", "interceptionMode"];

/// An annotation `inject` cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {reason} (value {value:?})")]
pub struct AnnotationError {
    /// The annotation's full name.
    pub annotation: String,
    /// Its value, as written.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// The pod template's annotation `name` as a string (numbers and booleans as
/// written, so that `excludeInboundPorts: 8080` is still understood).
fn annotation_text(annotations: Option<&Mapping>, name: &str) -> Option<String> {
    match annotations?.get(name)? {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Int(i) => Some(i.to_string()),
        Yaml::UInt(u) => Some(u.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Float(f) => Some(f.to_string()),
        _ => Some(String::new()),
    }
}

/// Whether `sidecar.istio.io/inject` turns injection off in `labels` or
/// `annotations`: a Go `ParseBool` false (`false`, `False`, `FALSE`, `f`, `F`, `0`).
/// Returns where it was found ("label" or "annotation").
pub fn opted_out(labels: Option<&Mapping>, annotations: Option<&Mapping>) -> Option<&'static str> {
    let is_false = |m: Option<&Mapping>| match m.and_then(|m| m.get(INJECT)) {
        Some(Yaml::Bool(false)) | Some(Yaml::Int(0)) => true,
        Some(Yaml::String(s)) => matches!(s.as_str(), "false" | "False" | "FALSE" | "f" | "F" | "0"),
        _ => false,
    };
    if is_false(labels) {
        Some("label")
    } else if is_false(annotations) {
        Some("annotation")
    } else {
        None
    }
}

/// The `serin iptables` arguments for a pod, from the defaults and the pod's
/// `traffic.sidecar.istio.io/*` annotations. `base` holds the fixed flags (ports,
/// uid, mode) written first.
pub fn iptables_args(base: &[&str], annotations: Option<&Mapping>) -> Result<Vec<String>, AnnotationError> {
    if let Some(m) = annotations {
        for (key, value) in m.iter() {
            let Some(name) = key.as_str().and_then(|k| k.strip_prefix(TRAFFIC_PREFIX)) else { continue };
            if !TRAFFIC.iter().any(|t| t.name == name) {
                let supported: Vec<_> = TRAFFIC.iter().map(|t| format!("{TRAFFIC_PREFIX}{}", t.name)).collect();
                return Err(AnnotationError {
                    annotation: format!("{TRAFFIC_PREFIX}{name}"),
                    value: value.as_str().unwrap_or_default().to_string(),
                    reason: format!("not supported by serin inject (supported: {})", supported.join(", ")),
                });
            }
        }
    }
    let mut args: Vec<String> = base.iter().map(|s| (*s).to_string()).collect();
    for t in TRAFFIC {
        let full = format!("{TRAFFIC_PREFIX}{}", t.name);
        let value = match annotation_text(annotations, &full) {
            Some(v) => {
                let v = normalize_list(&v);
                check_value(t.kind, &v).map_err(|reason| AnnotationError {
                    annotation: full.clone(),
                    value: v.clone(),
                    reason,
                })?;
                v
            }
            None => match t.default {
                Some(d) => d.to_string(),
                None => continue,
            },
        };
        args.push(t.flag.to_string());
        args.push(value);
    }
    Ok(args)
}

/// Checks `sidecar.istio.io/interceptionMode` (serin redirects only) and returns the
/// resource overrides `(section, resource, quantity)` of the `proxy*` annotations;
/// other `sidecar.istio.io/*` annotations are returned in `ignored`.
pub fn sidecar_overrides(
    annotations: Option<&Mapping>,
    ignored: &mut Vec<String>,
) -> Result<Vec<(&'static str, &'static str, String)>, AnnotationError> {
    let mut out = Vec::new();
    let Some(m) = annotations else { return Ok(out) };
    for (key, _) in m.iter() {
        let Some(name) = key.as_str().and_then(|k| k.strip_prefix(SIDECAR_PREFIX)) else { continue };
        let full = format!("{SIDECAR_PREFIX}{name}");
        let value = annotation_text(annotations, &full).unwrap_or_default();
        if name == "interceptionMode" && value != "REDIRECT" {
            return Err(AnnotationError {
                annotation: full,
                value,
                reason: "serin intercepts with REDIRECT only (TPROXY and NONE are not supported)".into(),
            });
        }
        if let Some(&(_, section, resource)) = RESOURCES.iter().find(|(n, _, _)| *n == name) {
            if !is_quantity(&value) {
                return Err(AnnotationError {
                    annotation: full,
                    value,
                    reason: "not a Kubernetes quantity (e.g. 100m, 2, 128Mi)".into(),
                });
            }
            out.push((section, resource, value));
        } else if !SIDECAR_HANDLED.contains(&name) {
            ignored.push(full);
        }
    }
    Ok(out)
}

/// `"8080, 9090"` → `"8080,9090"`.
fn normalize_list(value: &str) -> String {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(",")
}

fn check_value(kind: ValueKind, value: &str) -> Result<(), String> {
    let star_ok = matches!(kind, ValueKind::PortsOrStar | ValueKind::CidrsOrStar);
    if value == "*" {
        return if star_ok { Ok(()) } else { Err("`*` is not allowed here".into()) };
    }
    for item in value.split(',').filter(|s| !s.is_empty()) {
        match kind {
            ValueKind::Ports | ValueKind::PortsOrStar => {
                if !matches!(item.parse::<u16>(), Ok(p) if p > 0) {
                    return Err(format!("{item:?} is not a port (1-65535)"));
                }
            }
            ValueKind::Cidrs | ValueKind::CidrsOrStar => check_cidr(item)?,
        }
    }
    Ok(())
}

/// `10.0.0.0/8`, `fd00::/8`, or a single address.
fn check_cidr(item: &str) -> Result<(), String> {
    let (addr, prefix) = match item.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (item, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| format!("{item:?} is not a CIDR (e.g. 10.96.0.0/12)"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.map(str::parse::<u8>) {
        None => Ok(()),
        Some(Ok(p)) if p <= max => Ok(()),
        Some(_) => Err(format!("{item:?} has a bad prefix length (0-{max})")),
    }
}

/// A Kubernetes resource quantity: a decimal number with an optional suffix
/// (`m`, `k`, `M`, `G`, …, `Ki`, `Mi`, `Gi`, …, or an exponent).
fn is_quantity(value: &str) -> bool {
    static QUANTITY: LazyLock<Option<Regex>> =
        LazyLock::new(|| Regex::new(r"^(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?$").ok());
    QUANTITY.as_ref().is_some_and(|re| re.is_match(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_control_api::yaml::parse_document;

    fn annotations(text: &str) -> Mapping {
        parse_document(text).unwrap().and_then(|y| y.as_map().cloned()).unwrap()
    }

    const BASE: &[&str] = &["iptables", "-p", "15001"];

    #[test]
    fn defaults_capture_everything() {
        let args = iptables_args(BASE, None).unwrap();
        assert_eq!(args, ["iptables", "-p", "15001", "-i", "*", "-b", "*"]);
    }

    #[test]
    fn traffic_annotations_become_flags() {
        let m = annotations(
            "traffic.sidecar.istio.io/excludeOutboundPorts: \"5432, 6379\"\n\
             traffic.sidecar.istio.io/excludeInboundPorts: 9000\n\
             traffic.sidecar.istio.io/includeInboundPorts: \"8080\"\n\
             traffic.sidecar.istio.io/excludeOutboundIPRanges: 169.254.169.254/32,fd00::/8\n\
             traffic.sidecar.istio.io/includeOutboundIPRanges: 10.96.0.0/12\n\
             traffic.sidecar.istio.io/includeOutboundPorts: \"3306\"\n",
        );
        let args = iptables_args(BASE, Some(&m)).unwrap();
        assert_eq!(
            args,
            [
                "iptables",
                "-p",
                "15001",
                "-i",
                "10.96.0.0/12",
                "-x",
                "169.254.169.254/32,fd00::/8",
                "-b",
                "8080",
                "-d",
                "9000",
                "-o",
                "5432,6379",
                "-q",
                "3306"
            ]
        );
    }

    #[test]
    fn bad_values_and_unknown_traffic_annotations_are_named() {
        let m = annotations("traffic.sidecar.istio.io/excludeOutboundPorts: \"5432,http\"\n");
        let err = iptables_args(BASE, Some(&m)).unwrap_err();
        assert_eq!(err.annotation, "traffic.sidecar.istio.io/excludeOutboundPorts");
        assert!(err.reason.contains("\"http\" is not a port"), "{err}");

        let m = annotations("traffic.sidecar.istio.io/excludeOutboundIPRanges: 10.0.0.0/33\n");
        let err = iptables_args(BASE, Some(&m)).unwrap_err();
        assert!(err.to_string().contains("bad prefix length"), "{err}");

        let m = annotations("traffic.sidecar.istio.io/excludeInboundPorts: \"*\"\n");
        assert!(iptables_args(BASE, Some(&m)).is_err());

        let m = annotations("traffic.sidecar.istio.io/excludeInterfaces: eth1\n");
        let err = iptables_args(BASE, Some(&m)).unwrap_err();
        assert_eq!(err.annotation, "traffic.sidecar.istio.io/excludeInterfaces");
        assert!(err.reason.contains("not supported"), "{err}");
    }

    #[test]
    fn opt_out_reads_labels_and_annotations() {
        let off = annotations("sidecar.istio.io/inject: \"false\"\n");
        let on = annotations("sidecar.istio.io/inject: \"true\"\n");
        assert_eq!(opted_out(Some(&off), None), Some("label"));
        assert_eq!(opted_out(None, Some(&off)), Some("annotation"));
        assert_eq!(opted_out(Some(&on), Some(&on)), None);
        assert_eq!(opted_out(None, None), None);
        let unquoted = annotations("sidecar.istio.io/inject: false\n");
        assert_eq!(opted_out(None, Some(&unquoted)), Some("annotation"));
    }

    #[test]
    fn resource_overrides_and_interception_mode() {
        let mut ignored = Vec::new();
        let m = annotations(
            "sidecar.istio.io/proxyCPU: 50m\nsidecar.istio.io/proxyMemoryLimit: 1Gi\nsidecar.istio.io/logLevel: debug\n\
             sidecar.istio.io/interceptionMode: REDIRECT\n",
        );
        let overrides = sidecar_overrides(Some(&m), &mut ignored).unwrap();
        assert_eq!(overrides, [("requests", "cpu", "50m".to_string()), ("limits", "memory", "1Gi".to_string())]);
        assert_eq!(ignored, ["sidecar.istio.io/logLevel"]);

        let m = annotations("sidecar.istio.io/interceptionMode: TPROXY\n");
        assert!(sidecar_overrides(Some(&m), &mut ignored).unwrap_err().reason.contains("REDIRECT only"));
        let m = annotations("sidecar.istio.io/proxyMemory: lots\n");
        assert!(sidecar_overrides(Some(&m), &mut ignored).is_err());
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "2", "0.5", "128Mi", "1Gi", "1e3", "1E-2", "500k"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "12 Mi", "1x", "lots", "1e", "1e+"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
