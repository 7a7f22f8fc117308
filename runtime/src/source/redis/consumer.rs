//! One handler's consumer: reads its streams through its group, claims the
//! entries of dead consumers, keeps what it holds, and acknowledges what the
//! pipeline settled (invariants in [`redis`](crate::source::redis)).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::entry::{self, Entry};
use super::{RedisConnection, RedisSettings};
use crate::lock::Unpoisoned;
use crate::source::StartFrom;
use crate::source::{Message, Settled, Source, Subscription};

/// The longest one blocking read waits before looking around (claims,
/// shutdown).
const BLOCK: Duration = Duration::from_secs(2);

/// How often the group's lag is read once it answers; until then, every
/// [`JOIN_PERIOD`].
const LAG_PERIOD: Duration = Duration::from_secs(5);
const JOIN_PERIOD: Duration = Duration::from_millis(500);

/// One delivered entry.
pub struct RedisDelivery {
    id: u64,
    scope: u64,
    entry: String,
}

/// An entry the pipeline holds: which stream (by scope) and its ID.
#[derive(Clone)]
struct Held {
    scope: u64,
    entry: String,
}

type HeldMap = Arc<Mutex<HashMap<u64, Held>>>;

/// What the reading task keeps between reads.
struct Reader {
    /// The blocking read's own connection (`None` until made).
    connection: Option<ConnectionManager>,
    /// Whether every stream's group is known to exist.
    groups_ready: bool,
    /// While this consumer's own pending entries (a restart under a fixed
    /// name) are still being read: per stream, the last ID read so far.
    backlog: Option<Vec<String>>,
    /// When the next `XAUTOCLAIM` round is due.
    next_claim: Instant,
}

/// An entry read or claimed, with the scope (stream index) it came from.
type Fetched = (u64, Entry);

/// A handler's consumer of its streams.
///
/// Reading runs in a task of its own, which hands entries over through a
/// channel of `max_in_flight` (up to 256) places: `recv` only takes from
/// the channel, so dropping it loses nothing, and the task reads only as
/// many entries as there are free places.
pub struct RedisConsumer {
    connection: RedisConnection,
    spec: Arc<Subscription<RedisSettings>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Fetched>>,
    held: HeldMap,
    next_delivery: AtomicU64,
    acks: mpsc::UnboundedSender<(u64, String)>,
    tasks: [tokio::task::JoinHandle<()>; 4],
}

impl RedisConsumer {
    pub(super) fn new(
        connection: RedisConnection,
        subscription: Subscription<RedisSettings>,
    ) -> Self {
        let spec = Arc::new(subscription);
        let held: HeldMap = Arc::default();
        let (acks, queue) = mpsc::unbounded_channel();
        let (fetched, incoming) = mpsc::channel(spec.max_in_flight.clamp(1, 256));
        let tasks = [
            tokio::spawn(read(
                connection.clone(),
                spec.clone(),
                fetched,
                acks.clone(),
            )),
            tokio::spawn(send_acks(connection.clone(), spec.clone(), queue)),
            tokio::spawn(keep_alive(connection.clone(), spec.clone(), held.clone())),
            tokio::spawn(watch_lag(connection.clone(), spec.clone())),
        ];
        Self {
            connection,
            spec,
            incoming: tokio::sync::Mutex::new(incoming),
            held,
            next_delivery: AtomicU64::new(0),
            acks,
            tasks,
        }
    }

    /// Hands `entry` of the stream with `scope` to the pipeline: held from
    /// now on.
    fn deliver(&self, scope: u64, entry: Entry) -> (Message, RedisDelivery) {
        let stream = usize::try_from(scope)
            .ok()
            .and_then(|i| self.spec.topics.get(i))
            .cloned()
            .unwrap_or_default();
        let id = self.next_delivery.fetch_add(1, Ordering::Relaxed);
        self.held.locked().insert(
            id,
            Held {
                scope,
                entry: entry.id.clone(),
            },
        );
        let delivery = RedisDelivery {
            id,
            scope,
            entry: entry.id.clone(),
        };
        (entry::to_message(&stream, scope, entry), delivery)
    }
}

