//! Several `weir run` processes sharing one PostgreSQL store (`[store]
//! url`): dedup marks, attempt counts, handler state and the outbox live in
//! PostgreSQL, so processes that share one consumer group (Kafka) or one
//! durable consumer (NATS JetStream) keep exactly-once effects while work
//! moves between them: when a member is SIGKILLed, when it comes back,
//! when a newcomer joins; and a store that goes away holds the work
//! instead of losing or repeating it.
//!
//! Each test starts its own PostgreSQL server ([`PgServer`]), its own
//! broker, and the real `weir` binary; the proof is the `counter` handler's
//! (see [`weir_tests::counting`]). `WEIR_CRASH_CYCLES` sets the rounds of
//! kills (default 8 on Kafka, 80 on NATS: about a minute each);
//! `WEIR_CRASH_SEED` repeats a run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use weir_tests::admin::{get, ready_until};
use weir_tests::counting::{
    COUNTER_GROUP, CRASH_WAIT, INPUT, Input, counted, counter_deployment_working, crash_cycles,
    finish_and_verify,
};
use weir_tests::postgres::{quote_ident, quote_literal};
use weir_tests::{
    BrokerKind, Deployment, KafkaBroker, PgServer, Rng, TestBroker, WeirProcess, broker_test,
    free_port, poll_progress, poll_until, stop,
};

const WAIT: Duration = Duration::from_secs(90);

/// Rounds of produce-and-kill when `WEIR_CRASH_CYCLES` is not set: about a
/// minute per broker on two cores. A Kafka round is slower: a killed
/// member's partitions move only once the broker has given up on its
/// session; a JetStream durable consumer hands out messages to whichever
/// member pulls.
fn default_rounds(kind: BrokerKind) -> usize {
    match kind {
        BrokerKind::Kafka => 8,
        _ => 80,
    }
}
/// New events per round, and copies of earlier ones (same id, same key).
const NEW_PER_ROUND: usize = 60;
const DUPLICATES_PER_ROUND: usize = 15;
/// Milliseconds each counter call works, so that a round's events take a
/// while and calls overlap.
const WORK_MS: u64 = 40;
/// A kill comes up to this many milliseconds after a round's work began.
const KILL_DELAY_MS: u64 = 300;

mod kafka {
    #[test]
    fn three_processes_share_one_group_through_sigkills_and_a_newcomer() -> anyhow::Result<()> {
        super::three_processes(weir_tests::BrokerKind::Kafka)
    }
}

mod nats {
    #[test]
    fn three_processes_share_one_group_through_sigkills_and_a_newcomer() -> anyhow::Result<()> {
        super::three_processes(weir_tests::BrokerKind::Nats)
    }
}

/// One member of the group: a name (its data directory) and its current
/// process; a killed member is restarted under the same name.
struct Member {
    name: String,
    process: WeirProcess,
    runs: usize,
    /// `counted` records of its earlier, killed processes.
    earlier: usize,
}

impl Member {
    fn start(deployment: &Deployment, name: &str) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            process: deployment.start_member(name, &format!("{name}-0"))?,
            runs: 0,
            earlier: 0,
        })
    }

    /// Calls its current process has logged.
    fn counted(&self) -> usize {
        counted(&self.process)
    }

    /// Calls all its processes have logged.
    fn total(&self) -> usize {
        self.earlier + self.counted()
    }

    /// SIGKILL, then the same member again (same data directory, a new
    /// log).
    fn kill_and_restart(&mut self, deployment: &Deployment) -> Result<()> {
        self.process.kill()?;
        self.earlier += self.counted();
        self.runs += 1;
        self.process =
            deployment.start_member(&self.name, &format!("{}-{}", self.name, self.runs))?;
        Ok(())
    }
}

