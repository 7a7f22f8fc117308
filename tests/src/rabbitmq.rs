//! RabbitMQ for the conformance suite: a private `rabbitmq-server` node per
//! test and an independent client (pika, through
//! `tests/clients/rabbitmq_tool.py`).
//!
//! | | RabbitMQ |
//! |---|---|
//! | topic | a durable queue, published to through the default exchange |
//! | record key | header `ce-partitionkey` (text when UTF-8, else bytes) |
//! | partition | ignored: one queue |
//! | position | the queue and the `message_id` the harness gives each message |
//! | group | none: a queue has no consumer positions |
//! | caught up | the queue exists with nothing ready and nothing unacknowledged |
//!
//! A queue is read without being consumed: every message is fetched
//! (`basic.get`) without an acknowledgement, and closing the connection
//! puts them all back.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::broker::{BrokerKind, Position, Stored, TestBroker};
use crate::client::ClientScript;
use crate::{
    Deployment, Record, START_WAIT, free_ports, hex, output_within, poll_until, scratch_dir, unhex,
};

/// The header that carries a message's key.
pub const RABBIT_KEY_HEADER: &str = "ce-partitionkey";

/// Nodes started by this process, for unique node names.
static NODES: AtomicU64 = AtomicU64::new(0);

/// Messages produced by this process, for unique message ids.
static MESSAGES: AtomicU64 = AtomicU64::new(0);

/// A private RabbitMQ node on free loopback ports, with its own data, log,
/// plugins and feature-flags files in a temporary directory owned by the
/// `rabbitmq` user (kept with `WEIR_KEEP_TEST_DIRS`). Stopped on drop.
pub struct RabbitServer {
    child: Option<Child>,
    /// The node's name, `weirtest<pid>n<k>@localhost`.
    pub node: String,
    /// AMQP port on 127.0.0.1.
    pub port: u16,
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub url: String,
    /// `amqps://guest:guest@127.0.0.1:<tls port>/%2f` when started with TLS.
    pub tls_url: Option<String>,
    /// The server's output (its own logs are under `log/`).
    pub log: PathBuf,
    // Removed after the node has stopped (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl RabbitServer {
    /// Starts `rabbitmq-server` as a node of its own and waits until it
    /// answers the AMQP protocol header with `connection.start`.
    ///
    /// # Errors
    ///
    /// When rabbitmq-server is not installed or does not become ready.
    pub fn start() -> Result<Self> {
        Self::start_with(None, "")
    }

    /// As [`RabbitServer::start`], refusing messages larger than `bytes`
    /// (`max_message_size`: the broker closes the channel of a publish
    /// over it with `PRECONDITION_FAILED`).
    ///
    /// # Errors
    ///
    /// As [`RabbitServer::start`].
    pub fn start_with_max_message_size(bytes: usize) -> Result<Self> {
        Self::start_with(None, &format!("max_message_size = {bytes}\n"))
    }

    /// As [`RabbitServer::start`], with a TLS listener as well
    /// ([`RabbitServer::tls_url`]) using `certs`' server certificate.
    ///
    /// # Errors
    ///
    /// As [`RabbitServer::start`].
    pub fn start_tls(certs: &crate::tls::Certificates) -> Result<Self> {
        Self::start_with(Some(certs), "")
    }

