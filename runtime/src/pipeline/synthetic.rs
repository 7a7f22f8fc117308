//! An in-memory source, dead-letter sink and native handler, to run the
//! pipeline without a broker or Wasm: for tests and benchmarks.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::offsets::Ledger;
use super::publish::Publisher;
use super::{HandlerCall, HandlerFactory};
use crate::host::{Event, Failure, Outcome};
use crate::source::{Message, Source};

#[derive(Default)]
struct State {
    queues: BTreeMap<(String, i32), VecDeque<Message>>,
    paused: HashSet<(String, i32)>,
    acked: BTreeMap<(String, i32), i64>,
    pauses: u64,
    closed: bool,
}

/// A source over messages held in memory. All partitions that receive
/// messages are assigned on [`push`](SyntheticSource::push).
#[derive(Clone)]
pub struct SyntheticSource {
    state: Arc<Mutex<State>>,
    ledger: Arc<Ledger>,
    wake: Arc<Notify>,
}

impl SyntheticSource {
    /// A source reporting ownership to `ledger`.
    pub fn new(ledger: Arc<Ledger>) -> Self {
        Self {
            state: Arc::default(),
            ledger,
            wake: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends messages (in order per partition).
    pub fn push(&self, messages: impl IntoIterator<Item = Message>) {
        let mut state = self.lock();
        for message in messages {
            let tp = (message.topic.clone(), message.partition);
            if !state.queues.contains_key(&tp) {
                self.ledger.assign(&tp.0, tp.1);
            }
            state.queues.entry(tp).or_default().push_back(message);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Takes `topic`/`partition` away, as a rebalance would: the ledger
    /// stops accepting its completions and its undelivered messages are
    /// dropped. Returns the final watermark the source would commit.
    pub fn revoke(&self, topic: &str, partition: i32) -> Option<i64> {
        self.lock().queues.remove(&(topic.to_string(), partition));
        self.ledger.revoke(topic, partition)
    }

    /// The acknowledged position of every partition.
    pub fn acked(&self) -> BTreeMap<(String, i32), i64> {
        self.lock().acked.clone()
    }

    /// How often a partition was paused.
    pub fn pauses(&self) -> u64 {
        self.lock().pauses
    }

    /// Whether `close` was called.
    pub fn closed(&self) -> bool {
        self.lock().closed
    }
}

impl Source for SyntheticSource {
    async fn recv(&self) -> Result<Message, String> {
        loop {
            let notified = self.wake.notified();
            {
                let mut state = self.lock();
                let State { queues, paused, .. } = &mut *state;
                let next = queues
                    .iter_mut()
                    .filter(|(tp, _)| !paused.contains(*tp))
                    .find_map(|(_, queue)| queue.pop_front());
                if let Some(message) = next {
                    return Ok(message);
                }
            }
            notified.await;
        }
    }

    fn ack(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut state = self.lock();
        let acked = state
            .acked
            .entry((topic.to_string(), partition))
            .or_insert(0);
        assert!(
            next_offset >= *acked,
            "acknowledged position went backwards"
        );
        *acked = next_offset;
    }

    fn pause(&self, topic: &str, partition: i32) {
        let mut state = self.lock();
        state.pauses += 1;
        state.paused.insert((topic.to_string(), partition));
    }

    fn resume(&self, topic: &str, partition: i32) {
        self.lock().paused.remove(&(topic.to_string(), partition));
        self.wake.notify_one();
    }

    fn close(self) {
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
    ) -> anyhow::Result<()> {
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
        partition,
        offset,
        key: Some(key.as_bytes().to_vec()),
        payload: format!("payload {offset}").into_bytes(),
        headers: id
            .map(|id| vec![("event_id".to_string(), id.as_bytes().to_vec())])
            .unwrap_or_default(),
        timestamp_ms: None,
    }
}
