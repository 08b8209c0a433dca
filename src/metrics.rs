//! Every Prometheus metric Stargazer exports, in one place: names, help texts,
//! label sets, and one small function per event that the engine calls next to
//! its [`crate::stats::Stats`] counters. `docs/metrics.md` lists the same table.
//!
//! Crate choice: `metrics` + `metrics-exporter-prometheus` (no default
//! features) — call sites record through macros without a registry threaded
//! through the lanes, and with no recorder installed (benchmarks, tests that
//! do not serve HTTP) each call is a no-op.
//!
//! [`install`] puts the recorder in place once per process and returns the
//! handle that `/metrics` renders.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Label keys.
pub const PLATFORM: &str = "platform";
pub const TYPE: &str = "type";
pub const OUTCOME: &str = "outcome";
pub const KIND: &str = "kind";
pub const REASON: &str = "reason";
pub const SCOPE: &str = "scope";
pub const RESULT: &str = "result";
pub const SHARD: &str = "shard";

/// One metric: name, type, labels, meaning (rendered into `docs/metrics.md`).
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub kind: MetricKind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

macro_rules! defs {
    ($( $id:ident = $name:literal, $kind:ident, [$($label:expr),*], $help:literal; )*) => {
        $( pub const $id: Def = Def {
            name: $name,
            kind: MetricKind::$kind,
            labels: &[$($label),*],
            help: $help,
        }; )*
        /// Every metric, in documentation order.
        pub const ALL: &[Def] = &[$($id),*];
    };
}

