//! NATS JetStream for the integration tests: a private `nats-server`
//! process, and an independent client (nats-py through
//! `tests/clients/nats_tool.py`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::client::ClientScript;
use crate::{START_WAIT, free_ports, hex, poll_until, require, scratch_dir};

/// The stream Weir uses for `subject`: the subject with every character
/// outside `[A-Za-z0-9_-]` replaced by `_` (`orders.dlq` → `orders_dlq`).
pub fn stream_name(subject: &str) -> String {
    sanitize(subject)
}

/// The durable consumer Weir uses for consumer group `group` on `topic`:
/// the group with every character outside `[A-Za-z0-9_-]` replaced by `_`
/// (the default group `weir.<handler>` gives `weir_<handler>`); a handler
/// with several topics has one durable per topic,
/// `<durable>-<topic sanitized>`.
pub fn nats_durable(group: &str, topic: &str, handler_topics: usize) -> String {
    if handler_topics > 1 {
        format!("{}-{}", sanitize(group), sanitize(topic))
    } else {
        sanitize(group)
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A `nats-server` with JetStream, on free loopback ports, storing in its
/// own temporary directory (kept with `WEIR_KEEP_TEST_DIRS`). Killed on
/// drop; [`stop`](Self::stop) and [`restart`](Self::restart) take it down
/// and bring it back on the same port with the same store, for tests of a
/// server that goes away mid-run.
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// HTTP monitoring port on 127.0.0.1 (`/varz`, `/jsz`, `/healthz`).
    pub monitor_port: u16,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    /// The server's log (every run of it, appended).
    pub log: PathBuf,
    store: PathBuf,
    /// `--tls` arguments when it speaks TLS only.
    tls: Vec<std::ffi::OsString>,
    // Dropped after `child` is killed (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server -js` on a free loopback port and waits until it
    /// answers with its INFO line and reports itself healthy.
    ///
    /// # Errors
    ///
    /// When nats-server is not installed or does not become ready in time.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// As [`NatsServer::start`], speaking only TLS with `certs`' server
    /// certificate (clients connect to [`NatsServer::url`] as `tls://`).
    ///
    /// # Errors
    ///
    /// As [`NatsServer::start`].
    pub fn start_tls(certs: &crate::tls::Certificates) -> Result<Self> {
        Self::start_with(Some(certs))
    }

    fn start_with(certs: Option<&crate::tls::Certificates>) -> Result<Self> {
        let binary = nats_server_binary()?;
        let dir = scratch_dir("weir-nats-")?;
        let [port, monitor_port] = free_ports()?;
        let mut server = NatsServer {
            child: None,
            binary,
            port,
            monitor_port,
            url: format!(
                "{}://127.0.0.1:{port}",
                if certs.is_some() { "tls" } else { "nats" }
            ),
            log: dir.path().join("nats-server.log"),
            store: dir.path().join("js"),
            tls: certs.map_or_else(Vec::new, |certs| {
                vec![
                    "--tls".into(),
                    "--tlscert".into(),
                    certs.cert.clone().into_os_string(),
                    "--tlskey".into(),
                    certs.key.clone().into_os_string(),
                ]
            }),
            _dir: dir,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Whether the server process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the server (SIGTERM; SIGKILL if it has not exited within 10 s)
    /// and waits for it to exit. Its port and store stay reserved for
    /// [`restart`](Self::restart). Stopping a stopped server does nothing.
    ///
    /// # Errors
    ///
    /// When it cannot be signalled or waited for.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "kill -TERM nats-server failed");
            let exited = poll_until(
                Duration::from_secs(30),
                "nats-server to exit after SIGTERM",
                || Ok(child.try_wait()?),
                String::new,
            );
            if exited.is_err() {
                child.kill()?;
                child.wait()?;
            }
        }
        Ok(())
    }

    /// SIGKILL: the server stops at once, with no chance to flush.
    ///
    /// # Errors
    ///
    /// When it cannot be killed.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same ports with the same store (it
    /// keeps its streams and consumers), after [`stop`](Self::stop) or
    /// [`kill`](Self::kill); waits until it is ready.
    ///
    /// # Errors
    ///
    /// When it is still running, or does not become ready in time.
    pub fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(
            !self.is_running(),
            "nats-server is still running: stop() it first"
        );
        self.child = None;
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-js")
            .arg("-sd")
            .arg(&self.store)
            .args(&self.tls)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        let log = self.log.clone();
        let port = self.port;
        let monitor = self.monitor_port;
        poll_until(
            START_WAIT,
            "nats-server to accept connections",
            || {
                if let Some(child) = self.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    bail!(
                        "nats-server exited with {status} before accepting connections; see {}",
                        log.display()
                    );
                }
                Ok((says_info(port) && healthy(monitor)).then_some(()))
            },
            || format!("see {}", log.display()),
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a NATS server on `port` greets a new connection with `INFO`.
fn says_info(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

/// Whether the monitoring endpoint on `port` answers `/healthz` with 200
/// (the server is up and JetStream is ready).
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// nats-server from `$NATS_SERVER_BIN`, else the `PATH`, else
/// `/usr/sbin/nats-server` (Debian's package, which
/// `.ci/install-test-tools` installs).
fn nats_server_binary() -> Result<PathBuf> {
    const HOW: &str = "install it with `bash .ci/install-test-tools` (Debian package \
                       nats-server; or set NATS_SERVER_BIN), or set \
                       WEIR_SKIP_BROKER_TESTS=1 to skip the broker tests";
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return require(PathBuf::from(path), "nats-server ($NATS_SERVER_BIN)", HOW);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    if let Some(path) = on_path {
        return Ok(path);
    }
    require(
        Path::new("/usr/sbin/nats-server").to_path_buf(),
        "nats-server (neither $NATS_SERVER_BIN nor the PATH has one)",
        HOW,
    )
}

/// Which stream a [`NatsTool`] call is about.
#[derive(Debug, Clone, Copy)]
pub enum Stream<'a> {
    /// The stream with this name.
    Named(&'a str),
    /// The stream that captures this subject (wildcards allowed); reads are
    /// filtered on it.
    Capturing(&'a str),
}

impl Stream<'_> {
    fn args(&self) -> [&str; 2] {
        match self {
            Stream::Named(name) => ["--stream", name],
            Stream::Capturing(subject) => ["--subject", subject],
        }
    }
}

/// A durable consumer's progress, from the server's consumer info.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConsumerState {
    /// The stream it consumes.
    pub stream: String,
    /// Its name.
    pub name: String,
    /// Messages matching its filter not yet delivered.
    pub num_pending: u64,
    /// Delivered, not yet acknowledged.
    pub num_ack_pending: u64,
    /// Delivered more than once.
    pub num_redelivered: u64,
    /// Pull requests waiting.
    pub num_waiting: u64,
    /// Every message at or below this stream sequence is acknowledged.
    pub ack_floor_stream_seq: u64,
    /// The highest stream sequence delivered.
    pub delivered_stream_seq: u64,
    /// Its subject filter, if any.
    pub filter_subject: Option<String>,
    /// Redelivery delay for unacknowledged messages, in nanoseconds.
    pub ack_wait_ns: Option<i64>,
    /// Most messages delivered and unacknowledged at once.
    pub max_ack_pending: Option<i64>,
    /// Most deliveries of one message (-1: unlimited).
    pub max_deliver: Option<i64>,
}

/// A stream's name, subjects and contents.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamSummary {
    /// Stream name.
    pub name: String,
    /// The subjects it captures.
    pub subjects: Vec<String>,
    /// Messages held.
    pub messages: u64,
    /// Sequence of the first message held.
    pub first_seq: u64,
    /// Sequence of the last message stored.
    pub last_seq: u64,
    /// Consumers on it.
    pub consumers: u64,
}

/// One message to publish.
#[derive(Debug, Clone, Default)]
pub struct NatsMessage {
    /// Subject (`None`: the subject given to [`NatsTool::publish`]).
    pub subject: Option<String>,
    /// Payload bytes.
    pub value: Vec<u8>,
    /// Headers (NATS header values are text).
    pub headers: Vec<(String, String)>,
    /// `Nats-Msg-Id`, for the server's duplicate window.
    pub msg_id: Option<String>,
    /// A header block sent byte for byte instead of `headers` and
    /// `msg_id` (over the raw protocol: no client library sends every
    /// block a server relays).
    pub header_block: Option<Vec<u8>>,
}

/// The independent NATS client: nats-py driven through
/// `tests/clients/nats_tool.py`.
pub struct NatsTool {
    client: ClientScript,
}

impl NatsTool {
    /// A client for `server`.
    ///
    /// # Errors
    ///
    /// When the test venv is missing.
    pub fn new(server: &NatsServer) -> Result<Self> {
        Self::for_url(&server.url)
    }

    /// A client for the server at `url` (`nats://host:port`).
    ///
    /// # Errors
    ///
    /// When the test venv is missing.
    pub fn for_url(url: &str) -> Result<Self> {
        Ok(Self {
            client: ClientScript::new("nats_tool.py", "--url", url)?,
        })
    }

    /// A client speaking TLS to the server at `url`, trusting `ca`.
    ///
    /// # Errors
    ///
    /// When the test venv is missing.
    pub fn for_tls(url: &str, ca: &Path) -> Result<Self> {
        let mut client = ClientScript::new("nats_tool.py", "--url", url)?;
        client.extra = vec!["--tls-ca".into(), ca.display().to_string()];
        Ok(Self { client })
    }

    /// Creates stream `stream` capturing `subjects` (file storage), unless
    /// a stream of that name exists.
    ///
    /// # Errors
    ///
    /// When the server refuses (e.g. another stream captures a subject).
    pub fn add_stream(&self, stream: &str, subjects: &[&str]) -> Result<StreamSummary> {
        self.add_limited_stream(stream, subjects, None)
    }

    /// Like [`add_stream`](Self::add_stream); with `max_msgs`, the stream
    /// refuses publishes once it holds that many messages (a full stream).
    ///
    /// # Errors
    ///
    /// When the server refuses.
    pub fn add_limited_stream(
        &self,
        stream: &str,
        subjects: &[&str],
        max_msgs: Option<u64>,
    ) -> Result<StreamSummary> {
        let subjects = subjects.join(",");
        let max = max_msgs.map(|n| n.to_string());
        let mut args = vec!["--stream", stream, "--subjects", &subjects];
        if let Some(max) = &max {
            args.extend(["--max-msgs", max]);
        }
        let out = self.client.call("add-stream", &args, None)?;
        serde_json::from_value(out).context("unexpected add-stream result")
    }

    /// Deletes stream `stream` with its messages and consumers.
    ///
    /// # Errors
    ///
    /// When the server refuses (e.g. no such stream).
    pub fn delete_stream(&self, stream: &str) -> Result<()> {
        self.client
            .call("delete-stream", &["--stream", stream], None)?;
        Ok(())
    }

    /// Publishes `messages` through JetStream, one acknowledged publish at
    /// a time, in order; returns the (stream, sequence) of each from its
    /// PubAck (a duplicate `msg_id` gives the first copy's).
    ///
    /// # Errors
    ///
    /// When no stream captures a subject, or the server does not
    /// acknowledge.
    pub fn publish(&self, subject: &str, messages: &[NatsMessage]) -> Result<Vec<(String, u64)>> {
        let lines: Vec<String> = messages
            .iter()
            .map(|m| {
                serde_json::json!({
                    "subject": m.subject,
                    "value_hex": hex(&m.value),
                    "headers": m.headers.iter().map(|(n, v)| [n, v]).collect::<Vec<_>>(),
                    "msg_id": m.msg_id,
                    "header_block_hex": m.header_block.as_deref().map(hex),
                })
                .to_string()
            })
            .collect();
        let out = self
            .client
            .call("publish", &["--subject", subject], Some(lines.join("\n")))?;
        serde_json::from_value(out).context("unexpected publish result")
    }

    /// Every message of `stream` in sequence order up to the last one it
    /// held when the read began, at most `max` (`[]` when no stream
    /// captures the subject). Each is an object with `stream`, `subject`,
    /// `seq`, `value_hex`, `headers` (`[name, value_hex]` pairs, as
    /// [`crate::header`] reads them) and `time`.
    ///
    /// # Errors
    ///
    /// When the server leaves one request unanswered for `stall`: the
    /// read as a whole may take as long as the stream needs.
    pub fn read(&self, stream: Stream<'_>, max: usize, stall: Duration) -> Result<Vec<Value>> {
        let max = max.to_string();
        let stall = stall.as_millis().to_string();
        let mut args = stream.args().to_vec();
        args.extend(["--max", &max, "--timeout-ms", &stall]);
        let out = self.client.call("read", &args, None)?;
        serde_json::from_value(out).context("unexpected read result")
    }

    /// The progress of durable consumer `durable` on `stream`; `None` when
    /// the stream or the consumer does not exist.
    ///
    /// # Errors
    ///
    /// When the server cannot be asked.
    pub fn consumer(&self, stream: Stream<'_>, durable: &str) -> Result<Option<ConsumerState>> {
        let mut args = stream.args().to_vec();
        args.extend(["--durable", durable]);
        let out = self.client.call("consumer", &args, None)?;
        serde_json::from_value(out).context("unexpected consumer result")
    }

    /// Acts as a consumer: fetches up to `count` messages of `stream`
    /// through durable pull consumer `durable` (created if missing) and
    /// acknowledges them; returns their stream sequences. Fewer than
    /// `count` only when the consumer has nothing more pending.
    ///
    /// # Errors
    ///
    /// When the server refuses.
    pub fn ack(&self, stream: Stream<'_>, durable: &str, count: usize) -> Result<Vec<u64>> {
        let count = count.to_string();
        let mut args = stream.args().to_vec();
        args.extend(["--durable", durable, "--count", &count]);
        let out = self.client.call("ack", &args, None)?;
        serde_json::from_value(out).context("unexpected ack result")
    }

    /// Every stream on the server, by name.
    ///
    /// # Errors
    ///
    /// When the server cannot be asked.
    pub fn streams(&self) -> Result<Vec<StreamSummary>> {
        let out = self.client.call("streams", &[], None)?;
        serde_json::from_value(out).context("unexpected streams result")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_weirs_rule() {
        assert_eq!(stream_name("orders"), "orders");
        assert_eq!(stream_name("orders.dlq"), "orders_dlq");
        assert_eq!(stream_name("a.b-c_d*>é"), "a_b-c_d___");
        assert_eq!(nats_durable("weir.probe", "events", 1), "weir_probe");
        assert_eq!(
            nats_durable("weir.probe", "orders.eu", 2),
            "weir_probe-orders_eu"
        );
    }
}
