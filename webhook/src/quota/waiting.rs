//! How many refused clients are already waiting for a count quota to free up.
//!
//! client-go sleeps exactly the `Retry-After` it is given and retries the same call, so if
//! every refused client were told "one slot frees in 40 ms, come back in 1 s", all of them would
//! come back each second and all but a few be refused again: a burst of Jobs against a full
//! pending cap cost 1.5-2.6 refused creations per admitted pod that way (bench/burst.md). Counting
//! the clients already told to come back lets the next one be sent to the back of the line:
//! its wait covers the slots the earlier ones will take, so retries arrive at about the rate
//! slots free up.

use std::time::Duration;

/// The line is kept per whole second of the time each client was told to come back; waits
/// longer than this are counted as this long (such clients are at the back of the line anyway).
const HORIZON_SECS: u64 = 128;

/// Clients refused for a count quota whose retry time is still ahead, by the second it is due.
#[derive(Debug, Clone)]
pub struct WaitingLine {
    due: [u32; HORIZON_SECS as usize],
    /// The second up to which due clients have been taken off the line.
    cleared_to: u64,
    waiting: u32,
}

impl Default for WaitingLine {
    fn default() -> Self {
        WaitingLine {
            due: [0; HORIZON_SECS as usize],
            cleared_to: 0,
            waiting: 0,
        }
    }
}

impl WaitingLine {
    /// Clients still waiting at `now_secs` (seconds on the ledger's clock).
    pub fn waiting(&mut self, now_secs: u64) -> u32 {
        self.clear_due(now_secs);
        self.waiting
    }

    /// Records a client refused at `now_secs` and told to come back after `wait`.
    pub fn join(&mut self, now_secs: u64, wait: Duration) {
        self.clear_due(now_secs);
        let after = wait
            .as_secs_f64()
            .ceil()
            .clamp(1.0, (HORIZON_SECS - 1) as f64) as u64;
        let slot = &mut self.due[((now_secs + after) % HORIZON_SECS) as usize];
        *slot = slot.saturating_add(1);
        self.waiting = self.waiting.saturating_add(1);
    }

    fn clear_due(&mut self, now_secs: u64) {
        if now_secs <= self.cleared_to {
            return;
        }
        if now_secs - self.cleared_to >= HORIZON_SECS {
            // Everyone on the line is due by now.
            self.due = [0; HORIZON_SECS as usize];
            self.waiting = 0;
        } else {
            for second in self.cleared_to + 1..=now_secs {
                let slot = &mut self.due[(second % HORIZON_SECS) as usize];
                self.waiting = self.waiting.saturating_sub(*slot);
                *slot = 0;
            }
        }
        self.cleared_to = now_secs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_leave_the_line_when_their_retry_is_due() {
        let mut line = WaitingLine::default();
        line.join(100, Duration::from_millis(300)); // due at 101
        line.join(100, Duration::from_secs(3)); // due at 103
        assert_eq!(line.waiting(100), 2);
        line.join(101, Duration::from_secs(2)); // due at 103
        assert_eq!(
            line.waiting(101),
            2,
            "the first is due: gone; the third joined"
        );
        assert_eq!(line.waiting(102), 2);
        assert_eq!(line.waiting(103), 0);
    }

    #[test]
    fn a_long_gap_empties_the_line_and_long_waits_stay_within_the_horizon() {
        let mut line = WaitingLine::default();
        line.join(10, Duration::from_secs(3600));
        assert_eq!(line.waiting(10 + HORIZON_SECS - 2), 1);
        assert_eq!(line.waiting(10 + HORIZON_SECS - 1), 0);
        line.join(500, Duration::from_secs(5));
        line.join(500, Duration::from_secs(6));
        assert_eq!(line.waiting(10_000), 0);
        line.join(10_000, Duration::from_secs(1));
        assert_eq!(
            line.waiting(10_000),
            1,
            "buckets of the old line were cleared"
        );
        assert_eq!(line.waiting(10_001), 0);
    }

    #[test]
    fn time_going_backwards_changes_nothing() {
        let mut line = WaitingLine::default();
        line.join(50, Duration::from_secs(4));
        assert_eq!(line.waiting(40), 1);
        assert_eq!(line.waiting(53), 1);
        assert_eq!(line.waiting(54), 0);
    }
}
