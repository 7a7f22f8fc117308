//! What happens to each message between the broker and the handler:
//! decode → invoke (sandboxed) → retry or dead-letter → acknowledge.
//!
//! One [`Worker`] serves one handler from its own consumer group, one
//! message at a time in offset order (so per-key and per-partition order
//! hold trivially). The invariant every path below keeps:
//!
//! > A message's offset is acknowledged to the source only after its outcome
//! > is durable — the handler returned `ok`, or the broker acknowledged its
//! > dead letter. A message abandoned at shutdown is never acknowledged and
//! > is redelivered on the next start.

pub mod decode;
pub mod dlq;
pub mod retry;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::host::{Event, Failure, FailureKind, HandlerInstance, Outcome};
use crate::registry::LoadedHandler;
use crate::source::Message;
use crate::source::kafka::{KafkaConsumer, KafkaProducer};
use retry::Next;

/// Counters for one handler, readable while it runs.
#[derive(Debug, Default)]
pub struct HandlerStats {
    /// Messages whose handler returned `ok`.
    pub handled: AtomicU64,
    /// Messages dead-lettered (permanent error or attempts exhausted).
    pub dead_lettered: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
    /// Time spent inside `handle`, in microseconds, over all attempts.
    pub busy_micros: AtomicU64,
    /// Calls to `handle`.
    pub calls: AtomicU64,
}

impl HandlerStats {
    /// Messages with a final outcome (handled or dead-lettered).
    pub fn finished(&self) -> u64 {
        self.handled.load(Ordering::Relaxed) + self.dead_lettered.load(Ordering::Relaxed)
    }
}

/// Whether a message reached a durable outcome.
enum Delivery {
    /// Handled or dead-lettered: acknowledge it.
    Done,
    /// Shutdown came first: leave it unacknowledged for redelivery.
    Abandoned,
}

/// Serves one handler.
pub struct Worker {
    handler: LoadedHandler,
    consumer: KafkaConsumer,
    producer: KafkaProducer,
    stats: Arc<HandlerStats>,
    instance: Option<HandlerInstance>,
    shutdown: watch::Receiver<bool>,
}

impl Worker {
    /// A worker for `handler`, consuming with `consumer`, dead-lettering with
    /// `producer`, stopping when `shutdown` turns true.
    pub fn new(
        handler: LoadedHandler,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        stats: Arc<HandlerStats>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            handler,
            consumer,
            producer,
            stats,
            instance: None,
            shutdown,
        }
    }

    /// Consumes until shutdown, then commits acknowledged offsets and leaves
    /// the group. A message being handled when shutdown arrives is finished
    /// first; one waiting for a retry is abandoned (and redelivered later).
    pub async fn run(mut self) {
        let mut shutdown = self.shutdown.clone();
        loop {
            let received = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                received = self.consumer.recv() => received,
            };
            let message = match received {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(handler = %self.handler.name, error = %err, "consumer error; librdkafka keeps retrying");
                    if pause(self.shutdown.clone(), Duration::from_secs(1)).await {
                        continue;
                    }
                    break;
                }
            };
            let (topic, partition, offset) =
                (message.topic.clone(), message.partition, message.offset);
            match self.deliver(message).await {
                Delivery::Done => self.consumer.ack(&topic, partition, offset + 1),
                Delivery::Abandoned => break,
            }
        }
        self.consumer.close();
        tracing::info!(handler = %self.handler.name, "stopped");
    }

    /// Runs attempts until the message is handled or dead-lettered, or
    /// shutdown interrupts a backoff.
    async fn deliver(&mut self, message: Message) -> Delivery {
        let mut event = Arc::new(decode::to_event(message, 1));
        loop {
            let started = Instant::now();
            let outcome = self.invoke(event.clone()).await;
            let latency_us = started.elapsed().as_micros() as u64;
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats
                .busy_micros
                .fetch_add(latency_us, Ordering::Relaxed);
            let failure = match outcome {
                Outcome::Handled => {
                    self.stats.handled.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(handler = %self.handler.name, topic = %event.topic, partition = event.partition,
                        offset = event.offset, attempt = event.attempt, latency_us, "handled");
                    return Delivery::Done;
                }
                Outcome::Failed(failure) => failure,
            };
            if failure.poisoned {
                self.instance = None;
            }
            let requested = match failure.kind {
                FailureKind::RetryAfter(delay) => Some(delay),
                _ => None,
            };
            let next = match failure.kind {
                FailureKind::Permanent => Next::GiveUp,
                _ => self
                    .handler
                    .manifest
                    .retry
                    .next(event.attempt, requested, fastrand::f64()),
            };
            match next {
                Next::RetryIn(delay) => {
                    tracing::warn!(handler = %self.handler.name, version = %self.handler.compiled.version(),
                        topic = %event.topic, partition = event.partition, offset = event.offset,
                        attempt = event.attempt, kind = failure.kind.as_str(), error = %failure.message,
                        retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if !pause(self.shutdown.clone(), delay).await {
                        return Delivery::Abandoned;
                    }
                    // The blocking call has returned, so this is the only
                    // reference and no copy is made.
                    Arc::make_mut(&mut event).attempt += 1;
                }
                Next::GiveUp => return self.dead_letter(&event, &failure).await,
            }
        }
    }

    /// Calls the handler on a blocking thread, reusing the worker's instance
    /// (or creating one after a trap).
    async fn invoke(&mut self, event: Arc<Event>) -> Outcome {
        let compiled = self.handler.compiled.clone();
        let instance = self.instance.take();
        let joined = tokio::task::spawn_blocking(move || {
            let mut instance = match instance {
                Some(instance) => instance,
                None => match compiled.instantiate() {
                    Ok(instance) => instance,
                    Err(failure) => return (Outcome::Failed(failure), None),
                },
            };
            let outcome = instance.handle(&event);
            (outcome, Some(instance))
        })
        .await;
        match joined {
            Ok((outcome, instance)) => {
                self.instance = instance;
                outcome
            }
            Err(err) => Outcome::Failed(Failure {
                kind: FailureKind::Retryable,
                message: format!("handler invocation aborted: {err}"),
                poisoned: true,
            }),
        }
    }

    /// Produces the dead letter and waits for the broker's acknowledgement,
    /// retrying the produce until it succeeds or shutdown.
    async fn dead_letter(&mut self, event: &Event, failure: &Failure) -> Delivery {
        let handler = &self.handler.name;
        let topic = format!("{}{}", event.topic, self.handler.manifest.dlq.suffix);
        let headers = dlq::headers(handler, event, failure, event.attempt);
        let mut backoff = Duration::from_millis(200);
        loop {
            match self
                .producer
                .send(&topic, event.key.as_deref(), &event.payload, &headers)
                .await
            {
                Ok((dlq_partition, dlq_offset)) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(handler = %handler, topic = %event.topic, partition = event.partition,
                        offset = event.offset, attempts = event.attempt, kind = failure.kind.as_str(),
                        error = %failure.message, dlq = %topic, dlq_partition, dlq_offset, "dead-lettered");
                    return Delivery::Done;
                }
                Err(err) => {
                    tracing::error!(handler = %handler, dlq = %topic, error = %err,
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot write dead letter; the message stays unacknowledged until it can");
                    if !pause(self.shutdown.clone(), backoff).await {
                        return Delivery::Abandoned;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// Waits `delay` unless shutdown comes first. Returns `false` on shutdown.
async fn pause(mut shutdown: watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
