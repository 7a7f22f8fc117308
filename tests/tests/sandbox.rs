//! Hostile handlers cannot hurt the runtime: each misbehaviour fails only
//! its own invocation, with an error that names the limit, and goes through
//! retry and dead-lettering, while another handler keeps processing.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weir_tests::{
    Broker, Deployment, KafkaTool, Record, WeirProcess, broker_test, consume_at_least, header,
    poll_until, stop,
};

const WAIT: Duration = Duration::from_secs(90);

/// Waits for at least `count` dead letters on `topic`.
fn dead_letters(
    kafka: &KafkaTool,
    topic: &str,
    count: usize,
    weir: &WeirProcess,
) -> Result<Vec<Value>> {
    consume_at_least(kafka, topic, count, WAIT, weir)
}

#[test]
fn hostile_handlers_fail_alone_with_clear_errors() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    kafka.create_topic("hostile", 1)?;
    kafka.create_topic("steady", 1)?;
    kafka.create_topic("hostile.dlq", 1)?;
    kafka.create_topic("metered", 1)?;
    kafka.create_topic("metered.dlq", 1)?;
    kafka.create_topic("granted", 1)?;
    kafka.create_topic("granted.dlq", 1)?;
    let deployment = Deployment::new(&broker)?;
    // Fuel metering on, with a default budget no call here gets near.
    deployment.append_config("\n[limits]\nfuel = 1000000000000\n")?;
    deployment.add_handler(
        "hostile",
        "metered",
        "topics = [\"metered\"]\n[retry]\nmax_attempts = 1\n[limits]\nfuel = 1000000\ntimeout = \"30s\"\n",
    )?;
    deployment.add_handler(
        "hostile",
        "hostile",
        "topics = [\"hostile\"]\nordering = \"none\"\n[retry]\nmax_attempts = 2\ninitial_delay = \"50ms\"\njitter = 0.0\n[limits]\nmemory = \"32MiB\"\ntimeout = \"2s\"\n",
    )?;
    deployment.add_handler("probe", "probe", "topics = [\"steady\"]\n")?;
    // Only what the manifest grants, never the host's environment.
    deployment.add_handler(
        "hostile",
        "granted",
        "topics = [\"granted\"]\n[retry]\nmax_attempts = 1\n[limits]\ntimeout = \"5s\"\n[sandbox]\nenv = { GREETING = \"hi\" }\ndirs = { \"/data\" = \"granted-data\" }\n",
    )?;
    std::fs::create_dir_all(deployment.handlers().join("granted-data"))?;
    std::fs::write(
        deployment.handlers().join("granted-data/hello.txt"),
        "hi from the host",
    )?;

    // A granted file whose read blocks in the host until a writer comes.
    let fifo = deployment.handlers().join("granted-data/blocked");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    ensure!(made.success(), "mkfifo {}: {made}", fifo.display());

    let requests = [
        "loop",
        "sleep",
        "alloc-4g",
        "grow",
        "stack-overflow",
        "unreachable",
        "open-file",
        "read-env",
        "print:hello sandbox",
        "log-flood",
    ];
    let hostile: Vec<Record> = requests
        .iter()
        .map(|r| Record::request("hostile.do", r))
        .collect();
    let steady = |range: std::ops::Range<usize>| -> Vec<Record> {
        range
            .map(|i| Record {
                partition: Some(0),
                key: Some(format!("s{i}").into_bytes()),
                value: b"steady".to_vec(),
                headers: vec![],
            })
            .collect()
    };
    kafka.produce("steady", &steady(0..10))?;
    let mut weir = deployment.start("sandbox")?;
    kafka.produce("hostile", &hostile)?;
    kafka.produce("metered", &hostile[..1])?;
    let granted_requests: Vec<Record> = [
        "read-env",
        "read:/data/hello.txt",
        "write:/data/new.txt",
        "read:/data/blocked",
    ]
    .iter()
    .map(|r| Record::request("hostile.do", r))
    .collect();
    kafka.produce("granted", &granted_requests)?;
    kafka.produce("steady", &steady(10..20))?;

    // Every misbehaving event is dead-lettered, one each.
    // All but the two well-behaved ones (print, log-flood).
    let dead = dead_letters(&kafka, "hostile.dlq", requests.len() - 2, &weir)?;
    let by_request: BTreeMap<String, (String, String)> = dead
        .iter()
        .filter_map(|r| {
            Some((
                header(r, "hostile.do")?,
                (header(r, "weir.error")?, header(r, "weir.attempts")?),
            ))
        })
        .collect();
    let expect = |request: &str, needles: &[&str], attempts: &str| -> Result<()> {
        let (error, tried) = by_request
            .get(request)
            .with_context(|| format!("no dead letter for {request}: {by_request:?}"))?;
        for needle in needles {
            ensure!(
                error.contains(needle),
                "{request}: error {error:?} does not mention {needle:?}"
            );
        }
        ensure!(
            tried == attempts,
            "{request}: {tried} attempts, expected {attempts}"
        );
        Ok(())
    };
    expect("loop", &["timeout", "2s"], "2")?;
    // Waiting in the host is bounded by the same timeout.
    expect("sleep", &["timeout", "2s", "host call"], "2")?;
    expect("alloc-4g", &["memory limit", "32 MiB"], "2")?;
    expect("grow", &["memory limit", "32 MiB"], "2")?;
    expect("stack-overflow", &["stack overflow"], "2")?;
    expect("unreachable", &["trap", "unreachable"], "2")?;
    expect("open-file", &["open /etc/passwd denied"], "1")?;
    expect("read-env", &["environment has 0 variables"], "1")?;
    ensure!(
        !by_request.contains_key("print:hello sandbox") && !by_request.contains_key("log-flood"),
        "a well-behaved event was dead-lettered"
    );

    // A fuel budget stops a loop long before its timeout.
    let metered = dead_letters(&kafka, "metered.dlq", 1, &weir)?;
    let error = header(&metered[0], "weir.error").unwrap_or_default();
    ensure!(
        error.contains("fuel limit") && error.contains("1000000 units"),
        "metered loop: {error:?}"
    );

    let granted = dead_letters(&kafka, "granted.dlq", 4, &weir)?;
    let report = |request: &str| -> String {
        granted
            .iter()
            .find(|r| header(r, "hostile.do").as_deref() == Some(request))
            .and_then(|r| header(r, "weir.error"))
            .unwrap_or_default()
    };
    ensure!(
        report("read-env").contains("environment has 1 variables: [GREETING]"),
        "granted environment: {:?}",
        report("read-env")
    );
    ensure!(
        report("read:/data/hello.txt") == "read /data/hello.txt: hi from the host",
        "granted directory: {:?}",
        report("read:/data/hello.txt")
    );
    ensure!(
        report("write:/data/new.txt").contains("write /data/new.txt denied"),
        "granted directory is read-only: {:?}",
        report("write:/data/new.txt")
    );
    let blocked = report("read:/data/blocked");
    ensure!(
        blocked.contains("timeout") && blocked.contains("5s") && blocked.contains("host call"),
        "a read blocked in the host: {blocked:?}"
    );
    ensure!(
        !deployment.handlers().join("granted-data/new.txt").exists(),
        "the guest wrote into a read-only grant"
    );

    // The other handler kept going throughout.
    poll_until(
        WAIT,
        "all 20 steady events",
        || {
            let oks = weir
                .guest_records("probe", "probe")
                .into_iter()
                .filter(|r| r["outcome"] == "ok")
                .count();
            Ok((oks >= 20).then_some(()))
        },
        || format!("log: {}", weir.log.display()),
    )?;
    ensure!(
        weir.wait_exit(Duration::ZERO)?.is_none(),
        "weir died; log: {}",
        weir.log.display()
    );

    // The guest's stdout and stderr reached the log, tagged.
    let records = weir.records();
    let printed = |stream: &str, text: &str| {
        records.iter().any(|r| {
            r["target"] == "weir::guest"
                && r["handler"] == "hostile"
                && r["stream"] == stream
                && r["message"] == text
        })
    };
    ensure!(
        printed("stdout", "hello sandbox") && printed("stderr", "err: hello sandbox"),
        "guest output not in the log: {}",
        weir.log.display()
    );
    // A handler logging in a loop keeps 1,000 records of a call, 64 fields
    // of each, and is told of once.
    let flood: Vec<&Value> = records
        .iter()
        .filter(|r| r["target"] == "weir::guest" && r["message"] == "flood")
        .collect();
    ensure!(flood.len() == 1000, "{} flood records kept", flood.len());
    let fields: Value = serde_json::from_str(flood[0]["fields"].as_str().unwrap_or("{}"))?;
    ensure!(
        fields.as_object().map(|o| o.len()) == Some(65) && fields["fields_dropped"] == 36,
        "flood fields: {fields}"
    );
    ensure!(
        records.iter().any(|r| r["message"]
            .as_str()
            .is_some_and(|m| m.contains("logged more than 1000 records"))),
        "no word of the dropped log records"
    );
    // Failed attempts are logged with the handler's name and version.
    let trap = records
        .iter()
        .find(|r| {
            r["message"] == "attempt failed; will retry"
                && r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("unreachable"))
        })
        .context("no log record for the trap")?;
    ensure!(
        trap["handler"] == "hostile" && trap["version"].as_str().is_some_and(|v| v.len() == 12),
        "trap record lacks handler or version: {trap}"
    );
    stop(&mut weir)
}
