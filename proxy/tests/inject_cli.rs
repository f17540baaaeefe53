//! `serin inject`, run as a process: a Deployment gets the init container, the sidecar,
//! the volumes and the annotations; a second run changes nothing; opt-outs, other
//! documents and comments pass through untouched; a file without workload is an
//! error; Istio's traffic annotations become `serin iptables` flags.

mod process_support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use process_support::TempDir;
use serin::inject::tree::{Yaml, parse_document};

const DEPLOYMENT: &str = "\
# payment v1 (stable)
apiVersion: apps/v1
kind: Deployment
metadata:
  name: payment-v1
  namespace: default
  labels: {app: payment, version: v1}
spec:
  replicas: 2
  selector:
    matchLabels: {app: payment, version: v1}
  template:
    metadata:
      labels: {app: payment, version: v1}
    spec:
      serviceAccountName: payment
      containers:
      - name: payment
        image: example/payment:1.0
        ports:
        - containerPort: 8080
";

const SERVICE: &str = "\
# The Service and the canary route pass through byte for byte, comments included.
apiVersion: v1
kind: Service
metadata: {name: payment, namespace: default}   # flow style stays
spec:
  selector: {app: payment}
  ports: [{name: http, port: 8080}]
";

const VIRTUAL_SERVICE: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment}
spec:
  hosts: [payment]
  http:
  - route:
    - destination: {host: payment, subset: v1}
      weight: 95
    - destination: {host: payment, subset: v2}
      weight: 5
";

fn serin(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_serin"))
        .arg("inject")
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run serin inject");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(stdin.unwrap_or("").as_bytes()).expect("write stdin");
    drop(pipe);
    child.wait_with_output().expect("wait for serin inject")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write input");
    path.display().to_string()
}

/// The documents of a YAML stream, as trees.
fn documents(stream: &str) -> Vec<Yaml> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in stream.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.extend(parse_document(&current).expect("valid YAML"));
            current.clear();
        } else {
            current.push_str(line);
        }
    }
    docs.extend(parse_document(&current).expect("valid YAML"));
    docs
}

fn names(list: Option<&Yaml>) -> Vec<String> {
    list.and_then(Yaml::as_seq)
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.at(&["name"]).and_then(Yaml::as_str).map(str::to_string))
        .collect()
}

fn container<'a>(pod_spec: &'a Yaml, list: &str, name: &str) -> &'a Yaml {
    pod_spec
        .at(&[list])
        .and_then(Yaml::as_seq)
        .and_then(|items| items.iter().find(|c| c.at(&["name"]).and_then(Yaml::as_str) == Some(name)))
        .unwrap_or_else(|| panic!("no {list} entry named {name}"))
}

fn args_of(c: &Yaml) -> Vec<String> {
    c.at(&["args"])
        .and_then(Yaml::as_seq)
        .unwrap_or_default()
        .iter()
        .filter_map(Yaml::as_str)
        .map(String::from)
        .collect()
}

