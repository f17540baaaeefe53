//! The mesh config the control plane serves: Istio documents grouped by resource
//! type, each type with its own version, plus the weights set through the API,
//! persisted in a state folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::StoreError;
use super::canary::{self, FieldError};
use super::hosts::same_service;
use super::persist::{self, Override, State, VersionEntry};
use super::weights;
use crate::pb;
use crate::types::ResourceType;
use crate::yaml::{self, Mapping, Yaml};

/// One Istio document as the store holds it.
#[derive(Debug, Clone)]
pub(crate) struct Document {
    /// `VirtualService`, `DestinationRule`, …
    pub kind: String,
    /// `namespace/name`.
    pub name: String,
    /// The namespace (`default` when the name has none).
    pub namespace: String,
    /// The parsed document.
    pub value: Yaml,
    /// The text as loaded.
    pub yaml: String,
    /// True once `value` was edited (then `yaml` is rewritten from it).
    pub edited: bool,
}

impl Document {
    /// `Kind/namespace/name`, the resource name on the wire.
    pub(crate) fn resource_name(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// One resource as served to the sidecars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResource {
    /// `Kind/namespace/name`.
    pub name: String,
    /// The Istio kind.
    pub kind: String,
    /// The resource's namespace.
    pub namespace: String,
    /// The document's YAML text.
    pub yaml: Arc<str>,
    /// The hosts of the services the resource is about; `None` for resources every
    /// subscriber gets (Gateway, security policies).
    pub hosts: Option<Vec<String>>,
}

impl StoredResource {
    /// True when a subscriber to `names` (services; empty = all) gets this resource.
    pub fn selected_by(&self, names: &[String]) -> bool {
        match &self.hosts {
            _ if names.is_empty() => true,
            None => true,
            Some(hosts) => hosts.iter().any(|h| names.iter().any(|n| same_service(h, n, &self.namespace))),
        }
    }
}

/// The current resources of one type and their version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSnapshot {
    /// The type.
    pub ty: ResourceType,
    /// Its version (a counter per type, never reused, persisted).
    pub version: u64,
    /// Every resource of the type, in load order.
    pub resources: Vec<StoredResource>,
}

impl TypeSnapshot {
    /// The resources a subscriber to `names` (services; empty = all) gets.
    pub fn select<'a>(&'a self, names: &'a [String]) -> impl Iterator<Item = &'a StoredResource> + 'a {
        self.resources.iter().filter(move |r| r.selected_by(names))
    }
}

/// What a change through the API did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The type changed (routes, for weights).
    pub ty: ResourceType,
    /// The version carrying the change; the current one when nothing changed.
    pub version: u64,
    /// False when the config already said this.
    pub changed: bool,
    /// The weights now in force for the service (subset → percentage).
    pub weights: BTreeMap<String, u32>,
    /// The service's stable subset.
    pub stable_subset: String,
    /// The documents edited, `Kind/namespace/name`.
    pub resources: Vec<String>,
}

/// Why [`Store::set_weights_if`] changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum SetWeightsIfError {
    /// The weights in force are not the ones expected: someone else changed them.
    #[error(
        "weights changed outside the analysis: {service} is at {}, expected {}",
        weights::describe(current),
        expected.iter().map(weights::describe).collect::<Vec<_>>().join(" or ")
    )]
    Changed {
        /// The service.
        service: String,
        /// The weights in force (subset → percentage).
        current: BTreeMap<String, u32>,
        /// The weights that were expected (any of them).
        expected: Vec<BTreeMap<String, u32>>,
    },
    /// The store refused the weights themselves.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The mesh config: base documents (from the config folder), the weights set through
/// the API on top, and a version per resource type.
///
/// Every method is synchronous; the ones that change something write the state folder
/// (fsync included) before they return, so call them off the async runtime
/// (`spawn_blocking`) when latency matters.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    state_dir: Option<PathBuf>,
    changes: watch::Sender<u64>,
    /// Bumped when the Canary documents change.
    canary_changes: watch::Sender<u64>,
}

#[derive(Debug)]
struct Inner {
    base: Vec<Document>,
    effective: Vec<Document>,
    state: State,
    snapshots: BTreeMap<ResourceType, Arc<TypeSnapshot>>,
    warnings: Vec<String>,
    /// The `Canary` documents (flagger.app), checked and resolved against the mesh.
    canaries: Vec<pb::CanarySpec>,
}

