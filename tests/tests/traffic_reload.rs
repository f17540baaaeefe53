//! Hot reload through a real sidecar: 100 weight changes under keep-alive load
//! with zero failed requests, the last weights in effect; an invalid edit is
//! rejected whole, named in `/config_dump`, and the old config keeps serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serin::demo_app::AppConfig;
use serin_tests::*;

fn split_vs(v1: i64, v2: i64) -> String {
    vs_yaml(
        "payment",
        "payment",
        &format!(
            "  - name: split\n    route:\n    - {{destination: {{host: payment, subset: v1}}, weight: {v1}}}\n    - {{destination: {{host: payment, subset: v2}}, weight: {v2}}}\n"
        ),
    )
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    bad_status: AtomicUsize,
    conn_errors: AtomicUsize,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        let mut first = self.first_failure.lock().expect("lock");
        if first.is_none() {
            *first = Some(what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_reloads_under_load_fail_no_request() {
    let (_apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let docs = |v1, v2| vec![registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), split_vs(v1, v2)];
    let sidecar = Sidecar::start(&docs(90, 10)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, tally, addr) = (stop.clone(), tally.clone(), sidecar.bound.outbound);
        workers.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, "payment").await;
            // Bounded: stops when asked, or after a generous number of requests.
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match client.try_get("/", &[]).await {
                    Ok((status, _, _)) if status == 200 => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((status, _, body)) => {
                        tally.bad_status.fetch_add(1, Ordering::Relaxed);
                        tally.fail(format!("{status}: {}", String::from_utf8_lossy(&body)));
                    }
                    Err(e) => {
                        tally.conn_errors.fetch_add(1, Ordering::Relaxed);
                        tally.fail(format!("connection error: {e}"));
                        client = Client::connect(addr, "payment").await;
                    }
                }
            }
        }));
    }

    for i in 0..100 {
        let (v1, v2) = if i % 2 == 0 { (10, 90) } else { (90, 10) };
        let old = sidecar.version();
        sidecar.rewrite(&docs(v1, v2));
        sidecar.wait_reload(&old).await;
    }
    let old = sidecar.version();
    sidecar.rewrite(&docs(0, 100));
    sidecar.wait_reload(&old).await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("load worker");
    }
    let first = tally.first_failure.lock().expect("lock").clone();
    assert_eq!(tally.bad_status.load(Ordering::Relaxed), 0, "first failure: {first:?}");
    assert_eq!(tally.conn_errors.load(Ordering::Relaxed), 0, "first failure: {first:?}");
    assert!(tally.ok.load(Ordering::Relaxed) > 0, "the load ran");

    // The last config (0/100) is the one serving.
    let answers = load(sidecar.bound.outbound, "payment", "/", 2, 100).await;
    assert!(answers.iter().all(|(s, b)| *s == 200 && version_of(b).as_deref() == Some("v2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_is_rejected_whole_and_the_old_config_keeps_serving() {
    let (_apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let registry = registry_yaml("payment", "HTTP", &pods);
    let sidecar = Sidecar::start(&[registry.clone(), subsets_yaml("payment", None), split_vs(100, 0)]).await;
    let good = sidecar.version();
    let all_v1 = |answers: &[(http::StatusCode, bytes::Bytes)]| {
        answers.iter().all(|(s, b)| *s == 200 && version_of(b).as_deref() == Some("v1"))
    };

    // A negative weight: the whole update is rejected, the field named.
    sidecar.rewrite(&[registry.clone(), subsets_yaml("payment", None), split_vs(100, -5)]);
    let error = sidecar.wait_rejected("spec.http[0].route[1].weight").await;
    assert!(error.contains("negative"), "{error}");
    assert_eq!(sidecar.version(), good);
    assert!(all_v1(&load(sidecar.bound.outbound, "payment", "/", 1, 20).await));

    // An unknown field (a typo of `weight`), together with a valid-looking
    // weight change: rejected whole, so the change does not apply either.
    let typo = split_vs(0, 100).replace("weight: 100", "weigth: 100");
    sidecar.rewrite(&[registry.clone(), subsets_yaml("payment", None), typo]);
    let error = sidecar.wait_rejected("weigth").await;
    assert!(error.contains("spec.http[0].route[1]"), "the error names where: {error}");
    assert_eq!(sidecar.version(), good);
    assert!(all_v1(&load(sidecar.bound.outbound, "payment", "/", 1, 20).await));

    // A broken update in a second file rejects the whole folder too.
    std::fs::write(sidecar.dir.path().join("extra.yaml"), "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x, namespace: default}\nspec:\n  host: payment\n  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n").expect("write");
    let error = sidecar.wait_rejected("extra.yaml").await;
    assert!(error.contains("loadBalancer"), "{error}");
    assert_eq!(sidecar.version(), good);
    std::fs::remove_file(sidecar.dir.path().join("extra.yaml")).expect("remove");

    // A valid edit applies.
    sidecar.rewrite(&[registry, subsets_yaml("payment", None), split_vs(0, 100)]);
    sidecar.wait_reload(&good).await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 1, 20).await;
    assert!(answers.iter().all(|(s, b)| *s == 200 && version_of(b).as_deref() == Some("v2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequent_unrelated_reloads_keep_the_canary_share() {
    // A quiet service (5 requests between config pushes) under a mesh that pushes
    // often (here: an unrelated VirtualService changes each time). Each reload
    // compiles a new split; the canary must still get its share.
    let (_apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let other = |n: usize| {
        vs_yaml(
            "other",
            "other.example.com",
            &format!("  - directResponse: {{status: 200, body: {{string: \"{n}\"}}}}\n"),
        )
    };
    let docs =
        |n| vec![registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), split_vs(95, 5), other(n)];
    let sidecar = Sidecar::start(&docs(0)).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let rounds = 100;
    let mut v2 = 0;
    for n in 1..=rounds {
        for _ in 0..5 {
            let (status, _, body) = client.try_get("/", &[]).await.expect("request");
            assert_eq!(status, 200);
            if version_of(&body).as_deref() == Some("v2") {
                v2 += 1;
            }
        }
        let old = sidecar.version();
        sidecar.rewrite(&docs(n));
        sidecar.wait_reload(&old).await;
    }
    // 500 requests at 5%: 25 expected. Each run of 5 requests from a fresh split
    // holds the one v2 slot of a 20-request period with probability 1/4:
    // Binomial(100, 1/4), mean 25, sigma ≈ 4.3, 6 sigma ≈ 26. (A split that
    // restarted at the same point of its period gave v2 the same slot in every
    // run: 0 or 100 of 500, depending on the slot.)
    assert!(v2 > 0, "the canary got none of {} requests", rounds * 5);
    assert!(v2 <= 25 + 26, "v2 got {v2} of {}: far above its share", rounds * 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_when_a_reload_removes_their_endpoint() {
    let (apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), split_vs(100, 0)])
            .await;
    let outbound = sidecar.bound.outbound;
    let slow: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move { get(outbound, "payment", "/delay/3000", &[]).await.map(|(s, _, b)| (s, b)) })
        })
        .collect();
    // Wait until the three are at the v1 pod.
    let v1 = "outbound|8080|v1|payment.default.svc.cluster.local";
    let mut in_flight = false;
    for _ in 0..200 {
        if sidecar.host_status(v1, pods[0].addr).await["active_requests"] == 3 {
            in_flight = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(in_flight, "the slow requests reached v1");
    // v1 leaves the registry and the route.
    let old = sidecar.version();
    let only_v2 = vs_yaml("payment", "payment", "  - route: [{destination: {host: payment, subset: v2}}]\n");
    sidecar.rewrite(&[registry_yaml("payment", "HTTP", &pods[1..]), subsets_yaml("payment", None), only_v2]);
    sidecar.wait_reload(&old).await;
    let (status, _, body) = get(outbound, "payment", "/", &[]).await.expect("request");
    assert_eq!((status.as_u16(), version_of(&body)), (200, Some("v2".to_string())), "new requests use the new config");
    for t in slow {
        let (status, body) = t.await.expect("task").expect("request");
        assert_eq!(status, 200);
        assert_eq!(pod_of(&body).as_deref(), Some(apps[0].pod()), "finished on the endpoint it started on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_added_by_a_reload_gets_traffic() {
    let (apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v1", AppConfig::new("payment", "v1"))])
            .await;
    let policy = "    loadBalancer: {simple: ROUND_ROBIN}\n";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods[..1]),
        subsets_yaml("payment", Some(policy)),
        split_vs(100, 0),
    ])
    .await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 1, 10).await;
    assert!(answers.iter().all(|(_, b)| pod_of(b).as_deref() == Some(apps[0].pod())));
    let old = sidecar.version();
    sidecar.rewrite(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", Some(policy)),
        split_vs(100, 0),
    ]);
    sidecar.wait_reload(&old).await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 1, 10).await;
    let new_pod = answers.iter().filter(|(_, b)| pod_of(b).as_deref() == Some(apps[1].pod())).count();
    assert_eq!(new_pod, 5, "round robin over both pods");
}
