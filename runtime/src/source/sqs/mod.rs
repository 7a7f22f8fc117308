//! Amazon SQS through `aws-sdk-sqs`: each handler topic is a queue, read
//! with long polling; a publisher sends dead letters and emitted events.
//!
//! # Queues
//!
//! A topic names a queue (`.` becomes `-` before a trailing `.fifo`: see
//! [`names`]). Queue URLs come from `GetQueueUrl` and are cached. Weir
//! creates only dead-letter queues (`ensure_dead_letters`, when `[dlq]
//! create` allows): `<queue>-dlq`, FIFO for a FIFO queue, keeping messages
//! for the `[dlq] retention` capped at SQS's 14 days. The queues a handler
//! consumes and the queues it emits to must exist.
//!
//! A queue is not a log: handlers consuming one queue share its messages
//! (competing consumers) whatever their `group`, and a new handler gets
//! what the queue holds now (`start` does not apply).
//!
//! # Acknowledgements
//!
//! `Done` and `DeadLettered` delete the message (`DeleteMessageBatch`);
//! `Released` sets its visibility to 0, so it is delivered again at once.
//! Nothing else deletes a message.
//!
//! Invariant: a message Weir holds is never redelivered underneath it. A
//! received message is invisible for the handler's visibility timeout
//! (`[sqs] visibility_timeout`, else `[source.sqs] visibility_timeout`);
//! every held message's visibility is extended to that timeout again every
//! third of it (`ChangeMessageVisibilityBatch`), so running calls and retry
//! backoffs of any length keep it. Weir counts when each message's
//! visibility ends, from the moment it asked (before SQS answered); a
//! message whose visibility could not be extended in time (SQS unreachable,
//! or the receipt handle refused) is no longer this consumer's: `owns` says
//! so, and settling it deletes nothing. A crashed process stops extending,
//! and SQS delivers its messages again one visibility timeout later.
//!
//! # Backpressure
//!
//! A handler never has more than `max_in_flight` messages received and not
//! settled: each receive asks for at most 10 and at most what is left.
//!
//! # Keys, headers and ids
//!
//! A FIFO queue's message key is its `MessageGroupId`; on other queues it
//! is the `ce-partitionkey` attribute, else the queue's name. A manifest's
//! `key` overrides it. Message attributes are the headers (see
//! [`attributes`], which also says how headers beyond SQS's 10 attributes
//! travel). The event's position is the queue URL, message id, receive
//! count and (FIFO) sequence number; its time is `SentTimestamp`.
//!
//! Published messages carry their key in `ce-partitionkey`; on a FIFO
//! queue the key (else the topic) is also the `MessageGroupId`, and the
//! record's deterministic id its `MessageDeduplicationId` (SQS drops a
//! copy republished within five minutes). Either is hashed when SQS would
//! not take it as it is (see [`names::fifo_id`]).
//!
//! # The queue's own redrive policy
//!
//! Weir retries a failing message in-process, keeping it invisible; it
//! does not hand it back to SQS between attempts, so its receive count
//! grows only when a process crashes, releases it (shutdown) or loses it.
//! A queue whose `RedrivePolicy` has a low `maxReceiveCount` can therefore
//! move a message to the queue's own dead-letter queue before Weir
//! dead-letters it (with Weir's headers) after `[retry] max_attempts`. Weir
//! reads the policy when it starts consuming and warns when it is low.

pub mod attributes;
mod consumer;
pub mod names;
mod publisher;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{Credentials, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::{Deserialize, Deserializer};

use super::{Broker, BrokerKind, NoArchive, Rewind, no_archive, no_rewind};
use super::{Depth, Subscription};
use crate::lock::Unpoisoned;
use crate::parse::duration;

pub use consumer::{SqsConsumer, SqsDelivery};
pub use names::check_queue_name;
pub use publisher::SqsPublisher;

/// The attribute carrying a message's key on a standard queue
/// (CloudEvents' `partitionkey`).
pub const KEY_ATTRIBUTE: &str = "ce-partitionkey";

/// Longest long poll SQS allows.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Longest visibility timeout SQS allows.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// Shortest visibility timeout Weir takes: it is extended every third.
const MIN_VISIBILITY: Duration = Duration::from_secs(2);
/// Longest retention SQS allows.
const MAX_RETENTION: Duration = Duration::from_secs(14 * 86_400);
/// Shortest retention SQS allows.
const MIN_RETENTION: Duration = Duration::from_secs(60);

/// `[source.sqs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSource {
    /// The AWS region; unset: the AWS chain's (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// Another endpoint than AWS's (a local SQS-compatible server), e.g.
    /// `http://127.0.0.1:4566`.
    pub endpoint: Option<String>,
    /// A profile of the shared AWS config and credentials files.
    pub profile: Option<String>,
    /// A static access key id (with `secret_access_key`), for local
    /// servers; unset: the AWS credential chain.
    pub access_key_id: Option<String>,
    /// The static secret access key (with `access_key_id`).
    pub secret_access_key: Option<String>,
    /// A session token to go with the static keys.
    pub session_token: Option<String>,
    /// The AWS account owning the queues, when it is not the caller's.
    pub queue_owner: Option<String>,
    /// How long one receive waits for messages (long polling), at most 20 s.
    #[serde(default = "default_wait_time", with = "duration")]
    pub wait_time: Duration,
    /// How long a received message stays invisible to other consumers,
    /// unless a manifest's `[sqs] visibility_timeout` says otherwise.
    #[serde(default = "default_visibility_timeout", with = "duration")]
    pub visibility_timeout: Duration,
    /// How long opening a connection may take.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// How long one request may take (a receive: its wait on top).
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
}

