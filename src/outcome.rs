//! How a command ends, and the exit status a script reads from it. One
//! table for the whole tool (the README repeats it):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | migrated: the guest runs on the destination (`dest`: the guest it received runs) |
//! | 1 | an internal error (the environment, or a bug); nothing was migrated |
//! | 2 | refused input: bad flags or values, nothing started |
//! | 3 | failed: the guest runs on the source (`dest`: the copy was discarded) |
//! | 4 | in doubt: the guest is paused on the source / held at the destination; resolve with `hpmig ctl` |
//! | 5 | verification alarm: after switch-over the source's memory differs from what it sent |
//! | 6 | cancelled by an operator: the guest runs on the source |
//! | 7 | migrated, but the downtime target was not kept (pre-copy did not converge, or the pause outlasted the target) |

use std::process::ExitCode;

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Migrated = 0,
    Internal = 1,
    Usage = 2,
    Failed = 3,
    InDoubt = 4,
    /// After switch-over the source's memory differs from what it sent:
    /// the dirty log missed a write (`--verify incremental`).
    VerifyAlarm = 5,
    /// Cancelled by an operator (`hpmig ctl PATH cancel`, SIGINT, SIGTERM).
    Cancelled = 6,
    /// Migrated, but the downtime target was not kept.
    NotConverged = 7,
}

impl Outcome {
    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }

    /// The word the JSON report and the summary use.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Migrated => "migrated",
            Outcome::Internal => "internal-error",
            Outcome::Usage => "refused-input",
            Outcome::Failed => "failed",
            Outcome::InDoubt => "in-doubt",
            Outcome::VerifyAlarm => "verification-alarm",
            Outcome::Cancelled => "cancelled",
            Outcome::NotConverged => "migrated-target-missed",
        }
    }
}

/// An error in what the user asked for (exit status 2).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage error.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// Where the guest is after a failure, in words for the report.
pub fn guest_where(outcome: Outcome, role: &str) -> &'static str {
    match (outcome, role) {
        (Outcome::InDoubt, "dest") => "held paused at the destination",
        (Outcome::InDoubt, _) => "paused on the source",
        (Outcome::Migrated | Outcome::NotConverged, _) => "runs on the destination",
        (_, "dest") => "not here (the copy was discarded)",
        _ => "runs on the source",
    }
}
