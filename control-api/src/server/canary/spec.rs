//! The `Canary` document (the analysis part of Flagger's `flagger.app/v1beta1`
//! `Canary`, plus serin's own fields under `spec.serin`) read into a
//! [`pb::CanarySpec`], and the checks every spec goes through, from a document or from
//! `serin ctl canary start`.
//!
//! ```yaml
//! apiVersion: flagger.app/v1beta1
//! kind: Canary
//! metadata: {name: payment, namespace: default}
//! spec:
//!   targetRef: {apiVersion: apps/v1, kind: Deployment, name: payment}
//!   service: {port: 8080}                  # accepted, not used (a warning says so)
//!   analysis:
//!     interval: 30s
//!     threshold: 5
//!     maxWeight: 50
//!     stepWeight: 10                       # or stepWeights: [5, 10, 25, 50]
//!     metrics:
//!     - {name: request-success-rate, thresholdRange: {min: 99}, interval: 1m}
//!     - {name: request-duration, thresholdRange: {max: 500}}
//!   serin:                                 # all optional
//!     canarySubset: v2                     # default: the non-stable one of two subsets
//!     stableSubset: v1                     # default: the one rollback sends traffic to
//!     minRequests: 10                      # fewer canary requests in an interval: no judgement (≥ 1)
//!     promoteWeight: 100                   # the canary's weight after promotion (maxWeight to 100)
//!     maxSuccessDrop: 1                    # fail when the canary's success rate is > 1 point below stable's
//! ```
//!
//! `minRequests` and `promoteWeight`: absent = the default (10, 100); an explicit 0 is
//! an error naming the field, as `--min-requests 0` and `--promote-weight 0` are for
//! `serin ctl canary start`. A promote weight below the max weight is an error too
//! (promotion would lower the canary's weight).
//!
//! Flagger fields serin does not implement (webhooks, alerts, iterations, match,
//! mirror, stepWeightPromotion, skipAnalysis, progressDeadlineSeconds, custom metrics,
//! …) are errors naming the field.

use std::time::Duration;

use crate::pb;
use crate::yaml::{Mapping, Yaml};

/// The Flagger API version read.
pub const API_VERSION: &str = "flagger.app/v1beta1";
/// The analysis interval when none is given (Flagger's default, 1 minute).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// The fewest canary requests judged in an interval when none is given.
pub const DEFAULT_MIN_REQUESTS: u64 = 10;
/// Failed checks before rollback when none is given (Flagger's default).
pub const DEFAULT_THRESHOLD: u32 = 5;

/// A field of a Canary that is wrong, by its path in the document (`spec.analysis.threshold`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's path, e.g. `spec.analysis.stepWeights`, or the `ctl` flag.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// Flagger fields serin does not implement, by path, with why.
const UNSUPPORTED: [(&str, &str); 26] = [
    ("spec.analysis.webhooks", "webhooks are not supported by serin"),
    ("spec.analysis.alerts", "alerts are not supported by serin"),
    ("spec.analysis.iterations", "A/B and blue/green iterations are not supported by serin"),
    ("spec.analysis.match", "A/B matches are not supported by serin (write them in the VirtualService)"),
    ("spec.analysis.mirror", "mirroring is not supported by the analysis (write it in the VirtualService)"),
    ("spec.analysis.mirrorWeight", "mirroring is not supported by the analysis"),
    ("spec.analysis.stepWeightPromotion", "gradual promotion is not supported by serin (see spec.serin.promoteWeight)"),
    ("spec.analysis.sessionAffinity", "session affinity is not supported by serin"),
    ("spec.analysis.primaryReadyThreshold", "serin does not scale or check pods"),
    ("spec.analysis.canaryReadyThreshold", "serin does not scale or check pods"),
    ("spec.skipAnalysis", "skipping the analysis is not supported by serin"),
    ("spec.progressDeadlineSeconds", "serin does not watch Deployments' progress"),
    ("spec.autoscalerRef", "serin does not scale workloads"),
    ("spec.ingressRef", "serin routes through VirtualServices, not ingresses"),
    ("spec.upstreamRef", "serin routes through VirtualServices"),
    ("spec.revertOnDeletion", "not supported by serin"),
    ("spec.suspend", "not supported by serin (use `serin ctl canary abort`)"),
    ("spec.routeRef", "serin edits the VirtualServices of the config folder"),
    ("spec.service.retries", "write retries in the VirtualService"),
    ("spec.service.timeout", "write timeouts in the VirtualService"),
    ("spec.service.match", "write matches in the VirtualService"),
    ("spec.service.headers", "write headers in the VirtualService"),
    ("spec.service.corsPolicy", "write CORS in the VirtualService"),
    ("spec.service.rewrite", "write rewrites in the VirtualService"),
    ("spec.service.mirror", "write mirroring in the VirtualService"),
    ("spec.service.delegation", "not supported by serin"),
];