fn default_wait_time() -> Duration {
    MAX_WAIT
}

fn default_visibility_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn check_wait(wait: Duration) -> Result<(), String> {
    if wait > MAX_WAIT {
        return Err(format!(
            "{} is longer than the 20s SQS allows",
            humantime::format_duration(wait)
        ));
    }
    Ok(())
}

fn check_visibility(visibility: Duration) -> Result<(), String> {
    if !(MIN_VISIBILITY..=MAX_VISIBILITY).contains(&visibility) {
        return Err(format!(
            "{} is not between 2s and 12h",
            humantime::format_duration(visibility)
        ));
    }
    Ok(())
}

impl SqsSource {
    /// Checks the table, naming the key that is wrong.
    ///
    /// # Errors
    ///
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => {
                return Err("[source.sqs] secret_access_key: set it with access_key_id".into());
            }
            (None, Some(_)) => {
                return Err("[source.sqs] access_key_id: set it with secret_access_key".into());
            }
            _ => {}
        }
        if self.session_token.is_some() && self.access_key_id.is_none() {
            return Err(
                "[source.sqs] session_token: only with access_key_id and secret_access_key".into(),
            );
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!(
                "[source.sqs] endpoint: {endpoint:?} is not an http:// or https:// URL"
            ));
        }
        if self.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(
                "[source.sqs] region: must not be empty (leave it out to use the AWS chain's)"
                    .into(),
            );
        }
        check_wait(self.wait_time).map_err(|why| format!("[source.sqs] wait_time: {why}"))?;
        check_visibility(self.visibility_timeout)
            .map_err(|why| format!("[source.sqs] visibility_timeout: {why}"))?;
        if self.connect_timeout.is_zero() {
            return Err("[source.sqs] connect_timeout: must be greater than zero".into());
        }
        if self.request_timeout.is_zero() {
            return Err("[source.sqs] request_timeout: must be greater than zero".into());
        }
        Ok(())
    }
}

/// The manifest's `[sqs]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqsSettings {
    /// How long a received message stays invisible to other consumers
    /// (2 s to 12 h); unset: `[source.sqs] visibility_timeout`. Held
    /// messages are extended every third of it, so it only bounds how soon
    /// a crashed process's messages are delivered again.
    #[serde(deserialize_with = "visibility_setting")]
    pub visibility_timeout: Option<Duration>,
    /// How long one receive waits for messages (at most 20 s); unset:
    /// `[source.sqs] wait_time`.
    #[serde(deserialize_with = "wait_setting")]
    pub wait_time: Option<Duration>,
}

fn visibility_setting<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let visibility = duration::deserialize(d)?;
    check_visibility(visibility).map_err(serde::de::Error::custom)?;
    Ok(Some(visibility))
}

fn wait_setting<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let wait = duration::deserialize(d)?;
    check_wait(wait).map_err(serde::de::Error::custom)?;
    Ok(Some(wait))
}

/// Whether `err` says the queue does not exist.
fn missing_queue<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    matches!(
        err.code(),
        Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
    )
}

/// `err` in words, with its causes.
fn describe<E: std::error::Error + 'static, R: std::fmt::Debug>(err: &SdkError<E, R>) -> String {
    format!("{}", DisplayErrorContext(err))
}

/// Why a queue URL could not be had.
#[derive(Debug)]
enum Lookup {
    /// The queue does not exist.
    Missing,
    /// SQS did not answer, or refused.
    Failed(String),
}

impl std::fmt::Display for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lookup::Missing => write!(f, "the queue does not exist"),
            Lookup::Failed(why) => write!(f, "{why}"),
        }
    }
}

