//! A handler's circuit breaker: while what the handler depends on is down,
//! stop calling it, instead of burning every message's attempts and
//! dead-lettering the stream.
//!
//! ```text
//! Closed ──failure_threshold failed attempts in a row──► Open
//! Open ──reset_timeout──► HalfOpen: up to half_open_attempts calls run as probes
//! HalfOpen ──a probe succeeds──► Closed
//! HalfOpen ──a probe fails──► Open (the timeout starts again)
//! ```
//!
//! Invariants:
//!
//! - **Waiting is not an attempt.** While the breaker is open (and, half
//!   open, beyond its probes) a call waits in [`Breaker::admit`] before it
//!   starts: the message's attempt count is untouched and nothing is
//!   dead-lettered for it. The worker also stops receiving while it is open
//!   ([`worker`](crate::pipeline::worker)), so consumption pauses.
//! - **Only the dependency's failures count.** A permanent error is the
//!   message's fault: it neither trips nor resets the breaker. Every other
//!   failed attempt (retryable, retry-after, timeout, trap) counts; a
//!   success resets the count.
//! - **A failed probe is not held against its message.** It tested the
//!   dependency: [`Permit::report`] says so, and the pipeline does not count
//!   it as one of the message's attempts, so a long outage dead-letters
//!   nothing.
//! - **Every admitted call is answered once.** A [`Permit`] reports its
//!   call's result; one dropped unanswered (shutdown) frees its probe slot.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use super::HandlerStats;
use crate::lock::Unpoisoned;
use crate::registry::BreakerSettings;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls run.
    Closed,
    /// No call runs until the reset timeout has passed.
    Open,
    /// Probes run; the rest wait for their result.
    HalfOpen,
}

impl BreakerState {
    /// Its name in logs, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What a call came to, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// It succeeded: the dependency works.
    Success,
    /// It failed, not permanently: the dependency may be down.
    Failure,
    /// It says nothing about the dependency (a permanent error).
    Neutral,
}

struct Inner {
    state: BreakerState,
    /// Failed attempts in a row while closed.
    failures: u32,
    /// Probes running while half open.
    probes: u32,
    /// When it last opened.
    opened_at: Instant,
}

/// One handler's breaker. Cheap to clone (one reference count: every
/// admitted call holds a clone in its [`Permit`]); clones share the state.
#[derive(Clone)]
pub struct Breaker(Arc<Core>);

/// What the clones of a [`Breaker`] share.
pub struct Core {
    handler: String,
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    changed: watch::Sender<BreakerState>,
    stats: Option<Arc<HandlerStats>>,
}

impl std::ops::Deref for Breaker {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.0
    }
}

/// Leave to run one call; answer with [`Permit::report`].
pub struct Permit {
    breaker: Option<Breaker>,
    probe: bool,
}

impl Breaker {
    /// A closed breaker for `handler`, whose state is shown in `stats`.
    pub fn new(handler: &str, settings: BreakerSettings, stats: Option<Arc<HandlerStats>>) -> Self {
        let breaker = Self(Arc::new(Core {
            handler: handler.to_string(),
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                probes: 0,
                opened_at: Instant::now(),
            }),
            changed: watch::channel(BreakerState::Closed).0,
            stats,
        }));
        breaker.record(BreakerState::Closed);
        breaker
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Follows the state (for the worker, which stops receiving while it
    /// is open).
    pub fn watch(&self) -> watch::Receiver<BreakerState> {
        self.changed.subscribe()
    }

    /// Waits until a call may run; `None` if `shutdown` turns true first.
    pub async fn admit(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Permit> {
        loop {
            let (mut changed, wake_at) = {
                let mut inner = self.lock();
                if inner.state == BreakerState::Open
                    && inner.opened_at.elapsed() >= self.settings.reset_timeout
                {
                    self.enter(&mut inner, BreakerState::HalfOpen);
                }
                match inner.state {
                    BreakerState::Closed => {
                        return Some(Permit {
                            breaker: Some(self.clone()),
                            probe: false,
                        });
                    }
                    BreakerState::HalfOpen if inner.probes < self.settings.half_open_attempts => {
                        inner.probes += 1;
                        return Some(Permit {
                            breaker: Some(self.clone()),
                            probe: true,
                        });
                    }
                    // Subscribed under the lock that every change takes: no
                    // change between here and the wait is missed.
                    BreakerState::Open => (
                        self.changed.subscribe(),
                        Some(inner.opened_at + self.settings.reset_timeout),
                    ),
                    BreakerState::HalfOpen => (self.changed.subscribe(), None),
                }
            };
            let timeout = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return None,
                _ = changed.changed() => {}
                () = timeout => {}
            }
        }
    }

    /// Takes a call's result; `false` when it does not count as an attempt
    /// of its message (a failed probe).
    fn answer(&self, probe: bool, result: CallResult) -> bool {
        let mut inner = self.lock();
        let counts = !(probe && result == CallResult::Failure);
        if probe {
            inner.probes = inner.probes.saturating_sub(1);
        }
        match (inner.state, result) {
            (BreakerState::HalfOpen, CallResult::Neutral) if probe => {
                // Its slot is free: another probe may run.
                self.changed.send_replace(inner.state);
            }
            (_, CallResult::Neutral) => {}
            (BreakerState::Closed, CallResult::Success) => inner.failures = 0,
            (BreakerState::Closed, CallResult::Failure) => {
                inner.failures += 1;
                if inner.failures >= self.settings.failure_threshold {
                    tracing::warn!(handler = %self.handler, failures = inner.failures,
                        reset_in_ms = self.settings.reset_timeout.as_millis() as u64,
                        "circuit breaker opened: calls pause (no attempts used, nothing dead-lettered) until a probe succeeds");
                    self.enter(&mut inner, BreakerState::Open);
                }
            }
            (BreakerState::HalfOpen, CallResult::Success) if probe => {
                tracing::info!(handler = %self.handler, "circuit breaker closed: the probe succeeded; calls resume");
                self.enter(&mut inner, BreakerState::Closed);
            }
            (BreakerState::HalfOpen, CallResult::Failure) if probe => {
                tracing::warn!(handler = %self.handler,
                    reset_in_ms = self.settings.reset_timeout.as_millis() as u64,
                    "circuit breaker opened again: the probe failed");
                self.enter(&mut inner, BreakerState::Open);
            }
            // A call admitted before the breaker opened, finishing after:
            // the state already says what it would.
            _ => {}
        }
        counts
    }

    fn enter(&self, inner: &mut Inner, state: BreakerState) {
        inner.state = state;
        inner.failures = 0;
        match state {
            BreakerState::Open => inner.opened_at = Instant::now(),
            BreakerState::HalfOpen => {
                inner.probes = 0;
                tracing::info!(handler = %self.handler, probes = self.settings.half_open_attempts,
                    "circuit breaker half open: probing");
            }
            BreakerState::Closed => {}
        }
        self.record(state);
        self.changed.send_replace(state);
    }

    fn record(&self, state: BreakerState) {
        if let Some(stats) = &self.stats {
            stats.breaker(state.as_str());
        }
    }
}

