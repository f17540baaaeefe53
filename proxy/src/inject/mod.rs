//! `serin inject`: adds serin's sidecar to Kubernetes workloads, like `istioctl
//! kube-inject`.
//!
//! Every Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController,
//! Job, CronJob and Pod of a multi-document YAML stream gets, in its pod template:
//! the `serin-init` init container (`serin iptables`, NET_ADMIN + NET_RAW), the
//! `serin-proxy` sidecar container (uid 1337, probes on 15021, metrics on 15090),
//! the identity volumes and the `sidecar.serin.dev/status` / `prometheus.io/*`
//! annotations (see [`pod`]). Istio's `traffic.sidecar.istio.io/*` annotations
//! become `serin iptables` flags (see [`annotations`]).
//!
//! The rest is left alone: other documents are copied byte for byte (comments
//! included); so are workloads that opted out (`sidecar.istio.io/inject: "false"`)
//! or are already injected, which makes `inject` idempotent. An injected document
//! is rewritten from the project's ordered YAML tree ([`serin_control_api::yaml`],
//! shared with the control plane's store) that keeps every key, its order and its
//! value; its leading comments are kept, comments inside it are not.

pub mod annotations;
pub mod pod;

/// The YAML tree `inject` reads and writes documents with: the project's one,
/// [`serin_control_api::yaml`], also reachable as `serin::inject::tree`.
pub use serin_control_api::yaml as tree;

use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use serin_control_api::yaml::{self, Document, Mapping, Yaml, split_documents};

use self::pod::PodError;

/// The image `inject` uses unless told otherwise.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/serin-mesh/serin:", env!("CARGO_PKG_VERSION"));
/// The control plane the sidecars subscribe to (TLS port) unless told otherwise.
pub const DEFAULT_CONTROL_PLANE: &str = "https://serin-control-plane.serin-system.svc:15012";

/// Options of `serin inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Kubernetes YAML to inject (one or more `---`-separated documents); `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub filename: PathBuf,
    /// Write the result to this file instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Image of the init and sidecar containers.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// `imagePullPolicy` of the injected containers (Always, IfNotPresent, Never);
    /// Kubernetes' default when not given.
    #[arg(long, value_name = "POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: Option<String>,
    /// Control plane the sidecars subscribe to and get their certificate from.
    #[arg(long, value_name = "URL", default_value = DEFAULT_CONTROL_PLANE)]
    pub control_plane: String,
}

/// What the injected containers are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Image of both containers.
    pub image: String,
    /// The sidecar's `--control-plane`.
    pub control_plane: String,
    /// `imagePullPolicy` of both containers, when set.
    pub image_pull_policy: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: DEFAULT_IMAGE.to_string(),
            control_plane: DEFAULT_CONTROL_PLANE.to_string(),
            image_pull_policy: None,
        }
    }
}

impl From<&InjectArgs> for InjectConfig {
    fn from(args: &InjectArgs) -> Self {
        InjectConfig {
            image: args.image.clone(),
            control_plane: args.control_plane.clone(),
            image_pull_policy: args.image_pull_policy.clone(),
        }
    }
}

/// What happened to one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// Left as is: already injected (the reason says how it was recognised).
    AlreadyInjected(String),
    /// Left as is: `sidecar.istio.io/inject: "false"`.
    OptedOut(String),
    /// Left as is: a `hostNetwork` pod (the init rules would capture the node's traffic).
    HostNetwork,
}

/// One workload's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Kind namespace/name` (or `Kind name` without a namespace).
    pub workload: String,
    /// What happened.
    pub outcome: Outcome,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Injected => write!(f, "{}: injected", self.workload),
            Outcome::AlreadyInjected(why) => write!(f, "{}: already injected ({why}); left as is", self.workload),
            Outcome::OptedOut(why) => write!(f, "{}: not injected: {why}", self.workload),
            Outcome::HostNetwork => write!(
                f,
                "{}: not injected: hostNetwork pods are left alone (the rules would capture the node's traffic)",
                self.workload
            ),
        }
    }
}

