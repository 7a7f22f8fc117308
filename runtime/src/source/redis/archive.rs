//! Streams read from their start and trimmed, apart from any group (`weir
//! dlq`).

use super::{RedisConnection, entry};
use crate::source::{Archive, Depth, Message, Position};

/// Entries fetched per `XRANGE`.
const PAGE: usize = 1000;

impl Archive for RedisConnection {
    async fn read_all(&self, topic: &str) -> anyhow::Result<Vec<Message>> {
        let mut shared = self.shared().await?;
        let mut messages = Vec::new();
        let mut from = "-".to_string();
        loop {
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(topic)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut shared)
                .await
                .map_err(|err| anyhow::anyhow!("XRANGE {topic:?}: {err}"))?;
            let page = entry::entries(&reply).map_err(anyhow::Error::msg)?;
            let full = page.len() == PAGE;
            let Some(last) = page.last().map(|e| e.id.clone()) else {
                break;
            };
            messages.extend(page.into_iter().map(|e| entry::to_message(topic, 0, e)));
            if !full {
                break;
            }
            from = format!("({last}");
        }
        Ok(messages)
    }

    /// Deletes each selected entry (`XDEL`).
    async fn remove(
        &self,
        topic: &str,
        selected: &[Position],
        _read: &[Position],
    ) -> anyhow::Result<usize> {
        let ids: Vec<&str> = selected
            .iter()
            .filter_map(|p| match p {
                Position::Redis { entry_id, .. } => Some(entry_id.as_str()),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut shared = self.shared().await?;
        let removed: i64 = redis::cmd("XDEL")
            .arg(topic)
            .arg(&ids)
            .query_async(&mut shared)
            .await
            .map_err(|err| anyhow::anyhow!("XDEL on {topic:?}: {err}"))?;
        Ok(usize::try_from(removed).unwrap_or(0))
    }

    async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        let mut shared = self.shared().await?;
        let messages: u64 = redis::cmd("XLEN")
            .arg(topic)
            .query_async(&mut shared)
            .await
            .map_err(|err| anyhow::anyhow!("XLEN {topic:?}: {err}"))?;
        let first: redis::Value = redis::cmd("XRANGE")
            .arg(topic)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut shared)
            .await
            .map_err(|err| anyhow::anyhow!("XRANGE {topic:?}: {err}"))?;
        let oldest_ms = entry::entries(&first)
            .map_err(anyhow::Error::msg)?
            .first()
            .and_then(|e| entry::millis(&e.id));
        Ok(Depth {
            messages,
            oldest_ms,
        })
    }
}
