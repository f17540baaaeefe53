//! The analysis as a pure state machine: no clock, no store, no I/O. The runner
//! feeds it the figures of each interval and the weights in force; it answers with
//! the weights to apply, which the runner applies and confirms back
//! ([`AnalysisState::applied`]).
//!
//! Rules (Flagger's, where Flagger has one):
//! - An interval with fewer than `min_requests` canary requests (or, when the
//!   canary is compared with stable, stable requests) is not judged: a `wait` event
//!   says why; it neither passes nor fails.
//! - A judged interval fails when a check fails (success rate below the minimum,
//!   p99 above the maximum, success rate more than `max_success_drop` points below
//!   stable's). Failed checks count **cumulatively** over the analysis, as Flagger
//!   counts them (a passing interval does not reset the count); at `threshold` the
//!   canary is rolled back (weight 0, stable 100) and the analysis is FAILED.
//! - A passing interval moves the canary to the next step; passing at the max
//!   weight promotes it (`promote_weight`, stable the rest): SUCCEEDED.
//! - Weights that differ from what the analysis set (a manual `set-weight`,
//!   `rollback` or `reset-weights`) stop it as ABORTED at its next interval.
//! - Before a weight is applied the state records it in `applying` (and is
//!   persisted); after a restart a recorded weight is applied again, so no half-applied
//!   weight remains.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::spec::steps;
use crate::pb;

/// Events kept per analysis (the oldest are dropped).
pub const MAX_EVENTS: usize = 200;

/// One version's figures over one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// The subset.
    pub version: String,
    /// Finished requests.
    pub requests: u64,
    /// Non-5xx answers, percent (absent without requests).
    pub success_percent: Option<f64>,
    /// The p99 latency, milliseconds (absent without requests).
    pub p99_ms: Option<f64>,
}

impl Figures {
    /// `v2: 120 requests, 98.3% success, p99 41 ms`.
    pub fn describe(&self) -> String {
        let success =
            self.success_percent.map_or_else(|| "no success rate".to_string(), |s| format!("{s:.2}% success"));
        let p99 = self.p99_ms.map_or_else(|| "no p99".to_string(), |p| format!("p99 {p:.1} ms"));
        format!("{}: {} requests, {success}, {p99}", self.version, self.requests)
    }

    /// As the API gives it.
    pub fn to_pb(&self) -> pb::IntervalFigures {
        pb::IntervalFigures {
            version: self.version.clone(),
            requests: self.requests,
            success_percent: self.success_percent,
            p99_ms: self.p99_ms,
        }
    }
}

/// The phases, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// The first weight is being applied.
    Initialized,
    /// Judging intervals.
    Progressing,
    /// Promoted.
    Succeeded,
    /// Rolled back.
    Failed,
    /// Stopped by `abort`, a manual weight change or a changed Canary document.
    Aborted,
}

impl Phase {
    /// True once the analysis ended.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Aborted)
    }

    fn to_pb(self) -> pb::CanaryPhase {
        match self {
            Phase::Initialized => pb::CanaryPhase::Initialized,
            Phase::Progressing => pb::CanaryPhase::Progressing,
            Phase::Succeeded => pb::CanaryPhase::Succeeded,
            Phase::Failed => pb::CanaryPhase::Failed,
            Phase::Aborted => pb::CanaryPhase::Aborted,
        }
    }
}

/// One decision, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub unix_ms: i64,
    /// `started`, `step`, `wait`, `failed-check`, `rollback`, `promote`, `resumed`, `aborted`, …
    pub kind: String,
    /// For people, figures included.
    pub message: String,
    /// The canary weight after the event.
    pub weight: u32,
    /// The figures of the interval judged, canary first, then stable; each judged
    /// interval's figures are in exactly one event (`wait`, `failed-check`, `step`,
    /// `promote`), none in the others.
    pub figures: Vec<Figures>,
}

/// What an applied weight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingKind {
    /// The first step.
    Start,
    /// The next step after a passing interval.
    Step,
    /// Promotion after passing at the max weight.
    Promote,
    /// Rollback at threshold (or after a sidecar refused a step).
    Rollback,
    /// Rollback asked by `abort --rollback`.
    AbortRollback,
}

/// A weight recorded before it is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// Why.
    pub kind: PendingKind,
    /// The canary's weight it sets.
    pub weight: u32,
    /// The step index it sets (0-based, into the steps).
    pub step: u32,
    /// The decision's message (the event's, once applied).
    pub message: String,
    /// The figures the decision was made on.
    pub figures: Vec<Figures>,
    /// The weights this change replaces (what the analysis set last or, for the first
    /// step, the service's weights when the analysis started). The weight is applied
    /// only while the service is at these weights or already at the pending ones
    /// ([`Store::set_weights_if`](crate::server::Store::set_weights_if)); absent in
    /// files written before it existed (then applied unconditionally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<BTreeMap<String, u32>>,
}

/// How an applied weight went, as the runner reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// The store refused it: why.
    pub error: Option<String>,
    /// The routes version carrying it.
    pub version: u64,
    /// Sidecars waited for (connected and subscribed to the service).
    pub total: u32,
    /// Sidecars that ACKed.
    pub acked: u32,
    /// Sidecars that NACKed, with their errors (`node: error`).
    pub nacked: Vec<String>,
    /// Sidecars that did not answer in time.
    pub waiting: Vec<String>,
    /// The weights in force were not the ones the change replaces (a manual
    /// `set-weight`, `rollback` or `reset-weights` landed in between): what the store
    /// said. A step, the first weight or a promotion is then not applied; a rollback
    /// still is, unless the canary already has no traffic.
    pub changed_outside: Option<String>,
    /// Nothing was written: a rollback found the canary already without traffic.
    pub skipped: bool,
    /// The service's weights in force after the attempt (subset → percentage), as the
    /// store says; empty when not read.
    pub weights_in_force: BTreeMap<String, u32>,
}

