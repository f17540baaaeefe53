//! Hot reload from a folder: a change is applied, an identical rewrite is not,
//! a broken file is rejected and the last good snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serin::access_log::AccessLog;
use serin::reload::{self, ReloadOutcome};
use serin::snapshot::{RouteAction, Snapshot};
use serin::state::{LocalWorkload, Shared};

const REGISTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment}
spec:
  hosts: [payment]
  resolution: STATIC
  ports: [{number: 8080, name: http}]
  endpoints:
  - {address: 127.0.0.1, labels: {version: v1}}
  - {address: 127.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment}
spec:
  host: payment
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
";

fn route(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment}}
spec:
  hosts: [payment]
  http:
  - route:
    - {{destination: {{host: payment, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: payment, subset: v2}}, weight: {v2}}}
"
    )
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("serin-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn weights(shared: &Shared) -> Vec<u32> {
    let snap = shared.snapshot.load();
    let Some(vh) = snap.find_virtual_host("payment") else { return vec![] };
    match &vh.routes[0].action {
        RouteAction::Forward(w) => w.destinations.iter().map(|d| d.weight).collect(),
        _ => vec![],
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    // Generous bound: this checks the behaviour, not the speed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

#[test]
fn reload_now_applies_once_and_rejects_bad_config() {
    let dir = temp_dir("reload-now");
    write(&dir, "registry.yaml", REGISTRY);
    write(&dir, "route.yaml", &route(95, 5));
    let shared = Shared::new(Snapshot::empty("none"), LocalWorkload::default(), AccessLog::new(false));
    let first = reload::reload_now(&dir, &shared).expect("valid");
    assert!(matches!(first, ReloadOutcome::Applied(_)));
    assert_eq!(weights(&shared), vec![95, 5]);
    assert!(matches!(reload::reload_now(&dir, &shared), Ok(ReloadOutcome::Unchanged(_))));
    write(&dir, "route.yaml", &route(0, 0));
    let errors = reload::reload_now(&dir, &shared).expect_err("all-zero weights");
    assert!(errors.to_string().contains("total destination weight is 0"));
    assert_eq!(weights(&shared), vec![95, 5], "last good snapshot keeps serving");
    let rejected = shared.rejected.lock().map(|r| r.clone()).ok().flatten().expect("recorded");
    assert!(rejected.error.contains("route.yaml"), "{}", rejected.error);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A config folder (95/5) loaded as a sidecar loads it: the files' fingerprint
/// taken first, for the watch.
fn loaded_folder(tag: &str) -> (PathBuf, Arc<Shared>, reload::Fingerprint) {
    let dir = temp_dir(tag);
    write(&dir, "registry.yaml", REGISTRY);
    write(&dir, "route.yaml", &route(95, 5));
    let shared = Shared::new(Snapshot::empty("none"), LocalWorkload::default(), AccessLog::new(false));
    let loaded = reload::fingerprint(&dir);
    reload::reload_now(&dir, &shared).expect("initial config");
    (dir, shared, loaded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_changes_and_keeps_last_good() {
    let (dir, shared, loaded) = loaded_folder("watch");
    let handle = reload::spawn_watch(dir.clone(), Arc::clone(&shared), Some(loaded));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Rollback: v2 to 0.
    write(&dir, "route.yaml", &route(100, 0));
    wait_for("the rollback", || weights(&shared) == vec![100]).await;
    let version = shared.snapshot.load().version.clone();

    // A broken file is rejected; the rollback keeps serving.
    write(&dir, "route.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: [\n");
    wait_for("the rejection", || shared.rejected.lock().map(|r| r.is_some()).unwrap_or(false)).await;
    assert_eq!(shared.snapshot.load().version, version);

    // Fixed again.
    write(&dir, "route.yaml", &route(50, 50));
    wait_for("the fix", || weights(&shared) == vec![50, 50]).await;
    handle.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An edit made after the initial load but before the watch started gives no file
/// event and the poll's first look already includes it: the watch compares with
/// the files as that load read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_an_edit_made_before_it_started() {
    let (dir, shared, loaded) = loaded_folder("watch-late");
    write(&dir, "route.yaml", &route(100, 0));
    let handle = reload::spawn_watch(dir.clone(), Arc::clone(&shared), Some(loaded));
    wait_for("the edit made before the watch", || weights(&shared) == vec![100]).await;
    handle.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_a_single_file_edited_in_place() {
    let dir = temp_dir("watch-file");
    let file = dir.join("all.yaml");
    std::fs::write(&file, format!("{REGISTRY}---\n{}", route(95, 5))).expect("write");
    let shared = Shared::new(Snapshot::empty("none"), LocalWorkload::default(), AccessLog::new(false));
    let handle = reload::spawn_watch(file.clone(), Arc::clone(&shared), None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&file, format!("{REGISTRY}---\n{}", route(1, 999))).expect("write");
    wait_for("the edit", || weights(&shared) == vec![1, 999]).await;
    assert_eq!(shared.snapshot.load().source, format!("file:{}", file.display()));
    handle.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
