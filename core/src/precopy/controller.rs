//! The pre-copy controller: a pure function of the rounds so far that says
//! whether to run another round, stop and copy, or give up.
//!
//! The work set is the round's dirty *bytes* (payload bytes it had to send),
//! as in the paper, not its dirty pages. The projection for the next round
//! scales the pages dirty right now by the bytes per dirty page of the last
//! round, so segment mode, whose pages cost a few bytes each, projects a
//! small work set where page mode projects whole pages.
//!
//! A round also costs time per dirty page, whatever its bytes: the harvest,
//! the diff against the shadow, the hashes of incremental verification,
//! the landing. Measured here at 2-4 µs per page in segment final rounds,
//! it is what a final round of a few hundred KiB but 15,000 dirty pages
//! spends (34 ms at 1 GiB). The projection therefore also scales the pages
//! dirty now by the cheapest time per page any round has shown, and takes
//! whichever of bytes and pages costs more.

use std::time::Duration;

/// What to do when rounds stop paying off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStall {
    /// Pause the guest and send what is left, however long that takes.
    ForceStop,
    /// Give up: the guest keeps running on the source.
    Abort,
}

/// The user's stop criteria.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Longest acceptable pause of the guest.
    pub downtime_target: Duration,
    /// Stop as soon as the projected work set is at most this many bytes.
    pub min_work_set: u64,
    /// Most pre-copy rounds (round 0 included) before `on_stall` applies.
    pub max_rounds: u32,
    /// Rounds without a new smallest work set before `on_stall` applies.
    pub stall_rounds: u32,
    /// What a new smallest work set must improve on the old one, as a
    /// fraction of it, to count as progress: a work set shrinking 1 % per
    /// round is stalled, not converging.
    pub min_improvement: f64,
    /// The switch-over's fixed costs, beyond sending the final round: the
    /// vCPU state, the Complete/Ack and Commit/Outcome exchanges, the
    /// destination's verification and restore. Added to every projected
    /// downtime.
    pub switchover_cost: Duration,
    pub on_stall: OnStall,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            downtime_target: Duration::from_millis(300),
            min_work_set: 256 << 10,
            max_rounds: 30,
            stall_rounds: 5,
            min_improvement: 0.05,
            // Measured here at 4-25 ms (the summary's "until the Ack" less
            // the final round's bytes, plus the Outcome), whatever the guest size.
            switchover_cost: Duration::from_millis(20),
            on_stall: OnStall::ForceStop,
        }
    }
}

/// A final round projected to take less than this is not worth another
/// round to shrink it (about the switch-over's own fixed cost, so below it
/// the pause is mostly that cost).
pub const WORTH_A_ROUND: Duration = Duration::from_millis(5);

/// How much longer than the projected final round the last round must have
/// taken for one more round to pay: the guest dirties memory during the
/// extra round for about the final round's projected time, not the last
/// round's, so its dirty set, and the final round after it, shrinks by
/// about this factor.
pub const SHRINK_FOR_A_ROUND: u32 = 4;

/// The figures of one completed round.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundMetrics {
    pub round: u32,
    pub dirty_pages: u64,
    /// Payload bytes the round had to send (the paper's work set).
    pub work_set_bytes: u64,
    /// Bytes the round put on the wire (headers included).
    pub wire_bytes: u64,
    pub duration: Duration,
}

/// Why pre-copy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Nothing is dirty.
    Clean,
    /// The projected work set is under the byte threshold.
    SmallWorkSet,
    /// The projected downtime fits the target.
    DowntimeFits,
    /// The work set has not shrunk for `stall_rounds` rounds.
    Stalled,
    /// `max_rounds` were run.
    RoundCap,
}

impl StopReason {
    /// True when pre-copy converged (rather than being cut short).
    pub fn converged(self) -> bool {
        matches!(
            self,
            StopReason::Clean | StopReason::SmallWorkSet | StopReason::DowntimeFits
        )
    }

    /// The reason's name for machines (JSON reports, scripts):
    /// `small-work-set`.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Clean => "clean",
            StopReason::SmallWorkSet => "small-work-set",
            StopReason::DowntimeFits => "downtime-fits",
            StopReason::Stalled => "stalled",
            StopReason::RoundCap => "round-cap",
        }
    }
}

/// The reason in words, for people: `the projected downtime fits the target`.
impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Clean => "nothing is dirty",
            StopReason::SmallWorkSet => "the work set is under the threshold",
            StopReason::DowntimeFits => "the projected downtime fits the target",
            StopReason::Stalled => "the work set stopped shrinking",
            StopReason::RoundCap => "the round cap was reached",
        })
    }
}