#[test]
fn injects_a_deployment_and_reinjecting_is_a_no_op() {
    let dir = TempDir::new("inject-cli");
    let input = write(dir.path(), "payment.yaml", DEPLOYMENT);
    let output = dir.path().join("out.yaml").display().to_string();
    let out = serin(&["-f", &input, "-o", &output, "--image", "registry.local/serin:dev"], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "-o writes the file, not stdout");
    assert_eq!(text(&out.stderr).trim(), "serin inject: Deployment default/payment-v1: injected");

    let injected = std::fs::read_to_string(&output).expect("output file");
    assert!(injected.starts_with("# payment v1 (stable)\napiVersion: apps/v1\n"), "{injected}");
    let doc = &documents(&injected)[0];
    let pod = doc.at(&["spec", "template", "spec"]).expect("pod spec");
    assert_eq!(names(pod.at(&["containers"])), ["payment", "serin-proxy"]);
    assert_eq!(names(pod.at(&["initContainers"])), ["serin-init"]);
    assert_eq!(names(pod.at(&["volumes"])), ["serin-ca-root", "serin-token"]);
    assert_eq!(doc.at(&["spec", "replicas"]), Some(&Yaml::Int(2)));

    let init = container(pod, "initContainers", "serin-init");
    assert_eq!(init.at(&["image"]).and_then(Yaml::as_str), Some("registry.local/serin:dev"));
    assert_eq!(
        args_of(init),
        ["iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]
    );
    let caps = init.at(&["securityContext", "capabilities", "add"]).cloned();
    assert_eq!(caps, Some(Yaml::Seq(vec![Yaml::str("NET_ADMIN"), Yaml::str("NET_RAW")])));
    assert_eq!(init.at(&["securityContext", "runAsUser"]), Some(&Yaml::Int(0)));

    let proxy = container(pod, "containers", "serin-proxy");
    assert_eq!(proxy.at(&["securityContext", "runAsUser"]), Some(&Yaml::Int(1337)));
    assert_eq!(proxy.at(&["securityContext", "readOnlyRootFilesystem"]), Some(&Yaml::Bool(true)));
    assert_eq!(proxy.at(&["readinessProbe", "httpGet", "path"]).and_then(Yaml::as_str), Some("/healthz/ready"));
    assert_eq!(proxy.at(&["resources", "limits", "memory"]).and_then(Yaml::as_str), Some("256Mi"));
    let sidecar_args = args_of(proxy);
    assert_eq!(
        sidecar_args,
        [
            "sidecar",
            "--control-plane",
            "https://serin-control-plane.serin-system.svc:15012",
            "--ca-root",
            "/var/run/secrets/serin/root/root-cert.pem",
            "--bootstrap-token-file",
            "/var/run/secrets/serin/token/token",
        ]
    );
    // The real `serin sidecar` knows every flag and environment variable the container uses.
    let help = Command::new(env!("CARGO_BIN_EXE_serin")).args(["sidecar", "--help"]).output().expect("sidecar --help");
    let help = text(&help.stdout);
    for flag in sidecar_args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "serin sidecar has no {flag}");
    }
    let env = proxy.at(&["env"]).and_then(Yaml::as_seq).unwrap_or_default().to_vec();
    for var in env.iter().filter_map(|v| v.at(&["name"]).and_then(Yaml::as_str)) {
        let read = help.contains(&format!("[env: {var}")) || help.contains(&format!("${var}"));
        assert!(read, "serin sidecar reads no ${var}");
    }
    let token = pod.at(&["volumes"]).and_then(Yaml::as_seq).unwrap_or_default().to_vec();
    let secret = token.iter().find_map(|v| v.at(&["secret", "secretName"]).and_then(Yaml::as_str).map(String::from));
    assert_eq!(secret.as_deref(), Some("serin-bootstrap-token-payment"), "one token Secret per service account");
    let ports: Vec<_> = proxy.at(&["ports"]).and_then(Yaml::as_seq).unwrap_or_default().to_vec();
    let ports: Vec<_> = ports.iter().filter_map(|p| p.at(&["containerPort"]).cloned()).collect();
    assert_eq!(ports, [Yaml::Int(15090), Yaml::Int(15021)]);

    let annotations = doc.at(&["spec", "template", "metadata", "annotations"]).expect("annotations");
    let status = annotations.at(&["sidecar.serin.dev/status"]).and_then(Yaml::as_str).expect("status annotation");
    assert!(status.contains("\"containers\":[\"serin-proxy\"]"), "{status}");
    assert_eq!(annotations.at(&["prometheus.io/port"]).and_then(Yaml::as_str), Some("15090"));
    assert_eq!(annotations.at(&["prometheus.io/path"]).and_then(Yaml::as_str), Some("/stats/prometheus"));

    // Again, from stdin this time: exit 0, the same bytes, and it says why.
    let again = serin(&["-f", "-"], Some(&injected));
    assert_eq!(again.status.code(), Some(0), "stderr: {}", text(&again.stderr));
    assert_eq!(text(&again.stdout), injected);
    assert_eq!(
        text(&again.stderr).trim(),
        "serin inject: Deployment default/payment-v1: already injected (it has the sidecar.serin.dev/status \
         annotation); left as is"
    );
}

