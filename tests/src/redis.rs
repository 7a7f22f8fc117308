//! Redis Streams for the conformance suite: a private `redis-server` and
//! redis-py (`tests/clients/redis_tool.py`).
//!
//! | | Redis Streams |
//! |---|---|
//! | topic | stream key |
//! | record key | field `key` |
//! | partition | ignored: one stream, one order |
//! | position | stream, entry ID |
//! | group | consumer group (`XINFO GROUPS`) |
//! | caught up | nothing pending and the last delivered ID at the last entry produced |

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

use crate::broker::{BrokerKind, Position, Stored, TestBroker};
use crate::client::ClientScript;
use crate::{
    Deployment, Record, START_WAIT, free_ports, hex, poll_until, require, scratch_dir, unhex,
};

/// A `redis-server` on a free loopback port, keeping nothing on disk, in
/// its own temporary directory. Killed on drop.
pub struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
    /// `rediss://127.0.0.1:<tls port>` when started with TLS.
    pub tls_url: Option<String>,
    /// The server's log.
    pub log: PathBuf,
    // Dropped after `child` is killed.
    _dir: tempfile::TempDir,
}

/// `$REDIS_SERVER_BIN`, else `redis-server` on the PATH, else
/// `/usr/bin/redis-server`.
fn redis_server_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("REDIS_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    match on_path {
        Some(path) => Ok(path),
        None => require(
            PathBuf::from("/usr/bin/redis-server"),
            "redis-server",
            "install the Debian package redis-server (bash .ci/install-test-tools does), set REDIS_SERVER_BIN, or set WEIR_SKIP_BROKER_TESTS=1",
        ),
    }
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers `PING`.
    ///
    /// # Errors
    ///
    /// When redis-server is missing or does not become ready in time.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// As [`RedisServer::start`], also accepting TLS on a second port
    /// ([`RedisServer::tls_url`]) with `certs`' server certificate; clients
    /// need no certificate of their own.
    ///
    /// # Errors
    ///
    /// As [`RedisServer::start`].
    pub fn start_tls(certs: &crate::tls::Certificates) -> Result<Self> {
        Self::start_with(Some(certs))
    }

    fn start_with(certs: Option<&crate::tls::Certificates>) -> Result<Self> {
        let binary = redis_server_binary()?;
        let dir = scratch_dir("weir-redis-")?;
        let [port, tls_port] = free_ports()?;
        let log = dir.path().join("redis-server.log");
        let mut command = Command::new(&binary);
        let mut tls_url = None;
        if let Some(certs) = certs {
            command
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&certs.cert)
                .arg("--tls-key-file")
                .arg(&certs.key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca)
                .args(["--tls-auth-clients", "no"]);
            tls_url = Some(format!("rediss://127.0.0.1:{tls_port}"));
        }
        let child = command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let server = Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            tls_url,
            log,
            _dir: dir,
        };
        poll_until(
            START_WAIT,
            "redis-server to answer PING",
            || Ok(ping(port).then_some(())),
            || format!("log: {}", server.log.display()),
        )?;
        Ok(server)
    }
}

impl RedisServer {
    /// The plaintext port.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_default()
    }

    /// Sends one command (RESP, without authentication) and returns the
    /// first line of the reply; an error reply is an error.
    ///
    /// # Errors
    ///
    /// When the server cannot be reached or answers with an error.
    pub fn command(&self, words: &[&str]) -> Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut request = format!("*{}\r\n", words.len());
        for word in words {
            request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
        }
        stream.write_all(request.as_bytes())?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
            reply.push(byte[0]);
        }
        let reply = String::from_utf8_lossy(&reply).trim_end().to_string();
        anyhow::ensure!(!reply.starts_with('-'), "redis {words:?}: {reply}");
        Ok(reply)
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// redis-server and redis-py.
pub struct RedisBroker {
    /// The server process.
    pub server: RedisServer,
    client: ClientScript,
}

impl RedisBroker {
    /// Starts the server and its client.
    ///
    /// # Errors
    ///
    /// When either is missing or the server does not become ready.
    pub fn start() -> Result<Self> {
        Self::with_server(RedisServer::start()?)
    }

