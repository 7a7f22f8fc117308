//! Amazon SQS, end to end, against moto: the raw client (aws-sdk-sqs:
//! `ReceiveMessage` of up to 10 with a short wait, `DeleteMessageBatch` of
//! each batch, one request at a time) and `weir run`, on one private
//! `moto_server`, the same messages (attribute `ce-partitionkey`).
//!
//! moto is a Python server and bounds both figures, well below what SQS
//! itself serves: the ratio weir/raw says more than the absolute numbers.
//! It also scans a queue's whole message list on every delete, so a run
//! takes time quadratic in its messages: run it with a few thousand
//! (`E2E_BROKERS=sqs E2E_MESSAGES=5000`), not the default 100,000.
//!
//! A queue is consumed destructively, so each run has a standard queue of
//! its own (`bench-raw`, `bench-default`, `bench-no-dedup`), all filled
//! (`SendMessageBatch`, 10 a call) before the first run. A run is done when
//! its queue's `ApproximateNumberOfMessages` and
//! `ApproximateNumberOfMessagesNotVisible` are both 0.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aws_config::BehaviorVersion;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{Credentials, Region};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use weir_tests::MotoServer;

use super::{RUN_DEADLINE, Row, Settings, deploy, key, payload, time_weir, until};

const BROKER: &str = "Amazon SQS (moto)";

/// The attribute that carries a message's key.
const KEY_ATTRIBUTE: &str = "ce-partitionkey";

/// Most entries SQS takes in one batch request.
const BATCH: usize = 10;

/// moto's region (any will do).
const REGION: &str = "us-east-1";

/// The access key id and secret given to moto (it checks neither).
const ACCESS_KEY: &str = "test";

/// A client for the moto at `endpoint`.
async fn client(endpoint: &str) -> Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            ACCESS_KEY,
            ACCESS_KEY,
            None,
            None,
            "weir-bench",
        ))
        .load()
        .await;
    Client::new(&config)
}

/// Creates standard queue `name`; its URL.
async fn create_queue(client: &Client, name: &str) -> Result<String> {
    let out = client
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .map_err(|err| anyhow!("cannot create queue {name:?}: {}", DisplayErrorContext(err)))?;
    out.queue_url()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("moto created queue {name:?} without a URL"))
}

/// Sends `count` messages to the queue at `url`, [`BATCH`] a request.
async fn produce(client: &Client, url: &str, count: usize) -> Result<()> {
    let started = Instant::now();
    for chunk in (0..count).collect::<Vec<_>>().chunks(BATCH) {
        let mut entries = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let body = String::from_utf8(payload(i, 0)).context("a payload is not UTF-8")?;
            let key = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(key(i))
                .build()
                .context("cannot build the key attribute")?;
            entries.push(
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .message_attributes(KEY_ATTRIBUTE, key)
                    .build()
                    .context("cannot build a send entry")?,
            );
        }
        let out = client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|err| anyhow!("send to {url}: {}", DisplayErrorContext(err)))?;
        if let Some(failed) = out.failed().first() {
            bail!(
                "moto refused a send to {url}: {} {}",
                failed.code(),
                failed.message().unwrap_or_default()
            );
        }
    }
    eprintln!(
        "sent {count} messages to {url} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether the queue at `url` holds nothing visible and nothing in flight.
async fn drained(client: &Client, url: &str) -> Result<bool> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|err| {
            anyhow!(
                "cannot read the counts of {url}: {}",
                DisplayErrorContext(err)
            )
        })?;
    let count = |attribute: QueueAttributeName| -> Result<u64> {
        out.attributes()
            .and_then(|a| a.get(&attribute))
            .ok_or_else(|| anyhow!("moto did not say {attribute} of {url}"))?
            .parse::<u64>()
            .with_context(|| format!("{attribute} of {url}"))
    };
    Ok(count(QueueAttributeName::ApproximateNumberOfMessages)? == 0
        && count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)? == 0)
}

/// The raw client; timed until the queue shows everything deleted.
async fn raw(client: &Client, url: &str, count: usize) -> Result<Duration> {
    let started = Instant::now();
    let deadline = started + RUN_DEADLINE;
    let mut deleted = 0;
    while deleted < count {
        if Instant::now() > deadline {
            bail!("raw consumer: deadline passed after {deleted} of {count} messages");
        }
        // The message attributes (the key), as Weir reads them; no system
        // attributes (moto would need the older `AttributeNames` for them).
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(BATCH as i32)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|err| anyhow!("receive from {url}: {}", DisplayErrorContext(err)))?;
        let entries = out
            .messages()
            .iter()
            .enumerate()
            .filter_map(|(index, message)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(index.to_string())
                    .set_receipt_handle(message.receipt_handle().map(str::to_string))
                    .build()
                    .ok()
            })
            .collect::<Vec<_>>();
        if entries.is_empty() {
            continue;
        }
        let out = client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|err| anyhow!("delete from {url}: {}", DisplayErrorContext(err)))?;
        if let Some(failed) = out.failed().first() {
            bail!(
                "moto refused a delete from {url}: {} {}",
                failed.code(),
                failed.message().unwrap_or_default()
            );
        }
        deleted += out.successful().len();
    }
    until("the raw consumer's deletes", async || {
        drained(client, url).await
    })
    .await?;
    Ok(started.elapsed())
}

/// Raw, then weir with the default manifest and with dedup off.
pub(super) async fn bench(settings: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let server = MotoServer::start()?;
    let client = client(&server.endpoint).await;
    let n = settings.messages;
    let runs = [
        (
            "default",
            "weir, default manifest (dedup on, key ordering)",
            "",
        ),
        ("no-dedup", "weir, dedup off", "[dedup]\nenabled = false\n"),
    ];
    let mut urls = Vec::new();
    for label in std::iter::once("raw").chain(runs.iter().map(|(label, _, _)| *label)) {
        let url = create_queue(&client, &format!("bench-{label}")).await?;
        produce(&client, &url, n).await?;
        urls.push(url);
    }
    let [raw_url, weir_urls @ ..] = urls.as_slice() else {
        bail!("no queue for the raw run");
    };

    let raw = raw(&client, raw_url, n).await?;
    let raw_rate = n as f64 / raw.as_secs_f64();
    eprintln!("sqs raw: {raw_rate:.0} msg/s");
    rows.push(Row {
        broker: BROKER,
        what: "raw aws-sdk-sqs ReceiveMessage (10), DeleteMessageBatch".into(),
        rate: raw_rate,
        raw_rate,
        cpu_us: None,
    });

    let source = format!(
        "[source.sqs]\nendpoint = \"{}\"\nregion = \"{REGION}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{ACCESS_KEY}\"\n",
        server.endpoint
    );
    for ((label, what, extra), url) in runs.into_iter().zip(weir_urls) {
        let queue = format!("bench-{label}");
        let manifest = format!("topics = [\"{queue}\"]\ngroup = \"{queue}\"\n{extra}");
        let deployment = deploy(&source, "noop", "bench", &manifest)?;
        let (elapsed, cpu) = time_weir(&deployment, label, async || drained(&client, url).await)
            .await
            .map_err(|err| anyhow!("sqs weir {label}: {err:#}"))?;
        let rate = n as f64 / elapsed.as_secs_f64();
        let cpu_us = cpu.as_secs_f64() * 1e6 / n as f64;
        eprintln!("sqs weir {label}: {rate:.0} msg/s, {cpu_us:.1} µs CPU/msg");
        rows.push(Row {
            broker: BROKER,
            what: what.into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu_us),
        });
    }
    drop(server);
    Ok(())
}
