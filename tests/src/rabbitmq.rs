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
use crate::{Deployment, Record, free_port, hex, poll_until, scratch_dir, unhex};

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
    /// The server's output (its own logs are under `log/`).
    pub log: PathBuf,
    dir: tempfile::TempDir,
}

impl RabbitServer {
    /// Starts `rabbitmq-server` as a node of its own and waits until it
    /// answers the AMQP protocol header with `connection.start`.
    ///
    /// # Errors
    ///
    /// When rabbitmq-server is not installed or does not become ready.
    pub fn start() -> Result<Self> {
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
        let port = free_port()?;
        let dist_port = free_port()?;
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
            .env("RABBITMQ_PID_FILE", path("pid"))
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
            log,
            dir,
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
    /// When it fails or takes longer than 30 s.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut child = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run rabbitmqctl")?;
        let mut stdout = child.stdout.take();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(out) = stdout.as_mut() {
                let _ = out.read_to_string(&mut text);
            }
            text
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("rabbitmqctl {args:?} took longer than 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = reader
            .join()
            .map_err(|_| anyhow!("rabbitmqctl output reader panicked"))?;
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("rabbitmqctl {args:?} failed with {status}: {out}{err}");
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

    /// The node's process id, from its pid file.
    fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        let beam = self.beam_pid();
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
                if let Some(pid) = beam {
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
        let server = RabbitServer::start()?;
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
