//! When to try again: exponential backoff with jitter, and the rule of G5 for
//! giving up (attempts used up *and* old enough).

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub max_attempts: u32,
    pub max_age: Duration,
}

impl RetryPolicy {
    /// Delay before the next try after `attempts` failed ones: base·2^(n-1),
    /// capped, then drawn uniformly from its upper half so retries of many
    /// channels do not fall in step.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let full = self
            .base
            .saturating_mul(1u32 << exp)
            .min(self.max)
            .as_millis() as u64;
        let low = full / 2;
        Duration::from_millis(rand::rng().random_range(low..=full.max(low)))
    }

    /// G5: dead-letter only once both the attempts and the age are used up.
    pub fn exhausted(&self, attempts: u32, age: Duration) -> bool {
        attempts >= self.max_attempts && age >= self.max_age
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            max_attempts: 3,
            max_age: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let p = policy();
        for _ in 0..100 {
            let d1 = p.backoff(1).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            let d3 = p.backoff(3).as_millis();
            assert!((200..=400).contains(&d3), "{d3}");
            let d9 = p.backoff(9).as_millis();
            assert!((500..=1000).contains(&d9), "{d9}");
        }
    }

    #[test]
    fn exhausted_needs_both_attempts_and_age() {
        let p = policy();
        assert!(!p.exhausted(5, Duration::from_secs(10)));
        assert!(!p.exhausted(2, Duration::from_secs(100)));
        assert!(p.exhausted(3, Duration::from_secs(60)));
    }
}
