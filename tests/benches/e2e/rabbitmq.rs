//! RabbitMQ, end to end: the raw client (lapin: a consumer with prefetch
//! 256, acking each message) and `weir run`, on one private node, the same
//! messages (persistent, header `ce-partitionkey`, a unique `message_id`).
//!
//! A queue is consumed destructively, so each run has a durable queue of
//! its own (`bench-raw`, `bench-default`, `bench-no-dedup`), all filled
//! before the first run. A run is done when its queue has nothing ready
//! and nothing unacknowledged; the unacknowledged count comes from
//! `rabbitmqctl`, which takes a while to answer, so both figures include
//! about one such call.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use weir_tests::RabbitServer;

use super::{RUN_DEADLINE, Row, Settings, deploy, key, payload, time_weir, until};

const BROKER: &str = "RabbitMQ";

/// The header that carries a message's key.
const KEY_HEADER: &str = "ce-partitionkey";

/// Publishes awaited together before the confirms are collected.
const PUBLISH_WINDOW: usize = 1000;

/// Consumer prefetch of the raw client.
const PREFETCH: u16 = 256;

/// A connection to `url`, named after `role` (as the broker lists it).
async fn connect(url: &str, role: &str) -> Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(format!("weir-bench ({role})").into());
    Connection::connect(url, properties)
        .await
        .map_err(|err| anyhow!("cannot connect to RabbitMQ at {url}: {err}"))
}

/// Declares durable queue `queue`.
async fn declare(channel: &Channel, queue: &str) -> Result<()> {
    channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| anyhow!("cannot declare queue {queue:?}: {err}"))?;
    Ok(())
}

/// Persistent, with the key header and `id` as `message_id`.
fn properties(i: usize, id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        KEY_HEADER.into(),
        AMQPValue::LongString(LongString::from(key(i).into_bytes())),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_message_id(id.into())
}

/// Publishes `count` messages to `queue` through the default exchange, with
/// publisher confirms.
async fn produce(channel: &Channel, queue: &str, count: usize) -> Result<()> {
    let started = Instant::now();
    for chunk in (0..count).collect::<Vec<_>>().chunks(PUBLISH_WINDOW) {
        let mut pending = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let id = format!("{queue}-{i}");
            pending.push(
                channel
                    .basic_publish(
                        "",
                        queue,
                        BasicPublishOptions::default(),
                        &payload(i, 0),
                        properties(i, &id),
                    )
                    .await
                    .map_err(|err| anyhow!("publish to {queue:?}: {err}"))?,
            );
        }
        for confirm in pending {
            let confirmation = confirm
                .await
                .map_err(|err| anyhow!("publish to {queue:?}: {err}"))?;
            if !confirmation.is_ack() {
                bail!("the broker refused a publish to {queue:?}: {confirmation:?}");
            }
        }
    }
    eprintln!(
        "published {count} messages to {queue} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether `queue` has nothing ready (a passive declare, cheap) and, asked
/// only then, nothing unacknowledged (`rabbitmqctl`).
async fn drained(server: &RabbitServer, channel: &Channel, queue: &str) -> Result<bool> {
    let found = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| anyhow!("cannot look up queue {queue:?}: {err}"))?;
    if found.message_count() > 0 {
        return Ok(false);
    }
    // rabbitmqctl blocks this thread, which is fine: lapin's I/O runs on
    // threads of its own.
    Ok(server
        .queue_counts()?
        .iter()
        .any(|(name, ready, unacked)| name == queue && *ready == 0 && *unacked == 0))
}

/// The raw client; timed until the queue shows everything acknowledged.
async fn raw(
    server: &RabbitServer,
    connection: &Connection,
    check: &Channel,
    queue: &str,
    count: usize,
) -> Result<Duration> {
    let started = Instant::now();
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions { global: false })
        .await
        .map_err(|err| anyhow!("cannot set the prefetch: {err}"))?;
    let mut consumer = channel
        .basic_consume(
            queue,
            "weir-bench-raw",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| anyhow!("cannot consume queue {queue:?}: {err}"))?;
    let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
    let mut seen = 0;
    while seen < count {
        let Ok(next) = tokio::time::timeout_at(deadline, consumer.next()).await else {
            bail!("raw consumer: deadline passed after {seen} of {count} messages");
        };
        let Some(delivery) = next else {
            bail!("the raw consumer ended after {seen} of {count} messages");
        };
        let delivery = delivery.map_err(|err| anyhow!("raw consumer: {err}"))?;
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|err| anyhow!("raw consumer ack: {err}"))?;
        seen += 1;
    }
    until("the raw consumer's acks", async || {
        drained(server, check, queue).await
    })
    .await?;
    let elapsed = started.elapsed();
    let _ = channel.close(200, "done").await;
    Ok(elapsed)
}

/// Raw, then weir with the default manifest and with dedup off.
pub(super) async fn bench(settings: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let server = RabbitServer::start()?;
    let connection = connect(&server.url, "producer").await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| anyhow!("cannot turn on publisher confirms: {err}"))?;
    let n = settings.messages;
    let runs = [
        (
            "default",
            "weir, default manifest (dedup on, key ordering)",
            "",
        ),
        ("no-dedup", "weir, dedup off", "[dedup]\nenabled = false\n"),
    ];
    for queue in std::iter::once("raw").chain(runs.iter().map(|(label, _, _)| *label)) {
        let queue = format!("bench-{queue}");
        declare(&publisher, &queue).await?;
        produce(&publisher, &queue, n).await?;
    }
    // Lookups on a channel of their own: a failed one closes its channel.
    let check = connection.create_channel().await?;

    let raw = raw(&server, &connection, &check, "bench-raw", n).await?;
    let raw_rate = n as f64 / raw.as_secs_f64();
    eprintln!("rabbitmq raw: {raw_rate:.0} msg/s");
    rows.push(Row {
        broker: BROKER,
        what: format!("raw lapin consumer, prefetch {PREFETCH}, ack per message"),
        rate: raw_rate,
        raw_rate,
        cpu_us: None,
    });

    let source = format!("[source.rabbitmq]\nurl = \"{}\"\n", server.url);
    for (label, what, extra) in runs {
        let queue = format!("bench-{label}");
        let manifest = format!("topics = [\"{queue}\"]\ngroup = \"{queue}\"\n{extra}");
        let deployment = deploy(&source, "noop", "bench", &manifest)?;
        let (elapsed, cpu) = time_weir(&deployment, label, async || {
            drained(&server, &check, &queue).await
        })
        .await
        .map_err(|err| anyhow!("rabbitmq weir {label}: {err:#}"))?;
        let rate = n as f64 / elapsed.as_secs_f64();
        let cpu_us = cpu.as_secs_f64() * 1e6 / n as f64;
        eprintln!("rabbitmq weir {label}: {rate:.0} msg/s, {cpu_us:.1} µs CPU/msg");
        rows.push(Row {
            broker: BROKER,
            what: what.into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu_us),
        });
    }
    let _ = connection.close(200, "done").await;
    drop(server);
    Ok(())
}