    /// A server that also speaks TLS ([`RedisServer::start_tls`]); the
    /// client uses its plaintext port.
    ///
    /// # Errors
    ///
    /// As [`RedisBroker::start`].
    pub fn start_tls(certs: &crate::tls::Certificates) -> Result<Self> {
        Self::with_server(RedisServer::start_tls(certs)?)
    }

    fn with_server(server: RedisServer) -> Result<Self> {
        let client = ClientScript::new("redis_tool.py", "--url", &server.url)?;
        Ok(Self { server, client })
    }

    fn group(&self, group: &str, topic: &str) -> Result<Value> {
        self.client
            .call("group", &["--stream", topic, "--group", group], None)
    }
}

/// `<ms>-<seq>` as a pair that orders like Redis orders IDs.
fn entry_order(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl TestBroker for RedisBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Redis
    }

    fn deployment(&self) -> Result<Deployment> {
        Deployment::with_source(&format!("[source.redis]\nurl = \"{}\"\n", self.server.url))
    }

    /// Nothing: a stream exists from its first entry, and Weir creates its
    /// group with `MKSTREAM`.
    fn create_topic(&self, _topic: &str, _partitions: i32) -> Result<()> {
        Ok(())
    }

    fn create_output_topic(&self, _topic: &str) -> Result<()> {
        Ok(())
    }

    fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<Position>> {
        let lines: String = records
            .iter()
            .map(|r| {
                let headers: Vec<Value> =
                    r.headers.iter().map(|(n, v)| json!([n, hex(v)])).collect();
                let line = json!({
                    "key_hex": r.key.as_deref().map(hex),
                    "value_hex": hex(&r.value),
                    "headers": headers,
                });
                format!("{line}\n")
            })
            .collect();
        let ids = self
            .client
            .call("xadd", &["--stream", topic], Some(lines))?;
        ids.as_array()
            .ok_or_else(|| anyhow!("xadd printed {ids}"))?
            .iter()
            .map(|id| {
                Ok(Position::Redis {
                    stream: topic.to_string(),
                    entry_id: id
                        .as_str()
                        .ok_or_else(|| anyhow!("an entry id {id}"))?
                        .to_string(),
                })
            })
            .collect()
    }

    fn read(&self, topic: &str) -> Result<Vec<Stored>> {
        let entries = self.client.call("read", &["--stream", topic], None)?;
        entries
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|entry| {
                let mut key = None;
                let mut value = Vec::new();
                let mut headers = Vec::new();
                for field in entry["fields"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    let name = String::from_utf8(unhex(field[0].as_str().unwrap_or_default())?)?;
                    let bytes = unhex(field[1].as_str().unwrap_or_default())?;
                    match name.as_str() {
                        "key" if key.is_none() => key = Some(bytes),
                        "payload" => value = bytes,
                        _ => headers.push((name, bytes)),
                    }
                }
                Ok(Stored {
                    topic: topic.to_string(),
                    key,
                    value,
                    headers,
                    position: Position::Redis {
                        stream: topic.to_string(),
                        entry_id: entry["id"]
                            .as_str()
                            .ok_or_else(|| anyhow!("no id in {entry}"))?
                            .to_string(),
                    },
                })
            })
            .collect()
    }

    fn caught_up(&self, group: &str, topic: &str, produced: &[Position]) -> Result<bool> {
        let state = self.group(group, topic)?;
        if state.is_null() {
            return Ok(false);
        }
        let last = produced
            .iter()
            .filter_map(|p| match p {
                Position::Redis { stream, entry_id } if stream == topic => entry_order(entry_id),
                _ => None,
            })
            .max();
        let delivered = state["last_delivered_id"].as_str().and_then(entry_order);
        Ok(state["pending"].as_u64() == Some(0) && delivered >= last)
    }

    fn progress(&self, group: &str, topic: &str) -> String {
        match self.group(group, topic) {
            Ok(state) => format!("group {group} on stream {topic}: {state}"),
            Err(err) => format!("cannot read group {group}: {err:#}"),
        }
    }

    fn prepare_for_kills(&self, _deployment: &Deployment) -> Result<()> {
        Ok(())
    }

    fn manifest_for_kills(&self) -> &'static str {
        // A killed process's pending entries are claimed once idle this
        // long; held ones are kept however long they run.
        "\n[redis]\nclaim_idle = \"2s\"\n"
    }
}
