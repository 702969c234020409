//! Kube-free conditions derived from a build [`Report`], for the status of a resource (written
//! by the operator, or served by `/v1/status` in standalone mode).

use std::fmt;

use crate::topology::build::Report;

/// `status` of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    /// The status as written in a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition in the shape of KEP-1623, without the transition time (the writer sets it, as it
/// alone knows the previous status).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// CamelCase reason, e.g. `InvalidSpec`.
    pub reason: String,
    pub message: String,
    pub observed_generation: i64,
}

/// Reason of `Ready=True` for a resource that passed every check.
pub const REASON_VALID: &str = "Valid";

/// The `Ready` condition a report implies: `False` with the first problem's reason and every
/// problem in the message (`"; "`-separated, each as `path: message`), or `True` with reason
/// `Valid`. The runtime may refine a `True` into other conditions (broker or store down).
pub fn ready_condition(report: &Report) -> Condition {
    match report.problems.first() {
        None => Condition {
            type_: "Ready".to_string(),
            status: ConditionStatus::True,
            reason: REASON_VALID.to_string(),
            message: String::new(),
            observed_generation: report.generation,
        },
        Some(first) => Condition {
            type_: "Ready".to_string(),
            status: ConditionStatus::False,
            reason: first.reason.as_str().to_string(),
            message: report
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            observed_generation: report.generation,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Key;
    use crate::topology::build::{Problem, Reason};
    use crate::topology::index::Kind;

    #[test]
    fn ready_reflects_the_report() {
        let mut report = Report {
            kind: Kind::Subscription,
            key: Key::new("shop", "notify"),
            generation: 7,
            problems: Vec::new(),
        };
        let ok = ready_condition(&report);
        assert_eq!(ok.status, ConditionStatus::True);
        assert_eq!(ok.reason, "Valid");
        assert_eq!(ok.observed_generation, 7);

        report.problems = vec![
            Problem {
                path: "spec.stream".into(),
                message: "EventStream shop/orders not found".into(),
                reason: Reason::StreamNotFound,
            },
            Problem {
                path: "spec.delivery.timeout".into(),
                message: "must be greater than zero".into(),
                reason: Reason::InvalidSpec,
            },
        ];
        let bad = ready_condition(&report);
        assert_eq!(bad.type_, "Ready");
        assert_eq!(bad.status, ConditionStatus::False);
        assert_eq!(bad.reason, "StreamNotFound");
        assert_eq!(
            bad.message,
            "spec.stream: EventStream shop/orders not found; spec.delivery.timeout: must be greater than zero"
        );
    }
}
