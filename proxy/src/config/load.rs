//! Reading files and folders into a [`ConfigSet`]: YAML documents → typed Istio
//! resources → per-resource validation. Cross-resource checks (hosts in the
//! registry, subsets, ports) happen in `compile`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serin_control_api::server::canary::spec::{self as canary_spec, FieldError};

use super::error::{ConfigError, ConfigErrors, Sink};
use super::model::{Envelope, LoadedResource, Resource};
use super::validate;
use super::yaml::{self, Document};

/// A loaded, validated set of Istio resources (the configuration model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSet {
    /// Resources in file order.
    pub resources: Vec<LoadedResource>,
    /// Short hex hash of the configuration text (the snapshot version).
    pub hash: String,
    /// Files (or origins) read, in order.
    pub origins: Vec<String>,
    /// Things worth telling the user that are not errors (e.g. kinds accepted but
    /// not applied to the sidecar snapshot).
    pub warnings: Vec<String>,
}

impl ConfigSet {
    /// Number of resources of each kind, e.g. `2 VirtualService, 1 DestinationRule`.
    pub fn summary(&self) -> String {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for r in &self.resources {
            match counts.iter_mut().find(|(k, _)| k == r.resource.kind()) {
                Some((_, n)) => *n += 1,
                None => counts.push((r.resource.kind().to_string(), 1)),
            }
        }
        counts.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
    }
}

/// The Istio API versions serin reads for networking resources.
const NETWORKING_VERSIONS: [&str; 3] =
    ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];

/// The Istio API versions serin reads for PeerAuthentication and AuthorizationPolicy.
const SECURITY_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Istio kinds accepted but not applied to the sidecar snapshot, with their API group.
const NOT_APPLIED: [(&str, &str); 7] = [
    ("networking.istio.io", "Sidecar"),
    ("networking.istio.io", "EnvoyFilter"),
    ("networking.istio.io", "WorkloadGroup"),
    ("networking.istio.io", "ProxyConfig"),
    ("security.istio.io", "RequestAuthentication"),
    ("telemetry.istio.io", "Telemetry"),
    ("extensions.istio.io", "WasmPlugin"),
];

/// Loads a file, or every `*.yaml` / `*.yml` file of a folder (sorted, not recursive).
pub fn load_path(path: &Path) -> Result<ConfigSet, ConfigErrors> {
    load_paths(&[path.to_path_buf()])
}