/// The result of [`inject`].
#[derive(Debug, Clone)]
pub struct Injection {
    /// The output YAML stream.
    pub output: String,
    /// One entry per workload found, in order.
    pub reports: Vec<Report>,
    /// Things the user should know (annotations not applied, …).
    pub warnings: Vec<String>,
}

/// Why `inject` failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A document is not valid YAML.
    #[error("{file}: document {document}: {message}")]
    Parse {
        /// The input's name.
        file: String,
        /// 1-based document number.
        document: usize,
        /// The parser's message, with the line in the whole stream.
        message: String,
    },
    /// The input holds no workload at all.
    #[error("no workload in {file}: found {found}")]
    NoWorkload {
        /// The input's name.
        file: String,
        /// The kinds that were found, e.g. `kinds Service, ConfigMap`.
        found: String,
    },
    /// A workload cannot be injected.
    #[error("{file}: {workload}: {error}")]
    Workload {
        /// The input's name.
        file: String,
        /// `Kind namespace/name`.
        workload: String,
        /// What is wrong.
        error: PodError,
    },
    /// An injected document cannot be written back.
    #[error("{file}: {workload}: cannot write the YAML: {message}")]
    Emit {
        /// The input's name.
        file: String,
        /// `Kind namespace/name`.
        workload: String,
        /// The serializer's message.
        message: String,
    },
}

/// A kind `inject` handles: its API groups and the path to its pod template
/// (empty for a Pod, whose own `metadata`/`spec` are the template).
struct WorkloadKind {
    kind: &'static str,
    groups: &'static [&'static str],
    template: &'static [&'static str],
}

const WORKLOADS: &[WorkloadKind] = &[
    WorkloadKind { kind: "Pod", groups: &[""], template: &[] },
    WorkloadKind { kind: "Deployment", groups: &["apps", "extensions"], template: &["spec", "template"] },
    WorkloadKind { kind: "StatefulSet", groups: &["apps"], template: &["spec", "template"] },
    WorkloadKind { kind: "DaemonSet", groups: &["apps", "extensions"], template: &["spec", "template"] },
    WorkloadKind { kind: "ReplicaSet", groups: &["apps", "extensions"], template: &["spec", "template"] },
    WorkloadKind { kind: "ReplicationController", groups: &[""], template: &["spec", "template"] },
    WorkloadKind { kind: "Job", groups: &["batch"], template: &["spec", "template"] },
    WorkloadKind { kind: "CronJob", groups: &["batch"], template: &["spec", "jobTemplate", "spec", "template"] },
];

/// The document's `---` line and the comment/blank lines before its content: kept
/// in front of a rewritten document.
fn leading_lines(text: &str) -> &str {
    let mut end = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let body = line.trim();
        let keep = if i == 0 && line.starts_with("---") {
            // `---` alone or with a comment; `--- {…}` starts the content.
            let rest = body[3..].trim_start();
            rest.is_empty() || rest.starts_with('#')
        } else {
            body.is_empty() || body.starts_with('#')
        };
        if !keep {
            break;
        }
        end += line.len();
    }
    &text[..end]
}

/// Per-run bookkeeping.
struct Run<'a> {
    file: &'a str,
    config: &'a InjectConfig,
    kinds: Vec<String>,
    workloads: usize,
    reports: Vec<Report>,
    warnings: Vec<String>,
}

/// Injects every workload of `input` (named `file` in messages). See the module
/// documentation for what is added and what is left alone.
pub fn inject(input: &str, file: &str, config: &InjectConfig) -> Result<Injection, InjectError> {
    let mut run = Run { file, config, kinds: Vec::new(), workloads: 0, reports: Vec::new(), warnings: Vec::new() };
    let mut output = String::with_capacity(input.len() * 2);
    for (index, doc) in split_documents(input).into_iter().enumerate() {
        let parsed = yaml::parse_document(doc.text).map_err(|e| parse_error(file, index + 1, &doc, &e))?;
        let Some(mut resource) = parsed else {
            output.push_str(doc.text);
            continue;
        };
        if run.resource(&mut resource)? {
            let workload = describe(&resource);
            let text = yaml::to_yaml(&resource).map_err(|e| InjectError::Emit {
                file: file.to_string(),
                workload,
                message: e.to_string(),
            })?;
            let mut leading = leading_lines(doc.text);
            if leading.is_empty() && index > 0 {
                leading = "---\n";
            }
            if !output.is_empty() && !output.ends_with('\n') {
                output.push('\n');
            }
            output.push_str(leading);
            output.push_str(&text);
        } else {
            output.push_str(doc.text);
        }
    }
    if run.workloads == 0 {
        let found = if run.kinds.is_empty() {
            "no Kubernetes resource".to_string()
        } else {
            format!("kinds {}", run.kinds.join(", "))
        };
        return Err(InjectError::NoWorkload { file: file.to_string(), found });
    }
    Ok(Injection { output, reports: run.reports, warnings: run.warnings })
}

