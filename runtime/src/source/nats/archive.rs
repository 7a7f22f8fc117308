//! Reading a JetStream subject from its start, and deleting single
//! messages: the [`Archive`] the dead-letter tools use.
//!
//! Reading asks the stream for the next message on the subject, sequence
//! after sequence (the message-get API): no consumer is created, so
//! nothing on the server changes. Deleting removes each message by its
//! stream sequence.

use async_nats::jetstream::stream::RawMessageErrorKind;

use super::{KEY_HEADER, NatsConnection};
use futures_util::TryStreamExt;

use crate::source::{Archive, Depth, Message, Position};

impl Archive for NatsConnection {
    async fn read_all(&self, topic: &str) -> anyhow::Result<Vec<Message>> {
        let Ok(stream_name) = self.js.stream_by_subject(topic).await else {
            // No stream captures the subject: nothing was ever kept.
            return Ok(Vec::new());
        };
        let stream = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|err| anyhow::anyhow!("cannot open stream {stream_name:?}: {err}"))?;
        let mut messages = Vec::new();
        let mut next = 1u64;
        loop {
            let found = stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(topic.to_string())
                .send()
                .await;
            let message = match found {
                Ok(message) => message,
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(err) => {
                    anyhow::bail!("cannot read {topic:?} from stream {stream_name:?}: {err}")
                }
            };
            next = message.sequence + 1;
            let mut headers = Vec::new();
            for (name, values) in message.headers.iter() {
                for value in values {
                    headers.push((name.to_string(), value.as_str().as_bytes().to_vec()));
                }
            }
            headers.sort_by(|a, b| a.0.cmp(&b.0));
            let key = headers
                .iter()
                .find(|(n, v)| n == KEY_HEADER && !v.is_empty())
                .map(|(_, v)| v.clone());
            messages.push(Message {
                topic: message.subject.to_string(),
                key,
                payload: message.payload.to_vec(),
                headers,
                timestamp_ms: i64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).ok(),
                position: Position::JetStream {
                    stream: stream_name.clone(),
                    sequence: message.sequence,
                    delivered: 1,
                },
                scope: 0,
            });
        }
        Ok(messages)
    }

    async fn remove(
        &self,
        topic: &str,
        selected: &[Position],
        _read: &[Position],
    ) -> anyhow::Result<usize> {
        let mut removed = 0;
        for position in selected {
            let Position::JetStream {
                stream, sequence, ..
            } = position
            else {
                continue;
            };
            let handle = self
                .js
                .get_stream(stream)
                .await
                .map_err(|err| anyhow::anyhow!("cannot open stream {stream:?}: {err}"))?;
            match handle.delete_message(*sequence).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(err) => anyhow::bail!(
                    "cannot delete message {sequence} of {topic:?} from stream {stream:?}: {err}"
                ),
            }
        }
        Ok(removed)
    }

    async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        let Ok(stream_name) = self.js.stream_by_subject(topic).await else {
            return Ok(Depth::default());
        };
        let stream = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|err| anyhow::anyhow!("cannot open stream {stream_name:?}: {err}"))?;
        let mut subjects = stream
            .info_with_subjects(topic)
            .await
            .map_err(|err| anyhow::anyhow!("cannot read stream {stream_name:?}: {err}"))?;
        let mut messages = 0u64;
        while let Some((_, count)) = subjects
            .try_next()
            .await
            .map_err(|err| anyhow::anyhow!("cannot read stream {stream_name:?}: {err}"))?
        {
            messages += count as u64;
        }
        if messages == 0 {
            return Ok(Depth::default());
        }
        let oldest = stream
            .raw_message_builder()
            .sequence(1)
            .next_by_subject(topic.to_string())
            .send()
            .await;
        let oldest_ms = match oldest {
            Ok(message) => i64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).ok(),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => None,
            Err(err) => anyhow::bail!("cannot read {topic:?} from stream {stream_name:?}: {err}"),
        };
        Ok(Depth {
            messages,
            oldest_ms,
        })
    }
}