impl ApplyOutcome {
    fn describe(&self) -> String {
        if self.skipped {
            return format!("nothing written, the weights in force are {}", describe(&self.weights_in_force));
        }
        if self.total == 0 && self.nacked.is_empty() && self.waiting.is_empty() {
            return format!("routes version {}; no connected sidecar subscribes to the service", self.version);
        }
        let mut text = format!("routes version {}, ACKed by {} sidecar(s)", self.version, self.acked);
        if !self.nacked.is_empty() {
            text.push_str(&format!("; NACKed by {}", self.nacked.join(", ")));
        }
        if !self.waiting.is_empty() {
            text.push_str(&format!("; not confirmed in time by {}", self.waiting.join(", ")));
        }
        text
    }
}

/// What an interval came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too little traffic: not judged.
    Wait(String),
    /// Every check failed that is listed.
    Fail(Vec<String>),
    /// Every check passed.
    Pass,
}

/// Judges one interval's figures against the spec's checks (pure).
pub fn judge(spec: &pb::CanarySpec, canary: &Figures, stable: Option<&Figures>) -> Verdict {
    if canary.requests < spec.min_requests {
        return Verdict::Wait(format!(
            "canary {} had {} request(s) in the interval, fewer than the {} needed to judge it",
            canary.version, canary.requests, spec.min_requests
        ));
    }
    let mut failures = Vec::new();
    if let Some(min) = spec.min_success_percent {
        match canary.success_percent {
            Some(s) if s < min => failures.push(format!("success rate {s:.2}% < {min}%")),
            Some(_) => {}
            None => failures.push("no success rate".to_string()),
        }
    }
    if let Some(max) = spec.max_p99_ms {
        match canary.p99_ms {
            Some(p) if p > max => failures.push(format!("p99 {p:.1} ms > {max} ms")),
            Some(_) => {}
            None => failures.push("no p99".to_string()),
        }
    }
    if let Some(drop) = spec.max_success_drop_percent {
        // The canary's own checks failed: that stands whatever the stable's traffic.
        if !failures.is_empty() {
            return Verdict::Fail(failures);
        }
        let Some(stable) = stable.filter(|s| s.requests >= spec.min_requests) else {
            let n = stable.map_or(0, |s| s.requests);
            return Verdict::Wait(format!(
                "stable {} had {n} request(s) in the interval, fewer than the {} needed to compare the canary with it",
                spec.stable, spec.min_requests
            ));
        };
        if let (Some(c), Some(s)) = (canary.success_percent, stable.success_percent)
            && s - c > drop
        {
            failures
                .push(format!("success rate {c:.2}% is {:.2} points below stable's {s:.2}% (at most {drop})", s - c));
        }
    }
    if failures.is_empty() { Verdict::Pass } else { Verdict::Fail(failures) }
}

/// The whole state of one analysis: what is persisted and what `status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisState {
    /// The spec, resolved (subsets and defaults filled in).
    #[serde(with = "spec_serde")]
    pub spec: pb::CanarySpec,
    /// The phase.
    pub phase: Phase,
    /// The canary's weight now in force (confirmed), percent.
    pub weight: u32,
    /// Steps passed (index of the current step).
    pub step: u32,
    /// Failed intervals, counted over the whole analysis.
    pub failed_checks: u32,
    /// Why it FAILED or was ABORTED.
    pub reason: String,
    /// Unix milliseconds.
    pub started_unix_ms: i64,
    /// When the next interval is judged, Unix milliseconds (0 = not running).
    pub next_check_unix_ms: i64,
    /// The last interval's figures, canary first.
    pub last_figures: Vec<Figures>,
    /// The decisions, oldest first (at most [`MAX_EVENTS`]).
    pub events: VecDeque<Event>,
    /// A weight recorded and not yet confirmed applied.
    pub applying: Option<Pending>,
}

impl AnalysisState {
    /// A new analysis of `spec` (resolved): INITIALIZED, with the first step's weight
    /// to apply.
    pub fn start(spec: pb::CanarySpec, now_ms: i64) -> AnalysisState {
        let first = steps(&spec).first().copied().unwrap_or(spec.max_weight);
        let message = format!(
            "analysis of {} started ({}): canary {} to {first}%, stable {} to {}%",
            spec.service,
            spec.source,
            spec.canary,
            spec.stable,
            100 - first.min(100)
        );
        AnalysisState {
            phase: Phase::Initialized,
            weight: 0,
            step: 0,
            failed_checks: 0,
            reason: String::new(),
            started_unix_ms: now_ms,
            next_check_unix_ms: 0,
            last_figures: Vec::new(),
            events: VecDeque::new(),
            applying: Some(Pending {
                kind: PendingKind::Start,
                weight: first,
                step: 0,
                message,
                figures: Vec::new(),
                before: None,
            }),
            spec,
        }
    }

    /// A new analysis of `spec` whose service's weights are `current` now: its first
    /// weight is applied only while they still are (see [`Pending::before`]).
    pub fn start_from(spec: pb::CanarySpec, now_ms: i64, current: BTreeMap<String, u32>) -> AnalysisState {
        let mut state = AnalysisState::start(spec, now_ms);
        if let Some(p) = state.applying.as_mut() {
            p.before = Some(current);
        }
        state
    }

    /// A weight to record, replacing the weights the analysis set last.
    fn pending(&self, kind: PendingKind, weight: u32, step: u32, message: String, figures: Vec<Figures>) -> Pending {
        Pending { kind, weight, step, message, figures, before: Some(self.weights_for(self.weight)) }
    }

    /// True while the analysis has work to do: judging, or a weight to apply.
    pub fn running(&self) -> bool {
        !self.phase.finished() || self.applying.is_some()
    }