    /// A node with a TLS listener when `certs` are given, and `conf` (lines
    /// of `rabbitmq.conf`).
    fn start_with(certs: Option<&crate::tls::Certificates>, conf: &str) -> Result<Self> {
        let binary = PathBuf::from("/usr/sbin/rabbitmq-server");
        crate::require(
            binary.clone(),
            "rabbitmq-server",
            "install the Debian package rabbitmq-server (`bash .ci/install-test-tools`), or set WEIR_SKIP_BROKER_TESTS=1",
        )?;
        let dir = scratch_dir("weir-rabbit-")?;
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("mnesia"))?;
        std::fs::create_dir_all(root.join("log"))?;
        std::fs::write(root.join("plugins"), "[].\n")?;
        let [port, dist_port, tls_port] = free_ports()?;
        let mut tls_url = None;
        let mut conf = conf.to_string();
        if let Some(certs) = certs {
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                     ssl_options.cacertfile = {}\n\
                     ssl_options.certfile = {}\n\
                     ssl_options.keyfile = {}\n\
                     ssl_options.verify = verify_none\n\
                     ssl_options.fail_if_no_peer_cert = false\n",
                certs.ca.display(),
                certs.cert.display(),
                certs.key.display()
            ));
            tls_url = Some(format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f"));
        }
        if !conf.is_empty() {
            std::fs::write(root.join("rabbitmq.conf"), conf)?;
        }
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&root)
            .status()
            .context("cannot run chown")?;
        anyhow::ensure!(
            status.success(),
            "chown -R rabbitmq {} failed",
            root.display()
        );
        let node = format!(
            "weirtest{}n{}@localhost",
            std::process::id(),
            NODES.fetch_add(1, Ordering::Relaxed)
        );
        let log = root.join("server.log");
        let out = std::fs::File::create(&log)?;
        let path = |name: &str| root.join(name).display().to_string();
        let child = Command::new(&binary)
            .current_dir(&root)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", path("feature_flags"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("cannot start rabbitmq-server")?;
        let mut server = Self {
            child: Some(child),
            node,
            port,
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            tls_url,
            log,
            _dir: dir,
        };
        let log = server.log.display().to_string();
        poll_until(
            Duration::from_secs(60),
            "rabbitmq-server to accept AMQP connections",
            || {
                if let Some(child) = server.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    bail!("rabbitmq-server exited with {status} before it was ready; see {log}");
                }
                Ok(answers_amqp(port).then_some(()))
            },
            || format!("see {log}"),
        )?;
        Ok(server)
    }

    /// `rabbitmqctl -n <node> <args>`, its output.
    ///
    /// # Errors
    ///
    /// When it fails or takes longer than [`START_WAIT`].
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let output = output_within(
            Command::new("rabbitmqctl")
                .args(["-q", "-n", &self.node])
                .args(args),
            START_WAIT,
        )
        .context("running rabbitmqctl")?;
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed with {}: {out}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(out)
    }

    /// `(ready, unacknowledged)` of every queue, by name.
    ///
    /// # Errors
    ///
    /// When rabbitmqctl fails.
    pub fn queue_counts(&self) -> Result<Vec<(String, u64, u64)>> {
        let out = self.ctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
        ])?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                match fields.as_slice() {
                    [name, ready, unacked] => Ok((
                        name.to_string(),
                        ready.trim().parse()?,
                        unacked.trim().parse()?,
                    )),
                    _ => bail!("unexpected list_queues line {line:?}"),
                }
            })
            .collect()
    }

    /// The node's process ids: those started with this node's name in
    /// their environment (`RABBITMQ_NODENAME`, unique to this test).
    fn node_pids(&self) -> Vec<u32> {
        let entry = format!("RABBITMQ_NODENAME={}", self.node);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                    environ
                        .split(|b| *b == 0)
                        .any(|var| var == entry.as_bytes())
                })
            })
            .collect()
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        let stopped = self.ctl(&["stop"]).is_ok();
        if let Some(mut child) = self.child.take() {
            // The start script waits for the node; give it time to exit.
            let deadline = Instant::now() + Duration::from_secs(if stopped { 30 } else { 1 });
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                // The node runs under `su` in a session of its own: kill
                // it by its pid, then the start script's group.
                for pid in self.node_pids() {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
            }
        }
    }
}

/// Whether something on `port` answers the AMQP 0-9-1 protocol header with
/// a method frame (`connection.start`).
fn answers_amqp(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
        return false;
    }
    let mut first = [0u8; 1];
    BufReader::new(stream).read_exact(&mut first).is_ok() && first[0] == 1
}

/// A private RabbitMQ node and pika.
pub struct RabbitBroker {
    /// The server.
    pub server: RabbitServer,
    client: ClientScript,
}

impl RabbitBroker {
    /// Starts the server and its client.
    ///
    /// # Errors
    ///
    /// When either is missing or the server does not become ready.
    pub fn start() -> Result<Self> {
        Self::with_server(RabbitServer::start()?)
    }

