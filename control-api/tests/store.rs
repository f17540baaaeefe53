//! The store on its own: weights, rollback, versions, persistence, filtering.

use std::collections::BTreeMap;

use serin_control_api::ResourceType;
use serin_control_api::server::{STATE_FILE, SourceDocument, Store, StoreError, parse_documents};

fn mesh() -> Vec<SourceDocument> {
    parse_documents(include_str!("fixtures/mesh.yaml")).expect("fixture parses")
}

fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn routes_yaml(store: &Store) -> String {
    store.snapshot(ResourceType::Routes).resources.iter().map(|r| r.yaml.to_string()).collect()
}

#[test]
fn documents_group_by_type_and_unserved_kinds_are_skipped_with_a_warning() {
    let store = Store::from_documents(mesh()).expect("store");
    let names = |ty| store.snapshot(ty).resources.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(ResourceType::Routes), ["VirtualService/default/payment", "VirtualService/default/checkout"]);
    assert_eq!(names(ResourceType::Clusters), ["DestinationRule/default/payment", "DestinationRule/default/checkout"]);
    assert_eq!(names(ResourceType::Endpoints).len(), 3);
    assert_eq!(names(ResourceType::Policies), ["PeerAuthentication/default/default"]);
    let warnings = store.warnings();
    assert!(warnings.iter().any(|w| w.contains("Sidecar default/default")), "{warnings:?}");
    assert!(store.versions().values().all(|v| *v == 1));
}

#[test]
fn a_subscription_by_service_gets_that_service_and_the_shared_policies() {
    let store = Store::from_documents(mesh()).expect("store");
    let payment = vec!["payment".to_string()];
    let endpoints: Vec<String> =
        store.snapshot(ResourceType::Endpoints).select(&payment).map(|r| r.name.clone()).collect();
    assert_eq!(
        endpoints,
        ["ServiceEntry/default/payment", "WorkloadEntry/default/payment-v1", "WorkloadEntry/default/payment-v2"]
    );
    let checkout = vec!["checkout.default.svc.cluster.local".to_string()];
    assert_eq!(store.snapshot(ResourceType::Endpoints).select(&checkout).count(), 0);
    let clusters: Vec<String> =
        store.snapshot(ResourceType::Clusters).select(&checkout).map(|r| r.name.clone()).collect();
    assert_eq!(clusters, ["DestinationRule/default/checkout"]);
    assert_eq!(store.snapshot(ResourceType::Policies).select(&checkout).count(), 1);
}

#[test]
fn set_weights_edits_the_split_route_only_and_bumps_the_routes_version() {
    let store = Store::from_documents(mesh()).expect("store");
    let change = store.set_weights("payment", &weights(&[("v1", 90), ("v2", 10)])).expect("set");
    assert!(change.changed);
    assert_eq!(change.version, 2);
    assert_eq!(change.resources, ["VirtualService/default/payment"]);
    assert_eq!(change.stable_subset, "v1");
    assert_eq!(store.weights("payment"), weights(&[("v1", 90), ("v2", 10)]));
    let versions = store.versions();
    assert_eq!(versions[&ResourceType::Routes], 2);
    assert_eq!(versions[&ResourceType::Clusters], 1, "a weight change leaves the other types alone");
    // The header-pinned route still goes to v2 alone.
    let yaml = routes_yaml(&store);
    assert!(yaml.contains("canary-override"), "{yaml}");
    let pinned = yaml.split("name: split").next().expect("before the split");
    assert!(!pinned.contains("weight"), "the pinned route got weights: {pinned}");
    // Setting the same again makes no new version.
    let again =
        store.set_weights("payment.default.svc.cluster.local", &weights(&[("v1", 90), ("v2", 10)])).expect("set");
    assert!(!again.changed);
    assert_eq!(again.version, 2);
}

#[test]
fn bad_weights_change_nothing_and_name_the_problem() {
    let store = Store::from_documents(mesh()).expect("store");
    let before = routes_yaml(&store);
    let e = store.set_weights("payment", &weights(&[("v1", 90), ("v2", 20)])).expect_err("sum 110");
    assert!(matches!(e, StoreError::BadSum { sum: 110, .. }), "{e}");
    assert!(e.to_string().contains("add up to 110, not 100"), "{e}");
    let e = store.set_weights("payment", &weights(&[("v1", 90), ("v3", 10)])).expect_err("v3");
    assert_eq!(e.to_string(), "payment has no subset v3; its subsets are v1, v2");
    let e = store.set_weights("ledger", &weights(&[("v1", 100)])).expect_err("no such service");
    assert!(e.to_string().contains("no DestinationRule defines subsets for ledger"), "{e}");
    assert_eq!(routes_yaml(&store), before);
    assert_eq!(store.versions()[&ResourceType::Routes], 1);
    assert!(store.overrides().is_empty());
}

