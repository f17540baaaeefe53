//! Load reports over real gRPC on 127.0.0.1: raw streams and the client library send
//! them on the discovery stream, `GetLoad` answers the sums, and a report is never an ACK.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use common::{RawStream, Server, eventually, node, type_status};
use prost::Message as _;
use serin_control_api::ResourceType;
use serin_control_api::client::{self, ClientError, LoadClient, LoadReports, TakeLoadReport};
use serin_control_api::pb::{self, SyncState};

const PAYMENT: &str = "payment.default.svc.cluster.local";

fn version_load(version: &str, ok: u64, errors: u64, buckets: &[u64]) -> pb::VersionLoad {
    pb::VersionLoad {
        service: PAYMENT.to_string(),
        version: version.to_string(),
        status_2xx: ok,
        status_5xx: errors,
        duration_buckets: buckets.to_vec(),
        duration_sum_ms: 3.0 * (ok + errors) as f64,
        ..Default::default()
    }
}

fn report_request(loads: Vec<pb::VersionLoad>) -> pb::DiscoveryRequest {
    pb::DiscoveryRequest { load_report: Some(pb::LoadReport { interval_ms: 1000, loads }), ..Default::default() }
}

/// The figures of `version` once they count `requests` requests.
async fn wait_for(load: &mut LoadClient, version: &str, requests: u64) -> pb::VersionFigures {
    eventually(&format!("{requests} requests of {version}"), || {
        let mut load = load.clone();
        async move {
            let figures = load.load("payment", None, false).await.expect("GetLoad");
            figures.versions.into_iter().find(|v| v.version == version && v.requests == requests)
        }
    })
    .await
}

#[tokio::test]
async fn reports_from_two_streams_are_summed_and_are_not_acks() {
    let server = Server::start(common::store()).await;
    let mut load = LoadClient::connect(&server.url()).await.expect("load client");

    let mut a = RawStream::open(&server.url()).await;
    let first = a.subscribe(Some(node("frontend-1")), ResourceType::Routes).await;
    // A report while the routes response is unanswered.
    a.send(report_request(vec![version_load("v1", 95, 5, &[0, 0, 60, 40]), version_load("v2", 4, 1, &[0, 0, 5])]))
        .await;
    let v2 = wait_for(&mut load, "v2", 5).await;
    assert_eq!((v2.status_2xx, v2.status_5xx, v2.reporters), (4, 1, 1));
    // The report was handled (the figures show it) and the response is still unanswered.
    let status = server.plane.status();
    let routes = type_status(&status, "frontend-1", ResourceType::Routes).expect("routes");
    assert_eq!(routes.state(), SyncState::Stale, "a load report is not an ACK");
    assert_eq!(routes.acked_version, "");
    assert_eq!(routes.last_nack_error, "", "nor a NACK");

    // A second sidecar reports too.
    let mut b = RawStream::open(&server.url()).await;
    b.subscribe(Some(node("frontend-2")), ResourceType::Routes).await;
    b.send(report_request(vec![version_load("v1", 100, 0, &[0, 0, 100])])).await;
    let v1 = wait_for(&mut load, "v1", 200).await;
    assert_eq!((v1.status_2xx, v1.status_5xx, v1.reporters), (195, 5, 2));
    assert_eq!(v1.success_percent, Some(97.5));
    let figures = load.load(PAYMENT, Some(Duration::from_secs(60)), true).await.expect("GetLoad");
    let versions: Vec<(&str, u64)> = figures.versions.iter().map(|v| (v.version.as_str(), v.requests)).collect();
    assert_eq!(versions, [("v1", 200), ("v2", 5)]);
    let share: f64 = figures.versions.iter().map(|v| v.share_percent).sum();
    assert!((share - 100.0).abs() < 1e-9, "{share}");
    assert_eq!(figures.versions[0].series.len(), 60);
    assert_eq!(figures.versions[0].series.iter().map(|p| p.requests).sum::<u64>(), 200);
    // The control plane's own view agrees. `version_window` judges complete seconds only
    // (the current one is still filling), so it is asked as of a second later.
    let later = SystemTime::now() + Duration::from_secs(1);
    let stable = server.plane.load().version_window_at("payment", "v1", Duration::from_secs(60), later);
    assert_eq!(stable.requests, 200);

    // The ACK still works after the reports.
    a.ack(&first).await;
    eventually("the ACK", || async {
        let status = server.plane.status();
        (type_status(&status, "frontend-1", ResourceType::Routes)?.state() == SyncState::Synced).then_some(())
    })
    .await;
    assert_eq!(server.plane.load().reports_total(), 2);
    server.stop().await;
}

#[tokio::test]
async fn bad_reports_and_bad_queries_are_refused() {
    let server = Server::start(common::store()).await;
    // A report as the first request of a stream, without a node.
    let mut anonymous = RawStream::open(&server.url()).await;
    anonymous.send(report_request(vec![version_load("v1", 1, 0, &[])])).await;
    let status = anonymous.next().await.expect_err("error");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("node.id"), "{status:?}");

    let mut load = LoadClient::connect(&server.url()).await.expect("load client");
    let figures = load.load("nothing-here", None, false).await.expect("an unknown service is no error");
    assert!(figures.versions.is_empty());
    assert_eq!(figures.window_ms, 60_000);
    let error = load.load("", Some(Duration::from_secs(16 * 60)), false).await.expect_err("too long");
    assert!(matches!(&error, ClientError::Rpc(s) if s.code() == tonic::Code::InvalidArgument), "{error:?}");
    assert!(error.to_string().contains("window_ms"), "{error}");
    assert_eq!(server.plane.load().reports_total(), 0, "refused reports are not recorded");
    server.stop().await;
}