defs! {
    DELIVERIES = "stargazer_deliveries_total", Counter, [PLATFORM, TYPE, OUTCOME],
        "Entries finished, by envelope type (`invalid` when it did not parse) and outcome: delivered, dead_lettered or skipped.";
    RETRIES = "stargazer_retries_total", Counter, [PLATFORM],
        "Failed delivery tries that will be retried (backoff or retry-after).";
    DEAD_LETTERS = "stargazer_dead_letters_total", Counter, [PLATFORM, KIND],
        "Entries moved to the dead-letter stream, by error_kind.";
    ADAPTER_LATENCY = "stargazer_adapter_latency_seconds", Histogram, [PLATFORM],
        "Time one adapter call (one delivery try) took, successful or not.";
    IN_FLIGHT = "stargazer_in_flight", Gauge, [PLATFORM],
        "Entries this gateway holds in memory (read, queued or being sent).";
    ACTIVE_LANES = "stargazer_active_lanes", Gauge, [PLATFORM],
        "Channel lanes running on this gateway.";
    PENDING = "stargazer_pending", Gauge, [PLATFORM],
        "Entries read by some gateway and not yet acknowledged (group-wide).";
    LAG = "stargazer_lag", Gauge, [PLATFORM],
        "Entries in the stream not yet read by any gateway (group-wide; absent when Redis cannot tell).";
    OLDEST_PENDING_AGE = "stargazer_oldest_pending_age_seconds", Gauge, [PLATFORM],
        "Age (since publication) of the oldest pending entry; 0 when nothing is pending.";
    DLQ_LENGTH = "stargazer_dead_letter_stream_length", Gauge, [PLATFORM],
        "Entries in the dead-letter stream.";
    DLQ_AT_CAP = "stargazer_dead_letter_stream_at_cap", Gauge, [PLATFORM],
        "1 while the dead-letter stream has reached `dlq_maxlen` (its oldest entries are being dropped), else 0.";
    GAPS_SKIPPED = "stargazer_order_gaps_skipped_total", Counter, [PLATFORM],
        "Missing sequence numbers given up on after gap_timeout_ms.";
    UNKNOWN_OUTCOME_RESENDS = "stargazer_unknown_outcome_resends_total", Counter, [PLATFORM],
        "Entries re-sent although an earlier send may have reached the platform.";
    LOCK_RENEW_FAILURES = "stargazer_lock_renew_failures_total", Counter, [PLATFORM],
        "Heartbeats of this gateway that failed or timed out (its node lease is renewed by them; sends pause once it runs out).";
    LOCKS_LOST = "stargazer_locks_lost_total", Counter, [PLATFORM],
        "Times this gateway found itself no longer registered (declared dead by its peers, or replaced) and started over as a new instance.";
    CIRCUIT_OPEN = "stargazer_circuit_open", Gauge, [PLATFORM],
        "1 while the platform refuses the credential and its sends are stopped (entries stay pending), else 0.";
    CIRCUIT_TRIPS = "stargazer_circuit_trips_total", Counter, [PLATFORM],
        "Times the platform's circuit opened because a send met a refused credential.";
    TRIMMED = "stargazer_trimmed_entries_total", Counter, [PLATFORM],
        "Acknowledged entries removed from the outbound stream by the trimmer.";
    DISCORD_WAITS = "stargazer_discord_rate_limit_waits_total", Counter, [PLATFORM, REASON],
        "Discord requests held back by the shared rate limiter, by reason: bucket, global, global_429 or invalid_requests.";
    DISCORD_429S = "stargazer_discord_429s_total", Counter, [PLATFORM, SCOPE],
        "429 answers from Discord, by X-RateLimit-Scope (user, global, shared; route when absent).";
    DISCORD_INVALID = "stargazer_discord_invalid_requests_total", Counter, [PLATFORM],
        "Discord answers that count against its invalid-request limit (401, 403, 429 except scope shared).";
    DISCORD_UNKNOWN = "stargazer_discord_unknown_outcomes_total", Counter, [PLATFORM, RESULT],
        "Discord create-message resends whose earlier try may have landed, by result: reconciled (the gateway session saw the original; not resent), nonce_window (resent inside Discord's nonce de-duplication window) or unverified (resent past it with no record: may duplicate).";
    DISCORD_SESSION_EVENTS = "stargazer_discord_gateway_events_total", Counter, [PLATFORM, KIND],
        "Discord gateway session events, by kind: ready, resumed, reconnect, invalid_session, zombie, published.";
    DISCORD_SHARD_HELD = "stargazer_discord_shard_held", Gauge, [PLATFORM, SHARD],
        "1 for each Discord gateway shard this gateway holds (runs the websocket of), 0 for the others; across a fleet every shard shows 1 on exactly one gateway.";
    DISCORD_SHARD_COUNT = "stargazer_discord_shards", Gauge, [PLATFORM],
        "The Discord shard count in force (`shards`, or Discord's recommendation from GET /gateway/bot; raised by a close 4011).";
    MATRIX_SYNC_HOLDER = "stargazer_matrix_sync_holder", Gauge, [PLATFORM],
        "1 while this gateway holds the Matrix sync lease (runs the platform's /sync), else 0; exactly one gateway of a fleet shows 1.";
    MATRIX_GAPS = "stargazer_matrix_gaps_total", Counter, [PLATFORM, RESULT],
        "Limited Matrix timelines (events missed between two syncs), by result: filled (backfilled with /messages) or unfilled (a `gap` inbound event was published).";
    MATRIX_JOINS = "stargazer_matrix_joins_total", Counter, [PLATFORM, RESULT],
        "Auto-join attempts of invited Matrix rooms, by result: joined, retry (failed for now; tried again with backoff) or refused (for good).";
    MATRIX_DUPLICATE_REACTIONS = "stargazer_matrix_duplicate_reactions_total", Counter, [PLATFORM],
        "Matrix reactions the server already had (M_DUPLICATE_ANNOTATION), counted as delivered.";
    MATRIX_DECRYPTIONS = "stargazer_matrix_decryptions_total", Counter, [PLATFORM, RESULT],
        "Encrypted Matrix timeline events the syncer decrypted (e2ee feature), by result: ok, or failed (published as an `encrypted` event with the reason).";
    MATRIX_ENCRYPTIONS = "stargazer_matrix_encryptions_total", Counter, [PLATFORM],
        "Outbound Matrix events encrypted with the room's Megolm session (e2ee feature).";
    MATRIX_CRYPTO_REBUILDS = "stargazer_matrix_crypto_rebuilds_total", Counter, [PLATFORM],
        "Times this gateway rebuilt its Olm machine from the crypto store in Redis (at the first use, and whenever another gateway of the fleet wrote crypto state since).";
    DISCORD_REFUSED = "stargazer_discord_credential_refused", Gauge, [PLATFORM],
        "1 while Discord refuses the bot token (a 401, or gateway close 4004): every send of the platform is stopped, entries stay pending; 0 once a probe (GET /users/@me) succeeds.";
    DISCORD_PROBES = "stargazer_discord_token_probes_total", Counter, [PLATFORM, RESULT],
        "Probes of a refused Discord bot token (GET /users/@me), by result: ok (sends resume), refused, error.";
    REPLICAS_SHORT = "stargazer_commit_replicas_short_total", Counter, [PLATFORM],
        "Commits that `redis.wait_replicas` replicas did not acknowledge within `redis.wait_timeout_ms` (or whose WAIT failed); the commit stands.";
}

/// Buckets of the adapter latency histogram, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Install the Prometheus recorder (once per process) and return its handle.
/// When another recorder is already installed, metrics go there and the
/// handle renders nothing.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(ADAPTER_LATENCY.name.to_owned()),
                    LATENCY_BUCKETS,
                )
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                describe();
            }
            handle
        })
        .clone()
}