    /// A server with a TLS listener too ([`RabbitServer::start_tls`]); the
    /// client uses the plaintext one.
    ///
    /// # Errors
    ///
    /// As [`RabbitBroker::start`].
    pub fn start_tls(certs: &crate::tls::Certificates) -> Result<Self> {
        Self::with_server(RabbitServer::start_tls(certs)?)
    }

    /// A server refusing messages larger than `bytes`
    /// ([`RabbitServer::start_with_max_message_size`]).
    ///
    /// # Errors
    ///
    /// As [`RabbitBroker::start`].
    pub fn start_with_max_message_size(bytes: usize) -> Result<Self> {
        Self::with_server(RabbitServer::start_with_max_message_size(bytes)?)
    }

    fn with_server(server: RabbitServer) -> Result<Self> {
        let client = ClientScript::new("rabbitmq_tool.py", "--url", &server.url)?;
        Ok(Self { server, client })
    }

    fn declare(&self, queue: &str) -> Result<()> {
        self.client.call("declare", &["--queue", queue], None)?;
        Ok(())
    }

    /// `(exists, ready)` of `queue`, from a passive declare.
    fn ready(&self, queue: &str) -> Result<(bool, u64)> {
        let out = self.client.call("count", &["--queue", queue], None)?;
        Ok((
            out["exists"].as_bool().unwrap_or(false),
            out["ready"].as_u64().unwrap_or(0),
        ))
    }
}

