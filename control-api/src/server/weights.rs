//! Editing the route weights of a service in its VirtualServices.
//!
//! Which routes are edited: among the `http`, `tcp` and `tls` routes of every
//! VirtualService whose destinations all go to the service, the *split* routes (two
//! destinations or more). When there is none, the routes without a `match` (the
//! default routes). So a header-pinned route (`x-canary: always` → v2) is left alone,
//! and a plain one-destination route becomes a split on the first `set-weight`.
//!
//! How a route is edited: every destination whose subset is named gets that weight,
//! every other one gets weight 0 (kept, so a later change finds the split again), and
//! a named subset the route lacks is added (a copy of the route's first destination)
//! unless its weight is 0.

use std::collections::BTreeMap;

use super::Document;
use super::StoreError;
use super::hosts::same_service;
use crate::yaml::Yaml;

/// DestinationRule metadata label or annotation naming the stable subset.
pub const STABLE_SUBSET_KEY: &str = "serin.io/stable-subset";
/// Subset label marking the stable subset (`serin.io/stable: "true"`).
pub const STABLE_LABEL: &str = "serin.io/stable";

/// The subsets of a service as its DestinationRules define them, in order, and the
/// stable one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subsets {
    pub names: Vec<String>,
    pub stable: String,
}

/// Reads the subsets of `service` from the DestinationRules in `docs`.
pub(crate) fn subsets(docs: &[Document], service: &str) -> Result<Subsets, StoreError> {
    let mut names: Vec<String> = Vec::new();
    let mut marked: Option<String> = None;
    for doc in docs.iter().filter(|d| d.kind == "DestinationRule") {
        let host = doc.value.at(&["spec", "host"]).and_then(Yaml::as_str).unwrap_or("");
        if !same_service(host, service, &doc.namespace) {
            continue;
        }
        let dr_subsets: Vec<&Yaml> =
            doc.value.at(&["spec", "subsets"]).and_then(Yaml::as_seq).unwrap_or(&[]).iter().collect();
        for subset in &dr_subsets {
            if let Some(name) = subset.get("name").and_then(Yaml::as_str)
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_string());
            }
        }
        if marked.is_none() {
            marked = ["labels", "annotations"]
                .iter()
                .find_map(|m| doc.value.at(&["metadata", m, STABLE_SUBSET_KEY]).and_then(Yaml::as_str))
                .map(str::to_string)
                .or_else(|| {
                    dr_subsets
                        .iter()
                        .find(|s| s.at(&["labels", STABLE_LABEL]).and_then(Yaml::as_str) == Some("true"))
                        .and_then(|s| s.get("name").and_then(Yaml::as_str))
                        .map(str::to_string)
                });
        }
    }
    if names.is_empty() {
        return Err(StoreError::NoSubsets { service: service.to_string() });
    }
    let stable = match marked {
        Some(name) if names.contains(&name) => name,
        Some(name) => {
            return Err(StoreError::UnknownSubsets { service: service.to_string(), unknown: vec![name], known: names });
        }
        None => names.iter().find(|n| *n == "stable").unwrap_or(&names[0]).clone(),
    };
    Ok(Subsets { names, stable })
}

/// Checks `weights` against the service's subsets: percentages adding up to 100, every
/// subset known. Returns the subsets.
pub(crate) fn check(docs: &[Document], service: &str, weights: &BTreeMap<String, u32>) -> Result<Subsets, StoreError> {
    if weights.is_empty() {
        return Err(StoreError::NoWeights { service: service.to_string() });
    }
    let sum: u64 = weights.values().map(|w| u64::from(*w)).sum();
    if sum != 100 {
        return Err(StoreError::BadSum { service: service.to_string(), sum, weights: describe(weights) });
    }
    let subsets = subsets(docs, service)?;
    let unknown: Vec<String> = weights.keys().filter(|k| !subsets.names.contains(k)).cloned().collect();
    if !unknown.is_empty() {
        return Err(StoreError::UnknownSubsets { service: service.to_string(), unknown, known: subsets.names });
    }
    Ok(subsets)
}

