//! The control plane over real gRPC on 127.0.0.1: subscribers, ACK/NACK, status,
//! bad input, restart.

mod common;

use std::time::Duration;

use common::{RawStream, Server, Subscriber, eventually, node, type_status, weights};
use serin_control_api::ResourceType;
use serin_control_api::client::ClientError;
use serin_control_api::pb::{self, SyncState};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

#[tokio::test]
async fn three_subscribers_ack_a_weight_change_and_show_synced() {
    let server = Server::start(common::store()).await;
    let subscribers: Vec<Subscriber> =
        (1..=3).map(|i| Subscriber::start(&server.url(), &format!("frontend-{i}"), |_| None)).collect();
    for s in &subscribers {
        s.wait_for_routes_version("1").await;
        assert!(s.routes().contains("weight: 95"), "the first state has the folder's split");
    }
    let mut ctl = server.management().await;
    let result = ctl.set_weights("payment", &weights(&[("v1", 90), ("v2", 10)]), WAIT).await.expect("set-weight");
    assert_eq!(result.version, "2");
    assert!(result.changed);
    let ack = result.ack.expect("waited");
    assert_eq!((ack.acked, ack.nacked, ack.total, ack.timed_out), (3, 0, 3, false), "{ack:?}");
    for s in &subscribers {
        assert_eq!(s.routes_version().as_deref(), Some("2"));
        let routes = s.routes();
        assert!(routes.contains("weight: 90") && routes.contains("weight: 10"), "{routes}");
    }
    let status = ctl.status().await.expect("status");
    assert_eq!(status.proxies.len(), 3);
    assert_eq!(status.versions.get(ResourceType::Routes.type_url()).map(String::as_str), Some("2"));
    for i in 1..=3 {
        let routes = type_status(&status, &format!("frontend-{i}"), ResourceType::Routes).expect("routes status");
        assert_eq!(routes.state(), SyncState::Synced, "{routes:?}");
        assert_eq!((routes.sent_version.as_str(), routes.acked_version.as_str()), ("2", "2"));
        assert!(routes.push_to_ack_ms.is_some());
        for ty in ResourceType::ALL {
            assert_eq!(type_status(&status, &format!("frontend-{i}"), ty).expect("type").state(), SyncState::Synced);
        }
    }
    let proxy = &status.proxies[0];
    assert_eq!(proxy.node.as_ref().map(|n| n.workload.as_str()), Some("frontend"));
    assert!(proxy.connected_since_unix_ms > 0);
    // Rollback reaches them too.
    let result = ctl.rollback("payment", WAIT).await.expect("rollback");
    assert_eq!((result.stable_subset.as_str(), result.version.as_str()), ("v1", "3"));
    assert_eq!(result.ack.map(|a| a.acked), Some(3));
    for s in &subscribers {
        assert!(s.routes().contains("weight: 100"));
    }
    for s in subscribers {
        s.subscription.shutdown().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_rejected_update_is_nacked_shown_and_not_resent() {
    let server = Server::start(common::store()).await;
    let good = Subscriber::start(&server.url(), "good", |_| None);
    let picky = Subscriber::start(&server.url(), "picky", |state| {
        state.yaml().contains("weight: 80").then(|| "subset v2 has no healthy endpoints here".to_string())
    });
    good.wait_for_routes_version("1").await;
    picky.wait_for_routes_version("1").await;
    let mut ctl = server.management().await;
    let result = ctl.set_weights("payment", &weights(&[("v1", 80), ("v2", 20)]), WAIT).await.expect("set-weight");
    let ack = result.ack.expect("waited");
    assert_eq!((ack.acked, ack.nacked, ack.total), (1, 1, 2), "{ack:?}");
    let nacked = ack.nodes.iter().find(|n| n.node_id == "picky").expect("picky answered");
    assert_eq!(nacked.state, "NACKED");
    assert_eq!(nacked.error, "subset v2 has no healthy endpoints here");
    let status = ctl.status().await.expect("status");
    let routes = type_status(&status, "picky", ResourceType::Routes).expect("routes");
    assert_eq!(routes.state(), SyncState::Nacked);
    assert_eq!((routes.last_nack_version.as_str(), routes.acked_version.as_str()), ("2", "1"));
    assert_eq!(routes.last_nack_error, "subset v2 has no healthy endpoints here");
    assert_eq!(type_status(&status, "good", ResourceType::Routes).expect("routes").state(), SyncState::Synced);
    // The picky sidecar keeps its last good state.
    assert!(picky.routes().contains("weight: 95"));
    assert_eq!(picky.routes_version().as_deref(), Some("1"));
    let calls = *picky.calls.lock().expect("lock");
    // The next change reaches it; version 2 was not sent again in between (the handler
    // saw one call per version).
    let result = ctl.set_weights("payment", &weights(&[("v1", 70), ("v2", 30)]), WAIT).await.expect("set-weight");
    assert_eq!(result.ack.map(|a| (a.acked, a.nacked)), Some((2, 0)));
    assert_eq!(*picky.calls.lock().expect("lock"), calls + 1);
    assert!(picky.routes().contains("weight: 70"));
    let status = ctl.status().await.expect("status");
    assert_eq!(type_status(&status, "picky", ResourceType::Routes).expect("routes").state(), SyncState::Synced);
    good.subscription.shutdown().await;
    picky.subscription.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn after_a_nack_the_same_version_is_not_sent_again_and_the_next_one_is() {
    let server = Server::start(common::store()).await;
    let mut stream = RawStream::open(&server.url()).await;
    let first = stream.subscribe(Some(node("raw")), ResourceType::Routes).await;
    assert_eq!(first.version_info, "1");
    stream.ack(&first).await;
    let mut ctl = server.management().await;
    ctl.set_weights("payment", &weights(&[("v1", 50), ("v2", 50)]), None).await.expect("set");
    let second = stream.next().await.expect("version 2");
    assert_eq!(second.version_info, "2");
    stream.nack(&second, "1", "cannot apply").await;
    ctl.set_weights("payment", &weights(&[("v1", 40), ("v2", 60)]), None).await.expect("set");
    let third = stream.next().await.expect("the next response");
    assert_eq!(third.version_info, "3", "the NACKed version 2 must not come again");
    stream.ack(&third).await;
    let status = eventually("the ACK of version 3", || async {
        let status = server.plane.status();
        let t = type_status(&status, "raw", ResourceType::Routes)?;
        (t.acked_version == "3").then_some(status)
    })
    .await;
    let routes = type_status(&status, "raw", ResourceType::Routes).expect("routes");
    assert_eq!(routes.state(), SyncState::Synced);
    assert_eq!(routes.last_nack_version, "2", "the NACK stays on record");
    server.stop().await;
}

#[tokio::test]
async fn a_stale_nonce_is_ignored_and_a_change_waits_for_the_answer() {
    let server = Server::start(common::store()).await;
    let mut stream = RawStream::open(&server.url()).await;
    let first = stream.subscribe(Some(node("raw")), ResourceType::Routes).await;
    stream.ack(&first).await;
    let mut ctl = server.management().await;
    ctl.set_weights("payment", &weights(&[("v1", 90), ("v2", 10)]), None).await.expect("set");
    let second = stream.next().await.expect("version 2");
    assert_eq!(second.version_info, "2");
    // Two more changes while version 2 is unanswered: nothing is sent yet.
    ctl.set_weights("payment", &weights(&[("v1", 80), ("v2", 20)]), None).await.expect("set");
    ctl.set_weights("payment", &weights(&[("v1", 75), ("v2", 25)]), None).await.expect("set");
    // A late NACK of the first response (stale nonce): ignored, no error, no record.
    stream.nack(&first, "", "late complaint").await;
    let status = server.plane.status();
    let routes = type_status(&status, "raw", ResourceType::Routes).expect("routes");
    assert_eq!((routes.state(), routes.sent_version.as_str()), (SyncState::Stale, "2"));
    // Answering version 2 releases the latest version only (4), not 3.
    stream.ack(&second).await;
    let latest = stream.next().await.expect("the queued change");
    assert_eq!(latest.version_info, "4");
    assert!(String::from_utf8_lossy(&latest.resources[0].body).contains("weight: 75"));
    stream.ack(&latest).await;
    let status = eventually("the ACK of version 4", || async {
        let status = server.plane.status();
        (type_status(&status, "raw", ResourceType::Routes)?.acked_version == "4").then_some(status)
    })
    .await;
    let routes = type_status(&status, "raw", ResourceType::Routes).expect("routes");
    assert_eq!(routes.state(), SyncState::Synced);
    assert_eq!(routes.last_nack_error, "", "the stale NACK was not recorded");
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_type_url_ends_that_stream_only() {
    let server = Server::start(common::store()).await;
    let mut healthy = RawStream::open(&server.url()).await;
    let first = healthy.subscribe(Some(node("healthy")), ResourceType::Routes).await;
    healthy.ack(&first).await;

    let mut bad = RawStream::open(&server.url()).await;
    bad.send(pb::DiscoveryRequest {
        node: Some(node("bad")),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_string(),
        ..Default::default()
    })
    .await;
    let status = bad.next().await.expect_err("an error status");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("unknown type_url"), "{status:?}");

    // A nonce the server never sent: also an error for that stream alone.
    let mut forger = RawStream::open(&server.url()).await;
    let first_forged = forger.subscribe(Some(node("forger")), ResourceType::Clusters).await;
    forger
        .send(pb::DiscoveryRequest {
            type_url: first_forged.type_url.clone(),
            version_info: first_forged.version_info.clone(),
            response_nonce: "made-up".to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(forger.next().await.expect_err("error").code(), tonic::Code::InvalidArgument);

    // No node on the first request.
    let mut anonymous = RawStream::open(&server.url()).await;
    anonymous
        .send(pb::DiscoveryRequest { type_url: ResourceType::Routes.type_url().to_string(), ..Default::default() })
        .await;
    let status = anonymous.next().await.expect_err("error");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("node.id"), "{status:?}");

    // The healthy stream still gets changes.
    let mut ctl = server.management().await;
    ctl.set_weights("payment", &weights(&[("v1", 90), ("v2", 10)]), None).await.expect("set");
    let next = healthy.next().await.expect("still served");
    assert_eq!(next.version_info, "2");
    let status = ctl.status().await.expect("status");
    let nodes: Vec<&str> = status.proxies.iter().filter_map(|p| p.node.as_ref()).map(|n| n.id.as_str()).collect();
    assert_eq!(nodes, ["healthy"], "the failed streams are gone from the status");
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_message_ends_that_stream() {
    let server = Server::start(common::store()).await;
    let mut stream = RawStream::open(&server.url()).await;
    stream
        .send(pb::DiscoveryRequest {
            node: Some(node("big")),
            type_url: ResourceType::Routes.type_url().to_string(),
            resource_names: vec!["x".repeat(5 * 1024 * 1024)],
            ..Default::default()
        })
        .await;
    let status = stream.next().await.expect_err("an error status");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    // The server carries on.
    let mut other = RawStream::open(&server.url()).await;
    assert_eq!(other.subscribe(Some(node("small")), ResourceType::Routes).await.version_info, "1");
    server.stop().await;
}

#[tokio::test]
async fn bad_weights_change_nothing_and_say_why() {
    let server = Server::start(common::store()).await;
    let mut ctl = server.management().await;
    let before = ctl.config("payment", Some(ResourceType::Routes)).await.expect("config");
    let e = ctl.set_weights("payment", &weights(&[("v1", 90), ("v2", 20)]), None).await.expect_err("bad sum");
    assert!(matches!(&e, ClientError::Rpc(s) if s.code() == tonic::Code::InvalidArgument), "{e:?}");
    assert!(e.to_string().contains("add up to 110, not 100"), "{e}");
    let e = ctl.set_weights("payment", &weights(&[("v1", 90), ("v9", 10)]), None).await.expect_err("v9");
    assert_eq!(e.to_string(), "payment has no subset v9; its subsets are v1, v2");
    let after = ctl.config("payment", Some(ResourceType::Routes)).await.expect("config");
    assert_eq!(before, after);
    assert_eq!(after.versions.get(ResourceType::Routes.type_url()).map(String::as_str), Some("1"));
    assert!(after.yaml.starts_with("---\n") && after.yaml.contains("weight: 95"), "{}", after.yaml);
    assert_eq!(after.documents.len(), 1, "only the payment VirtualService");
    server.stop().await;
}

#[tokio::test]
async fn weights_survive_a_restart_and_subscribers_reconnect_to_the_current_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(common::open_store(dir.path())).await;
    let addr = server.addr;
    let subscriber = Subscriber::start(&server.url(), "frontend-1", |_| None);
    subscriber.wait_for_routes_version("1").await;
    let mut ctl = server.management().await;
    let result = ctl.set_weights("payment", &weights(&[("v1", 60), ("v2", 40)]), WAIT).await.expect("set");
    assert_eq!(result.ack.map(|a| a.acked), Some(1));
    drop(ctl);
    server.stop().await;

    // Down: the subscriber notices, keeps its last state and keeps trying.
    eventually("the subscriber sees the control plane gone", || async {
        (!subscriber.subscription.status().borrow().connected).then_some(())
    })
    .await;
    assert!(subscriber.routes().contains("weight: 60"));
    // Meanwhile the weights set before are on disk; one more change is made offline.
    {
        let store = common::open_store(dir.path());
        assert_eq!(store.weights("payment"), weights(&[("v1", 60), ("v2", 40)]));
        store.set_weights("payment", &weights(&[("v1", 30), ("v2", 70)])).expect("offline change");
    }
    // Back on the same port, from the same state folder.
    let server = Server::start_on(addr, common::open_store(dir.path())).await;
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 30), ("v2", 70)]));
    subscriber.wait_for_routes_version("3").await;
    assert!(subscriber.routes().contains("weight: 70"));
    let status = subscriber.subscription.status().borrow().clone();
    assert!(status.connected && status.connects >= 2, "{status:?}");
    let mut ctl = server.management().await;
    let table = ctl.status().await.expect("status");
    assert_eq!(type_status(&table, "frontend-1", ResourceType::Routes).expect("routes").state(), SyncState::Synced);
    subscriber.subscription.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_started_before_the_control_plane_connects_when_it_comes() {
    // Take a free port, then release it.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let subscriber = Subscriber::start(&format!("http://{addr}"), "early", |_| None);
    eventually("a failed connect", || async {
        subscriber.subscription.status().borrow().last_error.clone().filter(|e| e.contains("cannot reach"))
    })
    .await;
    let server = Server::start_on(addr, common::store()).await;
    subscriber.wait_for_routes_version("1").await;
    subscriber.subscription.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn a_subscription_to_one_service_gets_only_its_documents_and_waits_count_it() {
    let server = Server::start(common::store()).await;
    let mut stream = RawStream::open(&server.url()).await;
    stream.names = vec!["checkout".to_string()];
    let first = stream.subscribe(Some(node("checkout-only")), ResourceType::Routes).await;
    let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["VirtualService/default/checkout"]);
    assert!(first.resources.iter().all(|r| r.content_type == "application/yaml"));
    stream.ack(&first).await;
    // A payment change waits for nobody (the only stream is not subscribed to payment).
    let mut ctl = server.management().await;
    let result = ctl.set_weights("payment", &weights(&[("v1", 90), ("v2", 10)]), WAIT).await.expect("set");
    assert_eq!(result.ack.map(|a| a.total), Some(0));
    // A checkout change waits for it.
    let waiting = tokio::spawn(async move { ctl.rollback("checkout", WAIT).await });
    // Versions are per type, so the stream gets version 2 (payment's change) first.
    let second = stream.next().await.expect("version 2");
    stream.ack(&second).await;
    let third = stream.next().await.expect("version 3");
    assert_eq!(third.version_info, "3");
    stream.ack(&third).await;
    let result = waiting.await.expect("task").expect("rollback");
    assert_eq!(result.ack.map(|a| (a.acked, a.total)), Some((1, 1)));
    server.stop().await;
}