/// `spec.service` fields accepted and not used: they shape the VirtualService and
/// DestinationRule Flagger would generate, while serin edits the weights of the
/// ones in the config folder.
const SERVICE_NOT_USED: [&str; 9] =
    ["port", "targetPort", "portName", "portDiscovery", "appProtocol", "gateways", "hosts", "trafficPolicy", "apex"];

/// Checks that `map` (at `path`) has only `known` keys; a key in [`UNSUPPORTED`] says why.
fn only(map: &Mapping, path: &str, known: &[&str]) -> Result<(), FieldError> {
    for (key, _) in map.iter() {
        let Some(key) = key.as_str() else {
            return Err(bad(path, "keys must be strings"));
        };
        if known.contains(&key) {
            continue;
        }
        let field = format!("{path}.{key}");
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(f, _)| *f == field) {
            return Err(bad(field, format!("Flagger's field is not supported: {why}")));
        }
        return Err(bad(field, format!("unknown field (known here: {})", known.join(", "))));
    }
    Ok(())
}

fn map<'a>(node: &'a Yaml, path: &str) -> Result<&'a Mapping, FieldError> {
    node.as_map().ok_or_else(|| bad(path, format!("expected a mapping, found {}", node.type_name())))
}

fn string(node: &Yaml, path: &str) -> Result<String, FieldError> {
    match node {
        Yaml::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Yaml::String(_) => Err(bad(path, "must not be empty")),
        other => Err(bad(path, format!("expected a string, found {}", other.type_name()))),
    }
}

fn uint(node: &Yaml, path: &str) -> Result<u64, FieldError> {
    node.as_u64().ok_or_else(|| bad(path, format!("expected a whole number of 0 or more, found {}", describe(node))))
}

fn u32_of(node: &Yaml, path: &str) -> Result<u32, FieldError> {
    u32::try_from(uint(node, path)?).map_err(|_| bad(path, "too large"))
}

fn number(node: &Yaml, path: &str) -> Result<f64, FieldError> {
    let value = match *node {
        Yaml::Int(i) => i as f64,
        Yaml::UInt(u) => u as f64,
        Yaml::Float(f) => f,
        _ => return Err(bad(path, format!("expected a number, found {}", describe(node)))),
    };
    if value.is_finite() { Ok(value) } else { Err(bad(path, "must be a finite number")) }
}

fn describe(node: &Yaml) -> String {
    match node {
        Yaml::String(s) => format!("{s:?}"),
        Yaml::Int(i) => i.to_string(),
        Yaml::Float(f) => f.to_string(),
        other => other.type_name().to_string(),
    }
}

fn duration_field(node: &Yaml, path: &str) -> Result<Duration, FieldError> {
    let text = match node {
        Yaml::String(s) => s.clone(),
        other => return Err(bad(path, format!("expected a duration like 30s or 1m, found {}", describe(other)))),
    };
    let d = parse_go_duration(&text).map_err(|m| bad(path, m))?;
    if d.is_zero() {
        return Err(bad(path, "must be more than 0"));
    }
    Ok(d)
}

/// Milliseconds of `d`, at most `u32::MAX` (49 days).
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Parses a Go duration (`30s`, `1m`, `1m30s`, `500ms`, `1.5h`), as Flagger writes them.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("an empty duration".to_string());
    }
    let err = || format!("{text:?} is not a duration (like 30s, 1m, 1m30s or 500ms)");
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let value: f64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

/// A Canary document read: the spec (subsets not yet resolved) and the warnings
/// about fields accepted and not used.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCanary {
    /// The spec, `source` = `Canary/namespace/name`.
    pub spec: pb::CanarySpec,
    /// Fields accepted and not used.
    pub warnings: Vec<String>,
}