/// Telemetry never takes down config: a report over the entry cap, or with malformed
/// entries, is cut to its valid part and counted, and the stream carries on.
#[tokio::test]
async fn oversized_or_malformed_reports_keep_the_stream() {
    let server = Server::start(common::store()).await;
    let mut big = RawStream::open(&server.url()).await;
    let first = big.subscribe(Some(node("big")), ResourceType::Routes).await;
    big.send(report_request(vec![version_load("v1", 1, 0, &[1]); 1001])).await;
    let mut malformed = vec![version_load("v2", 3, 0, &[3])];
    malformed.push(pb::VersionLoad { service: String::new(), ..version_load("v2", 9, 0, &[]) });
    malformed.push(version_load("v2", 9, 0, &[1; 21]));
    big.send(report_request(malformed)).await;
    let mut load = LoadClient::connect(&server.url()).await.expect("load client");
    // The first 1,000 entries and the valid one of the second report are recorded.
    wait_for(&mut load, "v1", 1000).await;
    wait_for(&mut load, "v2", 3).await;
    let rejected = server.plane.load().rejected_reports();
    assert_eq!(rejected, [("too_many_entries", 1), ("malformed", 1)]);
    // The stream is still open: its ACK is taken, and a config change reaches it.
    big.ack(&first).await;
    eventually("the ACK", || async {
        let status = server.plane.status();
        (type_status(&status, "big", ResourceType::Routes)?.state() == SyncState::Synced).then_some(())
    })
    .await;
    let mut management = server.management().await;
    management.set_weights("payment", &common::weights(&[("v1", 50), ("v2", 50)]), None).await.expect("set-weight");
    let pushed = tokio::time::timeout(Duration::from_secs(10), big.next()).await.expect("a push in time");
    assert!(pushed.is_ok(), "the stream carries on: {pushed:?}");
    server.stop().await;
}

/// A sidecar calling more service/version pairs than one report may carry sends them
/// over several requests: every entry is recorded and the stream is never ended.
#[tokio::test]
async fn the_client_library_splits_big_reports() {
    let server = Server::start(common::store()).await;
    // Every interval, one request to each of 2,500 services.
    let take: TakeLoadReport = Arc::new(move || {
        Some(pb::LoadReport {
            interval_ms: 50,
            loads: (0..2_500)
                .map(|i| pb::VersionLoad {
                    service: format!("svc{i:04}.default.svc.cluster.local"),
                    version: "v1".to_string(),
                    status_2xx: 1,
                    duration_buckets: vec![1],
                    ..Default::default()
                })
                .collect(),
        })
    });
    let options = client::SubscribeOptions {
        load_reports: Some(LoadReports { interval: Duration::from_millis(50), take }),
        ..client::SubscribeOptions::default()
    };
    let endpoint = client::endpoint(&server.url()).expect("endpoint");
    let subscription = client::subscribe_with(endpoint, node("wide"), options, |_: client::Update<'_>| Ok(()));
    eventually("2,500 series", || async { (server.plane.load().series_count() == 2_500).then_some(()) }).await;
    eventually("several reports sent", || async {
        (subscription.status().borrow().load_reports_sent >= 3).then_some(())
    })
    .await;
    let status = subscription.status().borrow().clone();
    assert_eq!(status.connects, 1, "the stream was never ended: {status:?}");
    assert_eq!(status.last_error, None, "{status:?}");
    assert_eq!(server.plane.load().rejected_reports(), [("too_many_entries", 0), ("malformed", 0)]);
    let mut load = LoadClient::connect(&server.url()).await.expect("load client");
    let figures = load.load("svc2499", None, false).await.expect("GetLoad");
    assert!(figures.versions.first().is_some_and(|v| v.requests >= 1), "{figures:?}");
    subscription.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn the_client_library_sends_reports_on_its_stream() {
    let server = Server::start(common::store()).await;
    let once = Arc::new(AtomicBool::new(false));
    let taken = Arc::clone(&once);
    let take: TakeLoadReport = Arc::new(move || {
        (!taken.swap(true, Ordering::SeqCst)).then(|| pb::LoadReport {
            interval_ms: 50,
            loads: vec![version_load("v1", 7, 0, &[7]), version_load("v2", 2, 1, &[0, 3])],
        })
    });
    let options = client::SubscribeOptions {
        load_reports: Some(LoadReports { interval: Duration::from_millis(50), take }),
        ..client::SubscribeOptions::default()
    };
    let endpoint = client::endpoint(&server.url()).expect("endpoint");
    let subscription = client::subscribe_with(endpoint, node("lib"), options, |_: client::Update<'_>| Ok(()));
    let mut load = LoadClient::connect(&server.url()).await.expect("load client");
    let v2 = wait_for(&mut load, "v2", 3).await;
    assert_eq!((v2.status_5xx, v2.reporters), (1, 1));
    assert_eq!(wait_for(&mut load, "v1", 7).await.p50_ms, Some(0.25));
    assert_eq!(subscription.status().borrow().load_reports_sent, 1);
    subscription.shutdown().await;
    server.stop().await;
}

#[test]
fn a_typical_two_version_report_is_small() {
    // One second of 1,000 requests, 95/5 over v1/v2, a few errors, a typical spread.
    let report = report_request(vec![
        version_load("v1", 947, 3, &[12, 140, 610, 150, 30, 6, 2]),
        version_load("v2", 48, 2, &[1, 8, 30, 9, 2]),
    ]);
    let size = report.encoded_len();
    println!("a two-version load report is {size} bytes on the wire (protobuf, before gRPC framing)");
    assert!(size < 200, "{size} bytes");
}