/// The controller's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Continue,
    StopAndCopy(StopReason),
    Abort(StopReason),
}

impl Decision {
    /// The verdict's name for machines: `continue`, `stop-and-copy`, `abort`.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Continue => "continue",
            Decision::StopAndCopy(_) => "stop-and-copy",
            Decision::Abort(_) => "abort",
        }
    }

    /// Why pre-copy ends; `None` when it goes on.
    pub fn reason(self) -> Option<StopReason> {
        match self {
            Decision::Continue => None,
            Decision::StopAndCopy(r) | Decision::Abort(r) => Some(r),
        }
    }
}

/// The verdict in words, for people: `stop and copy: the work set is under
/// the threshold`.
impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Continue => f.write_str("another round"),
            Decision::StopAndCopy(r) => write!(f, "stop and copy: {r}"),
            Decision::Abort(r) => write!(f, "give up: {r}"),
        }
    }
}

/// The projection the decision was made on (reported with every round).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Projection {
    pub work_set_bytes: u64,
    pub wire_bytes: u64,
    /// Bytes per second measured over all rounds so far.
    pub rate: f64,
    /// The pages dirty now times the cheapest time per dirty page any round
    /// has shown (its bytes included, so an upper bound on the page work).
    pub page_time: Duration,
    /// The larger of wire bytes ÷ rate and `page_time`, plus the policy's
    /// fixed switch-over cost.
    pub downtime: Duration,
}

/// `secs` seconds as a Duration, capped at 1e9 s (an infinite or absurd
/// projection stays representable).
fn duration(secs: f64) -> Duration {
    Duration::from_secs_f64(secs.min(1e9))
}

/// A page sent whole: its bytes and its record header.
fn whole_page(page_size: u64) -> u64 {
    page_size + crate::protocol::HEADER_LEN as u64
}

/// Projects the next round from `rounds` (non-empty, oldest first) and the
/// pages dirty now; `fixed` is added to its downtime.
pub fn project(
    rounds: &[RoundMetrics],
    dirty_now: u64,
    page_size: u64,
    fixed: Duration,
) -> Projection {
    let Some(last) = rounds.last() else {
        return Projection::default();
    };
    let per_page = |bytes: u64, fallback: u64| {
        if last.dirty_pages == 0 {
            fallback as f64
        } else {
            bytes as f64 / last.dirty_pages as f64
        }
    };
    let work_set_bytes = (dirty_now as f64 * per_page(last.work_set_bytes, page_size)) as u64;
    let wire_bytes = (dirty_now as f64 * per_page(last.wire_bytes, whole_page(page_size))) as u64;
    let (bytes, secs) = rounds.iter().fold((0u64, 0f64), |(b, s), r| {
        (b + r.wire_bytes, s + r.duration.as_secs_f64())
    });
    let rate = if secs > 0.0 && bytes > 0 {
        bytes as f64 / secs
    } else {
        f64::INFINITY
    };
    let secs_per_page = rounds
        .iter()
        .filter(|r| r.dirty_pages > 0)
        .map(|r| r.duration.as_secs_f64() / r.dirty_pages as f64)
        .fold(f64::INFINITY, f64::min);
    let page_time = if secs_per_page.is_finite() {
        duration(dirty_now as f64 * secs_per_page)
    } else {
        Duration::ZERO
    };
    let downtime = duration(wire_bytes as f64 / rate).max(page_time) + fixed;
    Projection {
        work_set_bytes,
        wire_bytes,
        rate,
        page_time,
        downtime,
    }
}