/// Reads a `Canary` document named `namespace/name`. The service is `targetRef.name`
/// (or `service.name`), read in the document's namespace.
pub fn parse_document(doc: &Yaml, namespace: &str, name: &str) -> Result<ParsedCanary, FieldError> {
    let top = map(doc, "document")?;
    only(top, "", &["apiVersion", "kind", "metadata", "spec", "status"]).map_err(|mut e| {
        e.field = e.field.trim_start_matches('.').to_string();
        e
    })?;
    let api = top.get_str("apiVersion").unwrap_or("");
    if api != API_VERSION {
        return Err(bad("apiVersion", format!("{api:?} is not {API_VERSION:?}")));
    }
    let spec_node = top.get("spec").ok_or_else(|| bad("spec", "missing"))?;
    let spec = map(spec_node, "spec")?;
    only(spec, "spec", &["targetRef", "service", "analysis", "serin", "provider"])?;
    let mut warnings = Vec::new();
    let mut out = pb::CanarySpec { source: format!("Canary/{namespace}/{name}"), ..Default::default() };

    if let Some(provider) = spec.get("provider") {
        let provider = string(provider, "spec.provider")?;
        if provider != "istio" {
            return Err(bad(
                "spec.provider",
                format!("{provider:?}: serin is an Istio-compatible mesh; only \"istio\""),
            ));
        }
    }
    let mut service: Option<String> = None;
    if let Some(target) = spec.get("targetRef") {
        let target = map(target, "spec.targetRef")?;
        only(target, "spec.targetRef", &["apiVersion", "kind", "name"])?;
        if let Some(kind) = target.get("kind") {
            let kind = string(kind, "spec.targetRef.kind")?;
            if kind != "Deployment" && kind != "Service" {
                return Err(bad("spec.targetRef.kind", format!("{kind:?}: serin reads Deployment or Service")));
            }
        }
        let name = target.get("name").ok_or_else(|| bad("spec.targetRef.name", "missing"))?;
        service = Some(string(name, "spec.targetRef.name")?);
    }
    if let Some(svc) = spec.get("service") {
        let svc = map(svc, "spec.service")?;
        let mut known = vec!["name"];
        known.extend(SERVICE_NOT_USED);
        only(svc, "spec.service", &known)?;
        if let Some(name) = svc.get("name") {
            service = Some(string(name, "spec.service.name")?);
        }
        let unused: Vec<&str> =
            svc.iter().filter_map(|(k, _)| k.as_str()).filter(|k| SERVICE_NOT_USED.contains(k)).collect();
        if !unused.is_empty() {
            warnings.push(format!(
                "Canary/{namespace}/{name}: spec.service.{} accepted and not used: serin sets the weights of the \
                 VirtualService and DestinationRule of the config folder instead of generating them",
                unused.join(", spec.service.")
            ));
        }
    }
    let service = service.ok_or_else(|| bad("spec.targetRef", "missing: name the service (targetRef.name)"))?;
    out.service =
        if namespace == "default" || service.contains('.') { service } else { format!("{service}.{namespace}") };

    let analysis = spec.get("analysis").ok_or_else(|| bad("spec.analysis", "missing"))?;
    let analysis = map(analysis, "spec.analysis")?;
    only(analysis, "spec.analysis", &["interval", "threshold", "maxWeight", "stepWeight", "stepWeights", "metrics"])?;
    let interval = match analysis.get("interval") {
        Some(i) => duration_field(i, "spec.analysis.interval")?,
        None => DEFAULT_INTERVAL,
    };
    out.interval_ms = millis(interval);
    out.threshold = match analysis.get("threshold") {
        Some(t) => u32_of(t, "spec.analysis.threshold")?,
        None => DEFAULT_THRESHOLD,
    };
    if let Some(m) = analysis.get("maxWeight") {
        out.max_weight = u32_of(m, "spec.analysis.maxWeight")?;
    }
    if let Some(s) = analysis.get("stepWeight") {
        out.step_weight = u32_of(s, "spec.analysis.stepWeight")?;
    }
    if let Some(steps) = analysis.get("stepWeights") {
        let list = steps
            .as_seq()
            .ok_or_else(|| bad("spec.analysis.stepWeights", format!("expected a list, found {}", steps.type_name())))?;
        for (i, s) in list.iter().enumerate() {
            out.step_weights.push(u32_of(s, &format!("spec.analysis.stepWeights[{i}]"))?);
        }
        if out.step_weights.is_empty() {
            return Err(bad("spec.analysis.stepWeights", "empty"));
        }
    }
    if let Some(metrics) = analysis.get("metrics") {
        let list = metrics
            .as_seq()
            .ok_or_else(|| bad("spec.analysis.metrics", format!("expected a list, found {}", metrics.type_name())))?;
        for (i, metric) in list.iter().enumerate() {
            let path = format!("spec.analysis.metrics[{i}]");
            read_metric(metric, &path, &mut out)?;
        }
    }

    if let Some(serin) = spec.get("serin") {
        let serin = map(serin, "spec.serin")?;
        only(serin, "spec.serin", &["canarySubset", "stableSubset", "minRequests", "promoteWeight", "maxSuccessDrop"])?;
        if let Some(c) = serin.get("canarySubset") {
            out.canary = string(c, "spec.serin.canarySubset")?;
        }
        if let Some(s) = serin.get("stableSubset") {
            out.stable = string(s, "spec.serin.stableSubset")?;
        }
        if let Some(m) = serin.get("minRequests") {
            out.min_requests = uint(m, "spec.serin.minRequests")?;
            if out.min_requests == 0 {
                return Err(bad("spec.serin.minRequests", "must be at least 1 (no traffic is no evidence)"));
            }
        }
        if let Some(p) = serin.get("promoteWeight") {
            out.promote_weight = u32_of(p, "spec.serin.promoteWeight")?;
            if out.promote_weight == 0 {
                return Err(bad("spec.serin.promoteWeight", "must be from 1 to 100"));
            }
        }
        if let Some(d) = serin.get("maxSuccessDrop") {
            out.max_success_drop_percent = Some(number(d, "spec.serin.maxSuccessDrop")?);
        }
    }
    check_values(&out, Source::Document)?;
    Ok(ParsedCanary { spec: out, warnings })
}

