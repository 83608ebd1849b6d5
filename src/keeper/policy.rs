//! The keeper's decisions, free of processes and sockets so unit tests drive every case: what
//! to do when a mount process exits, how long to wait before its successor, and who owns a
//! volume when a hand-over connection drops at each step.

use std::time::Duration;

/// Delays before successive restarts of a volume that keeps crashing. The first successor starts
/// at once (a single crash costs the pods only the successor's start); repeated crashes wait
/// longer so a process failing at startup does not spin.
const BACKOFF: [Duration; 4] = [Duration::ZERO, Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(4)];
/// The longest delay between restarts: pods are blocked meanwhile, so it stays short, and with
/// the successor's start (about 0.1 s) within the 5 s a pod may wait for a volume to serve again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// A process that served this long counts as healthy: its crash restarts at once again.
pub const STABLE_UPTIME: Duration = Duration::from_secs(60);

/// Why a volume's supervision continues or ends when its process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Keep a mount process serving the volume.
    Serve,
    /// The node service asked to stop the volume.
    Stop,
    /// A newer keeper is taking the volume over.
    HandOver,
}

/// What to do after a mount process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Start a successor (`--takeover`) on the same descriptor after `delay`.
    Restart { delay: Duration },
    /// The mountpoint is no longer mounted (unmounted from outside): forget the volume and close
    /// the descriptor.
    Drop,
    /// Someone asked for the exit (stop or hand-over): they take it from here.
    Release,
}

/// Consecutive crashes of one volume, for the backoff.
#[derive(Debug, Clone, Default)]
pub struct CrashHistory {
    consecutive: usize,
}

impl CrashHistory {
    /// Records an exit (or a failed start) of a process that ran for `uptime` and returns how
    /// long to wait before the next start.
    pub fn record(&mut self, uptime: Duration) -> Duration {
        if uptime >= STABLE_UPTIME {
            self.consecutive = 0;
        }
        let delay = BACKOFF.get(self.consecutive).copied().unwrap_or(MAX_BACKOFF).min(MAX_BACKOFF);
        self.consecutive = self.consecutive.saturating_add(1);
        delay
    }
}

/// Decides what follows the exit of a volume's mount process. Any exit not asked for (a signal,
/// a non-zero status, or status 0 while the mount is still there: only we hold its descriptor
/// then) starts a successor while the mountpoint is still mounted.
pub fn on_exit(intent: Intent, still_mounted: bool, uptime: Duration, history: &mut CrashHistory) -> ExitAction {
    match intent {
        Intent::Stop | Intent::HandOver => ExitAction::Release,
        Intent::Serve if !still_mounted => ExitAction::Drop,
        Intent::Serve => ExitAction::Restart { delay: history.record(uptime) },
    }
}

/// How far the old keeper got with handing one volume over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverStep {
    /// The spec and descriptor were sent; the mount process still serves.
    Offered,
    /// The mount process was told to hand over (`SIGUSR2`) and has exited, or is exiting.
    Released,
    /// The newer keeper confirmed that its successor serves.
    Confirmed,
}

/// What the old keeper does with a volume when the hand-over of it ends at `step` without a
/// confirmation (connection dropped, or the newer keeper declined), or with one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerAction {
    /// The mount process still serves: keep supervising it.
    KeepServing,
    /// The mount process is gone: start a successor (`--takeover`) on our descriptor.
    StartSuccessor,
    /// The newer keeper owns the volume: close our descriptor and forget it.
    Forget,
}

/// The old keeper's side of a hand-over ending at `step`.
pub fn old_owner_after(step: HandoverStep) -> OwnerAction {
    match step {
        HandoverStep::Offered => OwnerAction::KeepServing,
        HandoverStep::Released => OwnerAction::StartSuccessor,
        HandoverStep::Confirmed => OwnerAction::Forget,
    }
}

/// How far the newer keeper got with taking one volume over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeoverStep {
    /// It holds the offered descriptor; the old process may still serve.
    Received,
    /// The old keeper reported its process exited.
    OldExited,
    /// Its own successor serves and it sent the confirmation.
    Confirmed,
}

/// What the newer keeper does with a volume when the connection to the old keeper drops at
/// `step`; `old_answers` says whether the old keeper still answers on its socket (it is alive
/// and keeps the volume by [`old_owner_after`]) or not (it is gone, and its processes with it).
pub fn new_owner_after_drop(step: TakeoverStep, old_answers: bool) -> OwnerAction {
    match (step, old_answers) {
        (TakeoverStep::Confirmed, _) => OwnerAction::KeepServing,
        (TakeoverStep::Received | TakeoverStep::OldExited, true) => OwnerAction::Forget,
        (TakeoverStep::Received | TakeoverStep::OldExited, false) => OwnerAction::StartSuccessor,
    }
}

