//! An in-memory source, dead-letter sink and native handler, to run the
//! pipeline without a broker or Wasm: for tests and benchmarks.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::{HandlerCall, HandlerFactory};
use crate::host::{Event, Failure, Outcome};
use crate::message::{Message, Position};
use crate::source::{Publisher, Settled, Source};

type Partition = (String, i32);

#[derive(Default)]
struct State {
    queues: BTreeMap<Partition, VecDeque<Message>>,
    /// Live assignment of each partition.
    generations: HashMap<Partition, u64>,
    last_generation: u64,
    received: BTreeMap<Partition, BTreeSet<i64>>,
    settled: BTreeMap<Partition, BTreeMap<i64, Settled>>,
    /// Delivered and not yet settled, now and at most.
    outstanding: usize,
    most_outstanding: usize,
    closed: bool,
}

/// A log-shaped source over messages held in memory, settled per message.
/// Partitions that receive messages are assigned on
/// [`push`](SyntheticSource::push); [`revoke`](SyntheticSource::revoke)
/// takes one away as a rebalance would.
#[derive(Clone, Default)]
pub struct SyntheticSource {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
}

/// One synthetic delivery.
pub struct SyntheticDelivery {
    partition: Partition,
    generation: u64,
    offset: i64,
}

impl SyntheticSource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends messages (in order per partition); their position must be
    /// a Kafka one.
    pub fn push(&self, messages: impl IntoIterator<Item = Message>) {
        let mut state = self.lock();
        for message in messages {
            let Position::Kafka { partition, .. } = message.position else {
                continue;
            };
            let tp = (message.topic.clone(), partition);
            if !state.generations.contains_key(&tp) {
                state.last_generation += 1;
                let generation = state.last_generation;
                state.generations.insert(tp.clone(), generation);
            }
            state.queues.entry(tp).or_default().push_back(message);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Takes `topic`/`partition` away, as a rebalance would: deliveries of
    /// it are no longer owned and its undelivered messages are dropped.
    /// Returns the position that would be committed.
    pub fn revoke(&self, topic: &str, partition: i32) -> Option<i64> {
        let tp = (topic.to_string(), partition);
        let mut state = self.lock();
        state.queues.remove(&tp);
        state.generations.remove(&tp);
        watermark(&state, &tp)
    }

    /// The committable position of every partition: below it, every
    /// message received was settled done or dead-lettered.
    pub fn acked(&self) -> BTreeMap<(String, i32), i64> {
        let state = self.lock();
        state
            .received
            .keys()
            .filter_map(|tp| Some((tp.clone(), watermark(&state, tp)?)))
            .collect()
    }

    /// How every message of a partition was settled, by offset.
    pub fn settled(&self, topic: &str, partition: i32) -> BTreeMap<i64, Settled> {
        self.lock()
            .settled
            .get(&(topic.to_string(), partition))
            .cloned()
            .unwrap_or_default()
    }

    /// The most messages delivered and not yet settled at any moment.
    pub fn most_outstanding(&self) -> usize {
        self.lock().most_outstanding
    }

    /// Whether `close` was called.
    pub fn closed(&self) -> bool {
        self.lock().closed
    }
}

fn watermark(state: &State, tp: &Partition) -> Option<i64> {
    let received = state.received.get(tp)?;
    let settled = state.settled.get(tp);
    let done = |offset: &i64| {
        settled
            .and_then(|s| s.get(offset))
            .is_some_and(|s| *s != Settled::Released)
    };
    received
        .iter()
        .find(|offset| !done(offset))
        .copied()
        .or_else(|| received.last().map(|last| last + 1))
}

impl Source for SyntheticSource {
    type Delivery = SyntheticDelivery;

    async fn recv(&self) -> Result<(Message, SyntheticDelivery), String> {
        loop {
            let notified = self.wake.notified();
            {
                let mut state = self.lock();
                let State {
                    queues,
                    generations,
                    received,
                    outstanding,
                    most_outstanding,
                    ..
                } = &mut *state;
                let next = queues
                    .iter_mut()
                    .find_map(|(tp, queue)| Some((tp.clone(), queue.pop_front()?)));
                if let Some((tp, mut message)) = next {
                    let generation = generations.get(&tp).copied().unwrap_or_default();
                    let Position::Kafka { offset, .. } = message.position else {
                        continue;
                    };
                    received.entry(tp.clone()).or_default().insert(offset);
                    *outstanding += 1;
                    *most_outstanding = (*most_outstanding).max(*outstanding);
                    message.scope = generation;
                    let delivery = SyntheticDelivery {
                        partition: tp,
                        generation,
                        offset,
                    };
                    return Ok((message, delivery));
                }
            }
            notified.await;
        }
    }

    fn owns(&self, delivery: &SyntheticDelivery) -> bool {
        self.lock().generations.get(&delivery.partition) == Some(&delivery.generation)
    }

    fn settle(&self, delivery: &SyntheticDelivery, outcome: Settled) {
        let mut state = self.lock();
        state.outstanding -= 1;
        if state.generations.get(&delivery.partition) != Some(&delivery.generation) {
            return;
        }
        let previous = state
            .settled
            .entry(delivery.partition.clone())
            .or_default()
            .insert(delivery.offset, outcome);
        assert!(previous.is_none(), "a delivery was settled twice");
    }

    async fn close(self) {
        self.lock().closed = true;
    }
}

/// A record as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Destination topic.
    pub topic: String,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A publisher that keeps records in memory; it can be told to fail.
#[derive(Clone, Default)]
pub struct MemoryPublisher {
    /// What was published, in order.
    pub written: Arc<Mutex<Vec<Published>>>,
    /// While set, every send fails.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    /// When set, the next send panics (and clears it): a bug in the path
    /// that publishes.
    pub panic_once: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryPublisher {
    /// A copy of what was published.
    pub fn records(&self) -> Vec<Published> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Publisher for MemoryPublisher {
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        _id: Option<&str>,
    ) -> anyhow::Result<()> {
        if self
            .panic_once
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("publisher panicked (injected)");
        }
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            anyhow::bail!("broker unavailable (simulated)");
        }
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Published {
                topic: topic.to_string(),
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                headers: headers.to_vec(),
            });
        Ok(())
    }
}