fn read_metric(metric: &Yaml, path: &str, out: &mut pb::CanarySpec) -> Result<(), FieldError> {
    let m = map(metric, path)?;
    for custom in ["templateRef", "query", "templateVariables"] {
        if m.get(custom).is_some() {
            return Err(bad(
                format!("{path}.{custom}"),
                "custom metrics (MetricTemplate, queries) are not supported by serin: use the builtin \
                 request-success-rate and request-duration",
            ));
        }
    }
    only(m, path, &["name", "thresholdRange", "interval"])?;
    let name = string(m.get("name").ok_or_else(|| bad(format!("{path}.name"), "missing"))?, &format!("{path}.name"))?;
    let window = match m.get("interval") {
        Some(i) => millis(duration_field(i, &format!("{path}.interval"))?),
        None => 0,
    };
    let range_path = format!("{path}.thresholdRange");
    let range = m.get("thresholdRange").ok_or_else(|| bad(&range_path, "missing"))?;
    let range = map(range, &range_path)?;
    only(range, &range_path, &["min", "max"])?;
    match name.as_str() {
        "request-success-rate" => {
            if range.get("max").is_some() {
                return Err(bad(
                    format!("{range_path}.max"),
                    "serin checks request-success-rate against a minimum only",
                ));
            }
            if out.min_success_percent.is_some() {
                return Err(bad(format!("{path}.name"), "request-success-rate is given twice"));
            }
            let min = range.get("min").ok_or_else(|| bad(format!("{range_path}.min"), "missing"))?;
            out.min_success_percent = Some(number(min, &format!("{range_path}.min"))?);
            out.success_window_ms = window;
        }
        "request-duration" => {
            if range.get("min").is_some() {
                return Err(bad(format!("{range_path}.min"), "serin checks request-duration against a maximum only"));
            }
            if out.max_p99_ms.is_some() {
                return Err(bad(format!("{path}.name"), "request-duration is given twice"));
            }
            let max = range.get("max").ok_or_else(|| bad(format!("{range_path}.max"), "missing"))?;
            out.max_p99_ms = Some(number(max, &format!("{range_path}.max"))?);
            out.p99_window_ms = window;
        }
        other => {
            return Err(bad(
                format!("{path}.name"),
                format!(
                    "{other:?}: serin implements the builtin metrics request-success-rate and request-duration \
                     (custom metrics are not supported)"
                ),
            ));
        }
    }
    Ok(())
}

/// Who gave a spec: the field names of its errors follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Canary document: `spec.analysis.threshold`.
    Document,
    /// `serin ctl canary start` (the Start call): `--threshold`.
    Ctl,
}

impl Source {
    fn name(self, field: Field) -> &'static str {
        let (doc, flag) = match field {
            Field::Service => ("spec.targetRef.name", "SERVICE"),
            Field::Canary => ("spec.serin.canarySubset", "--canary"),
            Field::Stable => ("spec.serin.stableSubset", "--stable"),
            Field::Interval => ("spec.analysis.interval", "--interval"),
            Field::Threshold => ("spec.analysis.threshold", "--threshold"),
            Field::MaxWeight => ("spec.analysis.maxWeight", "--max"),
            Field::StepWeight => ("spec.analysis.stepWeight", "--step"),
            Field::StepWeights => ("spec.analysis.stepWeights", "--steps"),
            Field::MinSuccess => ("spec.analysis.metrics[request-success-rate].thresholdRange.min", "--min-success"),
            Field::MaxP99 => ("spec.analysis.metrics[request-duration].thresholdRange.max", "--max-p99"),
            Field::PromoteWeight => ("spec.serin.promoteWeight", "--promote-weight"),
            Field::MinRequests => ("spec.serin.minRequests", "--min-requests"),
            Field::MaxSuccessDrop => ("spec.serin.maxSuccessDrop", "--max-success-drop"),
        };
        match self {
            Source::Document => doc,
            Source::Ctl => flag,
        }
    }

    /// The source a spec says it has.
    pub fn of(spec: &pb::CanarySpec) -> Source {
        if spec.source.starts_with("Canary/") { Source::Document } else { Source::Ctl }
    }
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Service,
    Canary,
    Stable,
    Interval,
    Threshold,
    MaxWeight,
    StepWeight,
    StepWeights,
    MinSuccess,
    MaxP99,
    PromoteWeight,
    MinRequests,
    MaxSuccessDrop,
}

/// The canary weights of each step, in order; the last one is the max weight.
/// Assumes a spec that passed [`check_values`].
pub fn steps(spec: &pb::CanarySpec) -> Vec<u32> {
    if !spec.step_weights.is_empty() {
        return spec.step_weights.clone();
    }
    let max = spec.max_weight.clamp(1, 100);
    let step = spec.step_weight.max(1);
    let mut out = Vec::new();
    let mut w = 0u32;
    while w < max {
        w = (w + step).min(max);
        out.push(w);
    }
    out
}