fn describe() {
    for d in ALL {
        match d.kind {
            MetricKind::Counter => describe_counter!(d.name, d.help),
            MetricKind::Gauge => describe_gauge!(d.name, d.help),
            MetricKind::Histogram => describe_histogram!(d.name, Unit::Seconds, d.help),
        }
    }
}

fn p(platform: &str) -> [(&'static str, String); 1] {
    [(PLATFORM, platform.to_owned())]
}

/// An entry finished: `outcome` is `delivered`, `dead_lettered` or `skipped`;
/// `kind` the dead letter's error_kind.
pub fn finished(
    platform: &str,
    parsed: &crate::envelope::Parsed,
    outcome: &'static str,
    kind: Option<&str>,
) {
    finished_as(platform, type_of(parsed), outcome, kind);
}

pub fn finished_as(platform: &str, ty: &'static str, outcome: &'static str, kind: Option<&str>) {
    counter!(DELIVERIES.name, PLATFORM => platform.to_owned(), TYPE => ty, OUTCOME => outcome)
        .increment(1);
    if let Some(kind) = kind {
        counter!(DEAD_LETTERS.name, PLATFORM => platform.to_owned(), KIND => kind.to_owned())
            .increment(1);
    }
}

/// A pending id found deleted from the stream, dead-lettered as `lost_in_stream`
/// (its type is unknown: the entry is gone).
pub fn lost_in_stream(platform: &str) {
    finished_as(platform, "unknown", "dead_lettered", Some("lost_in_stream"));
}

/// The `type` label of a parsed entry (`invalid` for bad input).
pub fn type_of(parsed: &crate::envelope::Parsed) -> &'static str {
    match &parsed.result {
        Ok(env) => env.action.type_name(),
        Err(_) => "invalid",
    }
}

pub fn retry(platform: &str) {
    counter!(RETRIES.name, &p(platform)).increment(1);
}

pub fn gaps_skipped(platform: &str, n: u64) {
    counter!(GAPS_SKIPPED.name, &p(platform)).increment(n);
}

pub fn unknown_outcome_resend(platform: &str) {
    counter!(UNKNOWN_OUTCOME_RESENDS.name, &p(platform)).increment(1);
}

pub fn lock_renew_failed(platform: &str) {
    counter!(LOCK_RENEW_FAILURES.name, &p(platform)).increment(1);
}

pub fn circuit(platform: &str, open: bool) {
    gauge!(CIRCUIT_OPEN.name, &p(platform)).set(if open { 1.0 } else { 0.0 });
    if open {
        counter!(CIRCUIT_TRIPS.name, &p(platform)).increment(1);
    }
}

pub fn replicas_short(platform: &str) {
    counter!(REPLICAS_SHORT.name, &p(platform)).increment(1);
}

pub fn lock_lost(platform: &str) {
    counter!(LOCKS_LOST.name, &p(platform)).increment(1);
}

pub fn trimmed(platform: &str, n: u64) {
    counter!(TRIMMED.name, &p(platform)).increment(n);
}

/// The Discord rate limiter held a request back (`reason` as the script names it).
pub fn discord_wait(platform: &str, reason: &str) {
    counter!(DISCORD_WAITS.name, PLATFORM => platform.to_owned(), REASON => reason.to_owned())
        .increment(1);
}

/// Discord answered 429 with this scope.
pub fn discord_429(platform: &str, scope: &str) {
    let scope = if scope.is_empty() { "route" } else { scope };
    counter!(DISCORD_429S.name, PLATFORM => platform.to_owned(), SCOPE => scope.to_owned())
        .increment(1);
}

/// A create-message resend of unknown earlier outcome (see DISCORD_UNKNOWN).
pub fn discord_unknown_outcome(platform: &str, result: &str) {
    counter!(DISCORD_UNKNOWN.name, PLATFORM => platform.to_owned(), RESULT => result.to_owned())
        .increment(1);
}

/// A Discord gateway session event (see DISCORD_SESSION_EVENTS).
pub fn discord_session_event(platform: &str, kind: &str) {
    counter!(DISCORD_SESSION_EVENTS.name, PLATFORM => platform.to_owned(), KIND => kind.to_owned())
        .increment(1);
}

/// Whether Discord refuses the bot token (see DISCORD_REFUSED).
pub fn discord_credential_refused(platform: &str, refused: bool) {
    gauge!(DISCORD_REFUSED.name, &p(platform)).set(if refused { 1.0 } else { 0.0 });
}

