//! Amazon SQS for the conformance suite: a private moto server (its server
//! mode, started by `tests/clients/sqs_server.py` with the test venv's
//! Python) and an independent client (boto3 through
//! `tests/clients/sqs_tool.py`).
//!
//! | | SQS (moto, boto3) |
//! |---|---|
//! | topic | queue [`queue_name`]`(topic)` (`.` → `-` before `.fifo`) |
//! | record key | attribute `ce-partitionkey` (FIFO: also the message group) |
//! | partition | ignored: a queue has none |
//! | position | queue URL, message id |
//! | group | none: every consumer of a queue competes for its messages |
//! | caught up | the queue holds nothing: none visible, in flight or delayed |
//!
//! moto keeps everything in memory and has no data directory. Where it
//! deviates from SQS: it ignores `MessageSystemAttributeNames` (only the
//! older `AttributeNames` brings a message's system attributes; Weir and
//! the client send both), it answers `AttributeNames = All` with a null
//! `MessageDeduplicationId` on standard queues (so Weir names the
//! attributes it reads), it accepts more than 10 message attributes (the
//! client refuses to send them), and it answers a FIFO duplicate with a
//! fresh message id. A receive with visibility timeout 0 leaves a message
//! visible, so `read` makes messages invisible for a while and then visible
//! again. Stock moto takes about 2 s per receive from a queue of 2,000
//! messages (it scans the queue some thirty times, reading an expensive
//! clock twice per message each time); the launcher brings that to one
//! scan with a cheap clock, without changing an answer.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::broker::{BrokerKind, Position, Stored, TestBroker};
use crate::client::{ClientScript, test_python};
use crate::{
    Deployment, Record, START_WAIT, free_port, hex, poll_until, require, scratch_dir, unhex,
    workspace,
};

/// The queue Weir uses for `topic`: every `.` before a trailing `.fifo`
/// becomes `-` (`events.dlq` → `events-dlq`, `e.dlq.fifo` → `e-dlq.fifo`).
pub fn queue_name(topic: &str) -> String {
    match topic.strip_suffix(".fifo") {
        Some(base) => format!("{}.fifo", base.replace('.', "-")),
        None => topic.replace('.', "-"),
    }
}

/// moto's SQS-API server on a free loopback port. Killed on drop.
pub struct MotoServer {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Its log.
    pub log: PathBuf,
    // Dropped after `child` is killed.
    _dir: tempfile::TempDir,
}

impl MotoServer {
    /// Starts moto's server (`tests/clients/sqs_server.py`: moto's
    /// `moto_server` with a cheaper clock and retention check) with the
    /// test venv's Python and waits until it answers HTTP.
    ///
    /// # Errors
    ///
    /// When moto is not installed or does not become ready in time.
    pub fn start() -> Result<Self> {
        let python = test_python()?;
        let script = require(
            workspace().join("tests/clients/sqs_server.py"),
            "the SQS-API server launcher",
            "it belongs to the repository",
        )?;
        let dir = scratch_dir("weir-sqs-")?;
        let port = free_port()?;
        let log = dir.path().join("moto.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&python)
            .arg(&script)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", script.display()))?;
        let mut server = MotoServer {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let log = server.log.clone();
        poll_until(
            START_WAIT,
            "the SQS-API server to answer HTTP",
            || {
                if let Some(child) = server.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    bail!(
                        "the SQS-API server exited with {status} before answering; see {}",
                        log.display()
                    );
                }
                Ok(answers_http(port).then_some(()))
            },
            || format!("see {}", log.display()),
        )?;
        Ok(server)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether an HTTP server on `port` answers a request.
fn answers_http(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = [0u8; 12];
    stream.read_exact(&mut response).is_ok() && response.starts_with(b"HTTP/1.")
}

/// A queue's approximate counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting to be received.
    pub visible: u64,
    /// Received, not deleted, not visible again yet.
    pub not_visible: u64,
    /// Sent with a delay that has not passed.
    pub delayed: u64,
}

/// A private moto and an independent client for it.
pub struct SqsBroker {
    /// The server.
    pub server: MotoServer,
    client: ClientScript,
}

impl SqsBroker {
    /// Starts the server and its client.
    ///
    /// # Errors
    ///
    /// When moto or the test venv is missing, or moto does not start.
    pub fn start() -> Result<Self> {
        let server = MotoServer::start()?;
        let client = ClientScript::new("sqs_tool.py", "--endpoint", &server.endpoint)?;
        Ok(Self { server, client })
    }

    /// The approximate counts of the queue of `topic`; `None` when it does
    /// not exist.
    ///
    /// # Errors
    ///
    /// When moto cannot be asked.
    pub fn counts(&self, topic: &str) -> Result<Option<QueueCounts>> {
        let out = self
            .client
            .call("counts", &["--name", &queue_name(topic)], None)?;
        if out.is_null() {
            return Ok(None);
        }
        let number = |name: &str| {
            out[name]
                .as_u64()
                .ok_or_else(|| anyhow!("no {name} in {out}"))
        };
        Ok(Some(QueueCounts {
            visible: number("visible")?,
            not_visible: number("not_visible")?,
            delayed: number("delayed")?,
        }))
    }
}

impl TestBroker for SqsBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Sqs
    }

