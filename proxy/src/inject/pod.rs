//! Injection into one pod template: the `serin-init` init container, the
//! `serin-proxy` sidecar container, the identity volumes and the annotations.

use serde::Serialize;
use serin_control_api::yaml::{Mapping, WrongType, Yaml, parse_document};

use super::annotations::{self, AnnotationError};
use super::{InjectConfig, Outcome};

/// Name of the init container.
pub const INIT_CONTAINER: &str = "serin-init";
/// Name of the sidecar container.
pub const PROXY_CONTAINER: &str = "serin-proxy";
/// The annotation that marks a pod as injected, listing what was added (like
/// Istio's `sidecar.istio.io/status`).
pub const STATUS_ANNOTATION: &str = "sidecar.serin.dev/status";
/// Istio's status annotation: a pod Istio already injected is left alone.
pub const ISTIO_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The proxy's uid and gid: the init rules spare the traffic of this uid.
pub const PROXY_UID: u32 = 1337;
/// The mesh's CA root, from the `serin-ca-root` ConfigMap.
pub const CA_ROOT_FILE: &str = "/var/run/secrets/serin/root/root-cert.pem";
/// The bootstrap token, from the `serin-bootstrap-token-<service account>` Secret.
pub const TOKEN_FILE: &str = "/var/run/secrets/serin/token/token";
/// Prefix of the bootstrap token Secret's name; the pod's service account completes it.
pub const TOKEN_SECRET_PREFIX: &str = "serin-bootstrap-token-";
/// Prometheus port of the sidecar.
pub const METRICS_PORT: u16 = 15090;
/// Prometheus path of the sidecar.
pub const METRICS_PATH: &str = "/stats/prometheus";

const INIT_TEMPLATE: &str = include_str!("templates/init.yaml");
const PROXY_TEMPLATE: &str = include_str!("templates/proxy.yaml");
const VOLUMES_TEMPLATE: &str = include_str!("templates/volumes.yaml");

/// The fixed `serin iptables` flags, before the annotation-driven ones (Istio's
/// names: outbound port, inbound port, proxy uid, mode).
const IPTABLES_BASE: &[&str] = &["iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"];

