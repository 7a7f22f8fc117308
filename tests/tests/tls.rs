//! Reaching real deployments: `weir run` over TLS to the brokers and the
//! store (and SASL/SCRAM to Kafka), each a real server (tansu behind
//! stunnel, with SCRAM users in SQLite storage for SASL, redis-server's TLS
//! port, nats-server with `--tls`, RabbitMQ's TLS listener, PostgreSQL
//! with `ssl=on`) with certificates the test makes; a
//! wrong CA is an error naming the endpoint, never a silent plaintext
//! fallback; and secrets (a password from the environment, one written in
//! a URL, the admin token from a file) appear in no log line, error or
//! admin answer.

use std::time::Duration;

use anyhow::{Result, ensure};
use weir_tests::admin::{get, samples};
use weir_tests::tls::Certificates;
use weir_tests::{
    Broker, Deployment, KafkaTool, NatsBroker, PgServer, RabbitBroker, Record, RedisBroker,
    TestBroker, broker_test, free_port, poll_until, stop,
};

const WAIT: Duration = Duration::from_secs(90);

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            partition: None,
            key: Some(format!("k{}", i % 3).into_bytes()),
            value: format!("{{\"id\":\"ev-{i}\"}}").into_bytes(),
            headers: vec![("event_id".to_string(), format!("ev-{i}").into_bytes())],
        })
        .collect()
}

/// Waits until the probe handler of `deployment`'s weir (admin on `port`)
/// has handled `n` messages of `topic`.
fn handled(port: u16, topic: &str, n: usize, log: &std::path::Path) -> Result<()> {
    let name = format!(
        "messages_consumed_total{{topic=\"{topic}\",consumer_group=\"weir.probe\",status=\"handled\"}}"
    );
    poll_until(
        WAIT,
        &format!("weir to handle {n} messages over TLS"),
        || {
            let Ok((200, text)) = get(port, "/metrics") else {
                return Ok(None);
            };
            Ok((samples(&text).get(&name).copied() == Some(n as f64)).then_some(()))
        },
        || format!("log: {}", log.display()),
    )
}

/// Waits until the log of a weir says something containing every one of
/// `words`, and returns that line.
fn said(log: &std::path::Path, what: &str, words: &[&str]) -> Result<String> {
    poll_until(
        WAIT,
        what,
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            Ok(text
                .lines()
                .find(|line| words.iter().all(|w| line.contains(w)))
                .map(String::from))
        },
        || format!("log: {}", log.display()),
    )
}

/// Waits until the admin server on `port` answers (it starts after the
/// consumers) and checks that it says not ready.
fn not_ready(port: u16, log: &std::path::Path) -> Result<()> {
    let (code, body) = poll_until(
        WAIT,
        "the admin server to answer",
        || Ok(get(port, "/health/ready").ok()),
        || format!("log: {}", log.display()),
    )?;
    ensure!(code == 503, "ready with the wrong CA: {code} {body}");
    Ok(())
}

#[test]
fn kafka_over_tls_consumes_and_a_wrong_ca_is_named() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let certs = Certificates::new()?;
    let (broker, _stunnel) = Broker::start_behind_tls(&certs)?;
    let kafka = KafkaTool::for_tls(&broker.bootstrap, &certs.ca)?;
    kafka.create_topic("events", 2)?;
    kafka.produce("events", &records(12))?;
    let source = |ca: &std::path::Path| {
        format!(
            "[source.kafka]\nbootstrap_servers = \"{}\"\n\n[source.kafka.properties]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n",
            broker.bootstrap,
            ca.display()
        )
    };
    let deployment = Deployment::with_source(&source(&certs.ca))?;
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("tls")?;
    handled(port, "events", 12, &weir.log)?;
    stop(&mut weir)?;

    let wrong = Deployment::with_source(&source(&certs.wrong_ca))?;
    wrong.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    wrong.admin_port(port)?;
    let mut weir = wrong.start("wrong-ca")?;
    let line = said(
        &weir.log,
        "weir to say the broker's certificate does not verify",
        &["certificate verify failed", &broker.bootstrap],
    )?;
    ensure!(
        !line.contains("\"level\":\"INFO\""),
        "a TLS failure logged as information: {line}"
    );
    not_ready(port, &weir.log)?;
    let (_, text) = get(port, "/metrics")?;
    ensure!(
        !text.contains("status=\"handled\"} 1"),
        "something was handled through an unverified connection"
    );
    // (A consumer that never reached its broker does not yet stop within
    // the shutdown timeout: librdkafka's close waits on the unreachable
    // group coordinator. Killed here; stopping it is a known gap.)
    weir.kill()?;
    Ok(())
}