    fn deployment(&self) -> Result<Deployment> {
        Deployment::with_source(&format!(
            "[source.sqs]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            self.server.endpoint
        ))
    }

    fn create_topic(&self, topic: &str, _partitions: i32) -> Result<()> {
        self.client
            .call("create-queue", &["--name", &queue_name(topic)], None)?;
        Ok(())
    }

    fn create_output_topic(&self, topic: &str) -> Result<()> {
        self.create_topic(topic, 1)
    }

    fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<Position>> {
        let lines: Vec<String> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "key_hex": r.key.as_deref().map(hex),
                    "value_hex": hex(&r.value),
                    "headers": r.headers.iter().map(|(n, v)| vec![n.clone(), hex(v)]).collect::<Vec<_>>(),
                })
                .to_string()
            })
            .collect();
        let out = self.client.call(
            "produce",
            &["--name", &queue_name(topic)],
            Some(lines.join("\n")),
        )?;
        out.as_array()
            .ok_or_else(|| anyhow!("produce answered {out}"))?
            .iter()
            .map(|p| {
                let text = |name: &str| {
                    p[name]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("no {name} in {p}"))
                };
                Ok(Position::Sqs {
                    queue_url: text("queue_url")?,
                    message_id: text("message_id")?,
                })
            })
            .collect()
    }

    /// Every message the queue holds, read without consuming it (see
    /// `sqs_tool.py read`); Weir never consumes the queues this is used on
    /// (dead letters, emitted events).
    fn read(&self, topic: &str) -> Result<Vec<Stored>> {
        let out = self
            .client
            .call("read", &["--name", &queue_name(topic)], None)?;
        out.as_array()
            .ok_or_else(|| anyhow!("read answered {out}"))?
            .iter()
            .map(|m| {
                Ok(Stored {
                    topic: topic.to_string(),
                    key: m["key_hex"].as_str().map(unhex).transpose()?,
                    value: unhex(m["value_hex"].as_str().unwrap_or_default())?,
                    headers: headers(m)?,
                    position: Position::Sqs {
                        queue_url: m["queue_url"]
                            .as_str()
                            .ok_or_else(|| anyhow!("no queue_url in {m}"))?
                            .to_string(),
                        message_id: m["message_id"]
                            .as_str()
                            .ok_or_else(|| anyhow!("no message_id in {m}"))?
                            .to_string(),
                    },
                })
            })
            .collect()
    }

    fn caught_up(&self, _group: &str, topic: &str, _produced: &[Position]) -> Result<bool> {
        Ok(self
            .counts(topic)?
            .is_some_and(|c| c.visible == 0 && c.not_visible == 0 && c.delayed == 0))
    }

    fn progress(&self, _group: &str, topic: &str) -> String {
        match self.counts(topic) {
            Ok(Some(c)) => format!(
                "queue {}: {} visible, {} in flight, {} delayed",
                queue_name(topic),
                c.visible,
                c.not_visible,
                c.delayed
            ),
            Ok(None) => format!("no queue {}", queue_name(topic)),
            Err(err) => format!("cannot read queue {}: {err:#}", queue_name(topic)),
        }
    }

    fn prepare_for_kills(&self, _deployment: &Deployment) -> Result<()> {
        Ok(())
    }

    fn manifest_for_kills(&self) -> &'static str {
        // Held messages' visibility is extended every third of it, so a
        // short timeout only bounds how soon a killed process's come back.
        "\n[sqs]\nvisibility_timeout = \"4s\"\n"
    }

    fn competing_consumers(&self) -> bool {
        true
    }
}

/// `[name, value_hex]` header pairs of a client record.
fn headers(record: &Value) -> Result<Vec<(String, Vec<u8>)>> {
    record["headers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|h| {
            let name = h[0].as_str().ok_or_else(|| anyhow!("bad header {h}"))?;
            Ok((name.to_string(), unhex(h[1].as_str().unwrap_or_default())?))
        })
        .collect()
}
