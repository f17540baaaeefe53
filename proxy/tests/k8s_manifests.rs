//! The Kubernetes manifests of `k8s/`: the injected Deployments are exactly `serin
//! inject`'s output for their sources in `k8s/apps/` (so the two cannot drift), the
//! kustomization lists every manifest, the Istio config passes `serin validate`, and
//! every Kubernetes manifest, and `inject`'s output for each workload kind, passes the
//! Kubernetes JSON schemas offline with `kubernetes-validate --strict`.
//!
//! `kubernetes-validate` comes from PyPI (`pip install kubernetes-validate`; `.ci/run`
//! installs it). Without it the schema test fails saying so, unless
//! `SERIN_SKIP_K8S_VALIDATE=1` is set on purpose.

mod process_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use process_support::TempDir;
use serin::inject::tree::{Yaml, parse_document};

/// The Kubernetes versions whose schemas the manifests must pass: the oldest release
/// kind and minikube still commonly run, and a recent one.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.33.0"];

/// API groups of the Istio resources: not in the Kubernetes schemas, checked by
/// `serin validate` instead. They live in `k8s/mesh/` only.
const ISTIO_GROUPS: &[&str] = &["networking.istio.io/", "security.istio.io/"];

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("k8s")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn serin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_serin")).args(args).env("NO_COLOR", "1").output().expect("run serin")
}

/// The documents of a YAML stream (split at `---` lines).
fn documents(stream: &str) -> Vec<Yaml> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in stream.split_inclusive('\n') {
        if line.starts_with("---") && line[3..].trim().is_empty() {
            docs.extend(parse_document(&current).unwrap_or_else(|e| panic!("{e}")));
            current.clear();
        } else {
            current.push_str(line);
        }
    }
    docs.extend(parse_document(&current).unwrap_or_else(|e| panic!("{e}")));
    docs
}

fn field<'a>(doc: &'a Yaml, path: &[&str]) -> &'a str {
    doc.at(path).and_then(Yaml::as_str).unwrap_or("")
}

/// The name of `path` relative to `k8s/`, for messages and the kustomization.
fn relative(path: &Path) -> String {
    path.strip_prefix(k8s_dir()).unwrap_or(path).display().to_string()
}

