//! The gateway's send budget: Discord closes a connection (4008) that sends
//! more than 120 events in 60 s. Counted locally per connection; presence
//! updates leave a reserve for heartbeats.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Gateway events one connection may send per [`SEND_WINDOW`].
pub const SEND_LIMIT: usize = 120;
pub const SEND_WINDOW: Duration = Duration::from_secs(60);
/// Sends a presence update leaves free for heartbeats and the like.
pub const PRESENCE_RESERVE: usize = 10;

/// The gateway's send limit, counted locally per connection.
#[derive(Debug, Default)]
pub struct Budget {
    sent: VecDeque<Instant>,
}

impl Budget {
    pub fn record(&mut self, at: Instant) {
        self.sent.push_back(at);
    }

    /// When a send that leaves `reserve` of the budget free may go.
    pub fn next_slot(&mut self, now: Instant, reserve: usize) -> Instant {
        while self.sent.front().is_some_and(|t| *t + SEND_WINDOW <= now) {
            self.sent.pop_front();
        }
        let allowed = SEND_LIMIT.saturating_sub(reserve).max(1);
        if self.sent.len() < allowed {
            now
        } else {
            self.sent[self.sent.len() - allowed] + SEND_WINDOW
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_budget_delays_when_near_the_limit() {
        let t0 = Instant::now();
        let mut b = Budget::default();
        for i in 0..(SEND_LIMIT - PRESENCE_RESERVE) as u64 {
            assert_eq!(
                b.next_slot(t0, PRESENCE_RESERVE),
                t0,
                "send {i} may go at once"
            );
            b.record(t0 + Duration::from_millis(i));
        }
        // Full (but for the reserve): the next presence waits for the oldest to age out.
        assert_eq!(b.next_slot(t0, PRESENCE_RESERVE), t0 + SEND_WINDOW);
        // Heartbeats (no reserve) still have room.
        assert_eq!(b.next_slot(t0, 0), t0);
        // A minute later the oldest has left the window.
        let later = t0 + SEND_WINDOW;
        assert_eq!(b.next_slot(later, PRESENCE_RESERVE), later);
    }
}