/// Why a pod template cannot be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    /// A field has the wrong type or is missing.
    #[error("{path}: {reason}")]
    Shape {
        /// Dotted path from the document root.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An annotation cannot be applied.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// A built-in template does not parse (a bug).
    #[error("built-in template {0}: {1}")]
    Template(&'static str, String),
}

impl PodError {
    fn shape(prefix: &str, e: WrongType) -> PodError {
        PodError::Shape { path: join(prefix, &e.key), reason: format!("expected {}, found {}", e.expected, e.found) }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// The `sidecar.serin.dev/status` value: what was injected, so that tools (and a
/// later `inject`) can tell.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
    version: &'a str,
    init_containers: [&'a str; 1],
    containers: [&'a str; 1],
    volumes: Vec<String>,
    image_pull_secrets: Option<()>,
}

/// Why a pod template is already injected, when it is.
pub fn already_injected(meta: &Mapping, spec: &Mapping) -> Option<String> {
    let annotations = meta.get("annotations").and_then(Yaml::as_map);
    if annotations.is_some_and(|a| a.get(STATUS_ANNOTATION).is_some()) {
        return Some(format!("it has the {STATUS_ANNOTATION} annotation"));
    }
    if annotations.is_some_and(|a| a.get(ISTIO_STATUS_ANNOTATION).is_some()) {
        return Some(format!("Istio injected it ({ISTIO_STATUS_ANNOTATION} annotation)"));
    }
    let has = |list: &str, name: &str| {
        spec.get(list)
            .and_then(Yaml::as_seq)
            .is_some_and(|items| items.iter().any(|c| c.as_map().and_then(|c| c.get_str("name")) == Some(name)))
    };
    if has("containers", PROXY_CONTAINER) {
        return Some(format!("it has a {PROXY_CONTAINER} container"));
    }
    if has("initContainers", INIT_CONTAINER) {
        return Some(format!("it has a {INIT_CONTAINER} init container"));
    }
    None
}

fn template(name: &'static str, text: &str) -> Result<Yaml, PodError> {
    match parse_document(text) {
        Ok(Some(y)) => Ok(y),
        Ok(None) => Err(PodError::Template(name, "empty".into())),
        Err(e) => Err(PodError::Template(name, e.to_string())),
    }
}

fn template_map(name: &'static str, text: &str) -> Result<Mapping, PodError> {
    match template(name, text)? {
        Yaml::Map(m) => Ok(m),
        other => Err(PodError::Template(name, format!("expected a mapping, found {}", other.type_name()))),
    }
}

fn strings(items: &[String]) -> Yaml {
    Yaml::Seq(items.iter().map(|s| Yaml::str(s.as_str())).collect())
}

/// Injects the pod template whose `metadata` and `spec` are given. `prefix` is the
/// template's dotted path in the document (for messages), `workload` the name given
/// to the sidecar (`SERIN_WORKLOAD`). Warnings (annotations not applied) go to
/// `warnings`.
pub fn inject_pod(
    meta: &mut Mapping,
    spec: &mut Mapping,
    prefix: &str,
    workload: &str,
    config: &InjectConfig,
    warnings: &mut Vec<String>,
) -> Result<Outcome, PodError> {
    if let Some(reason) = already_injected(meta, spec) {
        return Ok(Outcome::AlreadyInjected(reason));
    }
    let labels = meta.get("labels").and_then(Yaml::as_map);
    let annotations = meta.get("annotations").and_then(Yaml::as_map);
    if let Some(place) = annotations::opted_out(labels, annotations) {
        return Ok(Outcome::OptedOut(format!("{} {place} is \"false\"", annotations::INJECT)));
    }
    if matches!(spec.get("hostNetwork"), Some(Yaml::Bool(true))) {
        return Ok(Outcome::HostNetwork);
    }

    // Everything that can fail is computed before the template is touched.
    let meta_prefix = join(prefix, "metadata");
    let spec_prefix = join(prefix, "spec");
    let iptables = annotations::iptables_args(IPTABLES_BASE, annotations)?;
    let mut ignored = Vec::new();
    let overrides = annotations::sidecar_overrides(annotations, &mut ignored)?;
    warnings.extend(ignored.into_iter().map(|a| format!("annotation {a} is not applied by serin inject")));
    let app_container = match spec.get("containers") {
        Some(Yaml::Seq(items)) if !items.is_empty() => {
            items.first().and_then(Yaml::as_map).and_then(|c| c.get_str("name")).map(str::to_string)
        }
        Some(Yaml::Seq(_)) | None | Some(Yaml::Null) => {
            return Err(PodError::Shape {
                path: join(&spec_prefix, "containers"),
                reason: "a pod needs at least one container".into(),
            });
        }
        Some(other) => {
            return Err(PodError::Shape {
                path: join(&spec_prefix, "containers"),
                reason: format!("expected a list, found {}", other.type_name()),
            });
        }
    };

    let mut init = template_map("init.yaml", INIT_TEMPLATE)?;
    init.insert("image", Yaml::str(config.image.as_str()));
    init.insert("args", strings(&iptables));
    if let Some(policy) = &config.image_pull_policy {
        init.insert("imagePullPolicy", Yaml::str(policy.as_str()));
    }

    let mut proxy = template_map("proxy.yaml", PROXY_TEMPLATE)?;
    proxy.insert("image", Yaml::str(config.image.as_str()));
    proxy.insert("args", strings(&sidecar_args(config)));
    if let Some(policy) = &config.image_pull_policy {
        proxy.insert("imagePullPolicy", Yaml::str(policy.as_str()));
    }
    if let Ok(env) = proxy.seq_entry("env") {
        for var in env.iter_mut().filter_map(Yaml::as_map_mut) {
            if var.get_str("name") == Some("SERIN_WORKLOAD") {
                var.insert("value", Yaml::str(workload));
            }
        }
    }
    for (section, resource, quantity) in overrides {
        let resources = proxy.map_entry("resources").map_err(|e| PodError::shape("serin-proxy", e))?;
        resources
            .map_entry(section)
            .map_err(|e| PodError::shape("serin-proxy.resources", e))?
            .insert(resource, Yaml::String(quantity));
    }

    let mut volumes = match template("volumes.yaml", VOLUMES_TEMPLATE)? {
        Yaml::Seq(v) => v,
        other => {
            return Err(PodError::Template("volumes.yaml", format!("expected a list, found {}", other.type_name())));
        }
    };
    let service_account = service_account(spec);
    for secret in volumes.iter_mut().filter_map(|v| v.as_map_mut()?.get_mut("secret")?.as_map_mut()) {
        secret.insert("secretName", Yaml::String(format!("{TOKEN_SECRET_PREFIX}{service_account}")));
    }
    let volume_names: Vec<String> =
        volumes.iter().filter_map(|v| v.as_map().and_then(|v| v.get_str("name")).map(str::to_string)).collect();
    if let Some(existing) = spec.get("volumes").and_then(Yaml::as_seq) {
        for v in existing {
            if let Some(name) =
                v.as_map().and_then(|v| v.get_str("name")).filter(|n| volume_names.iter().any(|m| m == n))
            {
                return Err(PodError::Shape {
                    path: join(&spec_prefix, "volumes"),
                    reason: format!("the pod already has a volume named {name:?}, which serin's sidecar needs"),
                });
            }
        }
    }
    let status = Status {
        version: env!("CARGO_PKG_VERSION"),
        init_containers: [INIT_CONTAINER],
        containers: [PROXY_CONTAINER],
        volumes: volume_names,
        image_pull_secrets: None,
    };
    let status = serde_json::to_string(&status).map_err(|e| PodError::Template("status", e.to_string()))?;

    // Check every field's type before changing anything.
    for key in ["initContainers", "volumes"] {
        if let Some(v) = spec.get(key).filter(|v| !matches!(v, Yaml::Seq(_) | Yaml::Null)) {
            return Err(PodError::Shape {
                path: join(&spec_prefix, key),
                reason: format!("expected a list, found {}", v.type_name()),
            });
        }
    }
    if let Some(v) = meta.get("annotations").filter(|v| !matches!(v, Yaml::Map(_) | Yaml::Null)) {
        return Err(PodError::Shape {
            path: join(&meta_prefix, "annotations"),
            reason: format!("expected a mapping, found {}", v.type_name()),
        });
    }

    spec.seq_entry("initContainers").map_err(|e| PodError::shape(&spec_prefix, e))?.push(Yaml::Map(init));
    spec.seq_entry("containers").map_err(|e| PodError::shape(&spec_prefix, e))?.push(Yaml::Map(proxy));
    spec.seq_entry("volumes").map_err(|e| PodError::shape(&spec_prefix, e))?.extend(volumes);

    let annotations = meta.map_entry("annotations").map_err(|e| PodError::shape(&meta_prefix, e))?;
    if let Some(app) = app_container
        && annotations.get("kubectl.kubernetes.io/default-container").is_none()
    {
        annotations.insert("kubectl.kubernetes.io/default-container", Yaml::String(app));
    }
    let scrape = [
        ("prometheus.io/scrape", "true".to_string()),
        ("prometheus.io/port", METRICS_PORT.to_string()),
        ("prometheus.io/path", METRICS_PATH.to_string()),
    ];
    if scrape.iter().any(|(k, _)| annotations.get(k).is_some()) {
        warnings.push(
            "the pod has its own prometheus.io/* annotations: they are kept, so Prometheus scrapes the app, \
             not the sidecar's :15090/stats/prometheus"
                .to_string(),
        );
    } else {
        for (k, v) in scrape {
            annotations.insert(k, Yaml::String(v));
        }
    }
    annotations.insert(STATUS_ANNOTATION, Yaml::String(status));
    Ok(Outcome::Injected)
}

/// The pod's service account: `serviceAccountName`, else the deprecated
/// `serviceAccount`, else Kubernetes' `default`.
pub fn service_account(spec: &Mapping) -> &str {
    spec.get_str("serviceAccountName").or_else(|| spec.get_str("serviceAccount")).unwrap_or("default")
}

/// The `serin sidecar` arguments of the injected container. The rest comes from the
/// environment: `POD_NAME` (node id), `POD_NAMESPACE`, `SERIN_SERVICE_ACCOUNT` (the
/// identity asked for), `SERIN_APP` / `SERIN_VERSION` / `SERIN_WORKLOAD` (labels).
fn sidecar_args(config: &InjectConfig) -> Vec<String> {
    [
        "sidecar",
        "--control-plane",
        config.control_plane.as_str(),
        "--ca-root",
        CA_ROOT_FILE,
        "--bootstrap-token-file",
        TOKEN_FILE,
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InjectConfig {
        InjectConfig {
            image: "example/serin:test".into(),
            control_plane: "https://cp:15012".into(),
            image_pull_policy: None,
        }
    }

    fn pod(text: &str) -> (Mapping, Mapping) {
        let doc = parse_document(text).unwrap().unwrap();
        let m = doc.as_map().unwrap();
        let meta = m.get("metadata").and_then(Yaml::as_map).cloned().unwrap_or_default();
        let spec = m.get("spec").and_then(Yaml::as_map).cloned().unwrap_or_default();
        (meta, spec)
    }

    fn names(spec: &Mapping, key: &str) -> Vec<String> {
        spec.get(key)
            .and_then(Yaml::as_seq)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.as_map().and_then(|c| c.get_str("name")).map(str::to_string))
            .collect()
    }

    const POD: &str = "metadata:\n  labels: {app: payment, version: v1}\nspec:\n  serviceAccountName: payment\n  \
                       initContainers: [{name: migrate, image: db}]\n  containers:\n  - name: app\n    image: app:1\n  \
                       volumes: [{name: data, emptyDir: {}}]\n";

    #[test]
    fn adds_containers_volumes_and_annotations() {
        let (mut meta, mut spec) = pod(POD);
        let mut warnings = Vec::new();
        let outcome =
            inject_pod(&mut meta, &mut spec, "spec.template", "payment-v1", &config(), &mut warnings).unwrap();
        assert_eq!(outcome, Outcome::Injected);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(names(&spec, "initContainers"), ["migrate", INIT_CONTAINER]);
        assert_eq!(names(&spec, "containers"), ["app", PROXY_CONTAINER]);
        assert_eq!(names(&spec, "volumes"), ["data", "serin-ca-root", "serin-token"]);
        let token = &spec.get("volumes").and_then(Yaml::as_seq).unwrap()[2];
        assert_eq!(token.at(&["secret", "secretName"]).and_then(Yaml::as_str), Some("serin-bootstrap-token-payment"));

        let containers = spec.get("containers").and_then(Yaml::as_seq).unwrap();
        let proxy = containers[1].as_map().unwrap();
        assert_eq!(proxy.get_str("image"), Some("example/serin:test"));
        let args: Vec<_> = proxy.get("args").and_then(Yaml::as_seq).unwrap().iter().filter_map(Yaml::as_str).collect();
        assert_eq!(&args[..3], ["sidecar", "--control-plane", "https://cp:15012"]);
        assert_eq!(Yaml::Map(proxy.clone()).at(&["securityContext", "runAsUser"]), Some(&Yaml::Int(1337)));
        assert_eq!(Yaml::Map(proxy.clone()).at(&["readinessProbe", "httpGet", "port"]), Some(&Yaml::Int(15021)));
        let env = proxy.get("env").and_then(Yaml::as_seq).unwrap();
        let workload = env.iter().filter_map(Yaml::as_map).find(|v| v.get_str("name") == Some("SERIN_WORKLOAD"));
        assert_eq!(workload.and_then(|v| v.get_str("value")), Some("payment-v1"));

        let init = spec.get("initContainers").and_then(Yaml::as_seq).unwrap()[1].as_map().unwrap().clone();
        let caps = Yaml::Map(init.clone()).at(&["securityContext", "capabilities", "add"]).cloned();
        assert_eq!(caps, Some(Yaml::Seq(vec![Yaml::str("NET_ADMIN"), Yaml::str("NET_RAW")])));
        assert_eq!(Yaml::Map(init).at(&["securityContext", "runAsNonRoot"]), Some(&Yaml::Bool(false)));

        let annotations = meta.get("annotations").and_then(Yaml::as_map).unwrap();
        assert_eq!(annotations.get_str("prometheus.io/port"), Some("15090"));
        assert_eq!(annotations.get_str("prometheus.io/path"), Some("/stats/prometheus"));
        assert_eq!(annotations.get_str("kubectl.kubernetes.io/default-container"), Some("app"));
        let status: serde_json::Value = serde_json::from_str(annotations.get_str(STATUS_ANNOTATION).unwrap()).unwrap();
        assert_eq!(status["containers"], serde_json::json!(["serin-proxy"]));
        assert_eq!(status["initContainers"], serde_json::json!(["serin-init"]));
        assert_eq!(status["volumes"], serde_json::json!(["serin-ca-root", "serin-token"]));
    }

    #[test]
    fn second_injection_is_refused_as_already_done() {
        let (mut meta, mut spec) = pod(POD);
        let mut w = Vec::new();
        inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap();
        let (before_meta, before_spec) = (meta.clone(), spec.clone());
        let outcome = inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap();
        assert!(matches!(outcome, Outcome::AlreadyInjected(ref r) if r.contains(STATUS_ANNOTATION)), "{outcome:?}");
        assert_eq!((meta, spec), (before_meta, before_spec));

        // Containers alone (annotation stripped by hand) also count.
        let (mut meta, mut spec) =
            pod("metadata: {}\nspec:\n  containers: [{name: app, image: a}, {name: serin-proxy, image: b}]\n");
        let outcome = inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap();
        assert!(matches!(outcome, Outcome::AlreadyInjected(ref r) if r.contains("serin-proxy container")));
    }

    #[test]
    fn opt_out_host_network_and_conflicts() {
        let mut w = Vec::new();
        let (mut meta, mut spec) =
            pod("metadata:\n  annotations: {sidecar.istio.io/inject: \"false\"}\nspec:\n  containers: [{name: a}]\n");
        let before = spec.clone();
        let outcome = inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap();
        assert!(matches!(outcome, Outcome::OptedOut(_)));
        assert_eq!(spec, before);

        let (mut meta, mut spec) = pod("metadata: {}\nspec:\n  hostNetwork: true\n  containers: [{name: a}]\n");
        assert_eq!(inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap(), Outcome::HostNetwork);

        let (mut meta, mut spec) =
            pod("metadata: {}\nspec:\n  containers: [{name: a}]\n  volumes: [{name: serin-token, emptyDir: {}}]\n");
        let err = inject_pod(&mut meta, &mut spec, "spec.template", "x", &config(), &mut w).unwrap_err();
        assert!(err.to_string().starts_with("spec.template.spec.volumes: the pod already has a volume"), "{err}");

        let (mut meta, mut spec) = pod("metadata: {}\nspec:\n  containers: []\n");
        let err = inject_pod(&mut meta, &mut spec, "spec.template", "x", &config(), &mut w).unwrap_err();
        assert_eq!(err.to_string(), "spec.template.spec.containers: a pod needs at least one container");

        let (mut meta, mut spec) = pod("metadata: {annotations: [x]}\nspec:\n  containers: [{name: a}]\n");
        let before = (meta.clone(), spec.clone());
        let err = inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap_err();
        assert_eq!(err.to_string(), "metadata.annotations: expected a mapping, found a list");
        assert_eq!((meta, spec), before, "nothing is changed on error");
    }

    #[test]
    fn own_prometheus_annotations_are_kept_with_a_warning() {
        let (mut meta, mut spec) =
            pod("metadata:\n  annotations: {prometheus.io/port: \"9000\"}\nspec:\n  containers: [{name: a}]\n");
        let mut w = Vec::new();
        inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap();
        let annotations = meta.get("annotations").and_then(Yaml::as_map).unwrap();
        assert_eq!(annotations.get_str("prometheus.io/port"), Some("9000"));
        assert!(annotations.get("prometheus.io/scrape").is_none());
        assert!(w.iter().any(|w| w.contains("prometheus.io")), "{w:?}");
    }

    #[test]
    fn proxy_resource_annotations_override_the_defaults() {
        let (mut meta, mut spec) = pod(
            "metadata:\n  annotations: {sidecar.istio.io/proxyCPU: 250m, sidecar.istio.io/proxyMemoryLimit: 1Gi}\n\
             spec:\n  containers: [{name: a}]\n",
        );
        let mut w = Vec::new();
        inject_pod(&mut meta, &mut spec, "", "x", &config(), &mut w).unwrap();
        let items = spec.get("containers").and_then(Yaml::as_seq).unwrap();
        let resources = items[1].at(&["resources"]).unwrap();
        assert_eq!(resources.at(&["requests", "cpu"]), Some(&Yaml::str("250m")));
        assert_eq!(resources.at(&["requests", "memory"]), Some(&Yaml::str("32Mi")));
        assert_eq!(resources.at(&["limits", "memory"]), Some(&Yaml::str("1Gi")));
        assert_eq!(resources.at(&["limits", "cpu"]), Some(&Yaml::str("2")));
    }
}