/// A document to load: `(kind, "namespace/name", yaml)`.
pub type SourceDocument = (String, String, String);

impl Store {
    /// A store of `documents` without persistence (tests, `serin demo`). Each
    /// document is `(kind, "namespace/name", yaml)`; kinds the control plane does not
    /// serve are skipped with a warning, except `Canary` (flagger.app/v1beta1), kept
    /// for the canary analyses ([`Store::canaries`]); an invalid one fails the load.
    pub fn from_documents(documents: Vec<SourceDocument>) -> Result<Store, StoreError> {
        Store::build(None, documents)
    }

    /// A store of `documents` persisted in `state_dir`: the weights set through the API
    /// before (kept in the folder) are applied again over the documents, and versions
    /// go on from the persisted ones. The folder is created when missing.
    pub fn open(state_dir: &Path, documents: Vec<SourceDocument>) -> Result<Store, StoreError> {
        Store::build(Some(state_dir.to_path_buf()), documents)
    }

    fn build(state_dir: Option<PathBuf>, documents: Vec<SourceDocument>) -> Result<Store, StoreError> {
        let mut warnings = Vec::new();
        let (base, canaries) = parse_sources(documents, &mut warnings)?;
        let state = match &state_dir {
            Some(dir) => persist::load(dir)?,
            None => State::new(),
        };
        let (effective, override_warnings) = apply_overrides(&base, &state.overrides);
        warnings.extend(override_warnings);
        let (snapshots, versions) = snapshots(&effective, &state.versions)?;
        let new_state = State { versions, ..state.clone() };
        if let Some(dir) = &state_dir
            && new_state != state
        {
            persist::save(dir, &new_state)?;
        }
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        let inner = Inner { base, effective, state: new_state, snapshots, warnings, canaries };
        Ok(Store {
            inner: Mutex::new(inner),
            state_dir,
            changes: watch::Sender::new(0),
            canary_changes: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves whole values behind (every change is
        // computed aside and swapped in at the end), so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state folder, when the store persists.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// The `Canary` documents of the config folder, checked against the mesh (known
    /// service and subsets), subsets and defaults filled in.
    pub fn canaries(&self) -> Vec<pb::CanarySpec> {
        self.lock().canaries.clone()
    }

    /// A receiver that sees a new value after every change of the Canary documents.
    pub fn subscribe_canaries(&self) -> watch::Receiver<u64> {
        self.canary_changes.subscribe()
    }

    /// Checks a canary spec against the config in force (the service has subsets and a
    /// route to split, the subsets exist) and fills in its subsets and defaults.
    pub fn resolve_canary(&self, spec: pb::CanarySpec) -> Result<pb::CanarySpec, FieldError> {
        canary::resolve_against(&self.lock().effective, spec)
    }

    /// The current snapshot of a type.
    pub fn snapshot(&self, ty: ResourceType) -> Arc<TypeSnapshot> {
        let inner = self.lock();
        Arc::clone(&inner.snapshots[&ty])
    }

    /// The current version of every type.
    pub fn versions(&self) -> BTreeMap<ResourceType, u64> {
        self.lock().snapshots.iter().map(|(ty, s)| (*ty, s.version)).collect()
    }

    /// A receiver that sees a new value after every change of any type's version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Things the operator should know: skipped kinds, API weights that no longer
    /// apply or that override the config folder's.
    pub fn warnings(&self) -> Vec<String> {
        self.lock().warnings.clone()
    }

    /// The weights set through the API, service → (subset → percentage), in the order
    /// they were set.
    pub fn overrides(&self) -> Vec<(String, BTreeMap<String, u32>)> {
        self.lock().state.overrides.iter().map(|o| (o.service.clone(), o.weights.clone())).collect()
    }

    /// The weights of `service` as its routes say now (subset → weight).
    pub fn weights(&self, service: &str) -> BTreeMap<String, u32> {
        weights::current(&self.lock().effective, service)
    }

    /// The documents served, optionally only those about `service` and of type `ty`:
    /// `(type, Kind/namespace/name, yaml)`.
    pub fn documents(&self, service: Option<&str>, ty: Option<ResourceType>) -> Vec<(ResourceType, String, Arc<str>)> {
        let names: Vec<String> = service.map(|s| vec![s.to_string()]).unwrap_or_default();
        let inner = self.lock();
        ResourceType::ALL
            .into_iter()
            .filter(|t| ty.is_none_or(|ty| ty == *t))
            .flat_map(|t| {
                inner.snapshots[&t]
                    .select(&names)
                    .map(move |r| (t, r.name.clone(), Arc::clone(&r.yaml)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Sets the traffic split of `service` (short name or FQDN) between its subsets:
    /// percentages that add up to 100, naming subsets its DestinationRule defines.
    /// Written to the state folder before it returns; an error changes nothing.
    pub fn set_weights(&self, service: &str, weights: &BTreeMap<String, u32>) -> Result<Change, StoreError> {
        self.change(service, weights.clone(), "set-weight")
    }

    /// Sends all traffic of `service` to its stable subset: the subset named by the
    /// DestinationRule's `serin.io/stable-subset` label or annotation, else the subset
    /// labelled `serin.io/stable: "true"`, else the one named `stable`, else the first.
    pub fn rollback(&self, service: &str) -> Result<Change, StoreError> {
        let subsets = weights::subsets(&self.lock().effective, service)?;
        let weights = subsets.names.iter().map(|n| (n.clone(), if *n == subsets.stable { 100 } else { 0 })).collect();
        self.change(service, weights, "rollback")
    }

    /// [`Store::set_weights`] only when the weights of `service` in force are one of
    /// `expected` (compare-and-set, checked and written under the store's lock; a
    /// subset missing from a split reads as 0). Otherwise nothing changes and the
    /// error is [`SetWeightsIfError::Changed`] with the weights in force. What the
    /// canary analysis uses, so that a manual `set-weight` or `rollback` landing
    /// between its read and its write is never overwritten silently.
    pub fn set_weights_if(
        &self,
        service: &str,
        expected: &[BTreeMap<String, u32>],
        weights: &BTreeMap<String, u32>,
    ) -> Result<Change, SetWeightsIfError> {
        let mut inner = self.lock();
        let current = weights::current(&inner.effective, service.trim());
        if !expected.iter().any(|e| same_split(&current, e)) {
            return Err(SetWeightsIfError::Changed {
                service: service.trim().to_string(),
                current,
                expected: expected.to_vec(),
            });
        }
        Ok(self.change_locked(&mut inner, service, weights.clone(), "canary")?)
    }

    fn change(&self, service: &str, weights: BTreeMap<String, u32>, source: &str) -> Result<Change, StoreError> {
        let mut inner = self.lock();
        self.change_locked(&mut inner, service, weights, source)
    }

    fn change_locked(
        &self,
        inner: &mut Inner,
        service: &str,
        weights: BTreeMap<String, u32>,
        source: &str,
    ) -> Result<Change, StoreError> {
        let service = service.trim();
        if service.is_empty() {
            return Err(StoreError::NoService);
        }
        // Checked and edited on the config in force, so an error names today's problem.
        let mut edited_docs = inner.effective.clone();
        let (subsets, edited) = weights::apply(&mut edited_docs, service, &weights)?;
        let mut overrides: Vec<Override> =
            inner.state.overrides.iter().filter(|o| !same_service(&o.service, service, "default")).cloned().collect();
        overrides.push(Override {
            service: service.to_string(),
            weights: weights.clone(),
            source: source.to_string(),
            set_at_unix_ms: unix_ms(SystemTime::now()),
        });
        // The same result, rebuilt from the base as a restart would, with its notes.
        let (effective, warnings) = apply_overrides(&inner.base, &overrides);
        let version = self.commit(inner, effective, overrides, Some(warnings))?;
        let (version, changed) = version[&ResourceType::Routes];
        Ok(Change {
            ty: ResourceType::Routes,
            version,
            changed,
            weights,
            stable_subset: subsets.stable,
            resources: edited,
        })
    }

    /// Forgets the weights set through the API for `service`: the config folder's
    /// weights apply again. Errors when the API set none.
    pub fn reset_weights(&self, service: &str) -> Result<Change, StoreError> {
        let mut inner = self.lock();
        let overrides: Vec<Override> =
            inner.state.overrides.iter().filter(|o| !same_service(&o.service, service, "default")).cloned().collect();
        if overrides.len() == inner.state.overrides.len() {
            return Err(StoreError::NoOverride { service: service.to_string() });
        }
        let (effective, warnings) = apply_overrides(&inner.base, &overrides);
        let stable_subset = weights::subsets(&effective, service).map(|s| s.stable).unwrap_or_default();
        let weights = weights::current(&effective, service);
        let versions = self.commit(&mut inner, effective, overrides, Some(warnings))?;
        let (version, changed) = versions[&ResourceType::Routes];
        Ok(Change { ty: ResourceType::Routes, version, changed, weights, stable_subset, resources: Vec::new() })
    }

    /// Replaces the base documents (the config folder changed): the API's weights are
    /// applied again over them, and the types whose content changed get new versions.
    /// Returns the types that changed.
    pub fn replace_documents(&self, documents: Vec<SourceDocument>) -> Result<Vec<ResourceType>, StoreError> {
        let mut warnings = Vec::new();
        let (base, canaries) = parse_sources(documents, &mut warnings)?;
        let mut inner = self.lock();
        let overrides = inner.state.overrides.clone();
        let (effective, override_warnings) = apply_overrides(&base, &overrides);
        warnings.extend(override_warnings);
        let old_base = std::mem::replace(&mut inner.base, base);
        match self.commit(&mut inner, effective, overrides, Some(warnings)) {
            Ok(versions) => {
                if inner.canaries != canaries {
                    inner.canaries = canaries;
                    self.canary_changes.send_modify(|generation| *generation += 1);
                }
                Ok(versions.into_iter().filter(|(_, (_, changed))| *changed).map(|(t, _)| t).collect())
            }
            Err(e) => {
                inner.base = old_base;
                Err(e)
            }
        }
    }

    /// Makes `effective` and `overrides` current: new versions for the types whose
    /// content changed, persisted first. Returns each type's (version, changed).
    fn commit(
        &self,
        inner: &mut Inner,
        effective: Vec<Document>,
        overrides: Vec<Override>,
        warnings: Option<Vec<String>>,
    ) -> Result<BTreeMap<ResourceType, (u64, bool)>, StoreError> {
        let (snapshots, versions) = snapshots(&effective, &inner.state.versions)?;
        let state = State { versions, overrides, ..inner.state.clone() };
        if let Some(dir) = &self.state_dir
            && state != inner.state
        {
            persist::save(dir, &state)?;
        }
        let result: BTreeMap<ResourceType, (u64, bool)> = snapshots
            .iter()
            .map(|(ty, s)| (*ty, (s.version, s.version != inner.snapshots.get(ty).map_or(0, |old| old.version))))
            .collect();
        let any_changed = result.values().any(|(_, changed)| *changed);
        inner.effective = effective;
        inner.state = state;
        inner.snapshots = snapshots;
        if let Some(mut warnings) = warnings {
            let skipped: Vec<String> =
                inner.warnings.iter().filter(|w| w.starts_with(SKIPPED_PREFIX)).cloned().collect();
            for warning in &warnings {
                tracing::warn!("{warning}");
            }
            if warnings.iter().all(|w| !w.starts_with(SKIPPED_PREFIX)) {
                warnings.splice(0..0, skipped);
            }
            inner.warnings = warnings;
        }
        if any_changed {
            self.changes.send_modify(|generation| *generation += 1);
        }
        Ok(result)
    }
}

const SKIPPED_PREFIX: &str = "skipped ";

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses the source documents; kinds not served are skipped with a warning, but
/// `Canary` documents, which are read, checked against the others and returned apart.
fn parse_sources(
    documents: Vec<SourceDocument>,
    warnings: &mut Vec<String>,
) -> Result<(Vec<Document>, Vec<pb::CanarySpec>), StoreError> {
    let mut docs: Vec<Document> = Vec::with_capacity(documents.len());
    let mut canary_docs: Vec<(String, String, Yaml)> = Vec::new();
    for (kind, name, yaml) in documents {
        if kind == "Canary" {
            let value =
                read(&yaml).map_err(|message| StoreError::Document { name: format!("{kind}/{name}"), message })?;
            let (namespace, short) = name.split_once('/').unwrap_or(("default", name.as_str()));
            canary_docs.push((namespace.to_string(), short.to_string(), value));
            continue;
        }
        if ResourceType::for_kind(&kind).is_none() {
            warnings.push(format!("{SKIPPED_PREFIX}{kind} {name}: the control plane does not serve this kind"));
            continue;
        }
        let value = read(&yaml).map_err(|message| StoreError::Document { name: format!("{kind}/{name}"), message })?;
        let (namespace, short) = match name.split_once('/') {
            Some((ns, n)) => (ns.to_string(), n.to_string()),
            None => ("default".to_string(), name.clone()),
        };
        let name = format!("{namespace}/{short}");
        if docs.iter().any(|d| d.kind == kind && d.name == name) {
            return Err(StoreError::Duplicate { kind, name });
        }
        docs.push(Document { kind, name, namespace, value, yaml, edited: false });
    }
    let mut canaries: Vec<pb::CanarySpec> = Vec::with_capacity(canary_docs.len());
    for (namespace, short, value) in canary_docs {
        let name = format!("Canary/{namespace}/{short}");
        let invalid = |e: FieldError| StoreError::Document { name: name.clone(), message: e.to_string() };
        let parsed = canary::spec::parse_document(&value, &namespace, &short).map_err(invalid)?;
        let spec = canary::resolve_against(&docs, parsed.spec).map_err(invalid)?;
        if let Some(other) = canaries.iter().find(|c| same_service(&c.service, &spec.service, "default")) {
            return Err(StoreError::Document {
                name,
                message: format!("{} already has a Canary: {}", spec.service, other.source),
            });
        }
        warnings.extend(parsed.warnings);
        canaries.push(spec);
    }
    Ok((docs, canaries))
}

/// Applies the API's weights over the base documents, in the order they were set.
/// Weights that no longer apply are skipped with a warning; weights that differ from
/// the folder's are noted (the API wins).
fn apply_overrides(base: &[Document], overrides: &[Override]) -> (Vec<Document>, Vec<String>) {
    let mut docs = base.to_vec();
    let mut warnings = Vec::new();
    for o in overrides {
        let folder = weights::current(base, &o.service);
        let mut attempt = docs.clone();
        match weights::apply(&mut attempt, &o.service, &o.weights) {
            Ok(_) => {
                docs = attempt;
                if !same_split(&folder, &o.weights) {
                    warnings.push(format!(
                        "{}: the weights set through the API ({}, by {}) win over the config folder's ({}); \
                         `serin ctl reset-weights {}` goes back to the folder's",
                        o.service,
                        weights::describe(&o.weights),
                        o.source,
                        weights::describe(&folder),
                        o.service
                    ));
                }
            }
            Err(e) => warnings.push(format!(
                "{}: the weights set through the API ({}, by {}) no longer apply to the config folder, \
                 which is used as it is: {e}",
                o.service,
                weights::describe(&o.weights),
                o.source
            )),
        }
    }
    (docs, warnings)
}

/// Same split, reading a missing subset as weight 0.
fn same_split(a: &BTreeMap<String, u32>, b: &BTreeMap<String, u32>) -> bool {
    a.keys().chain(b.keys()).all(|k| a.get(k).copied().unwrap_or(0) == b.get(k).copied().unwrap_or(0))
}

/// Builds the per-type snapshots of `docs`, with versions following `previous`: a type
/// whose content hash changed gets the next version.
#[allow(clippy::type_complexity)]
fn snapshots(
    docs: &[Document],
    previous: &BTreeMap<String, VersionEntry>,
) -> Result<(BTreeMap<ResourceType, Arc<TypeSnapshot>>, BTreeMap<String, VersionEntry>), StoreError> {
    let mut by_type: BTreeMap<ResourceType, Vec<StoredResource>> =
        ResourceType::ALL.into_iter().map(|t| (t, Vec::new())).collect();
    for doc in docs {
        let Some(ty) = ResourceType::for_kind(&doc.kind) else { continue };
        let yaml: Arc<str> = if doc.edited {
            let text = yaml::to_yaml(&doc.value)
                .map_err(|e| StoreError::Document { name: doc.resource_name(), message: e.to_string() })?;
            Arc::from(text)
        } else {
            Arc::from(doc.yaml.as_str())
        };
        let hosts = hosts_of(doc, docs);
        by_type.entry(ty).or_default().push(StoredResource {
            name: doc.resource_name(),
            kind: doc.kind.clone(),
            namespace: doc.namespace.clone(),
            yaml,
            hosts,
        });
    }
    let mut snapshots = BTreeMap::new();
    let mut versions = BTreeMap::new();
    for (ty, resources) in by_type {
        let hash = content_hash(&resources);
        let old = previous.get(ty.short_name()).copied().unwrap_or_default();
        let version = if old.version > 0 && old.hash == hash { old.version } else { old.version + 1 };
        versions.insert(ty.short_name().to_string(), VersionEntry { version, hash });
        snapshots.insert(ty, Arc::new(TypeSnapshot { ty, version, resources }));
    }
    Ok((snapshots, versions))
}

/// The service hosts a document is about; `None` when every subscriber gets it.
fn hosts_of(doc: &Document, docs: &[Document]) -> Option<Vec<String>> {
    let strings = |v: Option<&Yaml>| -> Vec<String> {
        v.and_then(Yaml::as_seq).unwrap_or(&[]).iter().filter_map(Yaml::as_str).map(str::to_string).collect()
    };
    match doc.kind.as_str() {
        "VirtualService" | "ServiceEntry" => Some(strings(doc.value.at(&["spec", "hosts"]))),
        "DestinationRule" => {
            Some(doc.value.at(&["spec", "host"]).and_then(Yaml::as_str).map(str::to_string).into_iter().collect())
        }
        "WorkloadEntry" => {
            // The hosts of the ServiceEntries (same namespace) whose workloadSelector
            // the entry's labels satisfy.
            let labels = doc.value.at(&["spec", "labels"]);
            let mut hosts = Vec::new();
            for entry in docs.iter().filter(|d| d.kind == "ServiceEntry" && d.namespace == doc.namespace) {
                let Some(selector) = entry.value.at(&["spec", "workloadSelector", "labels"]) else { continue };
                let selected = selector
                    .as_map()
                    .into_iter()
                    .flat_map(Mapping::iter)
                    .filter_map(|(k, v)| Some((k.as_str()?, v)))
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
                if selected {
                    hosts.extend(strings(entry.value.at(&["spec", "hosts"])));
                }
            }
            Some(hosts)
        }
        _ => None,
    }
}

/// FNV-1a over the resources' names and texts: stable across builds and runs.
fn content_hash(resources: &[StoredResource]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for r in resources {
        for byte in r.name.bytes().chain([0]).chain(r.yaml.bytes()).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// Reads one document; an empty one (only comments or nothing) is [`Yaml::Null`].
fn read(text: &str) -> Result<Yaml, String> {
    yaml::parse_document(text).map(Option::unwrap_or_default).map_err(|e| e.to_string())
}

/// Splits a YAML stream into `(kind, "namespace/name", yaml)` documents, for callers
/// that hold plain YAML (tests, tools). Empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<SourceDocument>, StoreError> {
    let mut out = Vec::new();
    let documents =
        crate::yaml::split_documents(text).into_iter().map(|d| d.content()).filter(|d| !d.trim().is_empty());
    for (index, doc) in documents.enumerate() {
        let value = read(doc).map_err(|message| StoreError::Document { name: format!("#{index}"), message })?;
        if matches!(value, Yaml::Null) {
            continue;
        }
        let kind = value.get("kind").and_then(Yaml::as_str).unwrap_or("").to_string();
        let ns = value.at(&["metadata", "namespace"]).and_then(Yaml::as_str).unwrap_or("default");
        let name = value.at(&["metadata", "name"]).and_then(Yaml::as_str).unwrap_or("");
        if kind.is_empty() || name.is_empty() {
            return Err(StoreError::Document {
                name: format!("#{index}"),
                message: "a document needs kind and metadata.name".to_string(),
            });
        }
        out.push((kind, format!("{ns}/{name}"), doc.to_string()));
    }
    Ok(out)
}