/// A managed Kafka's usual setup, `SASL_SSL` with SCRAM-SHA-512 (tansu
/// requiring authentication, behind stunnel): weir authenticates with a
/// password from the environment and consumes; a wrong password is an
/// authentication error in the log, without the password, and nothing is
/// consumed.
#[test]
fn kafka_over_sasl_ssl_authenticates_and_a_wrong_password_is_refused() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let certs = Certificates::new()?;
    let password = "scram-Pa55word-for-alice";
    let (broker, _stunnel) = Broker::start_sasl_behind_tls(&certs, "alice", password)?;
    let kafka = KafkaTool::for_sasl(&broker.bootstrap, &certs.ca, "alice", password)?;
    kafka.create_topic("events", 2)?;
    kafka.produce("events", &records(12))?;
    let source = format!(
        "[source.kafka]\nbootstrap_servers = \"{}\"\n\n[source.kafka.properties]\n\
         \"security.protocol\" = \"SASL_SSL\"\n\"ssl.ca.location\" = \"{}\"\n\
         \"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"alice\"\n\
         \"sasl.password\" = \"${{KAFKA_PASSWORD}}\"\n",
        broker.bootstrap,
        certs.ca.display()
    );
    let deployment = Deployment::with_source(&source)?;
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start_with_env("sasl", &[("KAFKA_PASSWORD", password)])?;
    handled(port, "events", 12, &weir.log)?;
    stop(&mut weir)?;
    let text = std::fs::read_to_string(&weir.log)?;
    ensure!(!text.contains(password), "the password is in the log");

    let wrong_password = "not-alices-password";
    let wrong = Deployment::with_source(&source)?;
    wrong.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    wrong.admin_port(port)?;
    let mut weir = wrong.start_with_env("wrong-password", &[("KAFKA_PASSWORD", wrong_password)])?;
    let line = said(
        &weir.log,
        "weir to say the broker refused the credentials",
        &["uthentication"],
    )?;
    ensure!(
        !line.contains("\"level\":\"INFO\""),
        "an authentication failure logged as information: {line}"
    );
    not_ready(port, &weir.log)?;
    let (_, metrics) = get(port, "/metrics")?;
    ensure!(
        !metrics.contains("status=\"handled\"} 1"),
        "something was handled without authenticating"
    );
    // (As with the wrong CA above: killed, not stopped.)
    weir.kill()?;
    let text = std::fs::read_to_string(&weir.log)?;
    ensure!(
        !text.contains(wrong_password),
        "the wrong password is in the log"
    );
    Ok(())
}

#[test]
fn the_store_over_tls_verifies_the_server_and_refuses_a_wrong_ca() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let certs = Certificates::new()?;
    let pg = PgServer::start_tls(&certs)?;
    let broker = weir_tests::BrokerKind::Kafka.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("events", 1)?;
    broker.produce("events", &records(6))?;
    let store = |mode: &str, ca: &std::path::Path| {
        format!(
            "\n[store]\nurl = \"postgres://postgres@localhost:{}/postgres?sslmode={mode}&sslrootcert={}\"\n",
            pg.port,
            ca.display()
        )
    };
    let deployment = broker.deployment()?;
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    deployment.append_config(&store("verify-full", &certs.ca))?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("verify-full")?;
    handled(port, "events", 6, &weir.log)?;
    // Every connection weir holds is encrypted.
    let plain = pg.query(
        "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid) \
         where a.application_name = 'weir' and not s.ssl",
    )?;
    let encrypted = pg.query(
        "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid) \
         where a.application_name = 'weir' and s.ssl",
    )?;
    ensure!(
        plain.trim() == "0" && encrypted.trim() != "0",
        "weir's connections: {encrypted} encrypted, {plain} in plaintext"
    );
    stop(&mut weir)?;

    // A CA that did not sign the server's certificate: weir stops with an
    // error naming the server, instead of waiting or falling back.
    let wrong = broker.deployment()?;
    wrong.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    wrong.append_config(&store("verify-ca", &certs.wrong_ca))?;
    let out = wrong.weir(&["run"]);
    let err = format!("{:#}", out.err().unwrap_or_else(|| anyhow::anyhow!("")));
    ensure!(
        err.contains("certificate verify failed")
            && err.contains(&format!("localhost:{}", pg.port)),
        "weir run with the wrong CA: {err}"
    );
    // `require` to a server without TLS is refused too.
    let plain_pg = PgServer::start()?;
    let refused = broker.deployment()?;
    refused.append_config(&format!(
        "\n[store]\nurl = \"postgres://postgres@127.0.0.1:{}/postgres?sslmode=require\"\n",
        plain_pg.port
    ))?;
    let out = refused.weir(&["state", "list", "probe"]);
    let err = format!("{:#}", out.err().unwrap_or_else(|| anyhow::anyhow!("")));
    ensure!(
        err.contains("TLS") && err.contains(&format!("127.0.0.1:{}", plain_pg.port)),
        "sslmode=require to a server without TLS: {err}"
    );
    Ok(())
}