impl TestBroker for RabbitBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Rabbit
    }

    fn deployment(&self) -> Result<Deployment> {
        Deployment::with_source(&format!(
            "[source.rabbitmq]\nurl = \"{}\"\nconnection_name = \"weir-test\"\n",
            self.server.url
        ))
    }

    fn create_topic(&self, topic: &str, _partitions: i32) -> Result<()> {
        self.declare(topic)
    }

    fn create_output_topic(&self, topic: &str) -> Result<()> {
        // Weir publishes through the default exchange with `mandatory`:
        // the queue must be there.
        self.declare(topic)
    }

    fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<Position>> {
        let mut lines = String::new();
        let mut positions = Vec::with_capacity(records.len());
        for record in records {
            let mut headers = Vec::new();
            if let Some(key) = &record.key {
                headers.push(json!([RABBIT_KEY_HEADER, hex(key)]));
            }
            for (name, value) in &record.headers {
                if name == RABBIT_KEY_HEADER && record.key.is_some() {
                    bail!("record has both a key and a {RABBIT_KEY_HEADER} header");
                }
                headers.push(json!([name, hex(value)]));
            }
            let message_id = format!(
                "msg-{}-{}",
                std::process::id(),
                MESSAGES.fetch_add(1, Ordering::Relaxed)
            );
            lines.push_str(
                &json!({
                    "value_hex": hex(&record.value),
                    "headers": headers,
                    "message_id": message_id,
                })
                .to_string(),
            );
            lines.push('\n');
            positions.push(Position::Rabbit {
                queue: topic.to_string(),
                message_id,
            });
        }
        let confirmed = self
            .client
            .call("publish", &["--queue", topic], Some(lines))?;
        let confirmed: Vec<&str> = confirmed
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        anyhow::ensure!(
            confirmed.len() == positions.len(),
            "{} of {} messages confirmed",
            confirmed.len(),
            positions.len()
        );
        Ok(positions)
    }

    fn read(&self, topic: &str) -> Result<Vec<Stored>> {
        let out = self.client.call("read", &["--queue", topic], None)?;
        out.as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let headers: Vec<(String, Vec<u8>)> = m["headers"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|h| {
                        let name = h[0].as_str().ok_or_else(|| anyhow!("bad header {h}"))?;
                        Ok((name.to_string(), unhex(h[1].as_str().unwrap_or_default())?))
                    })
                    .collect::<Result<_>>()?;
                let key = headers
                    .iter()
                    .find(|(n, _)| n == RABBIT_KEY_HEADER)
                    .map(|(_, v)| v.clone());
                Ok(Stored {
                    topic: topic.to_string(),
                    key,
                    value: unhex(m["value_hex"].as_str().unwrap_or_default())?,
                    headers,
                    position: Position::Rabbit {
                        queue: topic.to_string(),
                        message_id: m["message_id"].as_str().unwrap_or_default().to_string(),
                    },
                })
            })
            .collect()
    }

    fn caught_up(&self, _group: &str, topic: &str, _produced: &[Position]) -> Result<bool> {
        // The cheap look first: anything still ready is not caught up.
        let (exists, ready) = self.ready(topic)?;
        if !exists || ready > 0 {
            return Ok(false);
        }
        Ok(self
            .server
            .queue_counts()?
            .iter()
            .any(|(name, ready, unacked)| name == topic && *ready == 0 && *unacked == 0))
    }

    fn progress(&self, _group: &str, topic: &str) -> String {
        match self.server.queue_counts() {
            Ok(counts) => match counts.iter().find(|(name, _, _)| name == topic) {
                Some((_, ready, unacked)) => {
                    format!("queue {topic}: {ready} ready, {unacked} unacknowledged")
                }
                None => format!("no queue {topic}; queues: {counts:?}"),
            },
            Err(err) => format!("cannot list the queues: {err:#}"),
        }
    }

    fn prepare_for_kills(&self, _deployment: &Deployment) -> Result<()> {
        // A killed process's connection closes with it, and the broker
        // requeues its unacknowledged messages at once.
        Ok(())
    }

    fn manifest_for_kills(&self) -> &'static str {
        ""
    }

    fn competing_consumers(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{WeirProcess, broker_test, stop};

    fn record(key: &[u8], payload: &str, headers: &[(&str, &[u8])]) -> Record {
        Record {
            partition: None,
            key: Some(key.to_vec()),
            value: payload.as_bytes().to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
        }
    }

    /// The harness itself: a queue read twice gives the same messages
    /// (nothing consumed), keys and headers come back as bytes, and a queue
    /// with messages ready is not caught up.
    #[test]
    fn a_queue_is_read_without_being_consumed() -> Result<()> {
        let Some(_serial) = broker_test() else {
            return Ok(());
        };
        let broker = RabbitBroker::start()?;
        broker.create_topic("orders", 1)?;
        broker.create_topic("orders", 1)?;
        let sent = vec![
            record(b"k1", "one", &[("ce_id", b"e1")]),
            record(&[0xff, 0x00], "two", &[("bin", &[0x80]), ("text", b"y z")]),
        ];
        let produced = broker.produce("orders", &sent)?;
        let first = broker.read("orders")?;
        let second = broker.read("orders")?;
        anyhow::ensure!(first == second, "two reads differ: {first:?} / {second:?}");
        anyhow::ensure!(first.len() == 2, "read {first:?}");
        for ((got, want), position) in first.iter().zip(&sent).zip(&produced) {
            anyhow::ensure!(
                got.value == want.value && got.key == want.key && got.position == *position,
                "read back {got:?} for {want:?} at {position:?}"
            );
            for (name, value) in &want.headers {
                anyhow::ensure!(
                    got.headers.iter().any(|(n, v)| n == name && v == value),
                    "header {name} lost: {:?}",
                    got.headers
                );
            }
        }
        anyhow::ensure!(broker.read("nothing")?.is_empty(), "a missing queue");
        anyhow::ensure!(
            !broker.caught_up("g", "orders", &produced)?,
            "caught up with two messages ready"
        );
        anyhow::ensure!(
            broker.progress("g", "orders").contains("2 ready"),
            "{}",
            broker.progress("g", "orders")
        );
        Ok(())
    }

    /// Payloads the probe handled successfully, with how often.
    fn handled(weir: &WeirProcess) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in weir.guest_records("probe", "probe") {
            if r["outcome"] == "ok" {
                let payload = unhex(r["payload_hex"].as_str().unwrap_or_default())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                *counts.entry(payload).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The broker closes every connection mid-run (`stop_app`) and comes
    /// back: Weir reconnects, consumes again, and every message is handled
    /// exactly once (redeliveries are deduplicated by `message_id`).
    #[test]
    fn a_broker_restart_mid_run_loses_and_repeats_nothing() -> Result<()> {
        let Some(_serial) = broker_test() else {
            return Ok(());
        };
        let broker = RabbitBroker::start()?;
        broker.create_topic("events", 1)?;
        let deployment = broker.deployment()?;
        deployment.add_handler(
            "probe",
            "probe",
            "topics = [\"events\"]\nmax_in_flight = 4\n",
        )?;
        let batch = |range: std::ops::Range<usize>, sleep: &str| -> Vec<Record> {
            range
                .map(|i| {
                    record(
                        format!("key-{}", i % 5).as_bytes(),
                        &format!("m-{i}"),
                        &[("probe.sleep-ms", sleep.as_bytes())],
                    )
                })
                .collect()
        };
        let mut produced = broker.produce("events", &batch(0..60, "100"))?;
        let mut weir = deployment.start("run")?;
        poll_until(
            Duration::from_secs(60),
            "some messages handled",
            || Ok((handled(&weir).len() >= 8).then_some(())),
            || format!("log: {}", weir.log.display()),
        )?;
        broker.server.ctl(&["stop_app"])?;
        let during = handled(&weir).len();
        broker.server.ctl(&["start_app"])?;
        anyhow::ensure!(
            weir.wait_exit(Duration::ZERO)?.is_none(),
            "weir exited while the broker was down; log: {}",
            weir.log.display()
        );
        produced.extend(broker.produce("events", &batch(60..80, "0"))?);
        let expected: Vec<String> = (0..80).map(|i| format!("m-{i}")).collect();
        poll_until(
            Duration::from_secs(90),
            "every message handled after the broker came back",
            || {
                let seen = handled(&weir);
                Ok(expected.iter().all(|p| seen.contains_key(p)).then_some(()))
            },
            || format!("log: {}", weir.log.display()),
        )?;
        poll_until(
            Duration::from_secs(60),
            "everything acknowledged",
            || {
                Ok(broker
                    .caught_up("weir.probe", "events", &produced)?
                    .then_some(()))
            },
            || broker.progress("weir.probe", "events"),
        )?;
        stop(&mut weir)?;
        let twice: Vec<_> = handled(&weir).into_iter().filter(|(_, n)| *n > 1).collect();
        anyhow::ensure!(twice.is_empty(), "handled more than once: {twice:?}");
        eprintln!("{during} of 60 handled when the broker stopped");
        Ok(())
    }

    /// Not a check: how fast Weir drains a queue with the no-op handler,
    /// beside pika draining the same number of messages (run with
    /// `--ignored --nocapture`; `WEIR_RABBIT_BENCH_N` messages, default
    /// 20000).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn throughput_against_the_raw_client() -> Result<()> {
        let Some(_serial) = broker_test() else {
            return Ok(());
        };
        let n: usize = std::env::var("WEIR_RABBIT_BENCH_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let broker = RabbitBroker::start()?;
        let records: Vec<Record> = (0..n)
            .map(|i| record(format!("k{}", i % 64).as_bytes(), &"x".repeat(512), &[]))
            .collect();
        broker.create_topic("raw", 1)?;
        broker.produce("raw", &records)?;
        let raw = broker.client.call(
            "drain",
            &[
                "--queue",
                "raw",
                "--count",
                &n.to_string(),
                "--prefetch",
                "256",
            ],
            None,
        )?;
        let raw_seconds = raw["seconds"].as_f64().unwrap_or(0.0);

        broker.create_topic("events", 1)?;
        let produced = broker.produce("events", &records)?;
        let deployment = broker.deployment()?;
        deployment.add_handler(
            "noop",
            "noop",
            "topics = [\"events\"]\nmax_in_flight = 256\n",
        )?;
        let started = Instant::now();
        let mut weir = deployment.start("bench")?;
        poll_until(
            Duration::from_secs(300),
            "the queue drained",
            || {
                Ok(broker
                    .caught_up("weir.noop", "events", &produced)?
                    .then_some(()))
            },
            || broker.progress("weir.noop", "events"),
        )?;
        let weir_seconds = started.elapsed().as_secs_f64();
        stop(&mut weir)?;
        eprintln!(
            "{n} messages of 512 B: pika (prefetch 256, ack each) {:.0} msg/s; weir noop (max_in_flight 256, from process start to all acknowledged) {:.0} msg/s; ratio {:.2}",
            n as f64 / raw_seconds.max(1e-9),
            n as f64 / weir_seconds,
            raw_seconds / weir_seconds
        );
        Ok(())
    }
}