impl Permit {
    /// A permit for a call no breaker guards.
    pub fn unguarded() -> Self {
        Self {
            breaker: None,
            probe: false,
        }
    }

    /// The call came to `result`. Returns whether it counts as an attempt
    /// of its message: not when it was a probe that failed.
    pub fn report(mut self, result: CallResult) -> bool {
        match self.breaker.take() {
            Some(breaker) => breaker.answer(self.probe, result),
            None => true,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker.take() {
            let _ = breaker.answer(self.probe, CallResult::Neutral);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The reset timeout of the breakers tested (on paused time).
    const TICK: Duration = Duration::from_millis(50);

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(
            "h",
            BreakerSettings {
                failure_threshold: threshold,
                reset_timeout: TICK,
                half_open_attempts: 1,
            },
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_probes_and_closes() {
        let b = breaker(2);
        let (_stop, mut shutdown) = watch::channel(false);
        for _ in 0..2 {
            let permit = b.admit(&mut shutdown).await.expect("closed");
            assert!(
                permit.report(CallResult::Failure),
                "a closed breaker's failure counts"
            );
        }
        assert_eq!(b.state(), BreakerState::Open);
        // While open, nobody is admitted before the timeout.
        let started = tokio::time::Instant::now();
        let probe = b.admit(&mut shutdown).await.expect("probe");
        assert!(started.elapsed() >= TICK, "admitted while open");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // A second caller waits for the probe's result.
        let waiting = {
            let b = b.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move { b.admit(&mut shutdown).await.map(|p| p.probe) })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(probe.report(CallResult::Success));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(waiting.await.expect("joined"), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again_and_permanent_errors_do_not_count() {
        let b = breaker(2);
        let (stop, mut shutdown) = watch::channel(false);
        b.admit(&mut shutdown)
            .await
            .expect("closed")
            .report(CallResult::Failure);
        b.admit(&mut shutdown)
            .await
            .expect("closed")
            .report(CallResult::Neutral);
        b.admit(&mut shutdown)
            .await
            .expect("closed")
            .report(CallResult::Neutral);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "permanent errors tripped it"
        );
        b.admit(&mut shutdown)
            .await
            .expect("closed")
            .report(CallResult::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        let counted = b
            .admit(&mut shutdown)
            .await
            .expect("probe")
            .report(CallResult::Failure);
        assert!(!counted, "a failed probe counted against its message");
        assert_eq!(b.state(), BreakerState::Open);
        // A probe dropped unanswered frees its slot for the next.
        drop(b.admit(&mut shutdown).await.expect("probe"));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let next = b.admit(&mut shutdown).await.expect("another probe");
        assert!(next.probe);
        // Shutdown ends a wait.
        let waiting = {
            let b = b.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move { b.admit(&mut shutdown).await.is_none() })
        };
        tokio::task::yield_now().await;
        let _ = stop.send(true);
        assert!(waiting.await.expect("joined"), "admitted after shutdown");
    }
}