#[cfg(test)]
mod tests {
    use test_case::test_case;

    use super::*;

    const SHORT: Duration = Duration::from_secs(3);

    #[test]
    fn repeated_crashes_back_off_up_to_the_cap_and_a_stable_run_resets() {
        let mut h = CrashHistory::default();
        let delays: Vec<u64> = (0..7).map(|_| h.record(SHORT).as_secs()).collect();
        assert_eq!(delays, [0, 1, 2, 4, 4, 4, 4]);
        assert_eq!(h.record(STABLE_UPTIME), Duration::ZERO, "a minute of service resets the backoff");
        assert_eq!(h.record(SHORT), Duration::from_secs(1));
    }

    #[test_case(Intent::Serve, true => ExitAction::Restart { delay: Duration::ZERO }; "crash while mounted restarts at once")]
    #[test_case(Intent::Serve, false => ExitAction::Drop; "unmounted from outside drops the volume")]
    #[test_case(Intent::Stop, true => ExitAction::Release; "asked to stop")]
    #[test_case(Intent::HandOver, true => ExitAction::Release; "handing over")]
    #[test_case(Intent::HandOver, false => ExitAction::Release; "handing over, unmounted meanwhile")]
    fn exits(intent: Intent, mounted: bool) -> ExitAction {
        on_exit(intent, mounted, SHORT, &mut CrashHistory::default())
    }

    #[test]
    fn exits_not_asked_for_count_towards_the_backoff_only_when_restarted() {
        let mut h = CrashHistory::default();
        assert_eq!(on_exit(Intent::Stop, true, SHORT, &mut h), ExitAction::Release);
        assert_eq!(on_exit(Intent::Serve, true, SHORT, &mut h), ExitAction::Restart { delay: Duration::ZERO });
        assert_eq!(on_exit(Intent::Serve, true, SHORT, &mut h), ExitAction::Restart { delay: Duration::from_secs(1) });
    }

    #[test_case(HandoverStep::Offered => OwnerAction::KeepServing; "dropped after the offer")]
    #[test_case(HandoverStep::Released => OwnerAction::StartSuccessor; "dropped after the process exited")]
    #[test_case(HandoverStep::Confirmed => OwnerAction::Forget; "confirmed")]
    fn old_keeper(step: HandoverStep) -> OwnerAction {
        old_owner_after(step)
    }

    #[test_case(TakeoverStep::Received, true => OwnerAction::Forget; "old alive after the offer")]
    #[test_case(TakeoverStep::OldExited, true => OwnerAction::Forget; "old alive after the exit")]
    #[test_case(TakeoverStep::Received, false => OwnerAction::StartSuccessor; "old gone after the offer")]
    #[test_case(TakeoverStep::OldExited, false => OwnerAction::StartSuccessor; "old gone after the exit")]
    #[test_case(TakeoverStep::Confirmed, true => OwnerAction::KeepServing; "confirmed, old alive")]
    #[test_case(TakeoverStep::Confirmed, false => OwnerAction::KeepServing; "confirmed, old gone")]
    fn new_keeper(step: TakeoverStep, old_answers: bool) -> OwnerAction {
        new_owner_after_drop(step, old_answers)
    }

    #[test]
    fn exactly_one_keeper_owns_a_volume_whatever_step_the_connection_drops_at() {
        // The old keeper is alive whenever it can act on a drop; the new keeper sees it answer.
        for (old_step, new_step) in [
            (HandoverStep::Offered, TakeoverStep::Received),
            (HandoverStep::Released, TakeoverStep::OldExited),
            (HandoverStep::Released, TakeoverStep::Received),
        ] {
            let old = old_owner_after(old_step);
            let new = new_owner_after_drop(new_step, true);
            let owners = [old, new].iter().filter(|a| **a != OwnerAction::Forget).count();
            assert_eq!(owners, 1, "{old_step:?}/{new_step:?}: {old:?} {new:?}");
        }
        // Confirmed: the old keeper read the confirmation and forgets; the new one keeps it.
        assert_eq!(old_owner_after(HandoverStep::Confirmed), OwnerAction::Forget);
        assert_eq!(new_owner_after_drop(TakeoverStep::Confirmed, true), OwnerAction::KeepServing);
    }
}
