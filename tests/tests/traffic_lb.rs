//! Load balancing through a real sidecar: consistent hashing on a header keeps
//! each user on one version and one pod under a 50/50 split; ROUND_ROBIN spreads
//! exactly evenly; LEAST_REQUEST avoids an endpoint that is busy.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serin::demo_app::AppConfig;
use serin_tests::*;

fn split_vs(v1: u32, v2: u32) -> String {
    vs_yaml(
        "payment",
        "payment",
        &format!(
            "  - name: split\n    route:\n    - {{destination: {{host: payment, subset: v1}}, weight: {v1}}}\n    - {{destination: {{host: payment, subset: v2}}, weight: {v2}}}\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_a_header_keeps_each_user_on_one_version_and_pod() {
    let (_apps, pods) = start_pods(
        "payment",
        vec![
            ("v1", AppConfig::new("payment", "v1")),
            ("v1", AppConfig::new("payment", "v1")),
            ("v2", AppConfig::new("payment", "v2")),
            ("v2", AppConfig::new("payment", "v2")),
        ],
    )
    .await;
    let policy = "    loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", Some(policy)),
        split_vs(50, 50),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    let mut versions: HashMap<String, usize> = HashMap::new();
    // Interleave users so the split's own counter cannot line them up.
    for _round in 0..20 {
        for u in 0..20 {
            let user = format!("user-{u}");
            let (status, _, body) = client.try_get("/", &[("x-user", &user)]).await.expect("request");
            assert_eq!(status, 200);
            let pod = pod_of(&body).expect("pod");
            seen.entry(user).or_default().insert(pod);
        }
    }
    for (user, pods_seen) in &seen {
        assert_eq!(pods_seen.len(), 1, "{user} moved between pods: {pods_seen:?}");
        let pod = pods_seen.iter().next().expect("one pod");
        let version = if pod.starts_with("payment-v2") { "v2" } else { "v1" };
        *versions.entry(version.to_string()).or_default() += 1;
    }
    // The hash is deterministic (FNV of fixed names): 20 users landing on one
    // version would be a broken hash, not bad luck that could come and go.
    assert!(
        versions.get("v1").copied().unwrap_or(0) > 0 && versions.get("v2").copied().unwrap_or(0) > 0,
        "{versions:?}"
    );
    let all_pods: HashSet<&String> = seen.values().flatten().collect();
    assert!(all_pods.len() >= 3, "users spread over the pods: {all_pods:?}");

    // Requests without the header are still split (no key: the normal pick).
    let answers = load(sidecar.bound.outbound, "payment", "/", 1, 20).await;
    let v2 = answers.iter().filter(|(_, b)| version_of(b).as_deref() == Some("v2")).count();
    assert_eq!(v2, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_exactly_evenly() {
    let (apps, pods) = start_pods(
        "payment",
        vec![
            ("v1", AppConfig::new("payment", "v1")),
            ("v1", AppConfig::new("payment", "v1")),
            ("v1", AppConfig::new("payment", "v1")),
            ("v2", AppConfig::new("payment", "v2")),
        ],
    )
    .await;
    let policy = "    loadBalancer: {simple: ROUND_ROBIN}\n";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", Some(policy)),
        split_vs(100, 0),
    ])
    .await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 3, 300).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (status, body) in &answers {
        assert_eq!(*status, 200);
        *counts.entry(pod_of(body).expect("pod")).or_default() += 1;
    }
    let want: HashMap<String, usize> = apps[..3].iter().map(|a| (a.pod().to_string(), 100)).collect();
    assert_eq!(counts, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_the_busy_endpoint() {
    let (apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v1", AppConfig::new("payment", "v1"))])
            .await;
    let policy = "    loadBalancer: {simple: LEAST_REQUEST}\n";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", Some(policy)),
        split_vs(100, 0),
    ])
    .await;
    // One long request keeps one endpoint busy.
    let outbound = sidecar.bound.outbound;
    let long = tokio::spawn(async move { get(outbound, "payment", "/delay/60000", &[]).await.map(|r| r.0) });
    let cluster = "outbound|8080|v1|payment.default.svc.cluster.local";
    let mut busy = None;
    for _ in 0..200 {
        for (i, pod) in pods.iter().enumerate() {
            if sidecar.host_status(cluster, pod.addr).await["active_requests"] == 1 {
                busy = Some(i);
            }
        }
        if busy.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let busy = busy.expect("the long request is in flight");
    let idle_pod = apps[1 - busy].pod().to_string();
    // With two endpoints, LEAST_REQUEST compares both on every pick: each
    // request goes to the idle one.
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..30 {
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 200);
        assert_eq!(pod_of(&body).as_deref(), Some(idle_pod.as_str()));
    }
    assert_eq!(sidecar.host_status(cluster, pods[busy].addr).await["active_requests"], 1, "still busy");
    long.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_level_consistent_hash_pins_users_within_that_subset() {
    // Only v2 hashes on x-user (the subset's own trafficPolicy); v1 is first in
    // the route. A user sent to v2 must always meet the same v2 pod.
    let (_apps, pods) = start_pods(
        "payment",
        vec![
            ("v1", AppConfig::new("payment", "v1")),
            ("v2", AppConfig::new("payment", "v2")),
            ("v2", AppConfig::new("payment", "v2")),
            ("v2", AppConfig::new("payment", "v2")),
        ],
    )
    .await;
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment, namespace: default}\nspec:\n  host: payment\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n".to_string();
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), dr, split_vs(50, 50)]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let mut v2_pods: HashMap<String, HashSet<String>> = HashMap::new();
    for _round in 0..20 {
        for u in 0..10 {
            let user = format!("user-{u}");
            let (status, _, body) = client.try_get("/", &[("x-user", &user)]).await.expect("request");
            assert_eq!(status, 200);
            if version_of(&body).as_deref() == Some("v2") {
                v2_pods.entry(user).or_default().insert(pod_of(&body).expect("pod"));
            }
        }
    }
    assert!(!v2_pods.is_empty(), "v2 got traffic");
    for (user, seen) in &v2_pods {
        assert_eq!(seen.len(), 1, "{user} met several v2 pods: {seen:?}");
    }
}
