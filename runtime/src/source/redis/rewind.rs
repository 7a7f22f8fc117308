//! A group moved back on its streams (`weir rewind`): `XGROUP SETID`.

use super::RedisConnection;
use super::consumer::info_fields;
use super::entry;
use crate::source::Rewind;

/// A group's consumer that was active this recently is taken to be running.
const ACTIVE_MS: i64 = 10_000;

impl RedisConnection {
    /// Moves `group` back on each of `streams` (`XGROUP SETID`,
    /// with `apply`; otherwise only says where it would go): one line per
    /// stream. Applying is refused while a consumer of the group (other
    /// than this process's own, which the caller has stopped) was active in
    /// the last 10 s; a consumer that stopped cleanly has left the group.
    ///
    /// # Errors
    ///
    /// When Redis cannot be asked, a consumer is active, or `from` is an
    /// offset (Redis entries have IDs).
    pub async fn rewind_group(
        &self,
        streams: &[String],
        group: &str,
        from: Rewind,
        apply: bool,
    ) -> anyhow::Result<Vec<String>> {
        let target = match from {
            Rewind::Earliest => "0".to_string(),
            Rewind::Time(time) => {
                let ms = time
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                // Everything at or after `time`: the last delivered ID is
                // the greatest one before it.
                match ms.checked_sub(1) {
                    Some(before) => format!("{before}-18446744073709551615"),
                    None => "0".to_string(),
                }
            }
            Rewind::Offset(_) => anyhow::bail!(
                "Redis entries have IDs, not offsets: use --from earliest or --from <RFC 3339 time>"
            ),
        };
        let mut shared = self.shared().await?;
        let mut lines = Vec::new();
        for stream in streams {
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query_async(&mut shared)
                .await
                .unwrap_or(redis::Value::Nil);
            let current = match &groups {
                redis::Value::Array(list) => list.iter().find_map(|info| {
                    let fields = info_fields(info);
                    (fields.get("name").copied().and_then(entry::text).as_deref() == Some(group))
                        .then(|| {
                            fields
                                .get("last-delivered-id")
                                .copied()
                                .and_then(entry::text)
                        })
                        .flatten()
                }),
                _ => None,
            };
            let Some(current) = current else {
                lines.push(format!(
                    "group {group} has no consumer on stream {stream} yet: it starts where the manifest says"
                ));
                continue;
            };
            let consumers: redis::Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg(group)
                .query_async(&mut shared)
                .await
                .map_err(|err| anyhow::anyhow!("XINFO CONSUMERS {stream:?}: {err}"))?;
            if let redis::Value::Array(list) = &consumers {
                for info in list {
                    let fields = info_fields(info);
                    let idle = match fields.get("idle") {
                        Some(redis::Value::Int(ms)) => *ms,
                        _ => i64::MAX,
                    };
                    let name = fields
                        .get("name")
                        .copied()
                        .and_then(entry::text)
                        .unwrap_or_default();
                    // This process's own consumer is stopped by whoever
                    // asks (the admin API's replay stops the worker first).
                    // Asked in a dry run too: a replay checks first.
                    if idle < ACTIVE_MS && name != self.consumer {
                        anyhow::bail!(
                            "consumer {name:?} of group {group} on stream {stream} was active {idle} ms ago: stop weir (every process) before moving the group"
                        );
                    }
                }
            }
            let verb = if apply { "" } else { "would " };
            if apply {
                let _: () = redis::cmd("XGROUP")
                    .arg("SETID")
                    .arg(stream)
                    .arg(group)
                    .arg(&target)
                    .query_async(&mut shared)
                    .await
                    .map_err(|err| anyhow::anyhow!("XGROUP SETID {stream:?}: {err}"))?;
            }
            lines.push(format!(
                "{verb}move group {group} on stream {stream} from last delivered {current} to {target}"
            ));
        }
        Ok(lines)
    }
}
