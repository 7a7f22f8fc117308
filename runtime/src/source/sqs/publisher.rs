//! Publishing dead letters and emitted events to SQS queues.
//!
//! Each destination queue has one task sending its messages in the order
//! they were handed over (`SendMessageBatch`, up to 10 messages and 256 KiB
//! a request, one request at a time), so a record handed over before
//! another is never sent after it, and a FIFO queue keeps their order
//! within a message group. [`SqsPublisher::send`] hands its record over
//! when first polled and returns once SQS acknowledged it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use tokio::sync::{mpsc, oneshot};

use super::attributes::{self, Encoded};
use super::names::{self, fifo_id, hex_sha256};
use super::{KEY_ATTRIBUTE, Lookup, SqsConnection, describe, missing_queue};
use crate::lock::Unpoisoned;
use crate::source::{Publisher, Receipt, Refused};

/// Most bytes (bodies and attributes) in one `SendMessageBatch`.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Most messages in one `SendMessageBatch`.
const MAX_BATCH: usize = 10;

/// Destination queue name → its publishing task's queue.
pub(super) type Lanes = Mutex<HashMap<String, mpsc::UnboundedSender<Outgoing>>>;

/// One record handed over, waiting to be sent.
pub(super) struct Outgoing {
    topic: String,
    encoded: Encoded,
    /// FIFO queues: the message group id.
    group_id: Option<String>,
    /// FIFO queues: the deduplication id.
    dedup_id: Option<String>,
    reply: oneshot::Sender<anyhow::Result<Receipt>>,
}

/// Publishes dead letters and emitted events to SQS queues.
#[derive(Clone)]
pub struct SqsPublisher {
    connection: SqsConnection,
}

impl SqsPublisher {
    pub(super) fn new(connection: SqsConnection) -> Self {
        Self { connection }
    }

    /// Hands a record to the task of its queue.
    fn hand_over(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        id: Option<&str>,
    ) -> oneshot::Receiver<anyhow::Result<Receipt>> {
        let name = names::queue_name(topic);
        let mut all = Vec::with_capacity(headers.len() + 1);
        if let Some(key) = key
            && !headers.iter().any(|(n, _)| n == KEY_ATTRIBUTE)
        {
            all.push((KEY_ATTRIBUTE.to_string(), key.to_vec()));
        }
        all.extend_from_slice(headers);
        let encoded = attributes::encode(payload, &all);
        let (group_id, dedup_id) = if names::is_fifo(&name) {
            let group = match key {
                Some(key) if !key.is_empty() => fifo_id(key),
                _ => fifo_id(topic.as_bytes()),
            };
            let dedup = match id {
                Some(id) => fifo_id(id.as_bytes()),
                None => {
                    // No id: the contents identify it.
                    let mut parts: Vec<&[u8]> = vec![key.unwrap_or_default(), payload];
                    for (name, value) in headers {
                        parts.push(name.as_bytes());
                        parts.push(value);
                    }
                    format!("c-{}", hex_sha256(&parts))
                }
            };
            (Some(group), Some(dedup))
        } else {
            (None, None)
        };
        let (reply, answer) = oneshot::channel();
        let outgoing = Outgoing {
            topic: topic.to_string(),
            encoded,
            group_id,
            dedup_id,
            reply,
        };
        let mut lanes = self.connection.inner.lanes.locked();
        let lane = lanes.entry(name.clone()).or_insert_with(|| {
            let (sender, queue) = mpsc::unbounded_channel();
            tokio::spawn(run_lane(self.connection.clone(), name.clone(), queue));
            sender
        });
        if let Err(mpsc::error::SendError(outgoing)) = lane.send(outgoing) {
            // The task is gone (it cannot end while its sender is here, but
            // should it): start another.
            let (sender, queue) = mpsc::unbounded_channel();
            tokio::spawn(run_lane(self.connection.clone(), name.clone(), queue));
            let _ = sender.send(outgoing);
            *lane = sender;
        }
        answer
    }
}

impl Publisher for SqsPublisher {
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        id: Option<&str>,
    ) -> anyhow::Result<Receipt> {
        // Handed over on the first poll, before anything is awaited: the
        // order of first polls is the order of sending.
        let answer = self.hand_over(topic, key, payload, headers, id);
        answer
            .await
            .map_err(|_| anyhow::anyhow!("publish to {topic:?}: the publishing task stopped"))?
    }
}