/// A handler written in Rust, called like a Wasm one.
pub struct NativeHandler<F> {
    handle: Arc<F>,
}

impl<F> NativeHandler<F>
where
    F: Fn(&Event) -> Outcome + Send + Sync + 'static,
{
    /// Wraps `handle`.
    pub fn new(handle: F) -> Self {
        Self {
            handle: Arc::new(handle),
        }
    }
}

/// One instance of a [`NativeHandler`].
pub struct NativeInstance<F> {
    handle: Arc<F>,
}

impl<F> HandlerCall for NativeInstance<F>
where
    F: Fn(&Event) -> Outcome,
{
    fn handle(&mut self, event: &Event) -> Outcome {
        (self.handle)(event)
    }
}

impl<F> HandlerFactory for NativeHandler<F>
where
    F: Fn(&Event) -> Outcome + Send + Sync + 'static,
{
    type Instance = NativeInstance<F>;

    fn instantiate(&self) -> Result<Self::Instance, Failure> {
        Ok(NativeInstance {
            handle: self.handle.clone(),
        })
    }

    fn version(&self) -> &str {
        "native"
    }
}

/// A message on `topic`/`partition` at `offset` with `key`, and an
/// `event_id` header when `id` is given.
pub fn message(topic: &str, partition: i32, offset: i64, key: &str, id: Option<&str>) -> Message {
    Message {
        topic: topic.to_string(),
        position: Position::Kafka { partition, offset },
        scope: 0,
        key: Some(key.as_bytes().to_vec()),
        payload: format!("payload {offset}").into_bytes(),
        headers: id
            .map(|id| vec![("event_id".to_string(), id.as_bytes().to_vec())])
            .unwrap_or_default(),
        timestamp_ms: None,
    }
}
