//! The API is language-neutral: a Python `grpcio` client, generated at run time from
//! our `.proto` files with `grpcio-tools`, calls SetWeights and GetStatus on a real
//! control plane over loopback.
//!
//! Needs `python3` with `grpcio` and `grpcio-tools` (`pip install grpcio grpcio-tools`);
//! the test fails without them unless `SERIN_SKIP_PYTHON=1` is set.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::Server;

/// The Python client is killed after this long.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `python3 ARGS` with a timeout; returns (exit success, stdout, stderr).
async fn python(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let child = tokio::process::Command::new("python3")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); install python3 and `pip install grpcio grpcio-tools`"));
    let output = tokio::time::timeout(CHILD_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("python3 {args:?} did not finish within {CHILD_TIMEOUT:?} (killed)"))
        .expect("wait for python3");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_python_grpcio_client_sets_weights_and_reads_status() {
    if std::env::var("SERIN_SKIP_PYTHON").as_deref() == Ok("1") {
        println!("skipped: SERIN_SKIP_PYTHON=1 (the Python grpcio client test did not run)");
        return;
    }
    let (ok, _, stderr) = python(&["-c", "import grpc, grpc_tools"]).await;
    assert!(
        ok.success(),
        "python3 cannot import grpc / grpc_tools: run `pip install grpcio grpcio-tools` \
         (or set SERIN_SKIP_PYTHON=1 to skip this test on purpose)\n{stderr}"
    );

    let server = Server::start(common::store()).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client.py");
    let script = script.to_str().expect("utf-8 path");
    let addr = server.addr.to_string();
    let (status, stdout, stderr) = python(&[script, &addr]).await;
    assert!(status.success(), "client.py failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}");

    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client.py printed no JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    let set = &report["set_weights"];
    assert_eq!(set["version"], "2", "{report}");
    assert_eq!(set["changed"], true, "{report}");
    assert_eq!(set["weights"], serde_json::json!({"v1": 90, "v2": 10}), "{report}");
    let routes_url = serin_control_api::ResourceType::Routes.type_url();
    assert_eq!(set["type_url"], routes_url, "{report}");
    assert_eq!(report["status"]["versions"][routes_url], "2", "GetStatus shows the new version: {report}");
    assert_eq!(report["status"]["proxies"], 0, "no sidecar is connected: {report}");

    let invalid = &report["invalid_set_weights"];
    assert_eq!(invalid["code"], "INVALID_ARGUMENT", "{report}");
    let details = invalid["details"].as_str().expect("details");
    assert!(details.contains("add up to 110") && details.contains("not 100"), "the error names the problem: {details}");

    // The store holds what Python set, and the rejected call changed nothing.
    let mut ctl = server.management().await;
    let config = ctl.config("payment", None).await.expect("get config");
    assert!(config.yaml.contains("weight: 90") && config.yaml.contains("weight: 10"), "{}", config.yaml);
    assert!(!config.yaml.contains("weight: 60") && !config.yaml.contains("weight: 50"), "{}", config.yaml);
    assert_eq!(config.versions.get(routes_url).map(String::as_str), Some("2"), "the invalid call made no version");
    server.stop().await;
}