/// A connection to SQS (an SDK client) and the queue URLs it has found.
#[derive(Clone)]
pub struct SqsConnection {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    source: SqsSource,
    /// Queue name → URL.
    urls: Mutex<HashMap<String, String>>,
    /// Destination queue name → the task publishing to it, in order (see
    /// [`publisher`]).
    lanes: publisher::Lanes,
}

impl SqsConnection {
    /// Makes the SDK client: the region, endpoint and credentials as
    /// configured, else from the AWS chain. Nothing is sent yet: while SQS
    /// is unreachable consumers keep retrying with backoff and log why, so
    /// Weir starts either way and consumes once SQS answers.
    ///
    /// # Errors
    ///
    /// When no region is configured and the AWS chain has none.
    pub async fn connect(source: &SqsSource) -> anyhow::Result<Self> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &source.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &source.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        if let Some(profile) = &source.profile {
            loader = loader.profile_name(profile.clone());
        }
        if let (Some(id), Some(secret)) = (&source.access_key_id, &source.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                source.session_token.clone(),
                None,
                "weir-config",
            ));
        }
        loader = loader.timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(source.connect_timeout)
                .operation_attempt_timeout(source.request_timeout + source.wait_time)
                .build(),
        );
        let config = loader.load().await;
        let Some(region) = config.region() else {
            anyhow::bail!(
                "[source.sqs] region: not set, and the AWS chain (AWS_REGION, AWS_DEFAULT_REGION, the profile's region) gives none: set one"
            );
        };
        tracing::info!(region = %region, endpoint = source.endpoint.as_deref().unwrap_or("AWS"),
            credentials = if source.access_key_id.is_some() { "static" } else { "AWS chain" },
            "SQS client ready");
        let client = Client::new(&config);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                source: source.clone(),
                urls: Mutex::default(),
                lanes: publisher::Lanes::default(),
            }),
        })
    }

    fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The URL of queue `name` (mapped already), from the cache or
    /// `GetQueueUrl`.
    async fn queue_url(&self, name: &str) -> Result<String, Lookup> {
        if let Some(url) = self.inner.urls.locked().get(name) {
            return Ok(url.clone());
        }
        let mut request = self.client().get_queue_url().queue_name(name);
        if let Some(owner) = &self.inner.source.queue_owner {
            request = request.queue_owner_aws_account_id(owner);
        }
        match request.send().await {
            Ok(out) => {
                let url = out
                    .queue_url()
                    .ok_or_else(|| Lookup::Failed("GetQueueUrl answered without a URL".into()))?
                    .to_string();
                self.inner
                    .urls
                    .locked()
                    .insert(name.to_string(), url.clone());
                Ok(url)
            }
            Err(err) if missing_queue(&err) => Err(Lookup::Missing),
            Err(err) => Err(Lookup::Failed(describe(&err))),
        }
    }

    /// Forgets the cached URL of queue `name` (it went away).
    fn forget_url(&self, name: &str) {
        self.inner.urls.locked().remove(name);
    }

    /// The approximate message counts of queue `name`.
    async fn counts(&self, name: &str) -> Result<Counts, Lookup> {
        let url = self.queue_url(name).await?;
        let out = self
            .client()
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|err| {
                if missing_queue(&err) {
                    self.forget_url(name);
                    Lookup::Missing
                } else {
                    Lookup::Failed(describe(&err))
                }
            })?;
        let count = |attribute: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&attribute))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Counts {
            visible: count(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        })
    }
}

impl Broker for SqsConnection {
    type Settings = SqsSettings;
    type Consumer = SqsConsumer;
    type Publisher = SqsPublisher;
    type Archive = NoArchive;

    fn kind(&self) -> BrokerKind {
        BrokerKind::Sqs
    }

    /// A consumer for one handler.
    fn consumer(&self, subscription: Subscription<SqsSettings>) -> anyhow::Result<SqsConsumer> {
        Ok(SqsConsumer::start(self.clone(), subscription))
    }

    /// A publisher on this connection (all of them share its queues'
    /// publishing tasks).
    fn publisher(&self) -> SqsPublisher {
        SqsPublisher::new(self.clone())
    }