/// `v1=90 v2=10`.
pub(crate) fn describe(weights: &BTreeMap<String, u32>) -> String {
    weights.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Where a route list sits: document index, section (`http`/`tcp`/`tls`), route index.
type RouteAt = (usize, &'static str, usize);

const SECTIONS: [&str; 3] = ["http", "tcp", "tls"];

/// Sets the weights of `service` in the VirtualServices of `docs` (checked first with
/// [`check`]). Returns the names of the documents edited; an error changes nothing.
pub(crate) fn apply(
    docs: &mut [Document],
    service: &str,
    weights: &BTreeMap<String, u32>,
) -> Result<(Subsets, Vec<String>), StoreError> {
    let subsets = check(docs, service, weights)?;
    let mut candidates: Vec<(RouteAt, bool, bool)> = Vec::new(); // (where, split, has match)
    for (index, doc) in docs.iter().enumerate().filter(|(_, d)| d.kind == "VirtualService") {
        for section in SECTIONS {
            let routes = doc.value.at(&["spec", section]).and_then(Yaml::as_seq).unwrap_or(&[]);
            for (r, route) in routes.iter().enumerate() {
                let destinations = route.get("route").and_then(Yaml::as_seq).unwrap_or(&[]);
                let all_to_service = !destinations.is_empty()
                    && destinations.iter().all(|d| {
                        let host = d.at(&["destination", "host"]).and_then(Yaml::as_str).unwrap_or("");
                        same_service(host, service, &doc.namespace)
                    });
                if all_to_service {
                    let has_match = route.get("match").and_then(Yaml::as_seq).is_some_and(|m| !m.is_empty());
                    candidates.push(((index, section, r), destinations.len() >= 2, has_match));
                }
            }
        }
    }
    let any_split = candidates.iter().any(|(_, split, _)| *split);
    let targets: Vec<RouteAt> = candidates
        .into_iter()
        .filter(|(_, split, has_match)| if any_split { *split } else { !*has_match })
        .map(|(at, _, _)| at)
        .collect();
    if targets.is_empty() {
        return Err(StoreError::NoRoute { service: service.to_string() });
    }
    let mut edited: Vec<String> = Vec::new();
    for (index, section, r) in targets {
        let doc = &mut docs[index];
        let Some(route) = doc
            .value
            .at_mut(&["spec", section])
            .and_then(Yaml::as_seq_mut)
            .and_then(|routes| routes.get_mut(r))
            .and_then(|route| route.get_mut("route"))
            .and_then(Yaml::as_seq_mut)
        else {
            continue;
        };
        if edit_route(route, &subsets.names, weights) {
            doc.edited = true;
            let name = doc.resource_name();
            if !edited.contains(&name) {
                edited.push(name);
            }
        }
    }
    Ok((subsets, edited))
}

/// Rewrites one route's destinations; true when anything changed.
fn edit_route(destinations: &mut Vec<Yaml>, order: &[String], weights: &BTreeMap<String, u32>) -> bool {
    let before = destinations.clone();
    let Some(template) = destinations.first().cloned() else {
        return false;
    };
    for destination in destinations.iter_mut() {
        let subset = destination.at(&["destination", "subset"]).and_then(Yaml::as_str).unwrap_or("");
        let weight = weights.get(subset).copied().unwrap_or(0);
        if let Some(destination) = destination.as_map_mut() {
            destination.insert("weight", Yaml::Int(i64::from(weight)));
        }
    }
    for subset in order {
        let weight = weights.get(subset).copied().unwrap_or(0);
        let present =
            destinations.iter().any(|d| d.at(&["destination", "subset"]).and_then(Yaml::as_str) == Some(subset));
        if weight > 0 && !present {
            let mut added = template.clone();
            if let Some(destination) = added.get_mut("destination").and_then(Yaml::as_map_mut) {
                destination.insert("subset", Yaml::str(subset.as_str()));
            }
            if let Some(added) = added.as_map_mut() {
                added.insert("weight", Yaml::Int(i64::from(weight)));
            }
            destinations.push(added);
        }
    }
    *destinations != before
}

/// The weights of `service` as its split route says (the first route [`apply`] would
/// edit), subset → weight; empty when there is no such route.
pub(crate) fn current(docs: &[Document], service: &str) -> BTreeMap<String, u32> {
    let mut fallback = BTreeMap::new();
    for doc in docs.iter().filter(|d| d.kind == "VirtualService") {
        for section in SECTIONS {
            for route in doc.value.at(&["spec", section]).and_then(Yaml::as_seq).unwrap_or(&[]) {
                let destinations = route.get("route").and_then(Yaml::as_seq).unwrap_or(&[]);
                let all_to_service = !destinations.is_empty()
                    && destinations.iter().all(|d| {
                        let host = d.at(&["destination", "host"]).and_then(Yaml::as_str).unwrap_or("");
                        same_service(host, service, &doc.namespace)
                    });
                if !all_to_service {
                    continue;
                }
                let weights: BTreeMap<String, u32> = destinations
                    .iter()
                    .map(|d| {
                        let subset = d.at(&["destination", "subset"]).and_then(Yaml::as_str).unwrap_or("");
                        let weight = match d.get("weight") {
                            Some(w) => w.as_u64().and_then(|w| u32::try_from(w).ok()).unwrap_or(0),
                            None if destinations.len() == 1 => 100,
                            None => 0,
                        };
                        (subset.to_string(), weight)
                    })
                    .collect();
                if destinations.len() >= 2 {
                    return weights;
                }
                let has_match = route.get("match").and_then(Yaml::as_seq).is_some_and(|m| !m.is_empty());
                if fallback.is_empty() && !has_match {
                    fallback = weights;
                }
            }
        }
    }
    fallback
}
