//! What the engine asks for: desired state per region, webhook calls, history.

use chrono::{DateTime, Utc};
use fleet::model::{Compare, HookEvent, Match, Sticky, Weight};
use serde::{Deserialize, Serialize};

use crate::analysis::Verdict;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Make `region` look like `desired`. Sending the same `seq` twice is harmless: agents
    /// apply a sequence number once.
    Desire { region: String, desired: Desired },
    /// Call a webhook and report the outcome as `Event::WebhookDone { id, .. }`; a timeout is a
    /// failure. `wait` is false for hooks whose outcome changes nothing (post-rollout, rollback).
    CallWebhook {
        id: u64,
        on: HookEvent,
        url: String,
        timeout_ms: u64,
        region: Option<String>,
        wait: bool,
    },
    /// Append to the release's history.
    Record(HistoryEvent),
}

/// The state a region should be in. Every change has a new, larger `seq`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub seq: u64,
    pub release: String,
    /// The version serving the stable track.
    pub stable: String,
    /// The version on the canary track, if one runs.
    pub canary: Option<String>,
    pub replicas: u32,
    pub traffic: Traffic,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// Share of requests (not matched by a cohort rule) sent to the canary.
    pub canary_weight: Weight,
    /// Requests matching any of these go to the canary.
    pub cohort: Vec<CohortRule>,
    /// Share of requests copied to the canary, answers dropped.
    pub mirror: Option<Weight>,
    /// What of each copy's answer is compared with the primary's, if anything.
    #[serde(default)]
    pub mirror_compare: Option<Compare>,
    pub sticky: Option<StickyKey>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CohortRule {
    pub on: String,
    pub name: String,
    pub test: String,
    pub value: String,
}

impl From<&Match> for CohortRule {
    fn from(m: &Match) -> Self {
        use fleet::model::{MatchOn, ValueTest};
        let on = match m.on {
            MatchOn::Header => "header",
            MatchOn::Cookie => "cookie",
            MatchOn::Query => "query",
        };
        let (test, value) = match &m.test {
            ValueTest::Exact(v) => ("exact", v.clone()),
            ValueTest::Prefix(v) => ("prefix", v.clone()),
            ValueTest::Regex(v) => ("regex", v.clone()),
            ValueTest::Present(p) => ("present", p.to_string()),
        };
        CohortRule {
            on: on.into(),
            name: m.name.clone(),
            test: test.into(),
            value,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyKey {
    Cookie(String),
    Header(String),
}

impl From<&Sticky> for StickyKey {
    fn from(s: &Sticky) -> Self {
        match s {
            Sticky::Cookie(c) => StickyKey::Cookie(c.clone()),
            Sticky::Header(h) => StickyKey::Header(h.clone()),
        }
    }
}

/// One line of a release's append-only history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub at: DateTime<Utc>,
    /// `engine`, or the operator who acted.
    pub actor: String,
    pub region: Option<String>,
    pub what: What,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    ReleaseStarted,
    WaveWaiting {
        wave: String,
    },
    WaveStarted {
        wave: String,
    },
    WaveBaking {
        wave: String,
        until: DateTime<Utc>,
    },
    StepStarted {
        step: usize,
        label: String,
        weight: Weight,
    },
    StepApplied {
        step: usize,
        weight: Weight,
    },
    Analysis {
        verdict: Verdict,
    },
    RegionPromoted,
    RegionSucceeded,
    RegionFailed,
    RegionHolding,
    Paused,
    Resumed,
    /// `gate` as [`crate::Engine::gate`] named it (empty in a history stored before gates).
    Promoted {
        #[serde(default)]
        gate: String,
    },
    WebhookCalled {
        on: HookEvent,
    },
    WebhookFailed {
        on: HookEvent,
    },
    RollbackStarted,
    RegionRolledBack,
    RolledBack,
    Succeeded,
}

#[cfg(test)]
mod tests {
    use super::What;

    #[test]
    fn a_promote_stored_before_gates_reads_with_an_empty_gate() {
        let old: What = serde_json::from_str(r#"{"kind":"promoted"}"#).unwrap();
        assert_eq!(
            old,
            What::Promoted {
                gate: String::new()
            }
        );
        let now = What::Promoted {
            gate: "bake:first".into(),
        };
        let json = serde_json::to_string(&now).unwrap();
        assert_eq!(json, r#"{"kind":"promoted","gate":"bake:first"}"#);
    }
}