/// Checks every value: threshold at least 1, steps that reach the max weight,
/// weights from 1 to 100, a promote weight not below the max weight. Min requests
/// and promote weight: unset = the default (10, 100), an explicit 0 = an error naming
/// the field or flag. In a document "unset" is an absent field (its explicit 0 is
/// refused by [`parse_document`]); on the Start call (`ctl`), whose fields are plain
/// numbers where 0 cannot be told from unset, every value is explicit: 0 is refused
/// (`ctl` sends its flags' defaults).
pub fn check_values(spec: &pb::CanarySpec, source: Source) -> Result<(), FieldError> {
    let name = |f| source.name(f);
    if spec.service.trim().is_empty() {
        return Err(bad(name(Field::Service), "missing"));
    }
    if spec.threshold == 0 {
        return Err(bad(name(Field::Threshold), "must be at least 1 (failed checks before rollback)"));
    }
    if spec.interval_ms == 0 {
        return Err(bad(name(Field::Interval), "must be more than 0"));
    }
    if spec.max_weight > 100 {
        return Err(bad(name(Field::MaxWeight), format!("{} is more than 100 (percent)", spec.max_weight)));
    }
    if spec.step_weights.is_empty() {
        if spec.max_weight == 0 {
            return Err(bad(name(Field::MaxWeight), "must be from 1 to 100 (the canary's weight before promotion)"));
        }
        if spec.step_weight == 0 {
            return Err(bad(
                name(Field::StepWeight),
                format!("must be more than 0 to reach the max weight {} (or give step weights)", spec.max_weight),
            ));
        }
    } else {
        let field = name(Field::StepWeights);
        let mut last = 0u32;
        for w in &spec.step_weights {
            if *w == 0 || *w > 100 {
                return Err(bad(field, format!("{w} is not a weight from 1 to 100")));
            }
            if *w <= last {
                return Err(bad(field, format!("must increase: {w} comes after {last}")));
            }
            last = *w;
        }
        if spec.max_weight != 0 && spec.max_weight != last {
            return Err(bad(
                name(Field::MaxWeight),
                format!("{} is not the last step weight {last}: the steps would not reach it", spec.max_weight),
            ));
        }
    }
    if spec.promote_weight > 100 {
        return Err(bad(name(Field::PromoteWeight), format!("{} is more than 100 (percent)", spec.promote_weight)));
    }
    // Unset = the default, an explicit 0 = an error, in documents and `ctl` alike. A
    // document's absent field reaches here as 0 (its explicit 0 was refused when
    // read); the Start call's fields are plain numbers, so 0 there can only be an
    // explicit 0 (`ctl` always sends its flags' defaults) and is refused.
    if source == Source::Ctl {
        if spec.min_requests == 0 {
            return Err(bad(
                name(Field::MinRequests),
                format!("must be at least 1 (no traffic is no evidence; the default is {DEFAULT_MIN_REQUESTS})"),
            ));
        }
        if spec.promote_weight == 0 {
            return Err(bad(name(Field::PromoteWeight), "must be from 1 to 100 (the default is 100)"));
        }
    }
    let max = if spec.max_weight != 0 { spec.max_weight } else { spec.step_weights.last().copied().unwrap_or(0) };
    if spec.promote_weight != 0 && spec.promote_weight < max {
        return Err(bad(
            name(Field::PromoteWeight),
            format!(
                "{} is below the max weight {max}: promotion would lower the canary's weight (give {max} to 100)",
                spec.promote_weight
            ),
        ));
    }
    if let Some(min) = spec.min_success_percent
        && !(0.0..=100.0).contains(&min)
    {
        return Err(bad(name(Field::MinSuccess), format!("{min} is not a percentage from 0 to 100")));
    }
    if let Some(max) = spec.max_p99_ms
        && (max.is_nan() || max <= 0.0)
    {
        return Err(bad(name(Field::MaxP99), format!("{max} must be more than 0 ms")));
    }
    if let Some(drop) = spec.max_success_drop_percent
        && (drop.is_nan() || !(0.0..=100.0).contains(&drop))
    {
        return Err(bad(name(Field::MaxSuccessDrop), format!("{drop} is not a number of points from 0 to 100")));
    }
    Ok(())
}

/// A checked spec with its defaults filled in: max weight from the steps, min
/// requests, promote weight.
pub fn with_defaults(mut spec: pb::CanarySpec) -> pb::CanarySpec {
    if spec.max_weight == 0
        && let Some(last) = spec.step_weights.last()
    {
        spec.max_weight = *last;
    }
    if !spec.step_weights.is_empty() {
        spec.step_weight = 0;
    }
    if spec.min_requests == 0 {
        spec.min_requests = DEFAULT_MIN_REQUESTS;
    }
    if spec.promote_weight == 0 {
        spec.promote_weight = 100;
    }
    spec
}

