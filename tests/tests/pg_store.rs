//! The PostgreSQL store itself, against a private PostgreSQL server: two
//! store handles connected to one schema stand for two weir processes
//! (each has its own pool, its own writer and its own relay lease
//! connection, exactly as two processes would).
//!
//! What the multi-process promises rest on (`runtime/src/store/`): no
//! effect twice, serializable state across processes, prefix listings that
//! see keys added elsewhere, one relay at a time with takeover, sequence
//! numbers in commit order, expiry through the index, and a schema newer
//! than the build refused.

// The one-broker-test-at-a-time guard is held for a whole test (`Guard`).
#![allow(clippy::await_holding_lock)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use std::sync::MutexGuard;
use weir::store::{Applied, Effects, OutboxRecord, PgSettings, Scan, Store, Write};
use weir_tests::postgres::PgServer;

/// Held across awaits on purpose: it keeps broker tests one at a time, and
/// each test has a runtime of its own, so nothing inside one waits for it.
type Guard = MutexGuard<'static, ()>;

fn settings(server: &PgServer, schema: &str) -> PgSettings {
    PgSettings {
        url: server.url(),
        schema: schema.into(),
        pool_size: 8,
        connect_timeout: Duration::from_secs(10),
    }
}

/// The one-broker-test-at-a-time guard, a server and two stores on it
/// ("two processes"); `None` when broker tests are skipped. The test holds
/// the guard for its whole body.
async fn two_stores(schema: &str) -> Result<Option<(Guard, PgServer, Store, Store)>> {
    let Some(guard) = weir_tests::broker_test() else {
        return Ok(None);
    };
    let server = PgServer::start()?;
    let a = Store::connect(&settings(&server, schema)).await?;
    let b = Store::connect(&settings(&server, schema)).await?;
    Ok(Some((guard, server, a, b)))
}

fn finished(id: &str, effects: Effects) -> Write {
    Write::Finished {
        handler: "h".into(),
        id: id.into(),
        ttl: Duration::from_secs(600),
        dedup: true,
        effects: Some(Arc::new(effects)),
    }
}

fn emit(topic: &str, payload: &str) -> OutboxRecord {
    OutboxRecord {
        topic: topic.into(),
        key: Some(b"k".to_vec()),
        payload: payload.as_bytes().to_vec(),
        headers: vec![("weir.handler".into(), b"h".to_vec())],
    }
}

/// One read-modify-write of counter `key`, retried on conflict as the
/// pipeline does; returns how many conflicts it met.
async fn increment(store: &Store, key: &str, id: &str) -> Result<u64> {
    let mut conflicts = 0;
    loop {
        let view = store.state_view()?;
        let found = view.get("h", key).await?;
        let (version, n) = match &found {
            Some((version, value)) => (
                Some(*version),
                String::from_utf8(value.clone())?.parse::<u64>()?,
            ),
            None => (None, 0),
        };
        let mut effects = Effects::default();
        effects.reads.insert(key.to_string(), version);
        effects
            .writes
            .insert(key.to_string(), Some((n + 1).to_string().into_bytes()));
        match store.write(finished(id, effects)).await? {
            Applied::Done => return Ok(conflicts),
            Applied::Conflict => conflicts += 1,
            Applied::Duplicate => anyhow::bail!("{id} is no duplicate"),
        }
    }
}

