//! The parts of `stargazer-faults`, in the order a run uses them:
//!
//! ```text
//!  plan ──▶ run (executes the plan against real processes) ──▶ check ──▶ report
//!            │  procs:    redis-server (AOF), N × `stargazer gateway`
//!            │  producer: HINCRBY seq + XADD, valid and hostile entries
//!            └─ sink:     the webhook platform, de-duplicating, with faults
//! ```
//!
//! - [`plan`]: the fault schedule, a pure function of the seed.
//! - [`procs`]: child processes, killed when their guard drops.
//! - [`sink`]: the webhook receiver (SPEC §5) that records every request.
//! - [`producer`]: publishers that take `seq` as SPEC §3 says.
//! - [`run`]: one run, start to finish, and what it observed.
//! - [`check`]: the checker over the whole history.
//! - [`report`]: the summary table and the verdict.
//!
//! Nothing here reads the engine's code or its internal keys: only what
//! SPEC.md and the README promise (the wire format, the stream, group and
//! dead-letter names, the webhook contract, the config keys and commands).

pub mod check;
pub mod plan;
pub mod procs;
pub mod producer;
pub mod report;
pub mod run;
pub mod sink;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock Unix time in milliseconds: the clock Redis stamps stream ids
/// with, so the sink's arrival times and stream ids compare directly.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Parses `500ms`, `90s`, `30m`, `2h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 180s, 30m, 1h)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown duration unit `{other}` in `{s}`")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Polls `check` every `every` until it returns true or `within` has passed;
/// returns whether it did. The way this suite waits for an event (a port
/// answering, a process exiting, a backlog draining) instead of sleeping a
/// guessed time.
pub async fn poll_until<F, Fut>(within: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// A 64-bit mix (splitmix64's finaliser): deterministic per-request choices
/// of the sink (bare answer or not, how slow) from the seed and a key.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a string, to feed [`mix`].
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The millisecond part of a stream id (`1700000000000-3` → 1700000000000).
pub fn id_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("150s").unwrap(), Duration::from_secs(150));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("3 weeks").is_err());
    }
}