/// Resolves the canary and stable subsets of `spec` against the service's subsets
/// (`known`, in order, and `default_stable`, the one rollback uses), and checks the
/// rest: every value ([`check_values`]), known subsets, canary ≠ stable. Returns the
/// spec with its subsets and defaults filled in.
pub fn resolve(spec: pb::CanarySpec, known: &[String], default_stable: &str) -> Result<pb::CanarySpec, FieldError> {
    let source = Source::of(&spec);
    check_values(&spec, source)?;
    let mut spec = with_defaults(spec);
    let list = known.join(", ");
    if spec.stable.is_empty() {
        spec.stable = default_stable.to_string();
    } else if !known.contains(&spec.stable) {
        return Err(bad(
            source.name(Field::Stable),
            format!("{} has no subset {:?}; its subsets are {list}", spec.service, spec.stable),
        ));
    }
    if spec.canary.is_empty() {
        let others: Vec<&String> = known.iter().filter(|n| **n != spec.stable).collect();
        match others.as_slice() {
            [one] => spec.canary = (*one).clone(),
            _ => {
                return Err(bad(
                    source.name(Field::Canary),
                    format!(
                        "missing: {} has {} subsets ({list}), so name the canary (stable is {})",
                        spec.service,
                        known.len(),
                        spec.stable
                    ),
                ));
            }
        }
    } else if !known.contains(&spec.canary) {
        return Err(bad(
            source.name(Field::Canary),
            format!("{} has no subset {:?}; its subsets are {list}", spec.service, spec.canary),
        ));
    }
    if spec.canary == spec.stable {
        return Err(bad(
            source.name(Field::Canary),
            format!("{:?} is also the stable subset; the canary must be another one of {list}", spec.canary),
        ));
    }
    Ok(spec)
}

