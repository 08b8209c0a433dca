//! The fault schedule: a list of timed steps that is a pure function of the
//! seed, the duration, the number of gateways and channels, so that
//! `--seed N` replays the same faults at the same offsets.
//!
//! Faults start every 1.5–7 s (after a 3 s warm-up). A gateway slot has at
//! most one fault at a time, and at most N − 1 slots are faulted at once (so
//! something is always running); Redis has at most one fault at a time;
//! platform faults overlap freely (the newest covering a channel wins).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::sink::{PlatformFault, Scope};

/// One step of the schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// SIGKILL the slot's gateway; it is restarted by a later `GwStart`.
    GwKill {
        slot: usize,
        new_name: bool,
    },
    /// Start the slot's gateway again, under its old or a new consumer name.
    GwStart {
        slot: usize,
        new_name: bool,
    },
    /// SIGSTOP the slot's gateway (`long`: past its leases).
    GwStop {
        slot: usize,
        long: bool,
    },
    GwCont {
        slot: usize,
    },
    RedisStop,
    RedisCont,
    RedisKill,
    /// Restart Redis on the same port and directory, loading its AOF.
    RedisStart,
    PlatformOn {
        id: u64,
        fault: PlatformFault,
        scope: Scope,
    },
    PlatformOff {
        id: u64,
    },
}

impl Step {
    /// The fault this step injects, as the report counts it (`None` for a
    /// step that ends a fault).
    pub fn fault_kind(&self) -> Option<String> {
        Some(match self {
            Step::GwKill {
                new_name: false, ..
            } => "gateway SIGKILL, restart same name".into(),
            Step::GwKill { new_name: true, .. } => "gateway SIGKILL, restart new name".into(),
            Step::GwStop { long: true, .. } => "gateway SIGSTOP long (15-70 s)".into(),
            Step::GwStop { long: false, .. } => "gateway SIGSTOP short (0.3-2 s)".into(),
            Step::RedisStop => "redis SIGSTOP (1-10 s)".into(),
            Step::RedisKill => "redis SIGKILL, AOF restart".into(),
            Step::PlatformOn { fault, scope, .. } => format!(
                "platform {} ({})",
                fault.name(),
                match scope {
                    Scope::Global => "global",
                    Scope::Channels(_) => "per channel",
                }
            ),
            _ => return None,
        })
    }
}

/// A step and when it runs, from the start of the fault phase.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub at: Duration,
    pub step: Step,
}

/// The channel names the producers use: `c0`, `c1`, …
pub fn channel_name(i: usize) -> String {
    format!("c{i}")
}

/// The schedule for these parameters, sorted by time.
pub fn generate(seed: u64, duration: Duration, gateways: usize, channels: usize) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let end = duration.as_millis() as u64;
    let mut slot_free_at = vec![0u64; gateways];
    let max_faulted = gateways.saturating_sub(1).max(1);
    let mut redis_free_at = 0u64;
    let mut next_id = 0u64;
    let mut out: Vec<(u64, Step)> = Vec::new();
    let mut t = 3_000u64;
    while t + 1_000 < end {
        let free: Vec<usize> = (0..gateways).filter(|&s| slot_free_at[s] <= t).collect();
        let can_gw = gateways > 0 && !free.is_empty() && gateways - free.len() < max_faulted;
        let can_redis = redis_free_at <= t;
        let roll = rng.random_range(0..100u32);
        match roll {
            0..=24 if can_gw => {
                let slot = free[rng.random_range(0..free.len())];
                let new_name = rng.random_bool(0.45);
                let down = if rng.random_bool(0.7) {
                    rng.random_range(200..3_000)
                } else {
                    rng.random_range(10_000..40_000)
                };
                out.push((t, Step::GwKill { slot, new_name }));
                out.push((t + down, Step::GwStart { slot, new_name }));
                slot_free_at[slot] = t + down + 2_000;
            }
            25..=32 if can_gw => {
                let slot = free[rng.random_range(0..free.len())];
                let d = if rng.random_bool(0.9) {
                    rng.random_range(15_000..20_000)
                } else {
                    rng.random_range(61_000..70_000)
                };
                out.push((t, Step::GwStop { slot, long: true }));
                out.push((t + d, Step::GwCont { slot }));
                slot_free_at[slot] = t + d + 1_000;
            }
            33..=42 if can_gw => {
                let slot = free[rng.random_range(0..free.len())];
                let d = rng.random_range(300..2_000);
                out.push((t, Step::GwStop { slot, long: false }));
                out.push((t + d, Step::GwCont { slot }));
                slot_free_at[slot] = t + d + 500;
            }
            43..=49 if can_redis => {
                let d = rng.random_range(1_000..10_000);
                out.push((t, Step::RedisStop));
                out.push((t + d, Step::RedisCont));
                redis_free_at = t + d + 3_000;
            }
            50..=56 if can_redis => {
                let d = rng.random_range(200..3_000);
                out.push((t, Step::RedisKill));
                out.push((t + d, Step::RedisStart));
                redis_free_at = t + d + 5_000;
            }
            _ => {
                let fault = PlatformFault::ALL[rng.random_range(0..PlatformFault::ALL.len())];
                let scope = if channels == 0 || rng.random_bool(0.4) {
                    Scope::Global
                } else {
                    let mut all: Vec<usize> = (0..channels).collect();
                    all.shuffle(&mut rng);
                    let k = rng.random_range(1..=3.min(channels));
                    Scope::Channels(all[..k].iter().map(|&c| channel_name(c)).collect())
                };
                let d = rng.random_range(3_000..20_000);
                let id = next_id;
                next_id += 1;
                out.push((t, Step::PlatformOn { id, fault, scope }));
                out.push((t + d, Step::PlatformOff { id }));
            }
        }
        t += rng.random_range(1_500..7_000);
    }
    // Stable: a fault's end never moves before its start.
    out.sort_by_key(|(at, _)| *at);
    out.into_iter()
        .map(|(at, step)| Planned {
            at: Duration::from_millis(at),
            step,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_plan() {
        let a = generate(7, Duration::from_secs(300), 3, 16);
        let b = generate(7, Duration::from_secs(300), 3, 16);
        assert_eq!(a, b);
        assert_ne!(a, generate(8, Duration::from_secs(300), 3, 16));
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn a_slot_has_one_fault_at_a_time() {
        let plan = generate(11, Duration::from_secs(1800), 3, 16);
        let mut down = [false; 3];
        for p in &plan {
            match p.step {
                Step::GwKill { slot, .. } | Step::GwStop { slot, .. } => {
                    assert!(!down[slot], "{p:?}");
                    down[slot] = true;
                }
                Step::GwStart { slot, .. } | Step::GwCont { slot } => down[slot] = false,
                _ => {}
            }
            assert!(down.iter().filter(|d| **d).count() <= 2);
        }
    }
}
