//! An in-memory source, dead-letter sink and native handler, to run the
//! pipeline without a broker or Wasm: for tests and benchmarks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use super::{HandlerCall, HandlerFactory};
use crate::host::{Event, Failure, Outcome};
use crate::lock::Unpoisoned;
use crate::message::{Message, Position};
use crate::source::{Publisher, Receipt, Settled, Source};

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
        self.state.locked()
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
    /// Per-topic switches: see [`stall`](Self::stall),
    /// [`fail_topic`](Self::fail_topic) and [`fail_once`](Self::fail_once).
    topics: Arc<Mutex<HashMap<String, TopicSwitch>>>,
}

/// How a [`MemoryPublisher`] treats one topic.
#[derive(Default)]
struct TopicSwitch {
    /// Sends wait, unanswered, in `parked`.
    stalled: bool,
    /// Every send fails.
    failing: bool,
    /// Payloads whose next send fails.
    fail_once: HashSet<Vec<u8>>,
    /// Payloads whose next send is refused for good
    /// ([`crate::source::Refused`]).
    refuse_once: HashSet<Vec<u8>>,
    /// Sends waiting while stalled, in the order they were made, with
    /// where to answer them.
    parked: VecDeque<(Published, oneshot::Sender<anyhow::Result<()>>)>,
}

impl MemoryPublisher {
    /// A copy of what was published.
    pub fn records(&self) -> Vec<Published> {
        self.written.locked().clone()
    }

    fn switches(&self) -> std::sync::MutexGuard<'_, HashMap<String, TopicSwitch>> {
        self.topics.locked()
    }

    /// From now on, sends to `topic` wait and are not answered (a broker
    /// that does not acknowledge) until [`release`](Self::release).
    pub fn stall(&self, topic: &str) {
        self.switches()
            .entry(topic.to_string())
            .or_default()
            .stalled = true;
    }

    /// Answers the sends waiting on `topic`, in the order they were made
    /// (as one broker partition would), and lets later sends through.
    pub fn release(&self, topic: &str) {
        let mut switches = self.switches();
        let Some(switch) = switches.get_mut(topic) else {
            return;
        };
        switch.stalled = false;
        // Answered under the lock, so a send made meanwhile cannot land
        // before the ones that waited.
        while let Some((record, reply)) = switch.parked.pop_front() {
            let result = self.deliver(Some(switch), record);
            let _ = reply.send(result);
        }
    }

    /// While `failing`, every send to `topic` fails.
    pub fn fail_topic(&self, topic: &str, failing: bool) {
        self.switches()
            .entry(topic.to_string())
            .or_default()
            .failing = failing;
    }

    /// The next send of `payload` to `topic` fails.
    pub fn fail_once(&self, topic: &str, payload: &[u8]) {
        self.switches()
            .entry(topic.to_string())
            .or_default()
            .fail_once
            .insert(payload.to_vec());
    }

    /// The next send of `payload` to `topic` is refused for good, as a
    /// broker refuses a record larger than it takes.
    pub fn refuse_once(&self, topic: &str, payload: &[u8]) {
        self.switches()
            .entry(topic.to_string())
            .or_default()
            .refuse_once
            .insert(payload.to_vec());
    }

    /// Records `record` as published, unless a switch says this send fails.
    fn deliver(&self, switch: Option<&mut TopicSwitch>, record: Published) -> anyhow::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            anyhow::bail!("broker unavailable (simulated)");
        }
        if let Some(switch) = switch {
            if switch.failing {
                anyhow::bail!("topic {:?} unavailable (simulated)", record.topic);
            }
            if switch.fail_once.remove(&record.payload) {
                anyhow::bail!("publish to {:?} failed once (simulated)", record.topic);
            }
            if switch.refuse_once.remove(&record.payload) {
                return Err(anyhow::Error::new(crate::source::Refused(format!(
                    "publish to {:?}: too large (simulated)",
                    record.topic
                ))));
            }
        }
        self.written.locked().push(record);
        Ok(())
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
    ) -> anyhow::Result<Receipt> {
        // One partition; where in it does not matter to the tests.
        let receipt = Receipt {
            partition: 0,
            offset: 0,
        };
        if self
            .panic_once
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("publisher panicked (injected)");
        }
        let record = Published {
            topic: topic.to_string(),
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            headers: headers.to_vec(),
        };
        let answer = {
            let mut switches = self.switches();
            match switches.get_mut(topic) {
                Some(switch) if switch.stalled => {
                    // Parked now, at the first poll: the order of the
                    // sends is the order they were handed over.
                    let (reply, answer) = oneshot::channel();
                    switch.parked.push_back((record, reply));
                    answer
                }
                switch => return self.deliver(switch, record).map(|()| receipt),
            }
        };
        answer
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("publisher dropped (simulated)")))
            .map(|()| receipt)
    }
}

/// A handler written in Rust, called like a Wasm one.
pub struct NativeHandler<F> {
    handle: Arc<F>,
    blocking: bool,
}

impl<F> NativeHandler<F>
where
    F: Fn(&Event) -> Outcome + Send + Sync + 'static,
{
    /// Wraps `handle`, which may block (sleep, wait): each call runs on a
    /// blocking thread.
    pub fn new(handle: F) -> Self {
        Self {
            handle: Arc::new(handle),
            blocking: true,
        }
    }

    /// Wraps `handle`, which never blocks and returns quickly: each call
    /// runs in place on the async runtime, as a Wasm call does.
    pub fn inline(handle: F) -> Self {
        Self {
            handle: Arc::new(handle),
            blocking: false,
        }
    }
}

/// One instance of a [`NativeHandler`].
pub struct NativeInstance<F> {
    handle: Arc<F>,
    blocking: bool,
}

impl<F> HandlerCall for NativeInstance<F>
where
    F: Fn(&Event) -> Outcome + Send + Sync + 'static,
{
    async fn handle(&mut self, event: &Event) -> Outcome {
        if !self.blocking {
            return (self.handle)(event);
        }
        let handle = self.handle.clone();
        let event = event.clone();
        tokio::task::spawn_blocking(move || handle(&event))
            .await
            .unwrap_or_else(|err| {
                Outcome::Failed(Failure {
                    kind: crate::host::FailureKind::Retryable,
                    message: format!("native handler panicked: {err}"),
                    poisoned: true,
                    category: None,
                })
            })
    }
}

impl<F> HandlerFactory for NativeHandler<F>
where
    F: Fn(&Event) -> Outcome + Send + Sync + 'static,
{
    type Instance = NativeInstance<F>;

    async fn instantiate(&self) -> Result<Self::Instance, Failure> {
        Ok(NativeInstance {
            handle: self.handle.clone(),
            blocking: self.blocking,
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