/// The reading task: reads (or claims) as many entries as there are free
/// places in `fetched`, and hands them over in order. While Redis does not
/// answer it waits, logging why, and tries again. Ends when the consumer
/// is gone.
async fn read(
    connection: RedisConnection,
    spec: Arc<Subscription<RedisSettings>>,
    fetched: mpsc::Sender<Fetched>,
    acks: mpsc::UnboundedSender<(u64, String)>,
) {
    let mut reader = Reader {
        connection: None,
        groups_ready: false,
        backlog: Some(vec!["0".to_string(); spec.topics.len()]),
        // The first claim round comes at once: entries a crashed process
        // left behind are handled without waiting.
        next_claim: Instant::now(),
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        let Ok(permit) = fetched.reserve().await else {
            return;
        };
        let room = fetched.capacity() + 1;
        match fill(&connection, &spec, &mut reader, room, &acks).await {
            Ok(entries) => {
                backoff = Duration::from_millis(250);
                let mut entries = entries.into_iter();
                if let Some(first) = entries.next() {
                    permit.send(first);
                }
                for entry in entries {
                    if fetched.send(entry).await.is_err() {
                        return;
                    }
                }
            }
            Err(err) => {
                drop(permit);
                // The group may be gone with its stream: make sure again.
                reader.groups_ready = false;
                tracing::warn!(group = %spec.group, error = %format!("{err:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot read the streams; trying again (nothing is acknowledged meanwhile)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Creates every stream's group where missing (at the start the manifest
/// asks for; `MKSTREAM`, so a stream nobody wrote yet works).
async fn create_groups(
    spec: &Subscription<RedisSettings>,
    consumer: &str,
    connection: &mut ConnectionManager,
) -> anyhow::Result<()> {
    let start = match spec.start {
        StartFrom::Earliest => "0",
        StartFrom::Latest => "$",
    };
    for stream in &spec.topics {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(&spec.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(connection)
            .await;
        match created {
            Ok(()) => {
                tracing::info!(stream = %stream, group = %spec.group, start, "created the consumer group")
            }
            Err(err) if err.code() == Some("BUSYGROUP") => {}
            Err(err) => anyhow::bail!(
                "cannot create group {:?} on stream {stream:?}: {err}",
                spec.group
            ),
        }
    }
    tracing::info!(group = %spec.group, consumer, streams = %spec.topics.join(","), "consuming");
    Ok(())
}

/// Claims or reads up to `room` entries (possibly none, after a blocking
/// read that timed out).
async fn fill(
    connection: &RedisConnection,
    spec: &Subscription<RedisSettings>,
    reader: &mut Reader,
    room: usize,
    acks: &mpsc::UnboundedSender<(u64, String)>,
) -> anyhow::Result<Vec<Fetched>> {
    let mut redis = match reader.connection.clone() {
        Some(redis) => redis,
        None => {
            let redis = connection.open(BLOCK + Duration::from_secs(10)).await?;
            reader.connection = Some(redis.clone());
            redis
        }
    };
    let group = &spec.group;
    let consumer = &connection.consumer;
    if !reader.groups_ready {
        create_groups(spec, consumer, &mut redis).await?;
        reader.groups_ready = true;
    }
    let claim_idle = spec.settings.claim_idle;
    let mut fetched = Vec::new();
    if Instant::now() >= reader.next_claim {
        let idle_ms = u64::try_from(claim_idle.as_millis()).unwrap_or(u64::MAX);
        for (scope, stream) in (0u64..).zip(&spec.topics) {
            let reply: redis::Value = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(group)
                .arg(consumer)
                .arg(idle_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(room.saturating_sub(fetched.len()).max(1))
                .query_async(&mut redis)
                .await
                .map_err(|err| anyhow::anyhow!("XAUTOCLAIM on {stream:?}: {err}"))?;
            let (_, claimed) = entry::autoclaim_reply(&reply).map_err(anyhow::Error::msg)?;
            if !claimed.is_empty() {
                tracing::info!(stream = %stream, group = %group, claimed = claimed.len(),
                    idle_ms, "claimed entries another consumer left pending");
            }
            fetched.extend(claimed.into_iter().map(|e| (scope, e)));
        }
        reader.next_claim = Instant::now() + (claim_idle / 2).max(BLOCK / 4);
        if !fetched.is_empty() {
            return Ok(fetched);
        }
    }
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(room);
    if reader.backlog.is_none() {
        let until_claim = reader.next_claim.saturating_duration_since(Instant::now());
        let block = BLOCK.min(until_claim).max(Duration::from_millis(10));
        read.arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(2000));
    }
    read.arg("STREAMS").arg(&spec.topics);
    match &reader.backlog {
        // Own pending entries after the last one read.
        Some(after) => {
            read.arg(after);
        }
        None => {
            for _ in &spec.topics {
                read.arg(">");
            }
        }
    }
    let reply: redis::Value = read
        .query_async(&mut redis)
        .await
        .map_err(|err| anyhow::anyhow!("XREADGROUP: {err}"))?;
    let mut got = 0;
    for (stream, entries) in entry::read_reply(&reply).map_err(anyhow::Error::msg)? {
        let Some(scope) = spec.topics.iter().position(|t| *t == stream) else {
            continue;
        };
        if let (Some(after), Some(last)) = (reader.backlog.as_mut(), entries.last()) {
            after[scope] = last.id.clone();
        }
        for entry in entries {
            got += 1;
            if entry.fields.is_empty() {
                // Deleted while pending: nothing to handle, nothing to keep
                // pending.
                let _ = acks.send((scope as u64, entry.id));
                continue;
            }
            fetched.push((scope as u64, entry));
        }
    }
    if reader.backlog.is_some() && got == 0 {
        reader.backlog = None;
    }
    Ok(fetched)
}

impl Source for RedisConsumer {
    type Delivery = RedisDelivery;

    /// The next entry of any of the handler's streams. Cancel-safe: it only
    /// takes from the reading task's channel.
    async fn recv(&self) -> Result<(Message, RedisDelivery), String> {
        let mut incoming = self.incoming.lock().await;
        match incoming.recv().await {
            Some((scope, entry)) => Ok(self.deliver(scope, entry)),
            None => {
                // The reading task ended: only when the consumer is going.
                std::future::pending::<()>().await;
                Err("the Redis reader stopped".into())
            }
        }
    }

    fn owns(&self, delivery: &RedisDelivery) -> bool {
        self.held.locked().contains_key(&delivery.id)
    }

    /// Invariant: `XACK` only for settled outcomes, which the pipeline
    /// reports only once they are durable; a released entry stays pending.
    fn settle(&self, delivery: &RedisDelivery, outcome: Settled) {
        if self.held.locked().remove(&delivery.id).is_none() {
            return;
        }
        if matches!(outcome, Settled::Done | Settled::DeadLettered) {
            let _ = self.acks.send((delivery.scope, delivery.entry.clone()));
        }
    }

    /// Stops reading and sends the acknowledgements still queued. Entries
    /// read but not handed over stay pending and are claimed again.
    async fn close(self) {
        self.held.locked().clear();
        let Self {
            connection,
            acks,
            tasks,
            spec,
            incoming,
            ..
        } = self;
        let [reading, acking, keepalive, lag] = tasks;
        reading.abort();
        drop(incoming);
        drop(acks);
        keepalive.abort();
        lag.abort();
        for topic in &spec.topics {
            spec.progress.forget(topic, 0);
        }
        if tokio::time::timeout(Duration::from_secs(5), acking)
            .await
            .is_err()
        {
            tracing::warn!(group = %spec.group, "acknowledgements still queued after 5 s; those entries are claimed again and deduplicated");
            return;
        }
        leave(&connection, &spec).await;
    }
}

/// Takes this consumer out of each stream's group once nothing is pending
/// under its name (so that a stopped process is not taken for a running
/// one). Invariant: never with entries pending, since deleting a consumer
/// drops its pending entries, which would then never be delivered again.
async fn leave(connection: &RedisConnection, spec: &Subscription<RedisSettings>) {
    let Ok(mut shared) = connection.shared().await else {
        return;
    };
    for stream in &spec.topics {
        let pending: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&spec.group)
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(&connection.consumer)
            .query_async(&mut shared)
            .await;
        let Ok(pending) = pending else { continue };
        if !pending_ids(&pending).is_empty() {
            continue;
        }
        let left: redis::RedisResult<i64> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(stream)
            .arg(&spec.group)
            .arg(&connection.consumer)
            .query_async(&mut shared)
            .await;
        if let Err(err) = left {
            tracing::debug!(stream = %stream, error = %err, "cannot leave the group");
        }
    }
}

/// Sends `XACK`s in batches, in the order settled; an acknowledged entry
/// advances its stream's committed progress. Ends when the queue closes
/// and is drained.
async fn send_acks(
    connection: RedisConnection,
    spec: Arc<Subscription<RedisSettings>>,
    mut queue: mpsc::UnboundedReceiver<(u64, String)>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch: Vec<(u64, String)> = vec![first];
        while batch.len() < 1000
            && let Ok(next) = queue.try_recv()
        {
            batch.push(next);
        }
        let mut by_scope: HashMap<u64, Vec<String>> = HashMap::new();
        for (scope, id) in batch {
            by_scope.entry(scope).or_default().push(id);
        }
        for (scope, ids) in by_scope {
            let Some(stream) = usize::try_from(scope).ok().and_then(|i| spec.topics.get(i)) else {
                continue;
            };
            let mut tries = 0;
            loop {
                tries += 1;
                let sent = match connection.shared().await {
                    Ok(mut shared) => redis::cmd("XACK")
                        .arg(stream)
                        .arg(&spec.group)
                        .arg(&ids)
                        .query_async::<i64>(&mut shared)
                        .await
                        .map_err(anyhow::Error::from),
                    Err(err) => Err(err),
                };
                match sent {
                    Ok(_) => {
                        spec.progress.advanced(stream, 0);
                        break;
                    }
                    Err(err) if tries < 5 => {
                        tracing::debug!(stream = %stream, error = %format!("{err:#}"), "XACK failed; trying again");
                        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                    }
                    Err(err) => {
                        tracing::warn!(stream = %stream, entries = ids.len(), error = %format!("{err:#}"),
                            "cannot acknowledge entries; they will be claimed again and deduplicated");
                        break;
                    }
                }
            }
        }
    }
}

/// Keeps every entry this consumer has from being claimed by another one:
/// every third of `claim_idle`, resets the idle time of everything in its
/// pending list (held, or read and not yet handed over), and drops from
/// `held` what is no longer in it (see "Pending entries of dead consumers"
/// in [`redis`](crate::source::redis)).
async fn keep_alive(
    connection: RedisConnection,
    spec: Arc<Subscription<RedisSettings>>,
    held: HeldMap,
) {
    let period = (spec.settings.claim_idle / 3).max(Duration::from_millis(200));
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let mut shared = match connection.shared().await {
            Ok(shared) => shared,
            Err(err) => {
                tracing::warn!(group = %spec.group, error = %format!("{err:#}"), "cannot keep held entries: Redis does not answer");
                continue;
            }
        };
        for (scope, stream) in (0u64..).zip(&spec.topics) {
            // Taken before the pending list is read: an entry delivered
            // after this is not judged by a list that predates it.
            let mine: Vec<(u64, String)> = held
                .locked()
                .iter()
                .filter(|(_, h)| h.scope == scope)
                .map(|(id, h)| (*id, h.entry.clone()))
                .collect();
            let pending: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
                .arg(stream)
                .arg(&spec.group)
                .arg("-")
                .arg("+")
                .arg(100_000)
                .arg(&connection.consumer)
                .query_async(&mut shared)
                .await;
            let pending = match pending {
                Ok(value) => pending_ids(&value),
                Err(err) => {
                    tracing::warn!(stream = %stream, error = %err, "cannot read the pending list to keep held entries");
                    continue;
                }
            };
            for (delivery, entry) in mine {
                if !pending.contains(&entry) && held.locked().remove(&delivery).is_some() {
                    tracing::warn!(stream = %stream, entry = %entry, group = %spec.group,
                        "a held entry was claimed by another consumer (this one stalled longer than claim_idle); it is no longer worked on here");
                }
            }
            let ids: Vec<&String> = pending.iter().collect();
            for chunk in ids.chunks(1000) {
                let touched: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                    .arg(stream)
                    .arg(&spec.group)
                    .arg(&connection.consumer)
                    .arg(0)
                    .arg(chunk)
                    .arg("JUSTID")
                    .query_async(&mut shared)
                    .await;
                if let Err(err) = touched {
                    tracing::warn!(stream = %stream, error = %err, "cannot reset the idle time of held entries");
                }
            }
        }
    }
}

/// The entry IDs of an `XPENDING … <consumer>` reply.
fn pending_ids(value: &redis::Value) -> HashSet<String> {
    match value {
        redis::Value::Array(rows) => rows
            .iter()
            .filter_map(|row| match row {
                redis::Value::Array(fields) => fields.first().and_then(entry::text),
                _ => None,
            })
            .collect(),
        _ => HashSet::new(),
    }
}

/// Keeps `spec.progress` current from each stream's group info (`XINFO
/// GROUPS`): joined while every group exists and answers; the lag is what
/// the group has not had acknowledged (entries not yet delivered plus
/// pending ones). Ends when aborted.
async fn watch_lag(connection: RedisConnection, spec: Arc<Subscription<RedisSettings>>) {
    loop {
        let mut missing = None;
        for stream in &spec.topics {
            match group_lag(&connection, stream, &spec.group).await {
                Ok(lag) => spec.progress.set_lag(stream, 0, lag),
                Err(why) => {
                    missing.get_or_insert(format!(
                        "group {:?} on stream {stream:?}: {why}",
                        spec.group
                    ));
                }
            }
        }
        let period = match missing {
            None => {
                spec.progress.joined();
                LAG_PERIOD
            }
            Some(why) => {
                spec.progress.not_joined(why);
                JOIN_PERIOD
            }
        };
        tokio::time::sleep(period).await;
    }
}

/// Entries of `stream` that `group` has not acknowledged: its `lag` (not
/// yet delivered) plus its `pending`.
async fn group_lag(connection: &RedisConnection, stream: &str, group: &str) -> Result<i64, String> {
    let mut shared = connection.shared().await.map_err(|e| format!("{e:#}"))?;
    let reply: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut shared)
        .await
        .map_err(|err| format!("no answer: {err}"))?;
    let groups = match reply {
        redis::Value::Array(groups) => groups,
        other => return Err(format!("unexpected reply {other:?}")),
    };
    for info in groups {
        let fields = info_fields(&info);
        if fields.get("name").copied().and_then(entry::text).as_deref() != Some(group) {
            continue;
        }
        let number = |name: &str| match fields.get(name) {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        };
        return Ok(number("lag") + number("pending"));
    }
    Err("not set up".into())
}

/// The name → value pairs of an `XINFO` record.
pub(super) fn info_fields(info: &redis::Value) -> HashMap<String, &redis::Value> {
    match info {
        redis::Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [name, value] => entry::text(name).map(|n| (n, value)),
                _ => None,
            })
            .collect(),
        redis::Value::Map(map) => map
            .iter()
            .filter_map(|(name, value)| entry::text(name).map(|n| (n, value)))
            .collect(),
        _ => HashMap::new(),
    }
}