/// One probe of a refused token (see DISCORD_PROBES).
pub fn discord_probe(platform: &str, result: &str) {
    counter!(DISCORD_PROBES.name, PLATFORM => platform.to_owned(), RESULT => result.to_owned())
        .increment(1);
}

pub fn discord_invalid(platform: &str) {
    counter!(DISCORD_INVALID.name, &p(platform)).increment(1);
}

/// Whether this gateway holds Discord shard `shard` (see DISCORD_SHARD_HELD).
pub fn discord_shard_held(platform: &str, shard: u32, held: bool) {
    gauge!(DISCORD_SHARD_HELD.name, PLATFORM => platform.to_owned(), SHARD => shard.to_string())
        .set(if held { 1.0 } else { 0.0 });
}

/// The Discord shard count in force (see DISCORD_SHARD_COUNT).
pub fn discord_shard_count(platform: &str, count: u32) {
    gauge!(DISCORD_SHARD_COUNT.name, &p(platform)).set(f64::from(count));
}

/// An encrypted Matrix event decrypted (`ok`) or not (`failed`).
pub fn matrix_decryption(platform: &str, result: &'static str) {
    counter!(MATRIX_DECRYPTIONS.name, PLATFORM => platform.to_owned(), RESULT => result)
        .increment(1);
}

/// An outbound Matrix event encrypted.
pub fn matrix_encryption(platform: &str) {
    counter!(MATRIX_ENCRYPTIONS.name, &p(platform)).increment(1);
}

/// The Olm machine rebuilt from Redis.
pub fn matrix_crypto_rebuild(platform: &str) {
    counter!(MATRIX_CRYPTO_REBUILDS.name, &p(platform)).increment(1);
}

/// This gateway took (true) or gave up (false) the Matrix sync lease.
pub fn matrix_sync_holder(platform: &str, holding: bool) {
    gauge!(MATRIX_SYNC_HOLDER.name, &p(platform)).set(if holding { 1.0 } else { 0.0 });
}

/// A limited Matrix timeline, `filled` or `unfilled`.
pub fn matrix_gap(platform: &str, result: &'static str) {
    counter!(MATRIX_GAPS.name, PLATFORM => platform.to_owned(), RESULT => result).increment(1);
}

/// An auto-join attempt: `joined`, `retry` or `refused`.
pub fn matrix_join(platform: &str, result: &'static str) {
    counter!(MATRIX_JOINS.name, PLATFORM => platform.to_owned(), RESULT => result).increment(1);
}

/// A reaction the server already had.
pub fn matrix_duplicate_reaction(platform: &str) {
    counter!(MATRIX_DUPLICATE_REACTIONS.name, &p(platform)).increment(1);
}

/// Run one adapter call, recording how long it took.
pub async fn timed<T>(platform: &str, fut: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let r = fut.await;
    adapter_latency(platform, started.elapsed());
    r
}

pub fn adapter_latency(platform: &str, took: Duration) {
    histogram!(ADAPTER_LATENCY.name, &p(platform)).record(took.as_secs_f64());
}

/// This gateway's own load, refreshed periodically.
pub fn set_load(platform: &str, in_flight: usize, lanes: usize) {
    gauge!(IN_FLIGHT.name, &p(platform)).set(in_flight as f64);
    gauge!(ACTIVE_LANES.name, &p(platform)).set(lanes as f64);
}

/// Group-wide figures, refreshed periodically.
pub fn set_backlog(platform: &str, pending: u64, lag: Option<u64>, oldest_age: Duration) {
    gauge!(PENDING.name, &p(platform)).set(pending as f64);
    if let Some(lag) = lag {
        gauge!(LAG.name, &p(platform)).set(lag as f64);
    }
    gauge!(OLDEST_PENDING_AGE.name, &p(platform)).set(oldest_age.as_secs_f64());
}

pub fn set_dead_letter_stream(platform: &str, length: u64, at_cap: bool) {
    gauge!(DLQ_LENGTH.name, &p(platform)).set(length as f64);
    gauge!(DLQ_AT_CAP.name, &p(platform)).set(if at_cap { 1.0 } else { 0.0 });
}

/// The documentation table (`docs/metrics.md` is this output).
pub fn markdown_table() -> String {
    let mut s = String::from("| name | type | labels | meaning |\n|---|---|---|---|\n");
    for d in ALL {
        let kind = match d.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        s.push_str(&format!(
            "| `{}` | {kind} | {} | {} |\n",
            d.name,
            d.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", "),
            d.help
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docs_list_every_metric() {
        let doc = include_str!("../docs/metrics.md");
        assert!(
            doc.contains(&markdown_table()),
            "docs/metrics.md is out of date; paste metrics::markdown_table() into it:\n{}",
            markdown_table()
        );
    }
}