/// The Kubernetes manifests of `k8s/` (top level and `apps/`), without the
/// kustomization itself.
fn kubernetes_manifests() -> Vec<PathBuf> {
    let dir = k8s_dir();
    yaml_files(&dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .chain(yaml_files(&dir.join("apps")))
        .collect()
}

#[test]
fn injected_manifests_are_inject_output_of_their_sources() {
    let dir = k8s_dir();
    let sources = yaml_files(&dir.join("apps"));
    assert!(sources.len() >= 3, "k8s/apps/ holds the payment v1/v2 and frontend sources: {sources:?}");
    for source in &sources {
        let name = source.file_name().and_then(|n| n.to_str()).expect("file name");
        let committed_path = dir.join(name);
        let committed = std::fs::read_to_string(&committed_path)
            .unwrap_or_else(|e| panic!("{}: {e} (every source in k8s/apps/ has its injected form in k8s/)", name));
        let out = serin(&["inject", "-f", &source.display().to_string()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout) == committed,
            "k8s/{name} is not `serin inject`'s output for k8s/apps/{name}: regenerate it with\n  \
             serin inject -f k8s/apps/{name} -o k8s/{name}"
        );
        // And the committed form is injected: a second run leaves it as it is.
        let again = serin(&["inject", "-f", &committed_path.display().to_string()]);
        assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
        assert_eq!(text(&again.stdout), committed);
        assert!(text(&again.stderr).contains("already injected"), "{}", text(&again.stderr));
        // The payment Deployments carry the canary's labels.
        for doc in documents(&committed).iter().filter(|d| field(d, &["kind"]) == "Deployment") {
            let labels = doc.at(&["spec", "template", "metadata", "labels"]).expect("pod labels");
            if name.starts_with("payment-") {
                let version = name.trim_start_matches("payment-").trim_end_matches(".yaml");
                assert_eq!(field(labels, &["app"]), "payment", "{name}");
                assert_eq!(field(labels, &["version"]), version, "{name}");
            }
        }
    }
}

#[test]
fn the_kustomization_lists_every_manifest_and_the_mesh_config() {
    let dir = k8s_dir();
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("k8s/kustomization.yaml");
    let kustomization = parse_document(&text).expect("valid YAML").expect("not empty");
    let listed: Vec<&str> = kustomization
        .at(&["resources"])
        .and_then(Yaml::as_seq)
        .unwrap_or_default()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let top_level: Vec<String> =
        yaml_files(&dir).iter().map(|p| relative(p)).filter(|n| n != "kustomization.yaml").collect();
    let mut listed_sorted: Vec<String> = listed.iter().map(|s| (*s).to_string()).collect();
    listed_sorted.sort();
    assert_eq!(listed_sorted, top_level, "kustomization.yaml resources vs the manifests in k8s/");

    let generators = kustomization.at(&["configMapGenerator"]).and_then(Yaml::as_seq).expect("configMapGenerator");
    let mesh = generators.iter().find(|g| field(g, &["name"]) == "serin-mesh-config").expect("serin-mesh-config");
    let mut files: Vec<String> = mesh
        .at(&["files"])
        .and_then(Yaml::as_seq)
        .unwrap_or_default()
        .iter()
        .filter_map(Yaml::as_str)
        .map(String::from)
        .collect();
    files.sort();
    let mesh_files: Vec<String> = yaml_files(&dir.join("mesh")).iter().map(|p| relative(p)).collect();
    assert_eq!(files, mesh_files, "every file of k8s/mesh/ goes into the serin-mesh-config ConfigMap");

    // The control plane and the gateway mount that ConfigMap.
    for manifest in ["control-plane.yaml", "gateway.yaml"] {
        let text = std::fs::read_to_string(dir.join(manifest)).expect("manifest");
        assert!(text.contains("name: serin-mesh-config"), "{manifest} mounts serin-mesh-config");
    }
}

#[test]
fn istio_resources_live_in_mesh_and_pass_serin_validate() {
    for path in kubernetes_manifests() {
        let text = std::fs::read_to_string(&path).expect("manifest");
        for doc in documents(&text) {
            let api = field(&doc, &["apiVersion"]);
            assert!(
                !ISTIO_GROUPS.iter().any(|g| api.starts_with(g)),
                "{}: {} {api} belongs in k8s/mesh/ (served by the control plane, checked by serin validate)",
                relative(&path),
                field(&doc, &["kind"])
            );
        }
    }
    let mesh = k8s_dir().join("mesh");
    let out = serin(&["validate", &mesh.display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "serin validate k8s/mesh:\n{}{}", text(&out.stdout), text(&out.stderr));
    let kinds: Vec<String> = yaml_files(&mesh)
        .iter()
        .flat_map(|p| documents(&std::fs::read_to_string(p).expect("mesh file")))
        .map(|d| field(&d, &["kind"]).to_string())
        .collect();
    for kind in ["VirtualService", "DestinationRule", "Gateway", "ServiceEntry"] {
        assert!(kinds.iter().any(|k| k == kind), "k8s/mesh/ has a {kind}: {kinds:?}");
    }
}

/// How to run kubernetes-validate here: `python3 -m kubernetes_validate`, else the
/// `kubernetes-validate` script. `None` when neither works.
fn kubernetes_validate() -> Option<Vec<String>> {
    let candidates: [&[&str]; 2] = [&["python3", "-m", "kubernetes_validate"], &["kubernetes-validate"]];
    candidates.iter().find_map(|argv| {
        let ok = Command::new(argv[0]).args(&argv[1..]).arg("--version").output().is_ok_and(|o| o.status.success());
        ok.then(|| argv.iter().map(|s| (*s).to_string()).collect())
    })
}

/// Workloads of every kind `inject` handles, with interception annotations.
const WORKLOADS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: default}
spec:
  containers: [{name: tool, image: busybox, command: [sleep, '3600']}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: ledger, namespace: default}
spec:
  serviceName: ledger
  selector: {matchLabels: {app: ledger}}
  template:
    metadata:
      labels: {app: ledger, version: v1}
      annotations:
        traffic.sidecar.istio.io/excludeOutboundPorts: \"5432\"
        traffic.sidecar.istio.io/excludeOutboundIPRanges: 169.254.169.254/32
        sidecar.istio.io/proxyMemoryLimit: 512Mi
    spec:
      serviceAccountName: ledger
      containers: [{name: ledger, image: example/ledger:1, ports: [{containerPort: 9000}]}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: example/agent:1}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: '0 * * * *'
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: report, image: example/report:1}]
";

