//! Backoff for failed attempts: exponential, capped, with jitter; or an
//! explicit schedule of delays, taken as written.

use std::time::Duration;

use crate::registry::RetryPolicy;

/// What to do after attempt number `attempt` failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Try again after this delay.
    RetryIn(Duration),
    /// No attempts left: dead-letter.
    GiveUp,
}

impl RetryPolicy {
    /// Decides what follows failed attempt `attempt` (1-based). `requested`
    /// is a delay the handler asked for (`retry-after`), which replaces the
    /// computed backoff but still counts against `max_attempts`, and is
    /// capped by `max_delay` like any other delay (a handler cannot park a
    /// message for days). `unit` is a
    /// uniform random number in `[0, 1)` for the jitter.
    pub fn next(&self, attempt: u32, requested: Option<Duration>, unit: f64) -> Next {
        if attempt >= self.max_attempts {
            return Next::GiveUp;
        }
        if let Some(delay) = requested {
            return Next::RetryIn(delay.min(self.max_delay));
        }
        if !self.delays.is_empty() {
            // `max_attempts` is one more than there are delays, so the
            // index is in range; past it, the longest delay.
            let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
            let delay = self.delays.get(index).copied().unwrap_or(self.max_delay);
            return Next::RetryIn(delay);
        }
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent);
        let spread = 1.0 + self.jitter * (2.0 * unit - 1.0);
        let seconds = (base * spread).min(self.max_delay.as_secs_f64()).max(0.0);
        Next::RetryIn(Duration::from_secs_f64(seconds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5),
            jitter,
            delays: Vec::new(),
        }
    }

    #[test]
    fn requested_delays_are_capped_by_max_delay() {
        let p = policy(0.0);
        assert_eq!(
            p.next(1, Some(Duration::from_millis(300)), 0.5),
            Next::RetryIn(Duration::from_millis(300))
        );
        assert_eq!(
            p.next(1, Some(Duration::from_secs(86_400 * 365)), 0.5),
            Next::RetryIn(Duration::from_secs(5))
        );
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = policy(0.0);
        assert_eq!(p.next(1, None, 0.5), Next::RetryIn(Duration::from_secs(1)));
        assert_eq!(p.next(2, None, 0.5), Next::RetryIn(Duration::from_secs(2)));
        assert_eq!(p.next(3, None, 0.5), Next::RetryIn(Duration::from_secs(4)));
        assert_eq!(p.next(4, None, 0.5), Next::RetryIn(Duration::from_secs(5)));
        assert_eq!(p.next(5, None, 0.5), Next::GiveUp);
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let p = policy(0.2);
        let low = p.next(1, None, 0.0);
        let high = p.next(1, None, 0.999_999);
        assert_eq!(low, Next::RetryIn(Duration::from_millis(800)));
        let Next::RetryIn(high) = high else {
            panic!("expected a retry")
        };
        assert!(high > Duration::from_millis(1199) && high <= Duration::from_millis(1200));
    }

    #[test]
    fn requested_delay_wins_but_attempts_still_run_out() {
        let p = policy(0.2);
        let wanted = Duration::from_millis(1234);
        assert_eq!(p.next(1, Some(wanted), 0.3), Next::RetryIn(wanted));
        assert_eq!(p.next(5, Some(wanted), 0.3), Next::GiveUp);
    }

    #[test]
    fn an_explicit_schedule_is_followed_then_gives_up() {
        let p = RetryPolicy {
            max_attempts: 4,
            max_delay: Duration::from_secs(30),
            delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            ..policy(0.2)
        };
        assert_eq!(p.next(1, None, 0.9), Next::RetryIn(Duration::from_secs(1)));
        assert_eq!(p.next(2, None, 0.1), Next::RetryIn(Duration::from_secs(5)));
        assert_eq!(p.next(3, None, 0.5), Next::RetryIn(Duration::from_secs(30)));
        assert_eq!(p.next(4, None, 0.5), Next::GiveUp);
    }

    #[test]
    fn single_attempt_policy_never_retries() {
        let p = RetryPolicy {
            max_attempts: 1,
            ..policy(0.0)
        };
        assert_eq!(p.next(1, None, 0.5), Next::GiveUp);
    }
}