#[test]
fn rollback_goes_to_the_stable_subset() {
    let store = Store::from_documents(mesh()).expect("store");
    // payment: no mark, so the first subset.
    let change = store.rollback("payment").expect("rollback");
    assert_eq!(change.stable_subset, "v1");
    assert_eq!(store.weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    // checkout: the DestinationRule names `blue`; the one-destination default route
    // becomes a split.
    let change = store.rollback("checkout").expect("rollback");
    assert_eq!(change.stable_subset, "blue");
    assert_eq!(store.weights("checkout"), weights(&[("blue", 100), ("stable", 0)]));
}

#[test]
fn a_subset_labelled_stable_is_the_stable_one() {
    let yaml = include_str!("fixtures/mesh.yaml").replace(
        "  - name: v2\n    labels:\n      version: v2\n",
        "  - name: v2\n    labels:\n      version: v2\n      serin.io/stable: \"true\"\n",
    );
    let store = Store::from_documents(parse_documents(&yaml).expect("parse")).expect("store");
    assert_eq!(store.rollback("payment").expect("rollback").stable_subset, "v2");
}

#[test]
fn weights_persist_across_open_and_versions_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path(), mesh()).expect("open");
        assert!(dir.path().join(STATE_FILE).exists(), "versions are written on first open");
        let change = store.set_weights("payment", &weights(&[("v1", 60), ("v2", 40)])).expect("set");
        assert_eq!(change.version, 2);
    }
    let store = Store::open(dir.path(), mesh()).expect("reopen");
    assert_eq!(store.weights("payment"), weights(&[("v1", 60), ("v2", 40)]));
    assert_eq!(store.versions()[&ResourceType::Routes], 2, "same content, same version");
    assert!(store.warnings().iter().any(|w| w.contains("win over the config folder's")), "{:?}", store.warnings());
    drop(store);
    // The folder changed while the control plane was down: a new version, the API's
    // weights still on top.
    let changed = include_str!("fixtures/mesh.yaml").replace("timeout: 3s", "timeout: 5s");
    let store = Store::open(dir.path(), parse_documents(&changed).expect("parse")).expect("reopen");
    assert_eq!(store.versions()[&ResourceType::Routes], 3);
    assert_eq!(store.weights("payment"), weights(&[("v1", 60), ("v2", 40)]));
    assert!(routes_yaml(&store).contains("5s"));
    // Reset: the folder's weights again.
    let change = store.reset_weights("payment").expect("reset");
    assert_eq!(change.version, 4);
    assert_eq!(store.weights("payment"), weights(&[("v1", 95), ("v2", 5)]));
    assert!(store.reset_weights("payment").is_err(), "nothing left to reset");
}

#[test]
fn weights_that_no_longer_apply_are_reported_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    Store::open(dir.path(), mesh())
        .expect("open")
        .set_weights("payment", &weights(&[("v1", 50), ("v2", 50)]))
        .expect("set");
    let without_v2 = include_str!("fixtures/mesh.yaml").replace("  - name: v2\n    labels:\n      version: v2\n", "");
    let store = Store::open(dir.path(), parse_documents(&without_v2).expect("parse")).expect("reopen");
    assert!(
        store.warnings().iter().any(|w| w.contains("no longer apply") && w.contains("no subset v2")),
        "{:?}",
        store.warnings()
    );
}

#[test]
fn a_broken_state_file_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(STATE_FILE), "{not json").expect("write");
    let e = Store::open(dir.path(), mesh()).expect_err("broken state");
    assert!(e.to_string().contains(STATE_FILE), "{e}");
}

#[test]
fn replacing_documents_bumps_only_the_types_that_changed() {
    let store = Store::from_documents(mesh()).expect("store");
    let mut changes = store.subscribe();
    let changed = include_str!("fixtures/mesh.yaml").replace("mode: STRICT", "mode: PERMISSIVE");
    let types = store.replace_documents(parse_documents(&changed).expect("parse")).expect("replace");
    assert_eq!(types, [ResourceType::Policies]);
    assert!(changes.has_changed().expect("sender alive"));
    changes.mark_unchanged();
    let versions = store.versions();
    assert_eq!((versions[&ResourceType::Policies], versions[&ResourceType::Routes]), (2, 1));
    let types = store.replace_documents(parse_documents(&changed).expect("parse")).expect("replace");
    assert!(types.is_empty());
    assert!(!changes.has_changed().expect("sender alive"));
}