    /// The weights that give the canary `weight`: stable the rest, any other subset 0
    /// (left out: `set_weights` sets the subsets it is not given to 0).
    pub fn weights_for(&self, weight: u32) -> BTreeMap<String, u32> {
        let weight = weight.min(100);
        let mut weights = BTreeMap::new();
        weights.insert(self.spec.canary.clone(), weight);
        weights.insert(self.spec.stable.clone(), 100 - weight);
        weights
    }

    fn push_event(&mut self, now_ms: i64, kind: &str, message: String, figures: Vec<Figures>) {
        tracing::info!(
            service = %self.spec.service,
            canary = %self.spec.canary,
            event = kind,
            weight = self.weight,
            failed_checks = self.failed_checks,
            "canary: {message}"
        );
        self.events.push_back(Event { unix_ms: now_ms, kind: kind.to_string(), message, weight: self.weight, figures });
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Notes a restart: the analysis goes on (a recorded weight is applied again).
    pub fn resumed(&mut self, now_ms: i64) {
        let message = match &self.applying {
            Some(p) => format!("control plane restarted: applying the recorded weight {}% again", p.weight),
            None => format!("control plane restarted: resuming at step {} ({}%)", self.step + 1, self.weight),
        };
        self.push_event(now_ms, "resumed", message, Vec::new());
    }

    /// Judges an interval: `current` is the service's weights in force now (to notice a
    /// manual change), then the canary's and stable's figures. Returns true when the
    /// state changed in a way worth persisting (always, but for a running apply).
    pub fn interval(&mut self, now_ms: i64, current: &BTreeMap<String, u32>, canary: Figures, stable: Figures) -> bool {
        if self.phase.finished() || self.applying.is_some() {
            return false;
        }
        let figures = vec![canary.clone(), stable.clone()];
        self.last_figures = figures.clone();
        let expected = self.weights_for(self.weight);
        let same = current
            .keys()
            .chain(expected.keys())
            .all(|k| current.get(k).copied().unwrap_or(0) == expected.get(k).copied().unwrap_or(0));
        if !same {
            let reason = format!(
                "weights changed outside the analysis: {} is at {}, the analysis set {}; stopped, weights left \
                 as they are",
                self.spec.service,
                describe(current),
                describe(&expected)
            );
            self.phase = Phase::Aborted;
            self.reason = reason.clone();
            self.next_check_unix_ms = 0;
            self.push_event(now_ms, "aborted", reason, Vec::new());
            return true;
        }
        let steps = steps(&self.spec);
        let at_max = self.weight >= self.spec.max_weight || self.step as usize + 1 >= steps.len();
        let shown = format!("{}; {}", canary.describe(), stable.describe());
        match judge(&self.spec, &canary, Some(&stable)) {
            Verdict::Wait(why) => {
                self.push_event(now_ms, "wait", format!("not judged at {}%: {why} ({shown})", self.weight), figures);
            }
            Verdict::Fail(failures) => {
                self.failed_checks += 1;
                let message = format!(
                    "check failed at {}% ({} of {}): {} ({shown})",
                    self.weight,
                    self.failed_checks,
                    self.spec.threshold,
                    failures.join(", ")
                );
                self.push_event(now_ms, "failed-check", message.clone(), figures.clone());
                if self.failed_checks >= self.spec.threshold {
                    let reason = format!(
                        "{} failed checks reached the threshold {}; last: {}",
                        self.failed_checks,
                        self.spec.threshold,
                        failures.join(", ")
                    );
                    // The figures are the failed-check event's: each judged interval's
                    // figures are in exactly one event.
                    self.applying = Some(self.pending(
                        PendingKind::Rollback,
                        0,
                        self.step,
                        format!("rolling back: {reason}"),
                        Vec::new(),
                    ));
                    self.reason = reason;
                }
            }
            Verdict::Pass if at_max => {
                let promote = self.spec.promote_weight.clamp(1, 100);
                let message = format!(
                    "checks passed at the max weight {}%: promoting, canary {} to {promote}% ({shown})",
                    self.weight, self.spec.canary
                );
                self.applying = Some(self.pending(PendingKind::Promote, promote, self.step, message, figures));
            }
            Verdict::Pass => {
                let next = self.step + 1;
                let weight = steps.get(next as usize).copied().unwrap_or(self.spec.max_weight);
                let message = format!("checks passed at {}%: canary to {weight}% ({shown})", self.weight);
                self.applying = Some(self.pending(PendingKind::Step, weight, next, message, figures));
            }
        }
        true
    }

    /// Records how the recorded weight went: the phase, weight and step it stood for,
    /// and its event.
    ///
    /// - A step (or the first weight, or the promotion) refused by a sidecar (NACK) or by
    ///   the store turns into a rollback; the first weight refused by the store ends
    ///   FAILED at once (nothing was written: the weights before the analysis stay).
    /// - Weights changed outside the analysis between its decision and its write
    ///   ([`ApplyOutcome::changed_outside`]): a step, first weight or promotion was not
    ///   applied, the analysis is ABORTED and the manual weights stay; a rollback is
    ///   still applied (its failure evidence stands and rolling back is the safe
    ///   direction) unless the canary already has no traffic, and ends as due (FAILED, or
    ///   ABORTED for `abort --rollback`).
    pub fn applied(&mut self, now_ms: i64, outcome: &ApplyOutcome) {
        let Some(pending) = self.applying.take() else { return };
        let confirm = outcome.describe();
        let in_force = if outcome.weights_in_force.is_empty() {
            format!("canary {} at {}%", self.spec.canary, self.weight)
        } else {
            describe(&outcome.weights_in_force)
        };
        let rollback = matches!(pending.kind, PendingKind::Rollback | PendingKind::AbortRollback);
        if let Some(changed) = &outcome.changed_outside {
            if !rollback {
                let what = match pending.kind {
                    PendingKind::Start => "first weight",
                    PendingKind::Promote => "promotion",
                    _ => "step",
                };
                let reason = format!(
                    "{changed}; the {what} to {}% was not applied: stopped, weights left as they are ({in_force})",
                    pending.weight
                );
                if let Some(w) = outcome.weights_in_force.get(&self.spec.canary) {
                    self.weight = *w;
                }
                self.phase = Phase::Aborted;
                self.next_check_unix_ms = 0;
                self.reason = reason.clone();
                self.push_event(now_ms, "aborted", reason, pending.figures);
                return;
            }
            let note = if outcome.skipped {
                format!("{changed}; the canary already has no traffic, so the rollback left them as they are")
            } else {
                format!("{changed}; rolled back anyway")
            };
            self.reason = if self.reason.is_empty() { note } else { format!("{}; {note}", self.reason) };
        }
        if let Some(error) = &outcome.error {
            match pending.kind {
                PendingKind::Step | PendingKind::Promote => {
                    let reason = format!(
                        "setting the canary's weight to {}% failed: {error}; the weights in force are {in_force}; \
                         rolling back",
                        pending.weight
                    );
                    self.reason = reason.clone();
                    self.push_event(now_ms, "error", reason.clone(), pending.figures);
                    self.applying = Some(self.pending(
                        PendingKind::Rollback,
                        0,
                        self.step,
                        format!("rolling back: {reason}"),
                        Vec::new(),
                    ));
                }
                PendingKind::Start => {
                    let reason = format!(
                        "setting the canary's first weight {}% failed: {error}; nothing was applied, the weights in \
                         force are {in_force}",
                        pending.weight
                    );
                    self.phase = Phase::Failed;
                    self.reason = reason.clone();
                    self.next_check_unix_ms = 0;
                    self.push_event(now_ms, "error", reason, pending.figures);
                }
                PendingKind::Rollback | PendingKind::AbortRollback => {
                    let reason = format!("rolling back failed: {error}; the weights in force are {in_force}");
                    self.phase =
                        if matches!(pending.kind, PendingKind::Rollback) { Phase::Failed } else { Phase::Aborted };
                    self.reason =
                        if self.reason.is_empty() { reason.clone() } else { format!("{}; {reason}", self.reason) };
                    self.next_check_unix_ms = 0;
                    self.push_event(now_ms, "error", reason, pending.figures);
                }
            }
            return;
        }
        match pending.kind {
            PendingKind::Start | PendingKind::Step | PendingKind::Promote if !outcome.nacked.is_empty() => {
                let reason = format!(
                    "{} sidecar(s) refused the canary at {}%: {}",
                    outcome.nacked.len(),
                    pending.weight,
                    outcome.nacked.join("; ")
                );
                self.weight = pending.weight;
                self.push_event(now_ms, "nacked", format!("{reason} ({confirm})"), pending.figures);
                self.applying = Some(self.pending(
                    PendingKind::Rollback,
                    0,
                    self.step,
                    format!("rolling back: {reason}"),
                    Vec::new(),
                ));
                self.reason = reason;
            }
            PendingKind::Start => {
                self.phase = Phase::Progressing;
                self.weight = pending.weight;
                self.step = pending.step;
                self.push_event(now_ms, "started", format!("{} ({confirm})", pending.message), pending.figures);
            }
            PendingKind::Step => {
                self.weight = pending.weight;
                self.step = pending.step;
                self.push_event(now_ms, "step", format!("{} ({confirm})", pending.message), pending.figures);
            }
            PendingKind::Promote => {
                self.phase = Phase::Succeeded;
                self.weight = pending.weight;
                self.next_check_unix_ms = 0;
                self.push_event(now_ms, "promote", format!("{} ({confirm})", pending.message), pending.figures);
            }
            PendingKind::Rollback | PendingKind::AbortRollback => {
                self.phase = if matches!(pending.kind, PendingKind::Rollback) { Phase::Failed } else { Phase::Aborted };
                self.weight = 0;
                self.next_check_unix_ms = 0;
                if !outcome.nacked.is_empty() || !outcome.waiting.is_empty() {
                    self.reason.push_str(&format!(" (rollback not confirmed everywhere: {confirm})"));
                }
                let kind = if matches!(pending.kind, PendingKind::Rollback) { "rollback" } else { "aborted" };
                self.push_event(
                    now_ms,
                    kind,
                    format!("{}: canary {} at 0% ({confirm})", pending.message, self.spec.canary),
                    pending.figures,
                );
            }
        }
    }

    /// Stops the analysis on request. With `rollback`, records the rollback weight
    /// (applied by the runner; ABORTED once applied); without, ABORTED now with the
    /// weights left as they are.
    ///
    /// A decision already recorded and not yet applied that is due whatever the
    /// request is kept, and the runner applies it: a rollback (threshold reached, or a
    /// refused step) ends FAILED as due, with or without `rollback`; a promotion ends
    /// SUCCEEDED when no rollback is asked (with `rollback`, the abort's rollback
    /// replaces it). A rollback already asked by an earlier abort stays.
    pub fn abort(&mut self, now_ms: i64, rollback: bool, why: &str) {
        self.next_check_unix_ms = 0;
        let kept = match self.applying.as_ref().map(|p| p.kind) {
            Some(PendingKind::Rollback) => Some("rollback"),
            Some(PendingKind::AbortRollback) => Some("rollback"),
            Some(PendingKind::Promote) if !rollback => Some("promotion"),
            _ => None,
        };
        if let Some(what) = kept {
            let message = format!("{why}: the {what} already decided is applied first");
            self.reason = if self.reason.is_empty() { message.clone() } else { format!("{}; {message}", self.reason) };
            self.push_event(now_ms, "abort-requested", message, Vec::new());
            return;
        }
        self.reason = why.to_string();
        if rollback {
            // The weights the rollback replaces: the analysis' own, or, when its first
            // weight was never applied, the service's weights before it.
            let before = match &self.applying {
                Some(p) if p.kind == PendingKind::Start => p.before.clone(),
                _ => Some(self.weights_for(self.weight)),
            };
            self.applying = Some(Pending {
                kind: PendingKind::AbortRollback,
                weight: 0,
                step: self.step,
                message: format!("{why}; rolling back"),
                figures: Vec::new(),
                before,
            });
        } else {
            let never_applied = self.applying.as_ref().is_some_and(|p| p.kind == PendingKind::Start);
            self.applying = None;
            self.phase = Phase::Aborted;
            let message = if never_applied {
                format!("{why}; the first weight was never applied: weights left as they were")
            } else {
                format!("{why}; weights left as they are (canary {} at {}%)", self.spec.canary, self.weight)
            };
            self.push_event(now_ms, "aborted", message, Vec::new());
        }
    }

    /// Notes that the decision recorded could not be saved to the state folder, so its
    /// weight is not applied (a weight is applied only once its intent is saved).
    /// The first weight: the analysis ends FAILED, nothing applied (returns false).
    /// Later ones: the weight waits and the runner retries saving at the next
    /// interval (returns true; one `save-failed` event per decision).
    pub fn save_failed(&mut self, now_ms: i64, error: &str) -> bool {
        let Some(pending) = self.applying.as_ref() else { return true };
        if pending.kind == PendingKind::Start {
            let reason = format!(
                "the analysis could not be saved to the state folder ({error}): nothing was applied, the weights \
                 stay as they were"
            );
            self.applying = None;
            self.phase = Phase::Failed;
            self.reason = reason.clone();
            self.next_check_unix_ms = 0;
            self.push_event(now_ms, "error", reason, Vec::new());
            return false;
        }
        if self.events.back().is_none_or(|e| e.kind != "save-failed") {
            let message = format!(
                "saving the decision to set the canary to {}% failed ({error}): not applied until it is saved; \
                 retrying at the next interval",
                pending.weight
            );
            self.push_event(now_ms, "save-failed", message, Vec::new());
        }
        true
    }

    /// As the API gives it.
    pub fn to_pb(&self) -> pb::CanaryStatus {
        pb::CanaryStatus {
            spec: Some(self.spec.clone()),
            phase: self.phase.to_pb() as i32,
            weight: self.weight,
            step: self.step,
            failed_checks: self.failed_checks,
            reason: self.reason.clone(),
            next_check_unix_ms: if self.phase.finished() { 0 } else { self.next_check_unix_ms },
            last_figures: self.last_figures.iter().map(Figures::to_pb).collect(),
            events: self
                .events
                .iter()
                .map(|e| pb::CanaryEvent {
                    unix_ms: e.unix_ms,
                    kind: e.kind.clone(),
                    message: e.message.clone(),
                    weight: e.weight,
                    figures: e.figures.iter().map(Figures::to_pb).collect(),
                })
                .collect(),
            started_unix_ms: self.started_unix_ms,
        }
    }
}

/// `v1=90 v2=10`.
fn describe(weights: &BTreeMap<String, u32>) -> String {
    if weights.is_empty() {
        return "no split".to_string();
    }
    weights.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// The spec as canonical JSON (to tell whether a document's spec changed).
pub(crate) fn spec_to_json(spec: &pb::CanarySpec) -> String {
    #[derive(Serialize)]
    struct Wrap {
        #[serde(with = "spec_serde")]
        spec: pb::CanarySpec,
    }
    serde_json::to_string(&Wrap { spec: spec.clone() }).unwrap_or_default()
}

/// The spec as JSON fields (prost messages have no serde).
mod spec_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::pb;

    #[derive(Serialize, Deserialize)]
    struct Spec {
        service: String,
        canary: String,
        stable: String,
        #[serde(default)]
        step_weight: u32,
        #[serde(default)]
        step_weights: Vec<u32>,
        max_weight: u32,
        interval_ms: u32,
        threshold: u32,
        #[serde(default)]
        min_success_percent: Option<f64>,
        #[serde(default)]
        max_p99_ms: Option<f64>,
        min_requests: u64,
        #[serde(default)]
        max_success_drop_percent: Option<f64>,
        promote_weight: u32,
        source: String,
        #[serde(default)]
        success_window_ms: u32,
        #[serde(default)]
        p99_window_ms: u32,
    }

    pub(super) fn serialize<S: Serializer>(s: &pb::CanarySpec, ser: S) -> Result<S::Ok, S::Error> {
        Spec {
            service: s.service.clone(),
            canary: s.canary.clone(),
            stable: s.stable.clone(),
            step_weight: s.step_weight,
            step_weights: s.step_weights.clone(),
            max_weight: s.max_weight,
            interval_ms: s.interval_ms,
            threshold: s.threshold,
            min_success_percent: s.min_success_percent,
            max_p99_ms: s.max_p99_ms,
            min_requests: s.min_requests,
            max_success_drop_percent: s.max_success_drop_percent,
            promote_weight: s.promote_weight,
            source: s.source.clone(),
            success_window_ms: s.success_window_ms,
            p99_window_ms: s.p99_window_ms,
        }
        .serialize(ser)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<pb::CanarySpec, D::Error> {
        let s = Spec::deserialize(de)?;
        Ok(pb::CanarySpec {
            service: s.service,
            canary: s.canary,
            stable: s.stable,
            step_weight: s.step_weight,
            step_weights: s.step_weights,
            max_weight: s.max_weight,
            interval_ms: s.interval_ms,
            threshold: s.threshold,
            min_success_percent: s.min_success_percent,
            max_p99_ms: s.max_p99_ms,
            min_requests: s.min_requests,
            max_success_drop_percent: s.max_success_drop_percent,
            promote_weight: s.promote_weight,
            source: s.source,
            success_window_ms: s.success_window_ms,
            p99_window_ms: s.p99_window_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::CanarySpec {
        pb::CanarySpec {
            service: "payment".into(),
            canary: "v2".into(),
            stable: "v1".into(),
            step_weight: 10,
            max_weight: 30,
            interval_ms: 200,
            threshold: 2,
            min_success_percent: Some(99.0),
            max_p99_ms: Some(500.0),
            min_requests: 10,
            promote_weight: 100,
            source: "ctl".into(),
            ..Default::default()
        }
    }

    fn figs(version: &str, requests: u64, success: f64, p99: f64) -> Figures {
        Figures { version: version.into(), requests, success_percent: Some(success), p99_ms: Some(p99) }
    }

    fn good() -> Figures {
        figs("v2", 100, 100.0, 20.0)
    }

    fn stable() -> Figures {
        figs("v1", 900, 99.9, 20.0)
    }

    fn ok() -> ApplyOutcome {
        ApplyOutcome { version: 2, total: 3, acked: 3, ..Default::default() }
    }

    /// Started and its first weight applied.
    fn started(spec: pb::CanarySpec) -> AnalysisState {
        let mut s = AnalysisState::start(spec, 1);
        assert_eq!(s.applying.as_ref().map(|p| (p.kind, p.weight)), Some((PendingKind::Start, 10)));
        assert_eq!(s.phase, Phase::Initialized);
        s.applied(2, &ok());
        assert_eq!((s.phase, s.weight, s.step), (Phase::Progressing, 10, 0));
        s
    }

    fn tick(s: &mut AnalysisState, canary: Figures) {
        let current = s.weights_for(s.weight);
        s.interval(10, &current, canary, stable());
    }

    #[test]
    fn passing_intervals_step_up_then_promote() {
        let mut s = started(spec());
        tick(&mut s, good());
        assert_eq!(s.applying.as_ref().map(|p| (p.kind, p.weight)), Some((PendingKind::Step, 20)));
        assert_eq!(s.weight, 10, "not applied yet");
        s.applied(11, &ok());
        assert_eq!((s.weight, s.step), (20, 1));
        assert_eq!(s.weights_for(s.weight), [("v1".to_string(), 80), ("v2".to_string(), 20)].into());
        tick(&mut s, good());
        s.applied(12, &ok());
        assert_eq!((s.weight, s.step, s.phase), (30, 2, Phase::Progressing));
        tick(&mut s, good());
        assert_eq!(s.applying.as_ref().map(|p| (p.kind, p.weight)), Some((PendingKind::Promote, 100)));
        s.applied(13, &ok());
        assert_eq!((s.phase, s.weight), (Phase::Succeeded, 100));
        assert!(!s.running());
        let kinds: Vec<&str> = s.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["started", "step", "step", "promote"]);
        assert!(s.events[1].message.contains("v2: 100 requests"), "{}", s.events[1].message);
        assert_eq!(s.events[1].figures.len(), 2);
        // Finished: further intervals change nothing.
        assert!(!s.interval(20, &BTreeMap::new(), good(), stable()));
    }

    #[test]
    fn failed_checks_count_cumulatively_and_roll_back_at_threshold() {
        let mut s = started(spec());
        tick(&mut s, figs("v2", 100, 92.0, 20.0));
        assert_eq!((s.failed_checks, s.applying.is_some()), (1, false));
        let last = s.events.back().expect("event");
        assert_eq!(last.kind, "failed-check");
        assert!(last.message.contains("success rate 92.00% < 99%"), "{}", last.message);
        // A pass in between steps up but does not reset the count (Flagger's rule).
        tick(&mut s, good());
        s.applied(11, &ok());
        assert_eq!((s.weight, s.failed_checks), (20, 1));
        tick(&mut s, figs("v2", 100, 100.0, 900.0));
        assert_eq!(s.failed_checks, 2);
        let pending = s.applying.clone().expect("rollback recorded");
        assert_eq!((pending.kind, pending.weight), (PendingKind::Rollback, 0));
        assert_eq!(s.weights_for(pending.weight), [("v1".to_string(), 100), ("v2".to_string(), 0)].into());
        assert!(s.reason.contains("p99 900.0 ms > 500 ms"), "{}", s.reason);
        s.applied(12, &ok());
        assert_eq!((s.phase, s.weight), (Phase::Failed, 0));
        assert_eq!(s.events.back().map(|e| e.kind.as_str()), Some("rollback"));
        assert_eq!(s.to_pb().phase(), pb::CanaryPhase::Failed);
        // Each judged interval's figures are in exactly one event.
        let judged: Vec<&str> = s.events.iter().filter(|e| !e.figures.is_empty()).map(|e| e.kind.as_str()).collect();
        assert_eq!(judged, ["failed-check", "step", "failed-check"]);
    }

    #[test]
    fn too_little_traffic_waits() {
        let mut s = started(spec());
        tick(&mut s, figs("v2", 3, 0.0, 9999.0));
        assert_eq!((s.failed_checks, s.weight, s.applying.is_none()), (0, 10, true));
        let last = s.events.back().expect("event");
        assert_eq!(last.kind, "wait");
        assert!(last.message.contains("3 request(s)"), "{}", last.message);
        assert!(last.message.contains("fewer than the 10"), "{}", last.message);
    }

    #[test]
    fn step_weights_are_followed() {
        let mut s = started(pb::CanarySpec { step_weights: vec![10, 25, 60], max_weight: 60, ..spec() });
        let mut seen = vec![s.weight];
        while s.phase == Phase::Progressing {
            tick(&mut s, good());
            s.applied(11, &ok());
            seen.push(s.weight);
        }
        assert_eq!(seen, vec![10, 25, 60, 100]);
        assert_eq!(s.phase, Phase::Succeeded);
    }

    #[test]
    fn success_drop_compares_with_stable() {
        let sp = pb::CanarySpec { min_success_percent: None, max_success_drop_percent: Some(1.0), ..spec() };
        let mut s = started(sp);
        let current = s.weights_for(s.weight);
        // Canary 98.5 vs stable 99.9: 1.4 points, more than 1.
        s.interval(10, &current, figs("v2", 100, 98.5, 10.0), figs("v1", 900, 99.9, 10.0));
        assert_eq!(s.failed_checks, 1);
        assert!(s.events.back().is_some_and(|e| e.message.contains("below stable's")));
        // Both degraded alike: the canary is not to blame.
        s.interval(11, &current, figs("v2", 100, 95.0, 10.0), figs("v1", 900, 95.5, 10.0));
        assert_eq!(s.failed_checks, 1);
        assert_eq!(s.applying.as_ref().map(|p| p.kind), Some(PendingKind::Step));
        s.applied(12, &ok());
        // Too little stable traffic to compare: wait.
        let current = s.weights_for(s.weight);
        s.interval(13, &current, figs("v2", 100, 99.0, 10.0), figs("v1", 2, 100.0, 10.0));
        assert_eq!(s.events.back().map(|e| e.kind.as_str()), Some("wait"));
    }

    #[test]
    fn the_canarys_own_failures_count_without_stable_traffic() {
        let sp = pb::CanarySpec { min_success_percent: Some(99.0), max_success_drop_percent: Some(1.0), ..spec() };
        let mut s = started(sp);
        let current = s.weights_for(s.weight);
        // Too little stable traffic to compare, but the canary fails its own minimum.
        s.interval(10, &current, figs("v2", 100, 80.0, 10.0), figs("v1", 2, 100.0, 10.0));
        assert_eq!(s.failed_checks, 1);
        assert_eq!(s.events.back().map(|e| e.kind.as_str()), Some("failed-check"));
    }

    #[test]
    fn a_manual_weight_change_aborts() {
        let mut s = started(spec());
        let manual: BTreeMap<String, u32> = [("v1".to_string(), 100), ("v2".to_string(), 0)].into();
        s.interval(10, &manual, good(), stable());
        assert_eq!(s.phase, Phase::Aborted);
        assert!(s.reason.contains("changed outside the analysis"), "{}", s.reason);
        assert!(s.applying.is_none());
    }

    #[test]
    fn a_nacked_step_rolls_back() {
        let mut s = started(spec());
        tick(&mut s, good());
        s.applied(11, &ApplyOutcome { nacked: vec!["frontend-1: bad".into()], ..ok() });
        assert_eq!(s.applying.as_ref().map(|p| p.kind), Some(PendingKind::Rollback));
        s.applied(12, &ok());
        assert_eq!(s.phase, Phase::Failed);
        assert!(s.reason.contains("refused"), "{}", s.reason);
    }

    #[test]
    fn abort_with_and_without_rollback() {
        let mut s = started(spec());
        s.abort(10, false, "aborted by ctl");
        assert_eq!((s.phase, s.weight), (Phase::Aborted, 10));
        let mut s = started(spec());
        s.abort(10, true, "aborted by ctl");
        assert!(s.running());
        s.applied(11, &ok());
        assert_eq!((s.phase, s.weight), (Phase::Aborted, 0));
    }

    #[test]
    fn a_restart_in_the_middle_resumes_where_it_was() {
        let mut s = started(spec());
        tick(&mut s, figs("v2", 100, 50.0, 20.0));
        tick(&mut s, good());
        // The process dies after recording the step, before confirming it.
        let saved = serde_json::to_string(&s).expect("serializes");
        let mut back: AnalysisState = serde_json::from_str(&saved).expect("deserializes");
        assert_eq!(back, s);
        back.resumed(20);
        assert_eq!(back.applying.as_ref().map(|p| (p.kind, p.weight)), Some((PendingKind::Step, 20)));
        back.applied(21, &ok());
        assert_eq!((back.weight, back.step, back.failed_checks), (20, 1, 1));
        tick(&mut back, figs("v2", 100, 50.0, 20.0));
        assert_eq!(back.applying.as_ref().map(|p| p.kind), Some(PendingKind::Rollback), "the count went on");
        back.applied(22, &ok());
        assert_eq!(back.phase, Phase::Failed);
    }

    fn outside(current: &[(&str, u32)]) -> ApplyOutcome {
        ApplyOutcome {
            changed_outside: Some("weights changed outside the analysis: payment is at ...".into()),
            weights_in_force: current.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn recorded_weights_carry_the_weights_they_replace() {
        let s = AnalysisState::start_from(spec(), 1, [("v1".to_string(), 80), ("v3".to_string(), 20)].into());
        assert_eq!(
            s.applying.as_ref().and_then(|p| p.before.clone()),
            Some([("v1".into(), 80), ("v3".into(), 20)].into())
        );
        let mut s = started(spec());
        tick(&mut s, good());
        assert_eq!(s.applying.as_ref().and_then(|p| p.before.clone()), Some(s.weights_for(10)));
    }

    #[test]
    fn a_step_over_weights_changed_outside_aborts_and_leaves_them() {
        let mut s = started(spec());
        tick(&mut s, good());
        s.applied(11, &outside(&[("v1", 100), ("v2", 0)]));
        assert_eq!((s.phase, s.weight, s.applying.is_none()), (Phase::Aborted, 0, true));
        assert!(s.reason.contains("weights changed outside the analysis"), "{}", s.reason);
        assert!(s.reason.contains("step to 20% was not applied"), "{}", s.reason);
        assert!(!s.running());
    }

    #[test]
    fn the_analysis_rollback_still_happens_over_weights_changed_outside() {
        let failing = || {
            let mut s = started(pb::CanarySpec { threshold: 1, ..spec() });
            tick(&mut s, figs("v2", 100, 50.0, 20.0));
            assert_eq!(s.applying.as_ref().map(|p| p.kind), Some(PendingKind::Rollback));
            s
        };
        // Someone raised the canary meanwhile: the rollback is written anyway.
        let mut s = failing();
        s.applied(11, &ApplyOutcome { acked: 1, total: 1, ..outside(&[("v1", 100), ("v2", 0)]) });
        assert_eq!((s.phase, s.weight), (Phase::Failed, 0));
        assert!(s.reason.contains("rolled back anyway"), "{}", s.reason);
        // Someone rolled back meanwhile: nothing written, FAILED as due.
        let mut s = failing();
        s.applied(11, &ApplyOutcome { skipped: true, ..outside(&[("v1", 100), ("v2", 0)]) });
        assert_eq!((s.phase, s.weight), (Phase::Failed, 0));
        assert!(s.reason.contains("already has no traffic"), "{}", s.reason);
    }

    #[test]
    fn a_step_the_store_refuses_rolls_back_and_says_what_is_in_force() {
        let mut s = started(spec());
        tick(&mut s, good());
        let refused = ApplyOutcome {
            error: Some("no VirtualService route sends traffic only to payment".into()),
            weights_in_force: [("v1".to_string(), 90), ("v2".to_string(), 10)].into(),
            ..Default::default()
        };
        s.applied(11, &refused);
        let pending = s.applying.clone().expect("a rollback recorded");
        assert_eq!((pending.kind, pending.weight), (PendingKind::Rollback, 0));
        assert_eq!(pending.before, Some(s.weights_for(10)));
        assert!(s.reason.contains("failed: no VirtualService route"), "{}", s.reason);
        assert!(s.reason.contains("the weights in force are v1=90 v2=10"), "{}", s.reason);
        s.applied(12, &ok());
        assert_eq!((s.phase, s.weight), (Phase::Failed, 0));
        // The rollback refused too: FAILED, saying which weights are in force.
        let mut s = started(spec());
        tick(&mut s, good());
        s.applied(11, &refused);
        s.applied(12, &refused);
        assert_eq!((s.phase, s.applying.is_none()), (Phase::Failed, true));
        assert!(s.reason.contains("rolling back failed"), "{}", s.reason);
        assert!(s.reason.contains("v1=90 v2=10"), "{}", s.reason);
        // The first weight refused: FAILED, nothing written, no rollback.
        let mut s = AnalysisState::start(spec(), 1);
        s.applied(2, &refused);
        assert_eq!((s.phase, s.weight, s.applying.is_none()), (Phase::Failed, 0, true));
        assert!(s.reason.contains("nothing was applied"), "{}", s.reason);
    }

    #[test]
    fn an_abort_keeps_a_rollback_or_promotion_already_decided() {
        // Threshold reached, rollback recorded, not applied: abort without rollback keeps it.
        let mut s = started(pb::CanarySpec { threshold: 1, ..spec() });
        tick(&mut s, figs("v2", 100, 50.0, 20.0));
        s.abort(11, false, "aborted by ctl");
        assert_eq!(s.applying.as_ref().map(|p| (p.kind, p.weight)), Some((PendingKind::Rollback, 0)));
        assert!(s.running());
        s.applied(12, &ok());
        assert_eq!((s.phase, s.weight), (Phase::Failed, 0), "FAILED as due");
        // With rollback too: still the analysis' rollback, FAILED.
        let mut s = started(pb::CanarySpec { threshold: 1, ..spec() });
        tick(&mut s, figs("v2", 100, 50.0, 20.0));
        s.abort(11, true, "aborted by ctl");
        assert_eq!(s.applying.as_ref().map(|p| p.kind), Some(PendingKind::Rollback));
        s.applied(12, &ok());
        assert_eq!(s.phase, Phase::Failed);
        // A promotion recorded: kept without rollback, replaced with it.
        let at_max = || {
            let mut s = started(pb::CanarySpec { max_weight: 10, ..spec() });
            tick(&mut s, good());
            assert_eq!(s.applying.as_ref().map(|p| p.kind), Some(PendingKind::Promote));
            s
        };
        let mut s = at_max();
        s.abort(11, false, "aborted by ctl");
        s.applied(12, &ok());
        assert_eq!((s.phase, s.weight), (Phase::Succeeded, 100));
        let mut s = at_max();
        s.abort(11, true, "aborted by ctl");
        assert_eq!(s.applying.as_ref().map(|p| p.kind), Some(PendingKind::AbortRollback));
        // A step recorded: dropped, weights left.
        let mut s = started(spec());
        tick(&mut s, good());
        s.abort(11, false, "aborted by ctl");
        assert_eq!((s.phase, s.weight, s.applying.is_none()), (Phase::Aborted, 10, true));
        // The first weight never applied, aborted with rollback: it replaces the
        // weights the service had before.
        let before: BTreeMap<String, u32> = [("v1".into(), 100)].into();
        let mut s = AnalysisState::start_from(spec(), 1, before.clone());
        s.abort(2, true, "aborted by ctl");
        assert_eq!(s.applying.as_ref().and_then(|p| p.before.clone()), Some(before));
    }

    #[test]
    fn a_decision_not_saved_is_not_applied() {
        // The first weight: FAILED, nothing to apply.
        let mut s = AnalysisState::start(spec(), 1);
        assert!(!s.save_failed(2, "disk full"));
        assert_eq!((s.phase, s.applying.is_none(), s.running()), (Phase::Failed, true, false));
        assert!(s.reason.contains("disk full") && s.reason.contains("nothing was applied"), "{}", s.reason);
        // A later step: kept for a retry, one event.
        let mut s = started(spec());
        tick(&mut s, good());
        assert!(s.save_failed(11, "disk full"));
        assert!(s.save_failed(12, "disk full"));
        assert_eq!(s.applying.as_ref().map(|p| p.kind), Some(PendingKind::Step));
        assert_eq!(s.events.iter().filter(|e| e.kind == "save-failed").count(), 1);
    }

    #[test]
    fn events_are_capped() {
        let mut s = started(pb::CanarySpec { min_requests: 1_000_000, ..spec() });
        for _ in 0..MAX_EVENTS + 50 {
            tick(&mut s, good());
        }
        assert_eq!(s.events.len(), MAX_EVENTS);
        assert_eq!(s.events.back().map(|e| e.kind.as_str()), Some("wait"));
    }
}