#[test]
fn manifests_and_inject_output_pass_the_kubernetes_schemas() {
    let Some(validate) = kubernetes_validate() else {
        if std::env::var("SERIN_SKIP_K8S_VALIDATE").as_deref() == Ok("1") {
            eprintln!("SERIN_SKIP_K8S_VALIDATE=1: the Kubernetes schema check is skipped");
            return;
        }
        panic!(
            "kubernetes-validate is not installed: `pip install kubernetes-validate` (it bundles the schemas and \
             runs offline), or set SERIN_SKIP_K8S_VALIDATE=1 to skip this check on purpose"
        );
    };
    let tmp = TempDir::new("k8s-validate");
    let workloads = tmp.path().join("workloads.yaml");
    std::fs::write(&workloads, WORKLOADS).expect("write workloads");
    let injected = tmp.path().join("injected.yaml");
    let out = serin(&["inject", "-f", &workloads.display().to_string(), "-o", &injected.display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr).matches(": injected").count(), 4, "{}", text(&out.stderr));

    // The mesh ConfigMap as kustomize generates it (kubectl may not be installed).
    let mut config_map = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: serin-mesh-config\n  namespace: serin-system\ndata:\n",
    );
    for path in yaml_files(&k8s_dir().join("mesh")) {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name").to_string();
        config_map.push_str(&format!("  {name}: |\n"));
        for line in std::fs::read_to_string(&path).expect("mesh file").lines() {
            config_map.push_str(&format!("    {line}\n"));
        }
    }
    let generated = tmp.path().join("serin-mesh-config.yaml");
    std::fs::write(&generated, config_map).expect("write the ConfigMap");

    let mut files: Vec<PathBuf> = kubernetes_manifests();
    files.push(injected);
    files.push(generated);
    // kubectl, when installed, renders the kustomization: that output must pass too.
    if let Ok(out) = Command::new("kubectl").args(["kustomize", &k8s_dir().display().to_string()]).output() {
        assert!(out.status.success(), "kubectl kustomize k8s/: {}", text(&out.stderr));
        let rendered = tmp.path().join("kustomized.yaml");
        std::fs::write(&rendered, &out.stdout).expect("write kustomize output");
        files.push(rendered);
    } else {
        eprintln!("kubectl is not installed: the kustomization is checked by listing only");
    }

    let mut command = Command::new(&validate[0]);
    command.args(&validate[1..]).arg("--strict");
    for version in KUBERNETES_VERSIONS {
        command.args(["-k", version]);
    }
    command.args(&files);
    let out = command.output().expect("run kubernetes-validate");
    let stdout = text(&out.stdout);
    let report = format!("{}{}", stdout, text(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict failed:\n{report}");
    // No resource may go unchecked: a kind without a schema (a typo in apiVersion, an
    // Istio resource outside k8s/mesh/) is a WARN that the exit code does not show.
    assert!(!stdout.contains("WARN"), "resources without a Kubernetes schema:\n{report}");
    let passed = stdout.lines().filter(|l| l.starts_with("INFO") && l.contains(" passed ")).count();
    assert!(passed >= files.len() * KUBERNETES_VERSIONS.len(), "every file was checked:\n{report}");

    // A broken manifest fails: the check is not vacuous.
    let broken = tmp.path().join("broken.yaml");
    let payment = std::fs::read_to_string(k8s_dir().join("payment-v1.yaml")).expect("payment-v1.yaml");
    std::fs::write(&broken, payment.replacen("readinessProbe:", "readinesProbe:", 1)).expect("write broken");
    let out = Command::new(&validate[0])
        .args(&validate[1..])
        .args(["--strict", "-k", KUBERNETES_VERSIONS[0]])
        .arg(&broken)
        .output();
    let out = out.expect("run kubernetes-validate");
    assert!(!out.status.success(), "a misspelt field must fail: {}", text(&out.stdout));
    assert!(text(&out.stdout).contains("readinesProbe"), "{}", text(&out.stdout));
}

#[test]
fn manifests_and_dockerfile_agree_on_the_image() {
    // Every serin container of k8s/ runs the image `serin inject` writes by default, so
    // a version bump shows here (and in the drift test) until the manifests follow.
    let mut seen = 0;
    for path in kubernetes_manifests() {
        let text = std::fs::read_to_string(&path).expect("manifest");
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("image: ghcr.io/serin-mesh/")) {
            assert_eq!(line, format!("image: {}", serin::inject::DEFAULT_IMAGE), "{}", relative(&path));
            seen += 1;
        }
    }
    assert!(seen >= 5, "control plane, gateway, payment v1/v2 and the injected containers: {seen}");

    let dockerfile = std::fs::read_to_string(k8s_dir().join("../docker/Dockerfile")).expect("docker/Dockerfile");
    let instructions: Vec<&str> = dockerfile.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let has = |prefix: &str| instructions.iter().any(|l| l.trim_start().starts_with(prefix));
    assert!(has(&format!("USER {0}:{0}", serin::inject::pod::PROXY_UID)), "the image runs as the proxy's uid");
    assert!(has("ENTRYPOINT [\"serin\"]"));
    assert!(dockerfile.contains("cargo build --release --locked -p serin"));
    assert!(dockerfile.contains("iptables"), "the init role needs iptables in the runtime image");
    let expose = instructions.iter().find(|l| l.starts_with("EXPOSE ")).expect("EXPOSE");
    for port in ["15001", "15006", "15000", "15090", "15021", "15010", "15012", "15014"] {
        assert!(expose.split_whitespace().any(|p| p == port), "EXPOSE lacks {port}: {expose}");
    }
    let ignore = std::fs::read_to_string(k8s_dir().join("../.dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"), ".dockerignore keeps target/ out of the context");
}
