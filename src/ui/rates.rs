//! Live rates for the dashboard's charts: deliveries, retries and dead
//! letters per second, per platform, over the last minute and the last hour.
//!
//! The figures are this gateway's own [`Stats`] counters (relaxed atomics the
//! engine bumps anyway), copied into two small rings. Sampling is what keeps
//! the dashboard free when nobody looks: every 10 s (three atomic loads per
//! platform, no Redis, no allocation once the rings are full) while nobody has
//! polled for a minute, every second while someone has.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// Sampling period while someone watches (the minute chart's resolution).
pub const WATCHED_EVERY: Duration = Duration::from_secs(1);
/// Sampling period while nobody does (the hour chart's resolution).
pub const IDLE_EVERY: Duration = Duration::from_secs(10);
/// A poll keeps the fast sampling on this long.
pub const WATCH_FOR: Duration = Duration::from_secs(60);

const MINUTE_MS: u64 = 61_000;
const HOUR_MS: u64 = 3_601_000;

/// One copy of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    at_ms: u64,
    delivered: u64,
    retries: u64,
    dead_lettered: u64,
}

/// What the whole fleet has done, seen in Redis when the overview is
/// computed (so only while someone watches): entries finished (read by the
/// group and no longer pending) and the dead-letter stream's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FleetSample {
    at_ms: u64,
    finished: u64,
    dead_letters: u64,
}

#[derive(Debug)]
struct Series {
    platform: String,
    stats: Arc<Stats>,
    minute: VecDeque<Sample>,
    hour: VecDeque<Sample>,
    fleet: VecDeque<FleetSample>,
}

impl Series {
    fn sample(&mut self, now_ms: u64) {
        let s = self.stats.snapshot();
        let x = Sample {
            at_ms: now_ms,
            delivered: s.delivered,
            retries: s.retries,
            dead_lettered: s.dead_lettered,
        };
        // 900 ms: a sample taken out of turn (a wake-up right after another)
        // would turn a few entries into a spike of a rate.
        push(&mut self.minute, x, 900, MINUTE_MS);
        push(
            &mut self.hour,
            x,
            IDLE_EVERY.as_millis() as u64 - 500,
            HOUR_MS,
        );
    }
}

/// Append `x` unless the newest sample is younger than `gap_ms`; drop what is
/// older than `keep_ms`.
fn push(ring: &mut VecDeque<Sample>, x: Sample, gap_ms: u64, keep_ms: u64) {
    if ring
        .back()
        .is_some_and(|b| x.at_ms < b.at_ms + gap_ms.max(1))
    {
        return;
    }
    ring.push_back(x);
    while ring.front().is_some_and(|f| f.at_ms + keep_ms < x.at_ms) {
        ring.pop_front();
    }
}

/// Which chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        match s {
            "minute" | "1m" => Ok(Window::Minute),
            "hour" | "1h" => Ok(Window::Hour),
            _ => Err(format!("window `{s}`: use minute or hour")),
        }
    }
}

/// Per-second rates between consecutive samples, at the later sample's time.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RateSeries {
    pub platform: String,
    /// Unix ms of each point.
    pub t: Vec<u64>,
    pub delivered: Vec<f64>,
    pub retries: Vec<f64>,
    pub dead_lettered: Vec<f64>,
    /// The counters now (totals since this gateway started the platform).
    pub totals: Totals,
    /// The whole fleet, from Redis, while someone watched: entries finished
    /// (delivered, skipped or dead-lettered, by any gateway) and dead letters
    /// added, per second, at the times in `fleet_t`.
    pub fleet_t: Vec<u64>,
    pub fleet_finished: Vec<f64>,
    pub fleet_dead_lettered: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub delivered: u64,
    pub retries: u64,
    pub dead_lettered: u64,
}

