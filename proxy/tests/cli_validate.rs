//! `serin validate`, run as a process: exit codes and the error lines (file,
//! resource, field).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("serin-cli-validate-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write file");
        path
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn validate(paths: &[&Path]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .arg("validate")
        .args(paths)
        .env("NO_COLOR", "1")
        .output()
        .expect("run serin validate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const REGISTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment, namespace: default}
spec:
  hosts: [payment.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: payment}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: payment-v1, namespace: default}
spec: {address: 127.0.0.1, ports: {http: 9080}, labels: {app: payment, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: payment-v2, namespace: default}
spec: {address: 127.0.0.1, ports: {http: 9081}, labels: {app: payment, version: v2}}
";

const RULES: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: default}
spec:
  host: payment
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: default}
spec:
  hosts: [payment]
  http:
  - route:
    - {destination: {host: payment, subset: v1}, weight: 999}
    - {destination: {host: payment, subset: v2}, weight: 1}
";

#[test]
fn a_good_folder_exits_0() {
    let dir = TempDir::new();
    dir.write("registry.yaml", REGISTRY);
    dir.write("rules.yaml", RULES);
    let (code, out, err) = validate(&[dir.path()]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.starts_with("OK: 2 file(s), 5 resource(s) valid"), "{out}");

    // Istio's own sample files, one configuration each.
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples");
    if let Ok(entries) = std::fs::read_dir(&samples) {
        let files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let (code, out, err) = validate(&refs);
        assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    }
}

#[test]
fn a_bad_file_exits_1_naming_file_resource_and_field() {
    let dir = TempDir::new();
    dir.write("registry.yaml", REGISTRY);
    let bad = dir.write(
        "bad.yaml",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: default}
spec:
  hosts: [payment]
  http:
  - route:
    - destination: {host: payment, subset: v1}
      weight: -5
",
    );
    let (code, out, err) = validate(&[&bad]);
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    let line = err.lines().find(|l| l.contains("weight")).unwrap_or_else(|| panic!("no weight error:\n{err}"));
    assert!(line.contains(&bad.display().to_string()), "file missing: {line}");
    assert!(line.contains("VirtualService default/broken"), "resource missing: {line}");
    assert!(line.contains("spec.http[0].route[0].weight"), "field missing: {line}");
    assert!(err.contains("1 error(s)"), "{err}");
    assert!(!out.contains("OK"), "{out}");

    // The same inside a folder, with the registry: still exit 1, same line.
    let (code, _, err) = validate(&[dir.path()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("spec.http[0].route[0].weight"), "{err}");

    // An unknown field is an error naming it, never silently ignored.
    let unknown = dir.write(
        "unknown.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: odd, namespace: default}
spec:
  host: payment
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    noSuchField: 1
",
    );
    let (code, _, err) = validate(&[&unknown]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("DestinationRule default/odd") && err.contains("noSuchField"), "{err}");

    // YAML syntax: file:line:column.
    let syntax = dir.write("syntax.yaml", "kind: VirtualService\n  bad: [\n");
    let (code, _, err) = validate(&[&syntax]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("{}:", syntax.display())), "{err}");

    // A missing path.
    let (code, _, err) = validate(&[&dir.path().join("missing.yaml")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.yaml"), "{err}");
}

/// A Flagger `Canary` is the control plane's: a proxy accepts it with a warning, and
/// `validate` checks its fields as the control plane reads them.
#[test]
fn a_canary_is_checked_field_by_field() {
    let canary = |threshold: u32| {
        format!(
            "apiVersion: flagger.app/v1beta1\nkind: Canary\nmetadata: {{name: payment, namespace: default}}\nspec:\n  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: payment}}\n  analysis: {{interval: 30s, threshold: {threshold}, maxWeight: 50, stepWeight: 10}}\n"
        )
    };
    let good = TempDir::new();
    let file = good.write("canary.yaml", &canary(3));
    let (code, stdout, stderr) = validate(&[&file]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("kind Canary is run by the control plane's canary analysis"), "{stderr}");

    let bad = TempDir::new();
    let file = bad.write("canary.yaml", &canary(0));
    let (code, stdout, stderr) = validate(&[&file]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("Canary default/payment: spec.analysis.threshold: must be at least 1"), "{stderr}");
    assert!(bad.path().exists());
}
