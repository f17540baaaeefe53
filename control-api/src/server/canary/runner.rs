//! One analysis' task: apply the recorded weight (and wait for the sidecars' ACKs),
//! then every interval read the figures and let the state machine decide; every
//! decision persisted before its weight is applied.
//!
//! - A weight is applied only once the decision recording it is saved
//!   (`canaries.json`). When saving fails, the first weight is not applied and the
//!   analysis ends FAILED (the caller of `start` gets the error); a later decision
//!   waits, and the runner retries saving it at the next interval (a `save-failed`
//!   event says so), applying it only once saved.
//! - Every weight the analysis writes is a compare-and-set on the store
//!   ([`Store::set_weights_if`](crate::server::Store::set_weights_if)): it is written
//!   only while the service is at the weights the decision replaces, or already at
//!   the decision's own (a weight recorded before a restart, applied again). See
//!   [`AnalysisState::applied`](super::AnalysisState::applied) for what a mismatch does.
//! - The figures are asked for the service's FQDN, so a short name never sums the
//!   traffic of a same-named service of another namespace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::analysis::{ApplyOutcome, Figures, Pending, PendingKind};
use super::{CanaryError, CanaryManager, Entry, FiguresSource, key, now_ms};
use crate::pb;
use crate::server::{Change, SetWeightsIfError};

/// Told once the first weight was dealt with (applied, refused, or not saved: the
/// error). Dropped unsent when the runner stops first (abort, shutdown).
pub(super) type Started = oneshot::Sender<Result<(), CanaryError>>;

/// Runs until the analysis ends, `stop` is set (abort) or the control plane closes.
/// `intent_saved`: the state as it stands (its recorded weight) is already in the
/// state folder.
pub(super) async fn run(
    manager: Arc<CanaryManager>,
    entry: Arc<Entry>,
    mut stop: watch::Receiver<bool>,
    mut intent_saved: bool,
    mut started: Option<Started>,
) {
    let mut closing = manager.shared.closing.subscribe();
    loop {
        if *stop.borrow() || *closing.borrow() {
            return;
        }
        let (pending, spec, running) = {
            let s = entry.state();
            (s.applying.clone(), s.spec.clone(), s.running())
        };
        if pending.as_ref().is_none_or(|p| p.kind != PendingKind::Start)
            && let Some(tx) = started.take()
        {
            let _ = tx.send(Ok(()));
        }
        if !running {
            manager.ended.send_modify(|n| *n += 1);
            return;
        }
        let interval = Duration::from_millis(u64::from(spec.interval_ms.max(1)));
        if let Some(pending) = pending {
            if !intent_saved {
                match manager.save().await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(service = %spec.service, error = %e, "saving the canary decision failed: its weight is not applied");
                        let retry = entry.state().save_failed(now_ms(), &e.to_string());
                        if !retry {
                            // Best effort: the file may still be writable for the FAILED record.
                            save(&manager).await;
                            if let Some(tx) = started.take() {
                                let _ = tx.send(Err(e));
                            }
                            continue;
                        }
                        tokio::select! {
                            () = tokio::time::sleep(interval) => {}
                            _ = stop.changed() => return,
                            () = super::super::closed(&mut closing) => return,
                        }
                        continue;
                    }
                }
            }
            let weights = entry.state().weights_for(pending.weight);
            let outcome = apply(&manager, &spec, &pending, weights).await;
            if *closing.borrow() {
                // Not recorded: the weight is applied again after the restart.
                return;
            }
            entry.state().applied(now_ms(), &outcome);
            // A decision recorded by `applied` (a rollback) is applied only once saved.
            intent_saved = save(&manager).await;
            continue;
        }
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
            intent_saved = save(&manager).await;
        }
    }
}

/// Saves every analysis; false (logged) when it failed.
async fn save(manager: &CanaryManager) -> bool {
    match manager.save().await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "saving the canary state failed");
            false
        }
    }
}

/// A version's figures over the interval; the success rate and p99 over their own
/// metric windows when the spec gives them. Asked by the service's FQDN (the load
/// aggregates match a FQDN exactly; a short name would match every namespace's).
fn read(source: &dyn FiguresSource, spec: &pb::CanarySpec, version: &str) -> Figures {
    let service = key(&spec.service);
    let window = |ms: u32| Duration::from_millis(u64::from(ms));
    let mut figures = source.figures(&service, version, window(spec.interval_ms));
    if spec.success_window_ms != 0 && spec.success_window_ms != spec.interval_ms {
        figures.success_percent = source.figures(&service, version, window(spec.success_window_ms)).success_percent;
    }
    if spec.p99_window_ms != 0 && spec.p99_window_ms != spec.interval_ms {
        figures.p99_ms = source.figures(&service, version, window(spec.p99_window_ms)).p99_ms;
    }
    figures.version = version.to_string();
    figures
}