/// Whether `member` logs another call within `timeout` (polling every few
/// milliseconds): a kill right after it lands while calls are running.
fn handles_within(member: &Member, timeout: Duration) -> bool {
    let seen = member.counted();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if member.counted() > seen {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Two processes, then three, share the counter's consumer group (NATS:
/// its durable consumer) over one PostgreSQL store. A stream with
/// duplicate ids goes in over several rounds; in each round a random
/// member that is handling the round's events is SIGKILLed and restarted;
/// halfway a third member joins. The members finish the stream, every
/// member stops, a final process catches up, and: every per-key count in state equals the distinct input
/// events of its key; every emitted event is in the output, its copies
/// identical, per key with counts 1..=n; the group acknowledged everything;
/// the state is in PostgreSQL's tables; and the members shared the work.
fn three_processes(kind: BrokerKind) -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let started = Instant::now();
    let pg = PgServer::start()?;
    let broker = kind.start()?;
    let broker = broker.as_ref();
    let deployment = counter_deployment_working(broker, "", WORK_MS)?;
    deployment.store_in(&pg, None)?;

    let mut rng = Rng::from_env();
    let mut input = Input::default();
    let rounds = crash_cycles(default_rounds(kind));
    let newcomer_round = rounds / 2;
    let mut members = vec![
        Member::start(&deployment, "a")?,
        Member::start(&deployment, "b")?,
    ];
    let mut kills_mid_work = 0;
    for round in 0..rounds {
        if round == newcomer_round {
            members.push(Member::start(&deployment, "c")?);
        }
        let before: Vec<usize> = members.iter().map(Member::counted).collect();
        input.produce(broker, &mut rng, NEW_PER_ROUND, DUPLICATES_PER_ROUND)?;
        let working_since = |members: &[Member]| -> Vec<usize> {
            (0..members.len())
                .filter(|&i| members[i].counted() > before.get(i).copied().unwrap_or(0))
                .collect()
        };
        poll_until(
            WAIT,
            &format!("a member to handle events of round {round}"),
            || Ok((!working_since(&members).is_empty()).then_some(())),
            || describe(&members, broker),
        )?;
        std::thread::sleep(Duration::from_millis(rng.below(KILL_DELAY_MS)));
        let working = working_since(&members);
        let victim = *working
            .get(rng.below(working.len() as u64) as usize)
            .ok_or_else(|| anyhow!("no member handled events of round {round}"))?;
        let member = members
            .get_mut(victim)
            .ok_or_else(|| anyhow!("no member {victim}"))?;
        if handles_within(member, Duration::from_secs(2)) {
            kills_mid_work += 1;
        }
        member.kill_and_restart(&deployment)?;
    }
    // The members finish the stream between them: once the group has
    // noticed the last killed process is gone, its share moves to the
    // others.
    poll_progress(
        CRASH_WAIT,
        "the members to acknowledge everything produced",
        || {
            Ok(broker
                .caught_up(COUNTER_GROUP, INPUT, &input.produced)?
                .then_some(()))
        },
        || {
            let calls: usize = members.iter().map(Member::total).sum();
            (calls, broker.progress_mark(COUNTER_GROUP, INPUT))
        },
        || describe(&members, broker),
    )?;
    for member in &mut members {
        stop(&mut member.process).with_context(|| format!("stopping member {}", member.name))?;
    }
    let shares: BTreeMap<String, usize> = members
        .iter()
        .map(|m| (m.name.clone(), m.total()))
        .collect();
    eprintln!(
        "{rounds} rounds, {kills_mid_work} kills while handling; calls per member: {shares:?}"
    );
    ensure!(
        kills_mid_work * 2 >= rounds,
        "only {kills_mid_work} of {rounds} kills landed while the member was handling"
    );
    ensure!(
        shares.values().filter(|&&n| n > 0).count() >= 2,
        "the work was not shared: calls per member {shares:?}"
    );
    ensure!(
        shares.get("c").is_some_and(|&n| n > 0),
        "the member that joined halfway never handled anything: {shares:?}"
    );

    finish_and_verify(broker, &deployment, &input)?;
    ensure_state_in_postgres(&pg, "weir", input.per_key().len())?;
    eprintln!("took {:.0?}", started.elapsed());
    Ok(())
}

/// Each member's calls so far and its log, and the group's progress.
fn describe(members: &[Member], broker: &dyn TestBroker) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|m| {
            format!(
                "{}: {} calls, log {}",
                m.name,
                m.total(),
                m.process.log.display()
            )
        })
        .collect();
    format!(
        "{}; {}",
        members.join("; "),
        broker.progress(COUNTER_GROUP, INPUT)
    )
}