#[test]
fn redis_over_tls_consumes_and_a_wrong_ca_is_named() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let certs = Certificates::new()?;
    let broker = RedisBroker::start_tls(&certs)?;
    let url = broker.server.tls_url.clone().unwrap_or_default();
    broker.produce("events", &records(9))?;
    let source = |ca: &std::path::Path| {
        format!(
            "[source.redis]\nurl = \"{url}\"\n\n[source.redis.tls]\nca_file = \"{}\"\n",
            ca.display()
        )
    };
    let deployment = Deployment::with_source(&source(&certs.ca))?;
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("tls")?;
    handled(port, "events", 9, &weir.log)?;
    stop(&mut weir)?;

    let wrong = Deployment::with_source(&source(&certs.wrong_ca))?;
    wrong.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    wrong.admin_port(port)?;
    let mut weir = wrong.start("wrong-ca")?;
    let endpoint = url.trim_start_matches("rediss://");
    said(
        &weir.log,
        "weir to say the server's certificate does not verify",
        &[endpoint, "certificate"],
    )?;
    not_ready(port, &weir.log)?;
    stop(&mut weir)?;
    Ok(())
}

/// One broker over TLS: `source(ca)` configures weir to trust `ca`; with
/// the right CA weir handles what was produced, with the wrong one it logs
/// an error naming `endpoint` and is not ready.
fn consumes_over_tls_and_names_a_wrong_ca(
    broker: &dyn TestBroker,
    certs: &Certificates,
    endpoint: &str,
    source: impl Fn(&std::path::Path) -> String,
) -> Result<()> {
    broker.create_topic("events", 1)?;
    broker.produce("events", &records(8))?;
    let deployment = Deployment::with_source(&source(&certs.ca))?;
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("tls")?;
    handled(port, "events", 8, &weir.log)?;
    stop(&mut weir)?;

    let wrong = Deployment::with_source(&source(&certs.wrong_ca))?;
    wrong.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    wrong.admin_port(port)?;
    let mut weir = wrong.start("wrong-ca")?;
    said(
        &weir.log,
        "weir to say the server's certificate does not verify",
        &[endpoint, "certificate"],
    )?;
    not_ready(port, &weir.log)?;
    stop(&mut weir)?;
    Ok(())
}

#[test]
fn nats_over_tls_consumes_and_a_wrong_ca_is_named() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let certs = Certificates::new()?;
    let broker = NatsBroker::start_tls(&certs)?;
    let url = broker.server.url.clone();
    let endpoint = url.trim_start_matches("tls://").to_string();
    consumes_over_tls_and_names_a_wrong_ca(&broker, &certs, &endpoint, |ca| {
        format!(
            "[source.nats]\nurl = \"{url}\"\n\n[source.nats.tls]\nrequired = true\nca_file = \"{}\"\n",
            ca.display()
        )
    })
}

#[test]
fn rabbitmq_over_tls_consumes_and_a_wrong_ca_is_named() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let certs = Certificates::new()?;
    let broker = RabbitBroker::start_tls(&certs)?;
    let url = broker.server.tls_url.clone().unwrap_or_default();
    let endpoint = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string();
    consumes_over_tls_and_names_a_wrong_ca(&broker, &certs, &endpoint, |ca| {
        format!(
            "[source.rabbitmq]\nurl = \"{url}\"\ntls_ca_file = \"{}\"\n",
            ca.display()
        )
    })
}

