//! Dead letters and emitted events as stream entries (`XADD`), in the
//! field layout of [`redis`](crate::source::redis).
//!
//! Redis keeps no record of publications to drop a republished one: the
//! outbox relay's republication after a crash can add an entry twice, with
//! the same event id header, which consumers deduplicate on (Weir does).
//! Streams are trimmed as entries are added: to `[source.redis] maxlen`
//! (approximately), and dead-letter streams to their `[dlq] retention` by
//! entry age.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{RedisConnection, entry};
use crate::lock::Unpoisoned;
use crate::source::{Publisher, Receipt, Refused};

/// Publishes entries to streams.
#[derive(Clone)]
pub struct RedisPublisher {
    connection: RedisConnection,
}

impl RedisPublisher {
    pub(super) fn new(connection: RedisConnection) -> Self {
        Self { connection }
    }

    /// The trimming for `topic`: `MINID ~` for a dead-letter stream with a
    /// retention, else `MAXLEN ~` when a length is configured.
    fn trim(&self, topic: &str) -> Option<(&'static str, String)> {
        let retention: Option<Duration> = self.connection.retention.locked().get(topic).copied();
        if let Some(retention) = retention {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let oldest = now.saturating_sub(retention).as_millis();
            return Some(("MINID", oldest.to_string()));
        }
        self.connection
            .maxlen
            .map(|maxlen| ("MAXLEN", maxlen.to_string()))
    }
}

impl Publisher for RedisPublisher {
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        _id: Option<&str>,
    ) -> anyhow::Result<Receipt> {
        let mut add = redis::cmd("XADD");
        add.arg(topic);
        if let Some((how, bound)) = self.trim(topic) {
            add.arg(how).arg("~").arg(bound);
        }
        add.arg("*");
        for (name, value) in entry::fields(key, payload, headers) {
            add.arg(name).arg(value.as_ref());
        }
        let mut shared = self.connection.shared().await?;
        let id: String = add.query_async(&mut shared).await.map_err(|err| {
            // The key holds a string, list, …: no XADD to it can
            // succeed until someone removes it.
            if err.code() == Some("WRONGTYPE") {
                anyhow::Error::new(Refused(format!(
                    "XADD to {topic:?}: the key holds something other than a stream ({err})"
                )))
            } else {
                anyhow::anyhow!("XADD to {topic:?} failed: {err}")
            }
        })?;
        Ok(Receipt {
            partition: 0,
            offset: entry::millis(&id).unwrap_or(0),
        })
    }
}
