//! One analysis' task: apply the recorded weight (and wait for the sidecars' ACKs),
//! then every interval read the figures and let the state machine decide; every
//! decision persisted before its weight is applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::analysis::{ApplyOutcome, Figures};
use super::{CanaryManager, Entry, FiguresSource, now_ms};
use crate::pb;

/// Runs until the analysis ends, `stop` is set (abort) or the control plane closes.
pub(super) async fn run(manager: Arc<CanaryManager>, entry: Arc<Entry>, mut stop: watch::Receiver<bool>) {
    let mut closing = manager.shared.closing.subscribe();
    loop {
        if *stop.borrow() || *closing.borrow() {
            return;
        }
        let (pending, spec, running) = {
            let s = entry.state();
            (s.applying.as_ref().map(|p| s.weights_for(p.weight)), s.spec.clone(), s.running())
        };
        if !running {
            manager.ended.send_modify(|n| *n += 1);
            return;
        }
        if let Some(weights) = pending {
            let outcome = apply(&manager, &spec.service, weights).await;
            if *closing.borrow() {
                // Not recorded: the weight is applied again after the restart.
                return;
            }
            entry.state().applied(now_ms(), &outcome);
            save(&manager).await;
            continue;
        }
        let interval = Duration::from_millis(u64::from(spec.interval_ms.max(1)));
        entry.state().next_check_unix_ms = now_ms().saturating_add(i64::try_from(interval.as_millis()).unwrap_or(0));
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
            () = super::super::closed(&mut closing) => return,
        }
        let source = manager.options().figures;
        let canary = read(source.as_ref(), &spec, &spec.canary);
        let stable = read(source.as_ref(), &spec, &spec.stable);
        let current = manager.shared.store.weights(&spec.service);
        let changed = entry.state().interval(now_ms(), &current, canary, stable);
        if changed {
            save(&manager).await;
        }
    }
}

async fn save(manager: &CanaryManager) {
    if let Err(e) = manager.save().await {
        tracing::error!(error = %e, "saving the canary state failed");
    }
}

/// A version's figures over the interval; the success rate and p99 over their own
/// metric windows when the spec gives them.
fn read(source: &dyn FiguresSource, spec: &pb::CanarySpec, version: &str) -> Figures {
    let window = |ms: u32| Duration::from_millis(u64::from(ms));
    let mut figures = source.figures(&spec.service, version, window(spec.interval_ms));
    if spec.success_window_ms != 0 && spec.success_window_ms != spec.interval_ms {
        figures.success_percent =
            source.figures(&spec.service, version, window(spec.success_window_ms)).success_percent;
    }
    if spec.p99_window_ms != 0 && spec.p99_window_ms != spec.interval_ms {
        figures.p99_ms = source.figures(&spec.service, version, window(spec.p99_window_ms)).p99_ms;
    }
    figures.version = version.to_string();
    figures
}

/// Sets the weights through the store (off the runtime: it fsyncs) and waits for the
/// sidecars subscribed to the service to answer.
pub(super) async fn apply(manager: &CanaryManager, service: &str, weights: BTreeMap<String, u32>) -> ApplyOutcome {
    let store = Arc::clone(&manager.shared.store);
    let svc = service.to_string();
    let change = match tokio::task::spawn_blocking(move || store.set_weights(&svc, &weights)).await {
        Ok(Ok(change)) => change,
        Ok(Err(e)) => return ApplyOutcome { error: Some(e.to_string()), ..ApplyOutcome::default() },
        Err(e) => {
            return ApplyOutcome { error: Some(format!("the change did not finish: {e}")), ..ApplyOutcome::default() };
        }
    };
    let timeout = manager.options().ack_timeout;
    let ack = manager.shared.wait_for_ack(change.ty, change.version, Some(service), timeout).await;
    outcome(change.version, &ack)
}

fn outcome(version: u64, ack: &pb::AckResult) -> ApplyOutcome {
    let nacked =
        ack.nodes.iter().filter(|n| n.state == "NACKED").map(|n| format!("{}: {}", n.node_id, n.error)).collect();
    let waiting = if ack.timed_out {
        ack.nodes.iter().filter(|n| n.state != "ACKED" && n.state != "NACKED").map(|n| n.node_id.clone()).collect()
    } else {
        Vec::new()
    };
    ApplyOutcome { error: None, version, total: ack.total, acked: ack.acked, nacked, waiting }
}
