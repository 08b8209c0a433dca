//! Counters of what one platform's consumer did. Cheap (relaxed atomics),
//! read by the demo, the benchmarks and the tests; the operations issue
//! exports them as Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters (see each field).
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A copy of [`Stats`] at one instant.
        #[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
        pub struct Snapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Stats {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Entries read from the stream (new or own pending).
    read,
    /// Entries taken over from other consumers by the recovery sweep.
    claimed,
    /// Actions the platform accepted.
    delivered,
    /// Failed tries that will be retried.
    retries,
    /// Entries moved to the dead-letter stream.
    dead_lettered,
    /// Entries found already finished (acknowledged) and skipped.
    duplicates_skipped,
    /// Entries whose message_key already held a platform id, skipped.
    cached_skipped,
    /// Typing/presence superseded by a newer one, not sent.
    superseded,
    /// Typing/presence past `expires_ms`, not sent.
    expired,
    /// Actions the adapter does not support, acknowledged unsent.
    unsupported,
    /// Sequence numbers given up on after `gap_timeout_ms`.
    gaps_skipped,
    /// Entries delivered after their gap had been skipped.
    late,
    /// Entries re-sent although an earlier send may have reached the platform.
    unknown_outcome_resends,
    /// Channel locks lost while held (renewal or commit refused).
    locks_lost,
    /// Entries dropped from memory because another consumer now owns them.
    moved,
    /// RPC requests answered.
    rpc_answered,
    /// RPC requests dropped past their deadline.
    rpc_expired,
    /// Ids pending in the group but gone from the stream.
    lost_in_stream,
    /// Queued edits of one target superseded by a newer one, not sent.
    coalesced,
    /// Entries handed to the peer gateway that owns their channel.
    handed_off,
    /// Channels taken (first take or takeover from a dead owner).
    channels_taken,
    /// Gateways found dead by this one.
    nodes_found_dead,
    /// Batched commits written.
    commits,
    /// Entries pending for this gateway that it did not hold (a lost read
    /// or hand-over reply), taken in again by the reconciliation.
    reclaimed,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
