//! Queues and bindings: finding a queue without changing it (a passive
//! declare), declaring a missing one, binding, and the dead-letter queues.
//!
//! A passive declare of a missing queue makes the broker close the channel
//! (404), so every lookup here uses a channel of its own.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongLongInt};
use lapin::{ErrorKind, ExchangeKind, Queue};

use super::link::Link;
use super::{Binding, RabbitSettings, route};

/// AMQP reply code 404: no such queue or exchange.
const NOT_FOUND: u16 = 404;

/// Whether `err` is the broker saying the queue or exchange does not
/// exist.
fn not_found(err: &lapin::Error) -> bool {
    matches!(err.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_id() == NOT_FOUND)
}

/// Closes a channel used for one lookup (best effort, without waiting for
/// the broker to confirm).
fn dispose(channel: lapin::Channel) {
    tokio::spawn(async move {
        if channel.status().connected() {
            let _ = channel.close(200, "done").await;
        }
    });
}

/// Queue `queue` as the broker has it, or `None` when it does not exist.
///
/// # Errors
///
/// When the broker cannot be asked.
pub(super) async fn passive(link: &Link, queue: &str) -> anyhow::Result<Option<Queue>> {
    let channel = link.channel().await?;
    match channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(found) => {
            dispose(channel);
            Ok(Some(found))
        }
        Err(err) if not_found(&err) => Ok(None),
        Err(err) => anyhow::bail!("cannot look up queue {queue:?}: {err}"),
    }
}

/// Declares durable queue `queue` with `arguments`.
async fn declare(link: &Link, queue: &str, arguments: FieldTable) -> anyhow::Result<Queue> {
    let channel = link.channel().await?;
    let declared = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .map_err(|err| anyhow::anyhow!("cannot declare queue {queue:?}: {err}"))?;
    dispose(channel);
    Ok(declared)
}

/// Makes sure a handler's queue `queue` exists (declared durable with the
/// manifest's arguments when missing) and is bound as the manifest says.
///
/// # Errors
///
/// When the broker refuses (an exchange to bind to does not exist).
pub(super) async fn ensure_queue(
    link: &Link,
    queue: &str,
    settings: &RabbitSettings,
) -> anyhow::Result<()> {
    if passive(link, queue).await?.is_none() {
        let mut arguments = FieldTable::default();
        if settings.single_active_consumer {
            arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        declare(link, queue, arguments).await?;
        tracing::info!(
            queue,
            single_active_consumer = settings.single_active_consumer,
            "declared a durable queue"
        );
    }
    for binding in settings
        .bind
        .iter()
        .filter(|b| b.queue.as_deref().is_none_or(|q| q == queue))
    {
        bind(link, queue, binding).await?;
    }
    Ok(())
}

async fn bind(link: &Link, queue: &str, binding: &Binding) -> anyhow::Result<()> {
    let channel = link.channel().await?;
    channel
        .queue_bind(
            queue,
            &binding.exchange,
            &binding.routing_key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| {
            let hint = if not_found(&err) {
                " (the exchange must exist: declare it first)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "[rabbitmq] bind: cannot bind queue {queue:?} to exchange {:?} with routing key {:?}: {err}{hint}",
                binding.exchange,
                binding.routing_key
            )
        })?;
    dispose(channel);
    Ok(())
}

/// Longest `x-message-ttl` the broker takes, in milliseconds.
const MAX_TTL_MS: u128 = u32::MAX as u128;

/// See `RabbitConnection::ensure_dead_letters`.
pub(super) async fn ensure_dead_letters(
    link: &Link,
    dlq: &str,
    origin: &str,
    retention: Duration,
    create: bool,
) -> anyhow::Result<bool> {
    let (exchange, routing_key) = route(dlq);
    if !exchange.is_empty() {
        let channel = link.channel().await?;
        return match channel
            .exchange_declare(
                exchange,
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                dispose(channel);
                Ok(false)
            }
            Err(err) if not_found(&err) => anyhow::bail!(
                "dead letters of {origin:?} go to exchange {exchange:?} (routing key {routing_key:?}), which does not exist: declare it, and a queue bound to it"
            ),
            Err(err) => anyhow::bail!("cannot look up exchange {exchange:?}: {err}"),
        };
    }
    if passive(link, dlq).await?.is_some() {
        return Ok(false);
    }
    if !create {
        anyhow::bail!(
            "no queue {dlq:?} for the dead letters of {origin:?} and [dlq] create = false: declare it (durable), or allow Weir to"
        );
    }
    let mut arguments = FieldTable::default();
    if !retention.is_zero() {
        let ttl = retention.as_millis().min(MAX_TTL_MS);
        if ttl < retention.as_millis() {
            tracing::warn!(
                queue = dlq,
                "[dlq] retention is longer than RabbitMQ's longest message TTL (about 49 days): dead letters are kept for that long"
            );
        }
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(LongLongInt::try_from(ttl).unwrap_or(LongLongInt::MAX)),
        );
    }
    declare(link, dlq, arguments).await?;
    tracing::info!(queue = dlq, origin, retention = %humantime::format_duration(retention),
        "declared a durable dead-letter queue");
    Ok(true)
}