/// Decides after a round. Criteria, in the order they are checked:
///
/// 1. `Clean`: no page is dirty now, stop and copy (only state remains).
/// 2. `SmallWorkSet`: projected work set ≤ `min_work_set`, stop and copy.
/// 3. `DowntimeFits`: the larger of projected wire bytes ÷ measured rate
///    and the projected page time, plus the fixed `switchover_cost`,
///    ≤ `downtime_target`, stop and copy. The rate is total wire bytes over
///    total round time, so one quick small round does not inflate it.
///
///    Before stopping under 2 or 3, one more round runs when it pays: the
///    last round took at least [`SHRINK_FOR_A_ROUND`] times the projected
///    final round (a long round 0 leaves thousands of dirty pages that a
///    round as short as the final one would mostly not dirty again), that
///    final round would take at least [`WORTH_A_ROUND`], right after
///    round 0 the pages dirty now would fit the target even sent whole (so
///    a projection made low by a round 0 of zero pages cannot start a
///    round that never ends; later rounds measured re-dirtied pages, whose
///    bytes per page the projection then uses), and the round cap leaves
///    room for it and the final round. The target
///    is met either way; the extra round makes the pause shorter than it.
/// 4. `RoundCap`: `max_rounds` rounds done, apply `on_stall`.
/// 5. `Stalled`: among rounds after round 0 (which sends all memory and says
///    nothing about the dirty rate), none of the last `stall_rounds` set a new
///    smallest work set by at least `min_improvement` of the old one, apply
///    `on_stall`.
pub fn decide(
    policy: &Policy,
    rounds: &[RoundMetrics],
    dirty_now: u64,
    page_size: u64,
) -> (Decision, Projection) {
    let p = project(rounds, dirty_now, page_size, policy.switchover_cost);
    let stop = |reason| (Decision::StopAndCopy(reason), p);
    if dirty_now == 0 {
        return stop(StopReason::Clean);
    }
    let reason = if p.work_set_bytes <= policy.min_work_set {
        Some(StopReason::SmallWorkSet)
    } else if p.downtime <= policy.downtime_target {
        Some(StopReason::DowntimeFits)
    } else {
        None
    };
    if let Some(reason) = reason {
        let last = rounds.last().map_or(Duration::ZERO, |r| r.duration);
        let final_round = p.downtime.saturating_sub(policy.switchover_cost);
        // The extra round must be safe even if the projection is low: a
        // round 0 of mostly zero pages sent a few bytes per page, so after
        // it, what is dirty now must fit the target sent as whole pages.
        // A later round measured pages that were dirtied again, like the
        // ones dirty now: its bytes per page are the projection's.
        let whole = duration(dirty_now as f64 * whole_page(page_size) as f64 / p.rate);
        let trusted = rounds.len() > 1 || whole + policy.switchover_cost <= policy.downtime_target;
        let pays = final_round >= WORTH_A_ROUND
            && last >= final_round * SHRINK_FOR_A_ROUND
            && trusted
            && rounds.len() + 2 <= policy.max_rounds as usize;
        return if pays {
            (Decision::Continue, p)
        } else {
            stop(reason)
        };
    }
    let give_up = |reason| match policy.on_stall {
        OnStall::ForceStop => (Decision::StopAndCopy(reason), p),
        OnStall::Abort => (Decision::Abort(reason), p),
    };
    if rounds.len() as u32 >= policy.max_rounds {
        return give_up(StopReason::RoundCap);
    }
    let k = policy.stall_rounds.max(1) as usize;
    let later = rounds.get(1..).unwrap_or(&[]);
    if later.len() > k {
        let (before, recent) = later.split_at(later.len() - k);
        let best_before = before
            .iter()
            .map(|r| r.work_set_bytes)
            .min()
            .unwrap_or(u64::MAX);
        let bar = best_before as f64 * (1.0 - policy.min_improvement.clamp(0.0, 1.0));
        if recent.iter().all(|r| r.work_set_bytes as f64 > bar) {
            return give_up(StopReason::Stalled);
        }
    }
    (Decision::Continue, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(round: u32, dirty_pages: u64, work: u64, ms: u64) -> RoundMetrics {
        RoundMetrics {
            round,
            dirty_pages,
            work_set_bytes: work,
            wire_bytes: work + dirty_pages * 16,
            duration: Duration::from_millis(ms),
        }
    }

    fn policy() -> Policy {
        Policy {
            downtime_target: Duration::from_millis(10),
            min_work_set: 1000,
            max_rounds: 10,
            stall_rounds: 2,
            min_improvement: 0.0,
            switchover_cost: Duration::ZERO,
            on_stall: OnStall::Abort,
        }
    }

    #[test]
    fn each_criterion_fires() {
        let p = policy();
        // 100 MB in 1 s: 100 MB/s.
        let r0 = [round(0, 25_000, 100_000_000, 1000)];
        assert_eq!(
            decide(&p, &r0, 0, 4096).0,
            Decision::StopAndCopy(StopReason::Clean)
        );
        // 4000 bytes per page × 10 pages = 40 KB > 1000 B; 40 KB / 100 MB/s = 0.4 ms.
        assert_eq!(
            decide(&p, &r0, 10, 4096).0,
            Decision::StopAndCopy(StopReason::DowntimeFits)
        );
        // 1 page: 4000 B work set, still > 1000.
        let small = [
            round(0, 25_000, 100_000_000, 1000),
            round(1, 1000, 8000, 10),
        ];
        assert_eq!(
            decide(&p, &small, 100, 4096).0,
            Decision::StopAndCopy(StopReason::SmallWorkSet)
        );
        // 10k dirty pages of 4 KB = 40 MB → 400 ms > 10 ms: continue.
        assert_eq!(decide(&p, &r0, 10_000, 4096).0, Decision::Continue);
        let capped: Vec<_> = (0..10)
            .map(|i| round(i, 25_000, 100_000_000 - u64::from(i), 1000))
            .collect();
        assert_eq!(
            decide(&p, &capped, 10_000, 4096).0,
            Decision::Abort(StopReason::RoundCap)
        );
    }

    #[test]
    fn stall_needs_k_rounds_without_a_new_minimum() {
        let p = policy();
        let mut rs = vec![
            round(0, 25_000, 100_000_000, 1000),
            round(1, 10_000, 40_000_000, 400),
        ];
        rs.push(round(2, 9_000, 36_000_000, 400));
        assert_eq!(
            decide(&p, &rs, 10_000, 4096).0,
            Decision::Continue,
            "still shrinking"
        );
        rs.push(round(3, 9_500, 38_000_000, 400));
        rs.push(round(4, 9_500, 38_000_000, 400));
        assert_eq!(
            decide(&p, &rs, 10_000, 4096).0,
            Decision::Abort(StopReason::Stalled)
        );
        let force = Policy {
            on_stall: OnStall::ForceStop,
            ..p
        };
        assert_eq!(
            decide(&force, &rs, 10_000, 4096).0,
            Decision::StopAndCopy(StopReason::Stalled)
        );
    }

    #[test]
    fn a_work_set_shrinking_by_less_than_the_minimum_improvement_stalls() {
        let p = Policy {
            min_improvement: 0.05,
            stall_rounds: 3,
            max_rounds: 30,
            ..policy()
        };
        // Each round 1 % smaller than the one before: a new minimum every
        // round, but never by 5 %.
        let mut rs = vec![round(0, 25_000, 100_000_000, 1000)];
        let mut work = 40_000_000f64;
        for i in 1..=4 {
            rs.push(round(i, 10_000, work as u64, 400));
            work *= 0.99;
        }
        assert_eq!(
            decide(&p, &rs, 10_000, 4096).0,
            Decision::Abort(StopReason::Stalled)
        );
        // Without the minimum, the same rounds count as progress.
        let lax = Policy {
            min_improvement: 0.0,
            ..p
        };
        assert_eq!(decide(&lax, &rs, 10_000, 4096).0, Decision::Continue);
        // Shrinking 10 % per round is progress.
        let mut rs = vec![round(0, 25_000, 100_000_000, 1000)];
        let mut work = 40_000_000f64;
        for i in 1..=4 {
            rs.push(round(i, 10_000, work as u64, 400));
            work *= 0.9;
        }
        assert_eq!(decide(&p, &rs, 10_000, 4096).0, Decision::Continue);
    }

    #[test]
    fn the_fixed_switch_over_cost_counts_against_the_target() {
        // 10 dirty pages of 4000 B at 100 MB/s: 0.4 ms of bytes.
        let r0 = [round(0, 25_000, 100_000_000, 1000)];
        let fits = Policy {
            min_work_set: 0,
            ..policy()
        };
        assert_eq!(
            decide(&fits, &r0, 10, 4096).0,
            Decision::StopAndCopy(StopReason::DowntimeFits)
        );
        // A 15 ms switch-over does not fit a 10 ms target, however few bytes.
        let dear = Policy {
            switchover_cost: Duration::from_millis(15),
            ..fits
        };
        let (d, proj) = decide(&dear, &r0, 10, 4096);
        assert_eq!(d, Decision::Continue);
        assert!(proj.downtime >= Duration::from_millis(15), "{proj:?}");
    }

    #[test]
    fn after_a_long_round_a_final_round_worth_shrinking_gets_one_more_round() {
        let p = Policy {
            downtime_target: Duration::from_millis(300),
            min_work_set: 256 << 10,
            ..policy()
        };
        // The 1 GiB run: round 0 sent 1 GiB in 2.4 s; 15,611 pages are
        // dirty, a 143 ms final round by round 0's bytes and time per page:
        // it fits 300 ms, but a round 17x shorter than round 0 shrinks it.
        let r0 = [round(0, 262_144, 1 << 30, 2394)];
        let (d, proj) = decide(&p, &r0, 15_611, 4096);
        assert_eq!(d, Decision::Continue, "{proj:?}");
        assert!(proj.page_time > Duration::from_millis(100), "{proj:?}");
        // That round took 40 ms for its 15,611 pages (2.6 us each) and
        // left 1,500 dirty: 3.8 ms projected, under WORTH_A_ROUND: stop.
        let r1 = [r0[0], round(1, 15_611, 75_000, 40)];
        assert_eq!(
            decide(&p, &r1, 1_500, 4096).0,
            Decision::StopAndCopy(StopReason::SmallWorkSet)
        );
        // Had it left 10,000 (26 ms projected) after a 40 ms round, another
        // round would not shrink it by SHRINK_FOR_A_ROUND: stop.
        assert_eq!(
            decide(&p, &r1, 10_000, 4096).0,
            Decision::StopAndCopy(StopReason::SmallWorkSet)
        );
        // A round 0 of zero pages (a few bytes each, 0.3 s for 1 GiB) makes
        // 15,611 dirty pages look cheap; sent whole at its rate they would
        // not fit: no extra round.
        let fresh = [round(0, 262_144, 2_000_000, 300)];
        assert_eq!(
            decide(&p, &fresh, 15_611, 4096).0,
            Decision::StopAndCopy(StopReason::SmallWorkSet)
        );
        // The 4 GiB run: round 1 took 1.2 s for 824,423 pages of ~31 bytes
        // and left 107,680 dirty, a ~160 ms final round by its time per
        // page. Sent whole at the link's rate (~250 MB/s) they would not fit
        // 300 ms, but round 1's bytes per page were measured on pages
        // dirtied again, as these are: one more round.
        let r4g = [
            round(0, 1 << 20, 4 << 30, 16_136),
            round(1, 824_423, 25_800_000, 1_246),
        ];
        let (d, proj) = decide(&p, &r4g, 107_680, 4096);
        assert_eq!(d, Decision::Continue, "{proj:?}");
        // No room under the round cap for the extra and the final round:
        // stop rather than end at the cap, not converged.
        let tight = Policy { max_rounds: 2, ..p };
        assert_eq!(
            decide(&tight, &r0, 15_611, 4096).0,
            Decision::StopAndCopy(StopReason::DowntimeFits)
        );
    }

    #[test]
    fn page_work_counts_against_the_target_when_it_costs_more_than_bytes() {
        let p = Policy {
            min_work_set: 0,
            ..policy()
        };
        // Round 0: 1 GB in 1 s, 4 us per page. Round 1: 16 bytes per page.
        let rs = [
            round(0, 250_000, 1_000_000_000, 1000),
            round(1, 10_000, 160_000, 100),
        ];
        // 5,000 pages of 16 bytes are 0.2 ms of bytes but 20 ms of page
        // work: over the 10 ms target.
        let (d, proj) = decide(&p, &rs, 5_000, 4096);
        assert_eq!(proj.page_time, Duration::from_millis(20));
        assert!(proj.downtime >= Duration::from_millis(20), "{proj:?}");
        assert_eq!(d, Decision::Continue);
    }

    #[test]
    fn decisions_read_as_words() {
        let d = Decision::StopAndCopy(StopReason::RoundCap);
        assert_eq!(d.to_string(), "stop and copy: the round cap was reached");
        assert_eq!(
            (d.name(), d.reason()),
            ("stop-and-copy", Some(StopReason::RoundCap))
        );
        assert_eq!(StopReason::SmallWorkSet.name(), "small-work-set");
        assert_eq!(Decision::Continue.to_string(), "another round");
        assert_eq!(Decision::Abort(StopReason::Stalled).name(), "abort");
    }

    #[test]
    fn segment_mode_projects_bytes_not_pages() {
        let p = Policy {
            min_work_set: 0,
            downtime_target: Duration::from_millis(1),
            ..policy()
        };
        // The same 10k dirty pages, but only 16 bytes each were dirty last round.
        let seg = [
            round(0, 25_000, 100_000_000, 1000),
            round(1, 10_000, 160_000, 10),
        ];
        let (_, proj) = decide(&p, &seg, 10_000, 4096);
        assert_eq!(proj.work_set_bytes, 160_000);
        let page = [
            round(0, 25_000, 100_000_000, 1000),
            round(1, 10_000, 40_960_000, 400),
        ];
        let (_, proj_page) = decide(&p, &page, 10_000, 4096);
        assert!(proj_page.work_set_bytes > 100 * proj.work_set_bytes);
    }
}