fn parse_error(file: &str, document: usize, doc: &Document<'_>, e: &serde_saphyr::Error) -> InjectError {
    let mut message = e.without_snippet().to_string();
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    if let Some(loc) = e.location().filter(|l| l.line() > 0) {
        let line = usize::try_from(loc.line()).unwrap_or(usize::MAX).saturating_add(doc.first_line as usize - 1);
        message = format!("line {line}, column {}: {message}", loc.column());
    }
    InjectError::Parse { file: file.to_string(), document, message }
}

/// `Kind namespace/name` of a resource, for messages.
fn describe(resource: &Yaml) -> String {
    let kind = resource.at(&["kind"]).and_then(Yaml::as_str).unwrap_or("(no kind)");
    let meta = resource.at(&["metadata"]);
    let name = meta
        .and_then(|m| m.at(&["name"]).or_else(|| m.at(&["generateName"])))
        .and_then(Yaml::as_str)
        .unwrap_or("(no name)");
    match meta.and_then(|m| m.at(&["namespace"])).and_then(Yaml::as_str) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

impl Run<'_> {
    fn note_kind(&mut self, kind: &str) {
        if !self.kinds.iter().any(|k| k == kind) {
            self.kinds.push(kind.to_string());
        }
    }

    /// Handles one resource (recursing into a `List`); true when it changed.
    fn resource(&mut self, resource: &mut Yaml) -> Result<bool, InjectError> {
        let Some(map) = resource.as_map_mut() else {
            self.note_kind(&format!("(a document that is {})", resource.type_name()));
            return Ok(false);
        };
        let kind = map.get_str("kind").unwrap_or("").to_string();
        let api_version = map.get_str("apiVersion").unwrap_or("").to_string();
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        if kind == "List" && group.is_empty() {
            let mut changed = false;
            if let Some(Yaml::Seq(items)) = map.get_mut("items") {
                for item in items.iter_mut() {
                    changed |= self.resource(item)?;
                }
            }
            return Ok(changed);
        }
        let Some(workload_kind) = WORKLOADS.iter().find(|w| w.kind == kind && w.groups.contains(&group)) else {
            self.note_kind(if kind.is_empty() { "(no kind)" } else { &kind });
            return Ok(false);
        };
        self.workloads += 1;
        let workload = describe(resource);
        let Some(map) = resource.as_map_mut() else { return Ok(false) };
        let name = map
            .get("metadata")
            .and_then(|m| m.at(&["name"]).or_else(|| m.at(&["generateName"])))
            .and_then(Yaml::as_str)
            .unwrap_or("unknown")
            .trim_end_matches('-')
            .to_string();
        let mut warnings = Vec::new();
        let outcome = self.template(map, workload_kind.template, &name, &mut warnings).map_err(|error| {
            InjectError::Workload { file: self.file.to_string(), workload: workload.clone(), error }
        })?;
        let changed = outcome == Outcome::Injected;
        self.warnings.extend(warnings.into_iter().map(|w| format!("{workload}: {w}")));
        self.reports.push(Report { workload, outcome });
        Ok(changed)
    }

    /// Finds the pod template at `path` and injects it.
    fn template(
        &self,
        resource: &mut Mapping,
        path: &[&str],
        name: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Outcome, PodError> {
        let mut template = resource;
        let mut walked = String::new();
        for key in path {
            walked = if walked.is_empty() { (*key).to_string() } else { format!("{walked}.{key}") };
            template = match template.get_mut(key) {
                Some(Yaml::Map(m)) => m,
                Some(other) => {
                    return Err(PodError::Shape {
                        path: walked,
                        reason: format!("expected a mapping, found {}", other.type_name()),
                    });
                }
                None => return Err(PodError::Shape { path: walked, reason: "missing".into() }),
            };
        }
        let mut meta = match template.get("metadata") {
            Some(Yaml::Map(m)) => m.clone(),
            None | Some(Yaml::Null) => Mapping::new(),
            Some(other) => {
                return Err(PodError::Shape {
                    path: pod_path(&walked, "metadata"),
                    reason: format!("expected a mapping, found {}", other.type_name()),
                });
            }
        };
        let mut spec = match template.get("spec") {
            Some(Yaml::Map(m)) => m.clone(),
            Some(other) => {
                return Err(PodError::Shape {
                    path: pod_path(&walked, "spec"),
                    reason: format!("expected a mapping, found {}", other.type_name()),
                });
            }
            None => return Err(PodError::Shape { path: pod_path(&walked, "spec"), reason: "missing".into() }),
        };
        let outcome = pod::inject_pod(&mut meta, &mut spec, &walked, name, self.config, warnings)?;
        if outcome == Outcome::Injected {
            template.insert("metadata", Yaml::Map(meta));
            template.insert("spec", Yaml::Map(spec));
        }
        Ok(outcome)
    }
}

fn pod_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// Runs `serin inject`: reads the input, writes the result to `--output` or stdout
/// and one line per workload to stderr.
pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    let (input, name) = if args.filename.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("serin inject: reading stdin")?;
        (text, "<stdin>".to_string())
    } else {
        let text = std::fs::read_to_string(&args.filename)
            .with_context(|| format!("serin inject: reading {}", args.filename.display()))?;
        (text, args.filename.display().to_string())
    };
    let injection = inject(&input, &name, &InjectConfig::from(args)).context("serin inject")?;
    let mut stderr = std::io::stderr().lock();
    for report in &injection.reports {
        tracing::debug!(workload = %report.workload, outcome = ?report.outcome, "inject");
        writeln!(stderr, "serin inject: {report}")?;
    }
    for warning in &injection.warnings {
        writeln!(stderr, "serin inject: warning: {warning}")?;
    }
    match &args.output {
        Some(path) => std::fs::write(path, &injection.output)
            .with_context(|| format!("serin inject: writing {}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(injection.output.as_bytes()).context("serin inject: writing stdout")?;
            stdout.flush().context("serin inject: writing stdout")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "\
# payment v1: the stable version
apiVersion: apps/v1
kind: Deployment
metadata:
  name: payment-v1
  namespace: shop
  labels: {app: payment, version: v1}
spec:
  replicas: 2
  selector:
    matchLabels: {app: payment, version: v1}
  template:
    metadata:
      labels: {app: payment, version: v1}
      annotations:
        traffic.sidecar.istio.io/excludeOutboundPorts: \"5432\"
    spec:
      serviceAccountName: payment
      containers:
      - name: payment
        image: example/payment:1.0
        args: [\"--port\", \"8080\"]
        env:
        - {name: FLAG, value: \"yes\"}
        - {name: MODE, value: \"0644\"}
        ports: [{containerPort: 8080}]
      volumes:
      - name: config
        configMap: {name: payment, defaultMode: 0644}
";

    const SERVICE: &str = "\
# the Service: passes through as written, comments included
apiVersion: v1
kind: Service
metadata: {name: payment}   # flow style kept
spec:
  ports: [{port: 8080, name: http}]
  selector: {app: payment}
";

    fn run(input: &str) -> Injection {
        inject(input, "test.yaml", &InjectConfig::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn docs(text: &str) -> Vec<Yaml> {
        split_documents(text).iter().filter_map(|d| yaml::parse_document(d.text).unwrap()).collect()
    }

    /// Removes what `inject` adds from a pod template, to compare with the input.
    fn strip_injection(doc: &mut Yaml, template: &[&str]) {
        let mut node = doc;
        for key in template {
            node = node.as_map_mut().and_then(|m| m.get_mut(key)).unwrap();
        }
        let t = node.as_map_mut().unwrap();
        let annotations = t.map_entry("metadata").unwrap().map_entry("annotations").unwrap();
        for key in [pod::STATUS_ANNOTATION, "prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"] {
            annotations.remove(key).unwrap_or_else(|| panic!("{key} missing"));
        }
        annotations.remove("kubectl.kubernetes.io/default-container").unwrap();
        let spec = t.map_entry("spec").unwrap();
        let keep = |list: &mut Vec<Yaml>, names: &[&str]| {
            list.retain(|c| !names.contains(&c.as_map().and_then(|c| c.get_str("name")).unwrap_or("")));
        };
        keep(spec.seq_entry("containers").unwrap(), &[pod::PROXY_CONTAINER]);
        keep(spec.seq_entry("initContainers").unwrap(), &[pod::INIT_CONTAINER]);
        keep(spec.seq_entry("volumes").unwrap(), &["serin-ca-root", "serin-token"]);
        if spec.seq_entry("initContainers").unwrap().is_empty() {
            spec.remove("initContainers");
        }
    }

    #[test]
    fn injects_a_deployment_and_leaves_everything_else_as_it_was() {
        let input = format!("{DEPLOYMENT}---\n{SERVICE}");
        let result = run(&input);
        assert_eq!(
            result.reports,
            [Report { workload: "Deployment shop/payment-v1".into(), outcome: Outcome::Injected }]
        );
        assert!(result.warnings.is_empty(), "{:?}", result.warnings);
        // The leading comment of the injected document stays; the Service is copied verbatim.
        assert!(result.output.starts_with("# payment v1: the stable version\napiVersion: apps/v1\nkind: Deployment\n"));
        assert!(result.output.ends_with(&format!("---\n{SERVICE}")), "{}", result.output);

        let mut out = docs(&result.output);
        let input_docs = docs(&input);
        assert_eq!(out.len(), 2);
        // Values as Kubernetes reads them: octal mode, quoted strings that look like other types.
        let volume = out[0].at(&["spec", "template", "spec", "volumes"]).and_then(Yaml::as_seq).unwrap()[0].clone();
        assert_eq!(volume.at(&["configMap", "defaultMode"]), Some(&Yaml::Int(0o644)));
        assert!(result.output.contains("value: \"yes\""), "{}", result.output);
        // Remove the injection: what is left is the input, keys in the same order.
        strip_injection(&mut out[0], &["spec", "template"]);
        let mut expected = input_docs[0].clone();
        // The input had no initContainers and its annotations held only the traffic one.
        assert_eq!(out[0], expected.clone());
        expected.as_map_mut().unwrap().insert("spec", Yaml::Null);
        assert_ne!(out[0], expected, "the comparison is not vacuous");
        assert_eq!(out[1], input_docs[1]);

        // The traffic annotation became an init flag.
        let init = docs(&result.output)[0].at(&["spec", "template", "spec", "initContainers"]).cloned().unwrap();
        let args: Vec<_> = init.as_seq().unwrap()[0].at(&["args"]).unwrap().as_seq().unwrap().to_vec();
        let args: Vec<&str> = args.iter().filter_map(Yaml::as_str).collect();
        let o = args.iter().position(|a| *a == "-o").expect("-o flag");
        assert_eq!(args[o + 1], "5432");
        assert_eq!(args[0], "iptables");
    }

    #[test]
    fn reinjecting_changes_nothing() {
        let input = format!("{DEPLOYMENT}---\n{SERVICE}");
        let once = run(&input);
        let twice = run(&once.output);
        assert_eq!(twice.output, once.output, "byte for byte");
        assert!(
            matches!(twice.reports[0].outcome, Outcome::AlreadyInjected(ref why) if why.contains("sidecar.serin.dev/status"))
        );
        assert_eq!(
            twice.reports[0].to_string(),
            "Deployment shop/payment-v1: already injected (it has the sidecar.serin.dev/status annotation); left as is"
        );
    }

    #[test]
    fn opted_out_workloads_are_copied_verbatim() {
        let input = DEPLOYMENT
            .replace("      annotations:\n", "      annotations:\n        sidecar.istio.io/inject: \"false\"\n");
        let result = run(&input);
        assert_eq!(result.output, input);
        assert_eq!(
            result.reports[0].to_string(),
            "Deployment shop/payment-v1: not injected: sidecar.istio.io/inject annotation is \"false\""
        );
    }

    #[test]
    fn a_file_without_workload_is_an_error_naming_the_kinds() {
        let input =
            format!("{SERVICE}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n# only a comment\n");
        let err = inject(&input, "svc.yaml", &InjectConfig::default()).unwrap_err();
        assert_eq!(err.to_string(), "no workload in svc.yaml: found kinds Service, ConfigMap");
        let err = inject("", "empty.yaml", &InjectConfig::default()).unwrap_err();
        assert_eq!(err.to_string(), "no workload in empty.yaml: found no Kubernetes resource");
        // A Deployment of another API group (a CRD) is not a workload either.
        let input = "apiVersion: example.com/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n";
        assert!(matches!(inject(input, "crd.yaml", &InjectConfig::default()), Err(InjectError::NoWorkload { .. })));
    }

    #[test]
    fn every_workload_kind_and_lists_are_handled() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a}]\n";
        let cron = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: '* * * * *'\n  \
                    jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          \
                    containers: [{name: a, image: a}]\n";
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: apps/v1\n  kind: StatefulSet\n  metadata: {name: s}\n  \
                    spec:\n    template:\n      spec:\n        containers: [{name: a, image: a}]\n";
        let result = run(&format!("{pod}---\n{cron}---\n{list}"));
        let names: Vec<_> = result.reports.iter().map(|r| (r.workload.as_str(), r.outcome.clone())).collect();
        assert_eq!(
            names,
            [("Pod p", Outcome::Injected), ("CronJob c", Outcome::Injected), ("StatefulSet s", Outcome::Injected)]
        );
        let out = docs(&result.output);
        let cron_containers = out[1].at(&["spec", "jobTemplate", "spec", "template", "spec", "containers"]).unwrap();
        assert_eq!(cron_containers.as_seq().map(<[Yaml]>::len), Some(2));
        let list_item = &out[2].at(&["items"]).and_then(Yaml::as_seq).unwrap()[0];
        assert!(list_item.at(&["spec", "template", "metadata", "annotations", pod::STATUS_ANNOTATION]).is_some());
        // The pod's own name is the sidecar's workload name.
        let env = out[0].at(&["spec", "containers"]).and_then(Yaml::as_seq).unwrap()[1].at(&["env"]).cloned().unwrap();
        assert!(env.as_seq().unwrap().iter().any(|v| v.at(&["value"]).and_then(Yaml::as_str) == Some("p")));
    }

    #[test]
    fn errors_name_the_file_the_workload_and_the_field() {
        let broken = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  replicas: 1\n";
        let err = inject(broken, "d.yaml", &InjectConfig::default()).unwrap_err();
        assert_eq!(err.to_string(), "d.yaml: Deployment d: spec.template: missing");

        let bad = DEPLOYMENT.replace("\"5432\"", "\"postgres\"");
        let err = inject(&bad, "d.yaml", &InjectConfig::default()).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "d.yaml: Deployment shop/payment-v1: annotation traffic.sidecar.istio.io/excludeOutboundPorts:"
            ),
            "{err}"
        );

        let syntax = format!("{SERVICE}---\nkind: Pod\nmetadata: {{name: [unclosed\n");
        let err = inject(&syntax, "s.yaml", &InjectConfig::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("s.yaml: document 2: line "), "{text}");
        let line: usize = text["s.yaml: document 2: line ".len()..].split(',').next().unwrap().parse().unwrap();
        assert!(line >= 9, "line {line} counts from the start of the file: {text}");
    }

    #[test]
    fn leading_lines_keep_the_marker_and_comments() {
        assert_eq!(leading_lines("--- # c\n# note\n\nc: 3\n"), "--- # c\n# note\n\n");
        assert_eq!(leading_lines("--- {a: 1}\n"), "");
    }
}
