//! Publishing dead letters and emitted events: one channel in confirm
//! mode on the publishing connection, shared by every clone, opened again
//! when lost.
//!
//! Invariant: [`Publisher::send`] returns `Ok` only once the broker has
//! confirmed the message (`basic.ack` in confirm mode) and did not return
//! it as unroutable (`mandatory`): for a durable queue and a persistent
//! message, the confirm comes once the message is written to disk. So a
//! dead letter is durable before its original is acknowledged, and an
//! outbox row is deleted only after its event is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;

use super::link::Link;
use super::{decode, route};
use crate::lock::Unpoisoned;
use crate::source::{Publisher, Receipt, Refused};

/// Whether the broker closed the channel because a message of `size`
/// bytes is larger than its `max_message_size` (`PRECONDITION_FAILED -
/// message size … is larger than configured max size <max>`): sending it
/// again cannot succeed. Every publish in flight on the channel gets the
/// same error, so it counts for this one only if this one is over `<max>`;
/// the others are ordinary failures, tried again on a new channel.
fn too_large(err: &lapin::Error, size: usize) -> bool {
    let lapin::ErrorKind::ProtocolError(amqp) = err.kind() else {
        return false;
    };
    let text = amqp.get_message().as_str();
    amqp.get_id() == 406
        && text.contains("message size")
        && text
            .rsplit(' ')
            .next()
            .and_then(|max| max.parse::<usize>().ok())
            .is_some_and(|max| size > max)
}

struct Inner {
    link: Arc<Link>,
    /// The confirm channel, while it is open.
    channel: Mutex<Option<Channel>>,
    /// Held while a channel is being opened (one opening at a time).
    opening: tokio::sync::Mutex<()>,
    timeout: Duration,
}

/// Publishes dead letters and emitted events (see "Publishing" in the
/// module documentation).
#[derive(Clone)]
pub struct RabbitPublisher {
    inner: Arc<Inner>,
}

impl RabbitPublisher {
    pub(super) fn new(link: Arc<Link>, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                link,
                channel: Mutex::new(None),
                opening: tokio::sync::Mutex::new(()),
                timeout,
            }),
        }
    }

    /// The open confirm channel. While one is open this returns at once,
    /// without yielding, so publishes reach the channel in the order their
    /// futures are first polled.
    async fn channel(&self) -> anyhow::Result<Channel> {
        if let Some(channel) = self.current() {
            return Ok(channel);
        }
        let _opening = self.inner.opening.lock().await;
        if let Some(channel) = self.current() {
            return Ok(channel);
        }
        let channel = self.inner.link.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| anyhow::anyhow!("cannot turn on publisher confirms: {err}"))?;
        *self.inner.channel.locked() = Some(channel.clone());
        Ok(channel)
    }

    fn current(&self) -> Option<Channel> {
        let mut slot = self.inner.channel.locked();
        match slot.as_ref() {
            Some(channel) if channel.status().connected() => Some(channel.clone()),
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
    }
}

impl Publisher for RabbitPublisher {
    /// Publishes to `topic` (a queue through the default exchange, or
    /// `exchange/routing.key`), persistent and mandatory, and waits for
    /// the broker's confirm. The receipt has partition and offset 0: a
    /// queue has no positions.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        id: Option<&str>,
    ) -> anyhow::Result<Receipt> {
        let (exchange, routing_key) = route(topic);
        // AMQP carries both names as short strings: a longer one would
        // corrupt the frame (the client writes the length as one byte)
        // and cost the connection.
        if exchange.len() > 255 || routing_key.len() > 255 {
            return Err(anyhow::Error::new(Refused(format!(
                "publish to {topic:?}: an exchange name or routing key longer than 255 bytes, the most AMQP carries"
            ))));
        }
        let properties = decode::properties(key, headers, id);
        let channel = self.channel().await?;
        let publish = async {
            channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    payload,
                    properties,
                )
                .await?
                .await
        };
        let confirmation = match tokio::time::timeout(self.inner.timeout, publish).await {
            Ok(Ok(confirmation)) => confirmation,
            Ok(Err(err)) if too_large(&err, payload.len()) => {
                return Err(anyhow::Error::new(Refused(format!(
                    "publish to {topic:?}: {err}"
                ))));
            }
            Ok(Err(err)) => anyhow::bail!("publish to {topic:?} failed: {err}"),
            Err(_) => anyhow::bail!(
                "publish to {topic:?} not confirmed within {:?}",
                self.inner.timeout
            ),
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(Receipt {
                partition: 0,
                offset: 0,
            }),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                let what = if exchange.is_empty() {
                    format!("there is no queue {routing_key:?}: declare it")
                } else {
                    format!(
                        "no queue is bound to exchange {exchange:?} for routing key {routing_key:?}: bind one"
                    )
                };
                anyhow::bail!(
                    "publish to {topic:?} was returned unroutable ({} {}): {what}",
                    returned.reply_code,
                    returned.reply_text
                )
            }
            Confirmation::Nack(None) => {
                anyhow::bail!("the broker refused the publish to {topic:?} (basic.nack)")
            }
            Confirmation::NotRequested => {
                // The channel lost its confirm mode: open a new one.
                self.inner.channel.locked().take();
                anyhow::bail!("publish to {topic:?} was not confirmed (no confirm mode)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    fn closed(text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            text.into(),
        ))
        .into()
    }

    /// The channel's close reaches every publish in flight on it: only the
    /// one over the broker's limit is refused for good.
    #[test]
    fn only_the_message_over_the_limit_is_too_large() {
        let err = closed(
            "PRECONDITION_FAILED - message size 300000 is larger than configured max size 262144",
        );
        assert!(too_large(&err, 300_000));
        assert!(!too_large(&err, 100));
        assert!(!too_large(
            &closed("PRECONDITION_FAILED - inequivalent arg 'durable'"),
            300_000
        ));
    }
}