#[test]
fn opted_out_workloads_and_other_documents_pass_through() {
    let dir = TempDir::new("inject-cli");
    let opted_out = DEPLOYMENT.replace("payment-v1", "payment-v2").replace(
        "      labels: {app: payment, version: v1}\n    spec:",
        "      labels: {app: payment, version: v1}\n      annotations:\n        sidecar.istio.io/inject: \"false\"\n    spec:",
    );
    assert_ne!(opted_out, DEPLOYMENT);
    let stream = format!("{SERVICE}---\n{DEPLOYMENT}---\n{VIRTUAL_SERVICE}---\n{opted_out}");
    let input = write(dir.path(), "all.yaml", &stream);
    let out = serin(&["-f", &input], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).lines().collect::<Vec<_>>(),
        [
            "serin inject: Deployment default/payment-v1: injected",
            "serin inject: Deployment default/payment-v2: not injected: sidecar.istio.io/inject annotation is \"false\"",
        ]
    );
    let output = text(&out.stdout);
    assert!(output.starts_with(&format!("{SERVICE}---\n# payment v1 (stable)\n")), "{output}");
    assert!(output.contains(&format!("---\n{VIRTUAL_SERVICE}---\n{opted_out}")), "{output}");
    assert!(output.ends_with(&opted_out));
    assert_eq!(documents(&output).len(), 4);
}

#[test]
fn a_file_without_workload_is_an_error() {
    let dir = TempDir::new("inject-cli");
    let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mesh}\ndata: {a: b}\n";
    let input = write(dir.path(), "svc.yaml", &format!("{SERVICE}---\n{config_map}---\n{VIRTUAL_SERVICE}"));
    let out = serin(&["-f", &input], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr).trim(),
        format!("serin inject: no workload in {input}: found kinds Service, ConfigMap, VirtualService")
    );

    let missing = dir.path().join("missing.yaml").display().to_string();
    let out = serin(&["-f", &missing], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with(&format!("serin inject: reading {missing}: ")), "{}", text(&out.stderr));
}

#[test]
fn traffic_annotations_become_init_flags_and_bad_ones_are_named() {
    let annotated = DEPLOYMENT.replace(
        "      labels: {app: payment, version: v1}\n    spec:",
        "      labels: {app: payment, version: v1}\n      annotations:\n        \
         traffic.sidecar.istio.io/excludeOutboundPorts: \"5432,6379\"\n        \
         traffic.sidecar.istio.io/excludeInboundPorts: \"9090\"\n        \
         traffic.sidecar.istio.io/includeInboundPorts: \"8080,9090\"\n        \
         traffic.sidecar.istio.io/excludeOutboundIPRanges: \"169.254.169.254/32\"\n    spec:",
    );
    let out = serin(&["-f", "-"], Some(&annotated));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let doc = &documents(&text(&out.stdout))[0];
    let init = container(doc.at(&["spec", "template", "spec"]).expect("pod spec"), "initContainers", "serin-init");
    let args = args_of(init);
    let flag = |f: &str| args.iter().position(|a| a == f).map(|i| args[i + 1].as_str());
    assert_eq!(flag("-o"), Some("5432,6379"));
    assert_eq!(flag("-d"), Some("9090"));
    assert_eq!(flag("-b"), Some("8080,9090"));
    assert_eq!(flag("-x"), Some("169.254.169.254/32"));
    assert_eq!(flag("-i"), Some("*"));
    // The real `serin iptables` takes these arguments: the rules spare the excluded ports.
    let dry_run = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(&args)
        .args(["--dry-run", "--ipv6", "off"])
        .output()
        .expect("run serin iptables --dry-run");
    assert_eq!(dry_run.status.code(), Some(0), "serin {args:?}: {}", text(&dry_run.stderr));
    let rules = text(&dry_run.stdout);
    for rule in ["--dport 5432 -j RETURN", "--dport 6379 -j RETURN", "--dport 9090 -j RETURN", "-d 169.254.169.254/32"]
    {
        assert!(rules.contains(rule), "no {rule:?} in\n{rules}");
    }
    // The annotations themselves stay on the pod.
    let kept = doc.at(&["spec", "template", "metadata", "annotations", "traffic.sidecar.istio.io/excludeInboundPorts"]);
    assert_eq!(kept.and_then(Yaml::as_str), Some("9090"));

    let bad = annotated.replace("\"5432,6379\"", "\"5432,postgres\"");
    let out = serin(&["-f", "-"], Some(&bad));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(
            "serin inject: <stdin>: Deployment default/payment-v1: annotation \
             traffic.sidecar.istio.io/excludeOutboundPorts: \"postgres\" is not a port"
        ),
        "{stderr}"
    );
}
