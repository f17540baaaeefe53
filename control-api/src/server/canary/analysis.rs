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
}

impl ApplyOutcome {
    fn describe(&self) -> String {
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
            applying: Some(Pending { kind: PendingKind::Start, weight: first, step: 0, message, figures: Vec::new() }),
            spec,
        }
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
                "the weights of {} were changed outside the analysis (now {}, the analysis set {}): stopped, \
                 weights left as they are",
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
                    self.applying = Some(Pending {
                        kind: PendingKind::Rollback,
                        weight: 0,
                        step: self.step,
                        message: format!("rolling back: {reason}"),
                        figures: Vec::new(),
                    });
                    self.reason = reason;
                }
            }
            Verdict::Pass if at_max => {
                let promote = self.spec.promote_weight.clamp(1, 100);
                self.applying = Some(Pending {
                    kind: PendingKind::Promote,
                    weight: promote,
                    step: self.step,
                    message: format!(
                        "checks passed at the max weight {}%: promoting, canary {} to {promote}% ({shown})",
                        self.weight, self.spec.canary
                    ),
                    figures,
                });
            }
            Verdict::Pass => {
                let next = self.step + 1;
                let weight = steps.get(next as usize).copied().unwrap_or(self.spec.max_weight);
                self.applying = Some(Pending {
                    kind: PendingKind::Step,
                    weight,
                    step: next,
                    message: format!("checks passed at {}%: canary to {weight}% ({shown})", self.weight),
                    figures,
                });
            }
        }
        true
    }

    /// Records how the recorded weight went: the phase, weight and step it stood for,
    /// and its event. A step refused by a sidecar (NACK) turns into a rollback.
    pub fn applied(&mut self, now_ms: i64, outcome: &ApplyOutcome) {
        let Some(pending) = self.applying.take() else { return };
        let confirm = outcome.describe();
        if let Some(error) = &outcome.error {
            let reason = format!("setting the canary's weight to {}% failed: {error}", pending.weight);
            self.phase =
                if matches!(pending.kind, PendingKind::AbortRollback) { Phase::Aborted } else { Phase::Failed };
            self.reason = if self.reason.is_empty() { reason.clone() } else { format!("{}; {reason}", self.reason) };
            self.next_check_unix_ms = 0;
            self.push_event(now_ms, "error", reason, pending.figures);
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
                self.applying = Some(Pending {
                    kind: PendingKind::Rollback,
                    weight: 0,
                    step: self.step,
                    message: format!("rolling back: {reason}"),
                    figures: Vec::new(),
                });
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
    pub fn abort(&mut self, now_ms: i64, rollback: bool, why: &str) {
        self.reason = why.to_string();
        self.next_check_unix_ms = 0;
        if rollback {
            self.applying = Some(Pending {
                kind: PendingKind::AbortRollback,
                weight: 0,
                step: self.step,
                message: format!("{why}; rolling back"),
                figures: Vec::new(),
            });
        } else {
            self.applying = None;
            self.phase = Phase::Aborted;
            let message = format!("{why}; weights left as they are (canary {} at {}%)", self.spec.canary, self.weight);
            self.push_event(now_ms, "aborted", message, Vec::new());
        }
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