/// Checks through psql that the store's tables are in `schema` and that
/// its state table(s) hold at least `keys` rows for handler `counter` (all
/// rows, when a table has no `handler` column).
fn ensure_state_in_postgres(pg: &PgServer, schema: &str, keys: usize) -> Result<()> {
    let tables = pg.tables(schema)?;
    ensure!(
        !tables.is_empty(),
        "no tables in schema {schema}: the store is not in PostgreSQL"
    );
    let state_tables: Vec<&String> = tables.iter().filter(|t| t.contains("state")).collect();
    ensure!(
        !state_tables.is_empty(),
        "no state table in schema {schema}: {tables:?}"
    );
    let mut rows = 0;
    for table in state_tables {
        let filter = if pg.columns(schema, table)?.iter().any(|c| c == "handler") {
            format!(" where handler = {}", quote_literal("counter"))
        } else {
            String::new()
        };
        let count = pg.query(&format!(
            "select count(*) from {}.{}{filter}",
            quote_ident(schema),
            quote_ident(table)
        ))?;
        rows += count
            .trim()
            .parse::<usize>()
            .with_context(|| format!("count of {table}: {count:?}"))?;
    }
    ensure!(
        rows >= keys,
        "{rows} state rows of the counter in schema {schema} (tables {tables:?}), expected at least {keys}"
    );
    Ok(())
}

/// Five of librdkafka's auto-commit intervals (1 s): offsets that have not
/// moved for this long are no longer being committed, even on a loaded
/// machine where the commit of what was stored before a crash lands late.
const SETTLE: Duration = Duration::from_secs(5);

/// One process, the counter, a stream; while it works, PostgreSQL stops
/// as in a crash. Then weir holds: `/health/ready` turns not ready, the
/// group's committed offsets stop short of the end and stay put (more is
/// produced meanwhile), and the process keeps running. PostgreSQL comes
/// back: ready again, more is produced, the same process catches up; a
/// final run verifies nothing was lost and nothing applied twice. The
/// store's tables are in the configured schema, none in the default one.
#[test]
fn postgres_restarted_mid_stream_holds_then_continues() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let started = Instant::now();
    const SCHEMA: &str = "weir_held";
    let mut pg = PgServer::start()?;
    let kafka = KafkaBroker::start()?;
    let broker: &dyn TestBroker = &kafka;
    // Several seconds of work: 50 ms calls, at most one per key at a time.
    let deployment = counter_deployment_working(broker, "", 50)?;
    deployment.store_in(&pg, Some(SCHEMA))?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut rng = Rng::from_env();
    let mut input = Input::default();
    input.produce(broker, &mut rng, 500, 60)?;

    let mut weir = deployment.start("run")?;
    poll_until(
        WAIT,
        "the counter to handle 40 events",
        || Ok((counted(&weir) >= 40).then_some(())),
        || format!("{} so far; log: {}", counted(&weir), weir.log.display()),
    )?;
    ready_until(port, "ready while handling", WAIT, &weir.log, |code, _| {
        code == 200
    })?;
    pg.crash()?;
    let at_crash = counted(&weir);
    let produced_before = input.produced.clone();

    let not_ready = ready_until(
        port,
        "not ready while PostgreSQL is down",
        Duration::from_secs(30),
        &weir.log,
        |code, body| code == 503 && body["ready"] == false,
    )?;
    eprintln!("while PostgreSQL is down: {not_ready}");
    let committed = || kafka.kafka.committed(COUNTER_GROUP, INPUT);
    // What was stored before the crash may still be committed once; after
    // that nothing moves.
    let last = RefCell::new((committed()?, Instant::now()));
    let held = poll_until(
        Duration::from_secs(60),
        "the committed offsets to stop moving while PostgreSQL is down",
        || {
            let now = committed()?;
            let mut last = last.borrow_mut();
            if now != last.0 {
                *last = (now, Instant::now());
                return Ok(None);
            }
            Ok((last.1.elapsed() >= SETTLE).then_some(now))
        },
        || {
            format!(
                "they kept moving, last {:?}; log: {}",
                last.borrow().0,
                weir.log.display()
            )
        },
    )?;
    ensure!(
        !broker.caught_up(COUNTER_GROUP, INPUT, &produced_before)?,
        "everything was acknowledged before PostgreSQL stopped ({held:?}); make the work longer"
    );
    input.produce(broker, &mut rng, 40, 10)?;
    let later = committed()?;
    ensure!(
        later == held,
        "committed offsets moved while PostgreSQL was down: {held:?}, then {later:?}; log: {}",
        weir.log.display()
    );
    ensure!(
        weir.wait_exit(Duration::ZERO)?.is_none(),
        "weir exited while PostgreSQL was down; log: {}",
        weir.log.display()
    );
    let (code, body) = get(port, "/health/ready")?;
    ensure!(code == 503, "ready while PostgreSQL is down: {code} {body}");
    let during = counted(&weir);

    pg.start_again()?;
    ready_until(
        port,
        "ready once PostgreSQL is back",
        WAIT,
        &weir.log,
        |code, _| code == 200,
    )?;
    input.produce(broker, &mut rng, 60, 15)?;
    poll_progress(
        WAIT,
        "the same process to acknowledge everything after PostgreSQL came back",
        || {
            Ok(broker
                .caught_up(COUNTER_GROUP, INPUT, &input.produced)?
                .then_some(()))
        },
        || (counted(&weir), broker.progress_mark(COUNTER_GROUP, INPUT)),
        || {
            format!(
                "{}; log: {}",
                broker.progress(COUNTER_GROUP, INPUT),
                weir.log.display()
            )
        },
    )?;
    stop(&mut weir)?;
    eprintln!(
        "{at_crash} calls when PostgreSQL stopped, {during} when it came back, {} in all; committed while down: {held:?}",
        counted(&weir)
    );

    finish_and_verify(broker, &deployment, &input)?;
    ensure_state_in_postgres(&pg, SCHEMA, input.per_key().len())?;
    let default_schema = pg.tables("weir")?;
    ensure!(
        default_schema.is_empty(),
        "tables in schema weir although the store is configured for {SCHEMA}: {default_schema:?}"
    );
    eprintln!("took {:.0?}", started.elapsed());
    Ok(())
}

