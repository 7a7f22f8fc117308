//! Reading a JetStream subject from its start, and deleting single
//! messages: the [`Archive`] the dead-letter tools use.
//!
//! Reading asks the stream for the next message on the subject, sequence
//! after sequence (the message-get API, read by [`raw`], so a header block
//! the client library cannot parse is read too): no consumer is created,
//! so nothing on the server changes. Packed headers are unpacked as for a
//! consumed message. Deleting removes each message by its
//! stream sequence.

use anyhow::Context as _;
use futures_util::TryStreamExt;

use super::{KEY_HEADER, NatsConnection, raw, unpack_headers};

use crate::source::{Archive, Depth, Message, Position};

impl Archive for NatsConnection {
    async fn read_all(&self, topic: &str) -> anyhow::Result<Vec<Message>> {
        let Ok(stream_name) = self.js().stream_by_subject(topic).await else {
            // No stream captures the subject: nothing was ever kept.
            return Ok(Vec::new());
        };
        let client = self.client();
        let mut messages = Vec::new();
        let mut next = 1u64;
        while let Some(stored) = raw::get(&client, &stream_name, next, topic)
            .await
            .with_context(|| format!("cannot read {topic:?}"))?
        {
            next = stored.sequence + 1;
            let mut headers = raw::headers(&stored.block);
            headers.sort_by(|a, b| a.0.cmp(&b.0));
            unpack_headers(&mut headers);
            let key = headers
                .iter()
                .find(|(n, v)| n == KEY_HEADER && !v.is_empty())
                .map(|(_, v)| v.clone());
            messages.push(Message {
                topic: stored.subject,
                key,
                payload: stored.payload,
                headers,
                timestamp_ms: stored.stored_ms,
                position: Position::JetStream {
                    stream: stream_name.clone(),
                    sequence: stored.sequence,
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
                .js()
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
        let Ok(stream_name) = self.js().stream_by_subject(topic).await else {
            return Ok(Depth::default());
        };
        let stream = self
            .js()
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
        let oldest = raw::get(&self.client(), &stream_name, 1, topic)
            .await
            .with_context(|| format!("cannot read {topic:?}"))?;
        let oldest_ms = oldest.and_then(|stored| stored.stored_ms);
        Ok(Depth {
            messages,
            oldest_ms,
        })
    }
}