/// The error for a service the store cannot split (no subsets, no route).
pub(crate) fn service_error(spec: &pb::CanarySpec, message: String) -> FieldError {
    bad(Source::of(spec).name(Field::Service), message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse_document as yaml;

    fn doc(text: &str) -> Yaml {
        yaml(text).expect("yaml").expect("a document")
    }

    const SAMPLE: &str = r#"
apiVersion: flagger.app/v1beta1
kind: Canary
metadata: {name: payment, namespace: prod}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: payment}
  service: {port: 8080, gateways: [prod/edge, mesh], hosts: [pay.example.com], trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}
  analysis:
    {interval: 1m, threshold: 5, maxWeight: 50, stepWeight: 5,
     metrics: [{name: request-success-rate, thresholdRange: {min: 99}, interval: 1m},
               {name: request-duration, thresholdRange: {max: 500}, interval: 30s}]}
"#;

    fn parse(text: &str) -> Result<ParsedCanary, FieldError> {
        parse_document(&doc(text), "default", "payment")
    }

    fn err(text: &str) -> FieldError {
        parse(text).expect_err("an error")
    }

    fn with_analysis(analysis: &str) -> String {
        format!(
            "apiVersion: flagger.app/v1beta1\nkind: Canary\nmetadata: {{name: payment}}\nspec:\n  targetRef: {{name: payment}}\n  analysis:\n{analysis}"
        )
    }

    #[test]
    fn the_flagger_sample_parses() {
        let parsed = parse_document(&doc(SAMPLE), "prod", "payment").expect("parses");
        let s = &parsed.spec;
        assert_eq!(s.service, "payment.prod");
        assert_eq!((s.interval_ms, s.threshold, s.max_weight, s.step_weight), (60_000, 5, 50, 5));
        assert_eq!(s.min_success_percent, Some(99.0));
        assert_eq!(s.max_p99_ms, Some(500.0));
        assert_eq!((s.success_window_ms, s.p99_window_ms), (60_000, 30_000));
        assert_eq!(s.source, "Canary/prod/payment");
        assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].contains("spec.service.port"), "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].contains("not used"), "{:?}", parsed.warnings);
        assert_eq!(steps(s), (1..=10).map(|i| i * 5).collect::<Vec<_>>());
    }

    #[test]
    fn serin_fields_and_step_weights_parse() {
        let text = with_analysis("    interval: 200ms\n    stepWeights: [5, 10, 25, 50]\n")
            + "  serin: {canarySubset: v2, stableSubset: v1, minRequests: 20, promoteWeight: 90, maxSuccessDrop: 1.5}\n";
        let s = parse(&text).expect("parses").spec;
        assert_eq!(s.interval_ms, 200);
        assert_eq!(s.step_weights, vec![5, 10, 25, 50]);
        assert_eq!((s.canary.as_str(), s.stable.as_str()), ("v2", "v1"));
        assert_eq!((s.min_requests, s.promote_weight), (20, 90));
        assert_eq!(s.max_success_drop_percent, Some(1.5));
        let s = resolve(s, &["v1".into(), "v2".into()], "v1").expect("resolves");
        assert_eq!(s.max_weight, 50);
        assert_eq!(steps(&s), vec![5, 10, 25, 50]);
    }

    #[test]
    fn unsupported_flagger_fields_are_named() {
        let cases = [
            ("    webhooks: []\n    maxWeight: 50\n    stepWeight: 5\n", "spec.analysis.webhooks"),
            ("    iterations: 10\n", "spec.analysis.iterations"),
            ("    stepWeightPromotion: 10\n", "spec.analysis.stepWeightPromotion"),
            ("    mirror: true\n", "spec.analysis.mirror"),
            ("    alerts: []\n", "spec.analysis.alerts"),
            ("    match: []\n", "spec.analysis.match"),
            ("    bogus: 1\n", "spec.analysis.bogus"),
            (
                "    maxWeight: 50\n    stepWeight: 5\n    metrics: [{name: error-rate, templateRef: {name: x}, thresholdRange: {max: 1}}]\n",
                "spec.analysis.metrics[0].templateRef",
            ),
            (
                "    maxWeight: 50\n    stepWeight: 5\n    metrics: [{name: error-rate, thresholdRange: {max: 1}}]\n",
                "spec.analysis.metrics[0].name",
            ),
            (
                "    maxWeight: 50\n    stepWeight: 5\n    metrics: [{name: request-success-rate, thresholdRange: {max: 1}}]\n",
                "spec.analysis.metrics[0].thresholdRange.max",
            ),
        ];
        for (analysis, field) in cases {
            let e = err(&with_analysis(analysis));
            assert_eq!(e.field, field, "{e}");
        }
        let skip = "apiVersion: flagger.app/v1beta1\nkind: Canary\nmetadata: {name: p}\nspec:\n  targetRef: {name: p}\n  skipAnalysis: true\n  analysis: {maxWeight: 50, stepWeight: 5}\n";
        let e = err(skip);
        assert_eq!(e.field, "spec.skipAnalysis");
        assert!(e.message.contains("not supported"), "{e}");
        let deadline = skip.replace("skipAnalysis: true", "progressDeadlineSeconds: 60");
        assert_eq!(err(&deadline).field, "spec.progressDeadlineSeconds");
        let retries = skip.replace("skipAnalysis: true", "service: {port: 80, retries: {attempts: 3}}");
        assert_eq!(err(&retries).field, "spec.service.retries");
        let api = skip.replace("flagger.app/v1beta1", "flagger.app/v1alpha3");
        assert_eq!(err(&api).field, "apiVersion");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("    threshold: 0\n    maxWeight: 50\n    stepWeight: 5\n", "spec.analysis.threshold"),
            ("    maxWeight: 50\n    stepWeight: 0\n", "spec.analysis.stepWeight"),
            ("    maxWeight: 0\n    stepWeight: 5\n", "spec.analysis.maxWeight"),
            ("    maxWeight: 150\n    stepWeight: 5\n", "spec.analysis.maxWeight"),
            ("    stepWeights: [5, 20, 10]\n", "spec.analysis.stepWeights"),
            ("    stepWeights: [5, 5]\n", "spec.analysis.stepWeights"),
            ("    stepWeights: [0, 5]\n", "spec.analysis.stepWeights"),
            ("    maxWeight: 60\n    stepWeights: [5, 10, 50]\n", "spec.analysis.maxWeight"),
            ("    interval: 1x\n    maxWeight: 50\n    stepWeight: 5\n", "spec.analysis.interval"),
            ("    interval: 0s\n    maxWeight: 50\n    stepWeight: 5\n", "spec.analysis.interval"),
            ("    threshold: -1\n", "spec.analysis.threshold"),
            (
                "    maxWeight: 50\n    stepWeight: 5\n    metrics: [{name: request-success-rate, thresholdRange: {min: 101}}]\n",
                "spec.analysis.metrics[request-success-rate].thresholdRange.min",
            ),
        ];
        for (analysis, field) in cases {
            let e = err(&with_analysis(analysis));
            assert_eq!(e.field, field, "{analysis}: {e}");
        }
    }

    #[test]
    fn subsets_are_resolved_or_named() {
        let known: Vec<String> = vec!["v1".into(), "v2".into()];
        let base = pb::CanarySpec {
            service: "payment".into(),
            step_weight: 10,
            max_weight: 50,
            threshold: 2,
            interval_ms: 1000,
            min_requests: 20,
            promote_weight: 90,
            source: "ctl".into(),
            ..Default::default()
        };
        let s = resolve(base.clone(), &known, "v1").expect("resolves");
        assert_eq!((s.canary.as_str(), s.stable.as_str(), s.min_requests, s.promote_weight), ("v2", "v1", 20, 90));
        let e = resolve(pb::CanarySpec { canary: "v3".into(), ..base.clone() }, &known, "v1").expect_err("unknown");
        assert_eq!(e.field, "--canary");
        assert!(e.message.contains("its subsets are v1, v2"), "{e}");
        let e = resolve(pb::CanarySpec { stable: "blue".into(), ..base.clone() }, &known, "v1").expect_err("unknown");
        assert_eq!(e.field, "--stable");
        let e = resolve(pb::CanarySpec { canary: "v1".into(), ..base.clone() }, &known, "v1").expect_err("same");
        assert_eq!(e.field, "--canary");
        let three: Vec<String> = vec!["v1".into(), "v2".into(), "v3".into()];
        let e = resolve(base.clone(), &three, "v1").expect_err("which canary");
        assert_eq!(e.field, "--canary");
        let doc = pb::CanarySpec { source: "Canary/default/payment".into(), ..base };
        let e = resolve(pb::CanarySpec { canary: "v9".into(), ..doc }, &known, "v1").expect_err("unknown");
        assert_eq!(e.field, "spec.serin.canarySubset");
    }

    /// Unset = default, explicit 0 = an error naming the field or flag, for documents
    /// and `ctl` alike; a promote weight below the max weight is refused by both.
    #[test]
    fn min_requests_and_promote_weight_follow_one_rule() {
        // Documents: absent = the defaults.
        let s = parse(&with_analysis("    maxWeight: 50\n    stepWeight: 5\n")).expect("parses").spec;
        let s = resolve(s, &["v1".into(), "v2".into()], "v1").expect("resolves");
        assert_eq!((s.min_requests, s.promote_weight), (DEFAULT_MIN_REQUESTS, 100));
        // Documents: explicit 0 = an error naming the field.
        let zero = with_analysis("    maxWeight: 50\n    stepWeight: 5\n") + "  serin: {minRequests: 0}\n";
        assert_eq!(err(&zero).field, "spec.serin.minRequests");
        let zero = with_analysis("    maxWeight: 50\n    stepWeight: 5\n") + "  serin: {promoteWeight: 0}\n";
        assert_eq!(err(&zero).field, "spec.serin.promoteWeight");
        // Documents: a promote weight below the max weight.
        let low = with_analysis("    maxWeight: 50\n    stepWeight: 5\n") + "  serin: {promoteWeight: 40}\n";
        let e = err(&low);
        assert_eq!(e.field, "spec.serin.promoteWeight", "{e}");
        assert!(e.message.contains("below the max weight 50"), "{e}");
        let low = with_analysis("    stepWeights: [10, 60]\n") + "  serin: {promoteWeight: 50}\n";
        assert_eq!(err(&low).field, "spec.serin.promoteWeight");
        let equal = with_analysis("    maxWeight: 50\n    stepWeight: 5\n") + "  serin: {promoteWeight: 50}\n";
        assert_eq!(parse(&equal).expect("the max weight itself is fine").spec.promote_weight, 50);

        // ctl (the Start call): every value explicit; 0 = an error naming the flag.
        let ctl = pb::CanarySpec {
            service: "payment".into(),
            step_weight: 10,
            max_weight: 50,
            threshold: 2,
            interval_ms: 1000,
            min_requests: 10,
            promote_weight: 100,
            source: "ctl".into(),
            ..Default::default()
        };
        let known: Vec<String> = vec!["v1".into(), "v2".into()];
        assert!(resolve(ctl.clone(), &known, "v1").is_ok());
        let e = resolve(pb::CanarySpec { min_requests: 0, ..ctl.clone() }, &known, "v1").expect_err("0");
        assert_eq!(e.field, "--min-requests", "{e}");
        let e = resolve(pb::CanarySpec { promote_weight: 0, ..ctl.clone() }, &known, "v1").expect_err("0");
        assert_eq!(e.field, "--promote-weight", "{e}");
        let e = resolve(pb::CanarySpec { promote_weight: 30, ..ctl.clone() }, &known, "v1").expect_err("low");
        assert_eq!(e.field, "--promote-weight", "{e}");
        assert!(e.message.contains("below the max weight 50"), "{e}");
        let steps = pb::CanarySpec { step_weight: 0, step_weights: vec![10, 60], max_weight: 0, ..ctl };
        let e = resolve(pb::CanarySpec { promote_weight: 50, ..steps }, &known, "v1").expect_err("low");
        assert_eq!(e.field, "--promote-weight", "{e}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_go_duration("30").is_err());
        assert!(parse_go_duration("s").is_err());
        assert!(parse_go_duration("1d").is_err());
    }

    #[test]
    fn steps_cap_at_the_max_weight() {
        let s = pb::CanarySpec { step_weight: 20, max_weight: 50, ..Default::default() };
        assert_eq!(steps(&s), vec![20, 40, 50]);
        let s = pb::CanarySpec { step_weight: 80, max_weight: 50, ..Default::default() };
        assert_eq!(steps(&s), vec![50]);
    }
}