/// Loads several files or folders as one set (e.g. a config and a registry file).
pub fn load_paths(paths: &[PathBuf]) -> Result<ConfigSet, ConfigErrors> {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    for path in paths {
        match yaml_files(path) {
            Ok(files) => {
                for file in files {
                    match std::fs::read_to_string(&file) {
                        Ok(text) => sources.push((file.display().to_string(), text)),
                        Err(e) => errors.push(ConfigError::new(&file.display().to_string(), "", "", e.to_string())),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    let texts: Vec<(&str, &str)> = sources.iter().map(|(o, t)| (o.as_str(), t.as_str())).collect();
    match load_sources(&texts) {
        Ok(set) if errors.is_empty() => Ok(set),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(more) => {
            errors.extend(more);
            Err(ConfigErrors(errors))
        }
    }
}

/// The YAML files a path stands for.
pub(crate) fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let origin = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::new(&origin, "", "", e.to_string()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| ConfigError::new(&origin, "", "", e.to_string()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Loads one YAML text; `origin` names it in errors (e.g. `<embedded>`).
pub fn load_str(text: &str, origin: &str) -> Result<ConfigSet, ConfigErrors> {
    load_sources(&[(origin, text)])
}

/// Loads several `(origin, text)` sources as one set, collecting every error.
pub fn load_sources(sources: &[(&str, &str)]) -> Result<ConfigSet, ConfigErrors> {
    let mut set = ConfigSet::default();
    let mut errors = Vec::new();
    let mut hasher = Fnv::new();
    for (origin, text) in sources {
        hasher.write(text.as_bytes());
        hasher.write(&[0xff]);
        set.origins.push((*origin).to_string());
        for doc in yaml::split_documents(text) {
            load_document(origin, doc, &mut set, &mut errors);
        }
    }
    set.hash = format!("{:016x}", hasher.finish());
    check_duplicates(&set, &mut errors);
    ConfigErrors(errors).into_result(set)
}

fn load_document(origin: &str, doc: Document<'_>, set: &mut ConfigSet, errors: &mut Vec<ConfigError>) {
    let header = match yaml::parse_header(doc) {
        Ok(Some(header)) => header,
        Ok(None) => return,
        Err(e) => {
            let mut error = ConfigError::new(origin, "", "", format!("invalid YAML: {}", e.message));
            error.location = e.location;
            errors.push(error);
            return;
        }
    };
    let (kind, api) = (header.kind().to_string(), header.api_version().to_string());
    let display = format!("{kind} {}", header.name());
    let bad = |field: &str, message: String| ConfigError::new(origin, &display, field, message).at(doc.first_line, 1);
    let networking = NETWORKING_VERSIONS.contains(&api.as_str());
    let security = SECURITY_VERSIONS.contains(&api.as_str());
    let resource = match kind.as_str() {
        "" => return errors.push(bad("kind", "missing kind".into())),
        "VirtualService" | "DestinationRule" | "ServiceEntry" | "WorkloadEntry" | "Gateway" if !networking => {
            let message = format!(
                "unsupported apiVersion {api:?} for {kind} (expected one of {})",
                NETWORKING_VERSIONS.join(", ")
            );
            return errors.push(bad("apiVersion", message));
        }
        "PeerAuthentication" | "AuthorizationPolicy" if !security => {
            let message =
                format!("unsupported apiVersion {api:?} for {kind} (expected one of {})", SECURITY_VERSIONS.join(", "));
            return errors.push(bad("apiVersion", message));
        }
        "VirtualService" => typed(origin, doc, &display, errors).map(Resource::VirtualService),
        "DestinationRule" => typed(origin, doc, &display, errors).map(Resource::DestinationRule),
        "ServiceEntry" => typed(origin, doc, &display, errors).map(Resource::ServiceEntry),
        "WorkloadEntry" => typed(origin, doc, &display, errors).map(Resource::WorkloadEntry),
        "Gateway" => typed(origin, doc, &display, errors).map(Resource::Gateway),
        "PeerAuthentication" => {
            typed(origin, doc, &display, errors).map(no_spec_is_empty).map(Resource::PeerAuthentication)
        }
        "AuthorizationPolicy" => {
            typed(origin, doc, &display, errors).map(no_spec_is_empty).map(Resource::AuthorizationPolicy)
        }
        "Canary" if api.split('/').next() == Some("flagger.app") => {
            let r = typed::<serde_json::Value>(origin, doc, &display, errors).map(Resource::NotApplied);
            if r.is_some() {
                let name = header.name();
                let (namespace, name) = name.split_once('/').unwrap_or(("default", name.as_str()));
                if let Err(e) = check_canary(doc, namespace, name) {
                    return errors.push(bad(&e.field, e.message));
                }
                set.warnings.push(format!(
                    "{origin}: {display}: kind Canary is run by the control plane's canary analysis, not by a proxy (its fields are checked here; its service and subsets when the control plane loads it)"
                ));
            }
            r
        }
        other => match NOT_APPLIED.iter().find(|(_, k)| *k == other) {
            Some((group, _)) if api.split('/').next() == Some(group) => {
                let r = typed::<serde_json::Value>(origin, doc, &display, errors).map(Resource::NotApplied);
                if r.is_some() {
                    set.warnings.push(format!(
                        "{origin}: {display}: kind {kind} is accepted but not applied by serin (its spec is not checked)"
                    ));
                }
                r
            }
            Some((group, _)) => {
                return errors.push(bad(
                    "apiVersion",
                    format!("unsupported apiVersion {api:?} for {kind} (expected {group}/…)"),
                ));
            }
            None => {
                return errors.push(bad("kind", format!("unknown kind {other:?} (apiVersion {api:?}): serin reads VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, Gateway, PeerAuthentication and AuthorizationPolicy")));
            }
        },
    };
    let Some(resource) = resource else { return };
    let before = errors.len();
    let mut sink = Sink { file: origin, resource: resource.display_name(), errors };
    validate::check_resource(&resource, &mut sink);
    if errors.len() == before {
        if let Resource::AuthorizationPolicy(ap) = &resource
            && validate::security::is_dry_run(&ap.metadata)
        {
            set.warnings.push(format!(
                "{origin}: {display}: dry-run (annotation {}): checked but not enforced; \
                 serin does not report what it would have decided",
                validate::security::DRY_RUN_ANNOTATION
            ));
        }
        set.resources.push(LoadedResource { file: origin.to_string(), line: doc.first_line, resource });
    }
}

/// Checks a `Canary` document's fields as the control plane reads them (its service and
/// subsets are checked there, against the mesh config).
fn check_canary(doc: Document<'_>, namespace: &str, name: &str) -> Result<(), FieldError> {
    let tree = serin_control_api::yaml::parse_document(doc.content())
        .map_err(|e| FieldError { field: String::new(), message: e.to_string() })?
        .unwrap_or_default();
    canary_spec::parse_document(&tree, namespace, name).map(|_| ())
}

fn typed<S: DeserializeOwned>(
    origin: &str,
    doc: Document<'_>,
    display: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Envelope<S>> {
    match yaml::parse_typed::<Envelope<S>>(doc) {
        Ok(envelope) => Some(envelope),
        Err(e) => {
            let mut error = ConfigError::new(origin, display, &e.path, e.message);
            error.location = e.location;
            errors.push(error);
            None
        }
    }
}

/// A missing or null `spec` (`spec:` with nothing under it, as older Istio docs
/// write a deny-all AuthorizationPolicy) is the empty spec.
fn no_spec_is_empty<S: Default>(envelope: Envelope<Option<S>>) -> Envelope<S> {
    Envelope {
        api_version: envelope.api_version,
        kind: envelope.kind,
        metadata: envelope.metadata,
        spec: envelope.spec.unwrap_or_default(),
        status: envelope.status,
    }
}

fn check_duplicates(set: &ConfigSet, errors: &mut Vec<ConfigError>) {
    let mut seen: HashMap<String, &LoadedResource> = HashMap::new();
    for r in &set.resources {
        let key = r.resource.display_name();
        if let Some(first) = seen.get(&key) {
            let message = format!("defined twice (first in {}:{})", first.file, first.line);
            errors.push(ConfigError::new(&r.file, &key, "metadata.name", message).at(r.line, 1));
        } else {
            seen.insert(key, r);
        }
    }
}

/// FNV-1a, 64 bit: a stable content hash (same text → same version, across runs).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