/// Sends the records handed over for queue `name`, in order, in batches.
async fn run_lane(
    connection: SqsConnection,
    name: String,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut waiting: VecDeque<Outgoing> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(outgoing) => waiting.push_back(outgoing),
                None => return,
            }
        }
        while let Ok(outgoing) = queue.try_recv() {
            waiting.push_back(outgoing);
        }
        let mut batch = Vec::new();
        let mut size = 0;
        while let Some(front) = waiting.front() {
            let next = front.encoded.size();
            if next > MAX_BATCH_BYTES {
                // Larger than SQS takes in one message: refused for good.
                if let Some(outgoing) = waiting.pop_front() {
                    let _ = outgoing.reply.send(Err(anyhow::Error::new(Refused(format!(
                        "publish to {:?} (queue {name:?}): {next} bytes with its attributes, more than the {MAX_BATCH_BYTES} SQS takes",
                        outgoing.topic
                    )))));
                }
                continue;
            }
            if batch.len() == MAX_BATCH || (!batch.is_empty() && size + next > MAX_BATCH_BYTES) {
                break;
            }
            size += next;
            batch.extend(waiting.pop_front());
        }
        send_batch(&connection, &name, batch).await;
    }
}

/// Sends `batch` to queue `name` and answers each record.
async fn send_batch(connection: &SqsConnection, name: &str, batch: Vec<Outgoing>) {
    let fail_all = |batch: Vec<Outgoing>, why: &str| {
        for outgoing in batch {
            let topic = outgoing.topic.clone();
            let _ = outgoing.reply.send(Err(anyhow::anyhow!(
                "publish to {topic:?} (queue {name:?}): {why}"
            )));
        }
    };
    let url = match connection.queue_url(name).await {
        Ok(url) => url,
        Err(Lookup::Missing) => {
            return fail_all(
                batch,
                "the queue does not exist; create it (Weir creates only dead-letter queues)",
            );
        }
        Err(Lookup::Failed(why)) => return fail_all(batch, &why),
    };
    let mut entries = Vec::with_capacity(batch.len());
    for (index, outgoing) in batch.iter().enumerate() {
        let entry = SendMessageBatchRequestEntry::builder()
            .id(index.to_string())
            .message_body(outgoing.encoded.body.clone())
            .set_message_attributes(
                (!outgoing.encoded.attributes.is_empty())
                    .then(|| outgoing.encoded.attributes.clone()),
            )
            .set_message_group_id(outgoing.group_id.clone())
            .set_message_deduplication_id(outgoing.dedup_id.clone())
            .build();
        match entry {
            Ok(entry) => entries.push(entry),
            Err(err) => return fail_all(batch, &format!("cannot build the request: {err}")),
        }
    }
    let sent = connection
        .client()
        .send_message_batch()
        .queue_url(&url)
        .set_entries(Some(entries))
        .send()
        .await;
    let out = match sent {
        Ok(out) => out,
        Err(err) => {
            if missing_queue(&err) {
                connection.forget_url(name);
            }
            return fail_all(batch, &describe(&err));
        }
    };
    let mut answers: HashMap<&str, anyhow::Result<Receipt>> = HashMap::new();
    for ok in out.successful() {
        let offset = ok
            .sequence_number()
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0);
        answers.insert(
            ok.id(),
            Ok(Receipt {
                partition: 0,
                offset,
            }),
        );
    }
    for failed in out.failed() {
        let why = format!(
            "SQS refused it: {} {}",
            failed.code(),
            failed.message().unwrap_or_default()
        );
        // A sender's fault is the message's own: sending it again cannot
        // succeed.
        answers.insert(
            failed.id(),
            Err(if failed.sender_fault() {
                anyhow::Error::new(Refused(why))
            } else {
                anyhow::anyhow!(why)
            }),
        );
    }
    let mut answers: HashMap<String, anyhow::Result<Receipt>> = answers
        .into_iter()
        .map(|(id, answer)| (id.to_string(), answer))
        .collect();
    for (index, outgoing) in batch.into_iter().enumerate() {
        let answer = answers
            .remove(&index.to_string())
            .unwrap_or_else(|| Err(anyhow::anyhow!("SQS did not answer for it")));
        let topic = outgoing.topic;
        let _ = outgoing.reply.send(
            answer.map_err(|err| err.context(format!("publish to {topic:?} (queue {name:?})"))),
        );
    }
}