    /// Makes sure the dead-letter queue of topic `dlq` (for messages of
    /// `origin`) exists: when it does not and `create` is set, creates it,
    /// FIFO when its name ends in `.fifo`, keeping messages for `retention`
    /// (at most SQS's 14 days). Returns whether it created it.
    ///
    /// # Errors
    ///
    /// When it is missing and may not be created, or SQS refuses.
    async fn ensure_dead_letters(
        &self,
        dlq: &str,
        origin: &str,
        retention: Duration,
        create: bool,
    ) -> anyhow::Result<Option<i32>> {
        let name = names::queue_name(dlq);
        match self.queue_url(&name).await {
            Ok(_) => return Ok(None),
            Err(Lookup::Failed(why)) => {
                anyhow::bail!("cannot look up dead-letter queue {name:?} (topic {dlq:?}): {why}")
            }
            Err(Lookup::Missing) => {}
        }
        if !create {
            anyhow::bail!(
                "dead-letter queue {name:?} (topic {dlq:?}) does not exist and [dlq] create = false: create it (or allow Weir to)"
            );
        }
        if names::is_fifo(&names::queue_name(origin)) && !names::is_fifo(&name) {
            tracing::warn!(queue = %name, origin,
                "the dead-letter queue of a FIFO queue is not FIFO: dead letters keep no order");
        }
        let seconds = retention.clamp(MIN_RETENTION, MAX_RETENTION).as_secs();
        if retention > MAX_RETENTION {
            tracing::warn!(queue = %name, "[dlq] retention is longer than SQS keeps messages: 14 days it is");
        }
        let mut request = self.client().create_queue().queue_name(&name).attributes(
            QueueAttributeName::MessageRetentionPeriod,
            seconds.to_string(),
        );
        if names::is_fifo(&name) {
            request = request.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let out = request.send().await.map_err(|err| {
            anyhow::anyhow!(
                "cannot create dead-letter queue {name:?} (topic {dlq:?}): {}",
                describe(&err)
            )
        })?;
        if let Some(url) = out.queue_url() {
            self.inner
                .urls
                .locked()
                .insert(name.clone(), url.to_string());
        }
        tracing::info!(queue = %name, topic = dlq, origin, retention_s = seconds, "created a dead-letter queue");
        Ok(Some(1))
    }

    /// How many messages the queue of `topic` holds (visible and in
    /// flight); SQS does not say how old the oldest is. A queue that does
    /// not exist holds none.
    ///
    /// # Errors
    ///
    /// When SQS cannot be asked.
    async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        let name = names::queue_name(topic);
        match self.counts(&name).await {
            Ok(counts) => Ok(Depth {
                messages: counts.visible + counts.in_flight,
                oldest_ms: None,
            }),
            Err(Lookup::Missing) => Ok(Depth::default()),
            Err(Lookup::Failed(why)) => {
                anyhow::bail!("cannot read the size of queue {name:?}: {why}")
            }
        }
    }

    async fn rewind(
        &self,
        _: &Subscription<Self::Settings>,
        _: Rewind,
        _: bool,
    ) -> anyhow::Result<Vec<String>> {
        Err(no_rewind(BrokerKind::Sqs))
    }

    fn archive(&self) -> anyhow::Result<NoArchive> {
        Err(no_archive(BrokerKind::Sqs))
    }
}

/// A queue's approximate message counts.
#[derive(Debug, Clone, Copy)]
struct Counts {
    /// Waiting to be received.
    visible: u64,
    /// Received and neither deleted nor visible again yet.
    in_flight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(extra: &str) -> Result<SqsSource, String> {
        let source: SqsSource = toml::from_str(extra).map_err(|e| e.to_string())?;
        source.validate()?;
        Ok(source)
    }

    #[test]
    fn defaults_and_checks() {
        let plain = source("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.wait_time, Duration::from_secs(20));
        assert_eq!(plain.visibility_timeout, Duration::from_secs(30));
        assert!(
            source("wait_time = \"21s\"")
                .expect_err("must be refused")
                .contains("wait_time")
        );
        assert!(
            source("visibility_timeout = \"1s\"")
                .expect_err("must be refused")
                .contains("visibility_timeout")
        );
        assert!(
            source("access_key_id = \"x\"")
                .expect_err("must be refused")
                .contains("secret_access_key")
        );
        assert!(
            source("endpoint = \"127.0.0.1:4566\"")
                .expect_err("must be refused")
                .contains("endpoint")
        );
        assert!(source("nonsense = 1").is_err());
        assert!(
            source("endpoint = \"http://127.0.0.1:4566\"\nregion = \"us-east-1\"\naccess_key_id = \"a\"\nsecret_access_key = \"b\"")
                .is_ok()
        );
    }

    #[test]
    fn manifest_settings_are_checked_when_read() {
        let settings: SqsSettings =
            toml::from_str("visibility_timeout = \"4s\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.visibility_timeout, Some(Duration::from_secs(4)));
        assert_eq!(settings.wait_time, None);
        assert_eq!(SqsSettings::default().visibility_timeout, None);
        let err =
            toml::from_str::<SqsSettings>("wait_time = \"30s\"").expect_err("must be refused");
        assert!(err.to_string().contains("20s"), "{err}");
        let err = toml::from_str::<SqsSettings>("visibility_timeout = \"13h\"")
            .expect_err("must be refused");
        assert!(err.to_string().contains("12h"), "{err}");
    }
}
