//! Redis Streams, end to end: the raw client (redis-rs: `XREADGROUP` of up
//! to 100 entries, `XACK` of each batch) and `weir run`, on one private
//! redis-server, the same entries (fields `key` and `payload`).

use std::time::Instant;

use anyhow::{Result, anyhow};
use redis::aio::ConnectionManager;
use weir_tests::RedisServer;

use super::{Row, Settings, deploy, key, payload, time_weir, until};

const BROKER: &str = "Redis Streams";

/// Appends `count` entries to `stream`, pipelined; the last entry ID.
async fn produce(connection: &mut ConnectionManager, stream: &str, count: usize) -> Result<String> {
    let started = Instant::now();
    let mut last = String::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("key")
                .arg(key(i))
                .arg("payload")
                .arg(payload(i, 0));
        }
        let ids: Vec<String> = pipe.query_async(connection).await?;
        last = ids.last().cloned().unwrap_or_default();
    }
    eprintln!(
        "appended {count} entries to {stream} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(last)
}

/// `<ms>-<seq>` as an ordered pair.
fn order(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Whether `group` has been delivered everything up to `last` and has
/// nothing pending.
async fn acked(
    connection: &mut ConnectionManager,
    stream: &str,
    group: &str,
    last: &str,
) -> Result<bool> {
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(connection)
        .await?;
    let redis::Value::Array(groups) = groups else {
        return Ok(false);
    };
    for info in groups {
        let redis::Value::Array(flat) = info else {
            continue;
        };
        let field = |name: &str| {
            flat.chunks(2).find_map(|pair| match pair {
                [redis::Value::BulkString(n), value] if n == name.as_bytes() => Some(value.clone()),
                _ => None,
            })
        };
        let text = |v: Option<redis::Value>| match v {
            Some(redis::Value::BulkString(b)) => String::from_utf8(b).ok(),
            _ => None,
        };
        if text(field("name")).as_deref() != Some(group) {
            continue;
        }
        let pending = matches!(field("pending"), Some(redis::Value::Int(0)));
        let delivered = text(field("last-delivered-id"));
        return Ok(pending && delivered.as_deref().and_then(order) >= order(last));
    }
    Ok(false)
}

/// The raw client; timed until the group shows everything acknowledged.
async fn raw(
    connection: &mut ConnectionManager,
    stream: &str,
    last: &str,
    count: usize,
) -> Result<std::time::Duration> {
    let started = Instant::now();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("raw")
        .arg("0")
        .query_async(connection)
        .await?;
    let mut seen = 0;
    while seen < count {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("raw")
            .arg("c")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(connection)
            .await?;
        for key in reply.keys {
            let ids: Vec<String> = key.ids.into_iter().map(|e| e.id).collect();
            seen += ids.len();
            let _: i64 = redis::cmd("XACK")
                .arg(stream)
                .arg("raw")
                .arg(&ids)
                .query_async(connection)
                .await?;
        }
    }
    let mut check = connection.clone();
    until("the raw consumer's acks", async || {
        acked(&mut check, stream, "raw", last).await
    })
    .await?;
    Ok(started.elapsed())
}

/// Raw, then weir with the default manifest and with dedup off.
pub(super) async fn bench(settings: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let server = RedisServer::start()?;
    let client = redis::Client::open(server.url.as_str())?;
    let mut connection = client.get_connection_manager().await?;
    let n = settings.messages;
    let last = produce(&mut connection, "bench", n).await?;
    let raw = raw(&mut connection, "bench", &last, n).await?;
    let raw_rate = n as f64 / raw.as_secs_f64();
    eprintln!("redis raw: {raw_rate:.0} msg/s");
    rows.push(Row {
        broker: BROKER,
        what: "raw redis-rs XREADGROUP, XACK per batch".into(),
        rate: raw_rate,
        raw_rate,
        cpu_us: None,
    });
    let source = format!("[source.redis]\nurl = \"{}\"\n", server.url);
    for (label, what, extra) in [
        (
            "default",
            "weir, default manifest (dedup on, key ordering)",
            "",
        ),
        ("no-dedup", "weir, dedup off", "[dedup]\nenabled = false\n"),
    ] {
        let group = format!("bench-{label}");
        let manifest = format!("topics = [\"bench\"]\ngroup = \"{group}\"\n{extra}");
        let deployment = deploy(&source, "noop", "bench", &manifest)?;
        let mut check = connection.clone();
        let (elapsed, cpu) = time_weir(&deployment, label, async || {
            acked(&mut check, "bench", &group, &last).await
        })
        .await
        .map_err(|err| anyhow!("redis weir {label}: {err:#}"))?;
        let rate = n as f64 / elapsed.as_secs_f64();
        let cpu_us = cpu.as_secs_f64() * 1e6 / n as f64;
        eprintln!("redis weir {label}: {rate:.0} msg/s, {cpu_us:.1} µs CPU/msg");
        rows.push(Row {
            broker: BROKER,
            what: what.into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu_us),
        });
    }
    Ok(())
}