async fn value(store: &Store, key: &str) -> Result<Option<String>> {
    Ok(store
        .state_view()?
        .get("h", key)
        .await?
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_incrementing_one_key_lose_no_update() -> Result<()> {
    let Some((_guard, _server, a, b)) = two_stores("weir").await? else {
        return Ok(());
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move { increment(&store, "total", &format!("e{i}")).await });
    }
    let mut conflicts = 0;
    while let Some(done) = tasks.join_next().await {
        conflicts += done??;
    }
    ensure!(
        value(&a, "total").await?.as_deref() == Some("200"),
        "200 increments from two processes left {:?}",
        value(&a, "total").await?
    );
    ensure!(
        conflicts > 0,
        "the two processes never raced; the test shows nothing"
    );
    eprintln!("200 increments, {conflicts} conflicts run again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_committed_by_two_processes_at_once_applies_once() -> Result<()> {
    let Some((_guard, _server, a, b)) = two_stores("weir").await? else {
        return Ok(());
    };
    for round in 0..20 {
        let id = format!("same-{round}");
        let effects = |who: &str| {
            let mut effects = Effects::default();
            effects
                .writes
                .insert(format!("by/{round}"), Some(who.as_bytes().to_vec()));
            effects.emits.push(emit("out", &format!("{round}")));
            effects
        };
        let (first, second) = tokio::join!(
            a.write(finished(&id, effects("a"))),
            b.write(finished(&id, effects("b")))
        );
        let mut outcomes = [first?, second?];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        ensure!(
            outcomes == [Applied::Done, Applied::Duplicate],
            "round {round}: {outcomes:?}"
        );
        ensure!(a.seen("h", &id).await?.done && b.seen("h", &id).await?.done);
    }
    ensure!(
        a.outbox_len().await? == 20,
        "{} outbox rows for 20 events",
        a.outbox_len().await?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listing_conflicts_with_a_key_another_process_adds() -> Result<()> {
    let Some((_guard, _server, a, b)) = two_stores("weir").await? else {
        return Ok(());
    };
    let mut first = Effects::default();
    first.writes.insert("item/1".into(), Some(b"x".to_vec()));
    ensure!(a.write(finished("e1", first)).await? == Applied::Done);
    // Process a lists item/… and will write a summary from it.
    let listed = a.state_view()?.scan("h", "item/", None, 10).await?;
    ensure!(listed.len() == 1, "listed {listed:?}");
    // Meanwhile process b adds item/2.
    let mut added = Effects::default();
    added.writes.insert("item/2".into(), Some(b"y".to_vec()));
    ensure!(b.write(finished("e2", added)).await? == Applied::Done);
    let mut summary = Effects::default();
    summary.scans.push(Scan {
        prefix: "item/".into(),
        start_after: None,
        fetched: 10,
        seen: listed.iter().map(|(k, v, _)| (k.clone(), *v)).collect(),
    });
    summary.writes.insert("count".into(), Some(b"1".to_vec()));
    ensure!(
        a.write(finished("e3", summary)).await? == Applied::Conflict,
        "a summary of a listing that missed item/2 was committed"
    );
    ensure!(value(&a, "count").await?.is_none());
    // Keys that need LIKE escaping list literally.
    let mut odd = Effects::default();
    odd.writes.insert("a_b%/1".into(), Some(b"1".to_vec()));
    odd.writes.insert("aXb%/2".into(), Some(b"2".to_vec()));
    ensure!(a.write(finished("e4", odd)).await? == Applied::Done);
    let listed = b.state_view()?.scan("h", "a_b%/", None, 10).await?;
    ensure!(
        listed
            .iter()
            .map(|(k, _, _)| k.as_str())
            .collect::<Vec<_>>()
            == ["a_b%/1"],
        "listed {listed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_lease_is_held_by_one_process_and_taken_over() -> Result<()> {
    let Some((_guard, server, a, b)) = two_stores("weir").await? else {
        return Ok(());
    };
    let lease_a = a.relay_lease().await?;
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.relay_lease().await }
    });
    // b waits while a holds it: its lock request is visible on the server.
    weir_tests::poll_until(
        Duration::from_secs(20),
        "the second process to wait for the lease",
        || {
            let waiting = server.query(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )?;
            Ok((waiting.trim() == "1").then_some(()))
        },
        || "no waiting advisory lock".into(),
    )?;
    ensure!(
        !waiting.is_finished(),
        "both processes hold the relay lease"
    );
    // The holder dies (its connection goes): the other takes over.
    server.query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()",
    )?;
    let mut lease_a = lease_a;
    tokio::time::timeout(Duration::from_secs(20), lease_a.lost())
        .await
        .context("the first process never noticed it lost the lease")?;
    let lease_b = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .context("the lease was not taken over")???;
    ensure!(!lease_b.is_lost());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_rows_of_two_processes_follow_commit_order() -> Result<()> {
    let Some((_guard, _server, a, b)) = two_stores("weir").await? else {
        return Ok(());
    };
    // Rows read in sequence order must never let a row with a lower
    // sequence number appear after a read that returned a higher one (the
    // relay's cursor). Commit from both processes while a reader follows.
    let writers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, store)| {
            tokio::spawn(async move {
                for i in 0..150 {
                    let mut effects = Effects::default();
                    effects.emits.push(emit("out", &format!("{w}-{i}")));
                    store.write(finished(&format!("w{w}-{i}"), effects)).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let mut cursor = None;
    let mut read = Vec::new();
    loop {
        // Whether every commit has returned, asked before the read: an
        // empty read after that means the reader has seen everything.
        let all_committed = writers.iter().all(|w| w.is_finished());
        let rows = a.outbox_batch(cursor, 50).await?;
        for (seq, _) in &rows {
            cursor = Some(*seq);
            read.push(*seq);
        }
        if rows.is_empty() {
            if all_committed {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    for writer in writers {
        writer.await??;
    }
    let all: Vec<u64> = a
        .outbox_batch(None, 1000)
        .await?
        .iter()
        .map(|(s, _)| *s)
        .collect();
    ensure!(
        read == all,
        "a reader following the cursor saw {} rows, the outbox holds {}: a row committed after a read sorted before it",
        read.len(),
        all.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn marks_expire_through_the_index_and_attempts_are_shared() -> Result<()> {
    let Some((_guard, server, a, b)) = two_stores("weir").await? else {
        return Ok(());
    };
    a.write(Write::Finished {
        handler: "h".into(),
        id: "old".into(),
        ttl: Duration::ZERO,
        dedup: true,
        effects: None,
    })
    .await?;
    ensure!(
        !b.seen("h", "old").await?.done,
        "an expired mark counts as done"
    );
    a.write(Write::Attempted {
        handler: "h".into(),
        id: "tried".into(),
        attempts: 3,
    })
    .await?;
    ensure!(
        b.seen("h", "tried").await?.attempts == 3,
        "attempts not shared"
    );
    // The writer sweeps due marks at most once a second, after a commit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        a.write(Write::Attempted {
            handler: "h".into(),
            id: "tick".into(),
            attempts: 1,
        })
        .await?;
        let left = server.query("SELECT count(*) FROM weir.dedup WHERE event_id = 'old'")?;
        if left.trim() == "0" {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the expired mark is still there after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let plan = server.query(
        "EXPLAIN SELECT ctid FROM weir.dedup WHERE expires_ms <= 0 ORDER BY expires_ms LIMIT 10",
    )?;
    ensure!(
        plan.contains("dedup_expiry"),
        "expiry does not use the index: {plan}"
    );
    Ok(())
}

/// However many marks come due, one sweep deletes them all: 10,000 marks
/// that come due together (an hour from now: the sweeper, which sweeps
/// what is due at the time, leaves them alone meanwhile) leave none behind
/// after one sweep at that hour. A sweep used to delete 1,024 at most, once
/// a second, so above that rate the table grew without bound. Prints the
/// sweep's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_sweep_keeps_up_with_any_rate_of_expiring_marks() -> Result<()> {
    let Some((_guard, server, a, _b)) = two_stores("weir").await? else {
        return Ok(());
    };
    const MARKS: usize = 10_000;
    let writes: Vec<_> = (0..MARKS)
        .map(|i| {
            a.write(Write::Finished {
                handler: "h".into(),
                id: format!("due-{i}"),
                ttl: Duration::from_secs(3600),
                dedup: true,
                effects: None,
            })
        })
        .collect();
    for write in futures_util::future::join_all(writes).await {
        write?;
    }
    let count = || -> Result<usize> {
        Ok(server
            .query("SELECT count(*) FROM weir.dedup WHERE event_id LIKE 'due-%'")?
            .trim()
            .parse()?)
    };
    ensure!(count()? == MARKS, "marks missing before the sweep");
    let later = std::time::SystemTime::now() + Duration::from_secs(3601);
    let started = std::time::Instant::now();
    let removed = a.sweep_expired(later).await?;
    let took = started.elapsed();
    let left = count()?;
    ensure!(
        left == 0 && removed as usize == MARKS,
        "one sweep removed {removed} and left {left} of {MARKS} due marks"
    );
    eprintln!(
        "one sweep deleted {removed} due marks in {:.0} ms ({:.0} marks/s)",
        took.as_secs_f64() * 1000.0,
        removed as f64 / took.as_secs_f64().max(1e-9)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_from_a_newer_weir_is_refused_and_schemas_are_apart() -> Result<()> {
    let Some((_guard, server, a, _b)) = two_stores("weir").await? else {
        return Ok(());
    };
    let mut effects = Effects::default();
    effects.writes.insert("k".into(), Some(b"v".to_vec()));
    a.write(finished("e", effects)).await?;
    // Another schema in the same database shares nothing.
    let other = Store::connect(&settings(&server, "other")).await?;
    ensure!(value(&other, "k").await?.is_none());
    ensure!(!other.seen("h", "e").await?.done);
    let tables = server.query(
        "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables WHERE table_schema = 'weir'",
    )?;
    ensure!(
        tables.trim() == "attempts,dedup,meta,outbox,state",
        "tables: {tables}"
    );
    server.query("UPDATE weir.meta SET value = 99 WHERE name = 'schema_version'")?;
    let refused = match Store::connect(&settings(&server, "weir")).await {
        Ok(_) => anyhow::bail!("a schema at version 99 was accepted"),
        Err(err) => err.to_string(),
    };
    ensure!(
        refused.contains("version 99") && refused.contains("newer"),
        "{refused}"
    );
    Ok(())
}