/// What the store did with a recorded weight.
enum Attempt {
    /// Written (`note`: the weights had changed outside the analysis; a rollback wrote anyway).
    Written(Change, Option<String>),
    /// The weights had changed outside the analysis: nothing written.
    Changed(String),
    /// A rollback found the canary already without traffic: nothing written.
    Skipped(String),
    /// The store refused it.
    Refused(String, Option<String>),
}

/// Sets the recorded weights through the store (off the runtime: it fsyncs) as a
/// compare-and-set against the weights the decision replaces, and waits for the
/// sidecars subscribed to the service to answer.
pub(super) async fn apply(
    manager: &CanaryManager,
    spec: &pb::CanarySpec,
    pending: &Pending,
    weights: BTreeMap<String, u32>,
) -> ApplyOutcome {
    let store = Arc::clone(&manager.shared.store);
    let service = spec.service.clone();
    let canary = spec.canary.clone();
    // The weights it replaces, or its own (applied again after a restart: idempotent).
    let expected: Option<Vec<BTreeMap<String, u32>>> = pending.before.clone().map(|b| vec![b, weights.clone()]);
    let rollback = matches!(pending.kind, PendingKind::Rollback | PendingKind::AbortRollback);
    let attempt = tokio::task::spawn_blocking(move || {
        let first = match &expected {
            Some(expected) => store.set_weights_if(&service, expected, &weights),
            None => store.set_weights(&service, &weights).map_err(SetWeightsIfError::from),
        };
        let attempt = match first {
            Ok(change) => Attempt::Written(change, None),
            Err(e @ SetWeightsIfError::Changed { .. }) if rollback => {
                let note = e.to_string();
                let SetWeightsIfError::Changed { current, .. } = e else { unreachable!() };
                if current.get(&canary).copied().unwrap_or(0) == 0 {
                    Attempt::Skipped(note)
                } else {
                    // The analysis' own rollback still happens: its evidence stands, and
                    // stable is the safe direction.
                    match store.set_weights(&service, &weights) {
                        Ok(change) => Attempt::Written(change, Some(note)),
                        Err(e) => Attempt::Refused(e.to_string(), Some(note)),
                    }
                }
            }
            Err(e @ SetWeightsIfError::Changed { .. }) => Attempt::Changed(e.to_string()),
            Err(SetWeightsIfError::Store(e)) => Attempt::Refused(e.to_string(), None),
        };
        (attempt, store.weights(&service))
    })
    .await;
    let (attempt, in_force) = match attempt {
        Ok(done) => done,
        Err(e) => {
            return ApplyOutcome { error: Some(format!("the change did not finish: {e}")), ..ApplyOutcome::default() };
        }
    };
    match attempt {
        Attempt::Written(change, note) => {
            let timeout = manager.options().ack_timeout;
            let ack = manager.shared.wait_for_ack(change.ty, change.version, Some(&spec.service), timeout).await;
            ApplyOutcome { changed_outside: note, weights_in_force: in_force, ..outcome(change.version, &ack) }
        }
        Attempt::Changed(note) => {
            ApplyOutcome { changed_outside: Some(note), weights_in_force: in_force, ..ApplyOutcome::default() }
        }
        Attempt::Skipped(note) => ApplyOutcome {
            changed_outside: Some(note),
            skipped: true,
            weights_in_force: in_force,
            ..ApplyOutcome::default()
        },
        Attempt::Refused(error, note) => ApplyOutcome {
            error: Some(error),
            changed_outside: note,
            weights_in_force: in_force,
            ..ApplyOutcome::default()
        },
    }
}

fn outcome(version: u64, ack: &pb::AckResult) -> ApplyOutcome {
    let nacked =
        ack.nodes.iter().filter(|n| n.state == "NACKED").map(|n| format!("{}: {}", n.node_id, n.error)).collect();
    let waiting = if ack.timed_out {
        ack.nodes.iter().filter(|n| n.state != "ACKED" && n.state != "NACKED").map(|n| n.node_id.clone()).collect()
    } else {
        Vec::new()
    };
    ApplyOutcome {
        error: None,
        version,
        total: ack.total,
        acked: ack.acked,
        nacked,
        waiting,
        ..ApplyOutcome::default()
    }
}
