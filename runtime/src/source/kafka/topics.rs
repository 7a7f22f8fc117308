//! Dead-letter topics that exist: on a cluster that does not create topics
//! on first produce, a missing `<topic>.dlq` would make every dead letter
//! fail and its partition stall. Weir creates it, like the topic it
//! serves (same partition count and replication), with a retention.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::Cluster;

/// How long a metadata request or a creation may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What [`ensure_topic`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The topic was there.
    Existing,
    /// Weir created it with this many partitions.
    Created(i32),
}

/// The partition count and replication factor of `topic`; `None` when the
/// cluster does not know it.
fn shape(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> anyhow::Result<Option<(i32, i32)>> {
    let metadata = admin
        .inner()
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|err| anyhow::anyhow!("cannot read the metadata of {topic:?}: {err}"))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| {
            let replicas = t.partitions()[0].replicas().len();
            (
                i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                i32::try_from(replicas).unwrap_or(1).max(1),
            )
        }))
}

/// Makes sure `topic` exists: when it does not and `create` is set, creates
/// it with the partitions and replication of `like` (one partition, one
/// replica when `like` is unknown too) and `retention`.
///
/// # Errors
///
/// When it is missing and may not be created, or the cluster refuses to
/// create it (the reason, in words).
pub async fn ensure_topic(
    cluster: &Cluster,
    topic: &str,
    like: &str,
    retention: Duration,
    create: bool,
) -> anyhow::Result<Ensured> {
    let config = cluster.client_config("weir-admin");
    let (names, like_name) = (topic.to_string(), like.to_string());
    // Metadata requests block: off the async threads.
    let (admin, found, model) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let admin: AdminClient<DefaultClientContext> = config
            .create()
            .map_err(|err| anyhow::anyhow!("cannot create an admin client: {err}"))?;
        let found = shape(&admin, &names)?;
        let model = shape(&admin, &like_name)?;
        Ok((admin, found, model))
    })
    .await
    .map_err(|err| anyhow::anyhow!("the metadata request stopped: {err}"))??;
    if found.is_some() {
        return Ok(Ensured::Existing);
    }
    if !create {
        anyhow::bail!(
            "dead-letter topic {topic:?} does not exist and [dlq] create = false: create it (or allow Weir to)"
        );
    }
    let (partitions, replication) = model.unwrap_or((1, 1));
    let retention_ms = retention.as_millis().to_string();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
        .set("retention.ms", &retention_ms);
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|err| anyhow::anyhow!("cannot create dead-letter topic {topic:?}: {err}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                anyhow::bail!("the cluster refused to create dead-letter topic {topic:?}: {code}")
            }
        }
    }
    Ok(Ensured::Created(partitions))
}