/// Secrets from the environment, from a file and written in a URL are
/// used (weir consumes with them) and never shown: not in the log, not in
/// the admin answers, not in an error the CLI prints.
#[test]
fn secrets_reach_the_servers_and_no_output() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    const REDIS_PASSWORD: &str = "redis-secret-7f3a9c";
    const PG_PASSWORD: &str = "pg-secret-51e0b2";
    const TOKEN: &str = "admin-token-secret-0c8d44e1";
    const WRONG_PASSWORD: &str = "wrong-secret-93b1d7";
    let broker = RedisBroker::start()?;
    broker.produce("events", &records(3))?;
    // From now on every client needs the password.
    broker
        .server
        .command(&["CONFIG", "SET", "requirepass", REDIS_PASSWORD])?;
    let pg = PgServer::start()?;
    let redis_port = broker.server.port();
    let source = |variable: &str| {
        format!("[source.redis]\nurl = \"redis://:${{{variable}}}@127.0.0.1:{redis_port}\"\n")
    };
    let deployment = Deployment::with_source(&source("WEIR_TEST_REDIS_PASSWORD"))?;
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    std::fs::write(
        deployment.dir.path().join("admin-token"),
        format!("{TOKEN}\n"),
    )?;
    deployment.append_config(&format!(
        "\n[store]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres\"\n",
        pg.port
    ))?;
    let config = std::fs::read_to_string(deployment.dir.path().join("weir.toml"))?
        .replace("[admin]\n", "[admin]\ntoken = \"${file:admin-token}\"\n");
    std::fs::write(deployment.dir.path().join("weir.toml"), config)?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir =
        deployment.start_with_env("secrets", &[("WEIR_TEST_REDIS_PASSWORD", REDIS_PASSWORD)])?;
    handled(port, "events", 3, &weir.log)?;
    let mut shown = Vec::new();
    for path in ["/handlers", "/health/ready", "/metrics", "/"] {
        shown.push(get(port, path)?.1);
    }
    let (code, state) = weir_tests::admin::get_with_token(port, "/handlers/probe/state", TOKEN)?;
    ensure!(code == 200, "the token from the file: {code} {state}");
    shown.push(state);
    stop(&mut weir)?;
    shown.push(std::fs::read_to_string(&weir.log)?);

    // A wrong password: the error is logged and answered, the password is
    // not.
    let wrong = Deployment::with_source(&source("WEIR_TEST_WRONG_PASSWORD"))?;
    wrong.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let port = free_port()?;
    wrong.admin_port(port)?;
    let mut weir =
        wrong.start_with_env("wrong", &[("WEIR_TEST_WRONG_PASSWORD", WRONG_PASSWORD)])?;
    said(
        &weir.log,
        "weir to say Redis refused the password",
        &[&format!("127.0.0.1:{redis_port}"), "cannot connect"],
    )?;
    shown.push(get(port, "/health/ready")?.1);
    shown.push(get(port, "/handlers")?.1);
    stop(&mut weir)?;
    shown.push(std::fs::read_to_string(&weir.log)?);
    // A URL the driver cannot parse, password and all, and a reference to
    // an unset variable: errors naming the key, not the secret.
    let broken = Deployment::with_source(&format!(
        "[source.redis]\nurl = \"redis://:{WRONG_PASSWORD}@127.0.0.1:notaport\"\n"
    ))?;
    let err = broken
        .weir(&["run"])
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    ensure!(err.contains("[source.redis] url"), "a broken URL: {err}");
    shown.push(err);
    let unset = Deployment::with_source(&source("WEIR_TEST_UNSET_VARIABLE"))?;
    let err = unset
        .weir(&["run"])
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    ensure!(
        err.contains("[source.redis] url") && err.contains("WEIR_TEST_UNSET_VARIABLE"),
        "an unset variable: {err}"
    );
    for text in &shown {
        for secret in [REDIS_PASSWORD, PG_PASSWORD, TOKEN, WRONG_PASSWORD] {
            ensure!(
                !text.contains(secret),
                "{secret} was shown in: {}",
                &text[..text.len().min(4000)]
            );
        }
    }
    Ok(())
}