/// The rings of every platform, and when someone last looked.
#[derive(Debug)]
pub struct Rates {
    series: Mutex<Vec<Series>>,
    started: Instant,
    /// Milliseconds after `started` of the last poll, plus one (0: never).
    watched_at: AtomicU64,
    wake: Notify,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            series: Mutex::new(Vec::new()),
            started: Instant::now(),
            watched_at: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }
}

impl Rates {
    /// Follow `stats` as `platform`'s counters (replacing an earlier one).
    pub fn add(&self, platform: &str, stats: Arc<Stats>) {
        let mut series = self.series.lock().expect("rates poisoned");
        series.retain(|s| s.platform != platform);
        let mut s = Series {
            platform: platform.to_owned(),
            stats,
            minute: VecDeque::new(),
            hour: VecDeque::new(),
            fleet: VecDeque::new(),
        };
        s.sample(crate::now_ms());
        series.push(s);
    }

    /// Someone polled: sample every second for the next minute.
    pub fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let was = self.watched_at.swap(now, Ordering::Relaxed);
        if was == 0 || now.saturating_sub(was) > WATCH_FOR.as_millis() as u64 {
            self.wake.notify_one();
        }
    }

    /// Whether someone polled within [`WATCH_FOR`].
    pub fn watched(&self) -> bool {
        let at = self.watched_at.load(Ordering::Relaxed);
        at != 0
            && (self.started.elapsed().as_millis() as u64 + 1).saturating_sub(at)
                <= WATCH_FOR.as_millis() as u64
    }

    /// The fleet's figures of `platform` at server time `at_ms` (from the
    /// overview): entries finished so far and the dead-letter stream's length.
    pub fn record_fleet(&self, platform: &str, at_ms: u64, finished: u64, dead_letters: u64) {
        let mut series = self.series.lock().expect("rates poisoned");
        let Some(s) = series.iter_mut().find(|s| s.platform == platform) else {
            return;
        };
        let x = FleetSample {
            at_ms,
            finished,
            dead_letters,
        };
        if s.fleet.back().is_some_and(|b| at_ms < b.at_ms + 900) {
            return;
        }
        s.fleet.push_back(x);
        while s.fleet.front().is_some_and(|f| f.at_ms + HOUR_MS < at_ms) {
            s.fleet.pop_front();
        }
    }

    /// Take one sample of every platform now.
    pub fn sample_all(&self) {
        let now = crate::now_ms();
        for s in self.series.lock().expect("rates poisoned").iter_mut() {
            s.sample(now);
        }
    }

    /// Samples held per platform (minute ring, hour ring), for tests.
    pub fn held(&self) -> Vec<(String, usize, usize)> {
        self.series
            .lock()
            .expect("rates poisoned")
            .iter()
            .map(|s| (s.platform.clone(), s.minute.len(), s.hour.len()))
            .collect()
    }

    /// The rates of `window`, per platform in the order they were added.
    pub fn series(&self, window: Window) -> Vec<RateSeries> {
        let series = self.series.lock().expect("rates poisoned");
        series
            .iter()
            .map(|s| {
                let ring = match window {
                    Window::Minute => &s.minute,
                    Window::Hour => &s.hour,
                };
                let now = s.stats.snapshot();
                let mut out = RateSeries {
                    platform: s.platform.clone(),
                    totals: Totals {
                        delivered: now.delivered,
                        retries: now.retries,
                        dead_lettered: now.dead_lettered,
                    },
                    ..RateSeries::default()
                };
                for (a, b) in ring.iter().zip(ring.iter().skip(1)) {
                    let dt = (b.at_ms.saturating_sub(a.at_ms)) as f64 / 1000.0;
                    if dt <= 0.0 {
                        continue;
                    }
                    let r = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
                    out.t.push(b.at_ms);
                    out.delivered.push(r(a.delivered, b.delivered));
                    out.retries.push(r(a.retries, b.retries));
                    out.dead_lettered.push(r(a.dead_lettered, b.dead_lettered));
                }
                let span = match window {
                    Window::Minute => MINUTE_MS,
                    Window::Hour => HOUR_MS,
                };
                let newest = s.fleet.back().map_or(0, |b| b.at_ms);
                let fleet: Vec<&FleetSample> = s
                    .fleet
                    .iter()
                    .filter(|f| f.at_ms + span >= newest)
                    .collect();
                for (a, b) in fleet.iter().zip(fleet.iter().skip(1)) {
                    // A gap of over a minute: nobody watched; draw no rate across it.
                    let dt = (b.at_ms.saturating_sub(a.at_ms)) as f64 / 1000.0;
                    if dt <= 0.0 || dt > 60.0 {
                        continue;
                    }
                    out.fleet_t.push(b.at_ms);
                    out.fleet_finished
                        .push(b.finished.saturating_sub(a.finished) as f64 / dt);
                    out.fleet_dead_lettered
                        .push(b.dead_letters.saturating_sub(a.dead_letters) as f64 / dt);
                }
                out
            })
            .collect()
    }

    /// Sample until `stop`: every [`WATCHED_EVERY`] while watched, else every
    /// [`IDLE_EVERY`] (woken at once by the first poll after a quiet spell).
    pub fn spawn(self: Arc<Self>, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                self.sample_all();
                let every = if self.watched() {
                    WATCHED_EVERY
                } else {
                    IDLE_EVERY
                };
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = self.wake.notified() => {}
                    _ = stop.cancelled() => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, d: u64) -> Sample {
        Sample {
            at_ms: ms,
            delivered: d,
            retries: 0,
            dead_lettered: 0,
        }
    }

    #[test]
    fn rings_keep_their_window_and_spacing() {
        let mut minute = VecDeque::new();
        let mut hour = VecDeque::new();
        for i in 0..200u64 {
            push(&mut minute, at(i * 1000, i), 900, MINUTE_MS);
            push(&mut minute, at(i * 1000 + 10, i), 900, MINUTE_MS);
            push(&mut hour, at(i * 1000, i), 9_500, HOUR_MS);
        }
        assert_eq!(minute.len(), 62, "61 s of 1 s samples, both ends");
        assert_eq!(minute.front().unwrap().at_ms, 138_000);
        assert_eq!(hour.len(), 20, "one sample per 10 s");
    }

    #[test]
    fn rates_are_differences_over_time() {
        let stats = Arc::new(Stats::default());
        let rates = Rates::default();
        rates.add("p", stats.clone());
        {
            let mut s = rates.series.lock().unwrap();
            let s = &mut s[0];
            s.minute.clear();
            s.minute.push_back(at(1_000, 0));
            s.minute.push_back(at(3_000, 10));
            s.minute.push_back(at(4_000, 10));
        }
        Stats::add(&stats.delivered, 10);
        let r = &rates.series(Window::Minute)[0];
        assert_eq!(r.t, [3_000, 4_000]);
        assert_eq!(r.delivered, [5.0, 0.0]);
        assert_eq!(r.totals.delivered, 10);
    }

    #[test]
    fn fleet_rates_come_from_redis_figures() {
        let rates = Rates::default();
        rates.add("p", Arc::new(Stats::default()));
        rates.record_fleet("p", 10_000, 100, 3);
        rates.record_fleet("p", 10_500, 999, 9); // too soon: ignored
        rates.record_fleet("p", 12_000, 140, 5);
        rates.record_fleet("p", 13_000, 150, 4); // a purge: no negative rate
        rates.record_fleet("other", 13_000, 1, 1); // unknown platform: ignored
        let r = &rates.series(Window::Minute)[0];
        assert_eq!(r.fleet_t, [12_000, 13_000]);
        assert_eq!(r.fleet_finished, [20.0, 10.0]);
        assert_eq!(r.fleet_dead_lettered, [1.0, 0.0]);
    }

    #[test]
    fn watching_lasts_a_minute() {
        let rates = Rates::default();
        assert!(!rates.watched());
        rates.touch();
        assert!(rates.watched());
        assert!(Window::parse("hour").is_ok() && Window::parse("day").is_err());
    }
}