/// The harness itself, without weir: a private PostgreSQL server answers
/// psql on its port, keeps a committed row over a crash (`-m immediate`)
/// and a clean stop, refuses connections while down, and lists its tables
/// and columns.
#[test]
fn postgres_harness_keeps_its_data_over_crashes_and_restarts() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let mut pg = PgServer::start()?;
    ensure!(
        pg.url() == format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port),
        "url {}",
        pg.url()
    );
    pg.query("create schema held; create table held.kv (k text primary key, v int)")?;
    pg.query("insert into held.kv values ('a', 1), ('b', 2)")?;
    let rows = |pg: &PgServer| pg.query("select k || '=' || v from held.kv order by k");
    ensure!(rows(&pg)? == "a=1\nb=2\n", "rows: {:?}", rows(&pg));

    pg.crash()?;
    ensure!(!pg.is_running(), "running after a crash");
    ensure!(
        pg.query("select 1").is_err(),
        "answered while crashed: {:?}",
        pg.query("select 1")
    );
    pg.start_again()?;
    ensure!(
        rows(&pg)? == "a=1\nb=2\n",
        "after the crash: {:?}",
        rows(&pg)
    );
    ensure!(
        pg.start_again().is_err(),
        "started twice on one data directory"
    );

    pg.query("update held.kv set v = 3 where k = 'a'")?;
    pg.stop()?;
    pg.stop()?;
    ensure!(pg.query("select 1").is_err(), "answered while stopped");
    pg.start_again()?;
    ensure!(
        rows(&pg)? == "a=3\nb=2\n",
        "after a clean stop: {:?}",
        rows(&pg)
    );
    ensure!(
        pg.tables("held")? == vec!["kv".to_string()],
        "tables: {:?}",
        pg.tables("held")
    );
    ensure!(
        pg.columns("held", "kv")? == vec!["k".to_string(), "v".to_string()],
        "columns: {:?}",
        pg.columns("held", "kv")
    );
    ensure!(
        pg.tables("weir")?.is_empty(),
        "a fresh server has schema weir"
    );
    ensure!(
        pg.query("select nonsense").is_err(),
        "a failing statement is an error"
    );
    Ok(())
}
