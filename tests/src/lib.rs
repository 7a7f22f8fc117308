//! Harness for Weir's integration tests: real broker processes (tansu for
//! the Kafka protocol, nats-server for NATS JetStream), an independent
//! client for each (kafka-python, nats-py), and the real `weir` binary,
//! each on loopback with its own temporary directory. [`TestBroker`] puts
//! the brokers behind one face, so that a delivery test is written once and
//! runs against each. [`PgServer`] is a private PostgreSQL server for the
//! store that several processes share, with psql as its client.
//!
//! Nothing here sleeps and hopes: every wait polls for an observable effect
//! until a deadline, and a timeout reports the last state seen and where the
//! logs are.

pub mod admin;
mod broker;
mod client;
pub mod counting;
mod nats;
pub mod postgres;
mod rabbitmq;
mod redis;
mod sqs;
pub mod tls;

pub use broker::{
    BrokerKind, KafkaBroker, NATS_KEY_HEADER, NatsBroker, Position, Stored, TestBroker,
};
pub use nats::{
    ConsumerState, NatsMessage, NatsServer, NatsTool, Stream, StreamSummary, nats_durable,
    stream_name,
};
pub use postgres::PgServer;
pub use rabbitmq::{RabbitBroker, RabbitServer};
pub use redis::{RedisBroker, RedisServer};
pub use sqs::{MotoServer, SqsBroker};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use client::ClientScript;

/// Integration tests share two cores: run them one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The start of every integration test: the [`serial`] lock, or `None`
/// (said on stderr) when `WEIR_SKIP_BROKER_TESTS=1` asks to skip the tests
/// that need tansu, kafka-python and the built binaries. Without that
/// variable a missing tool fails the test with instructions; nothing is
/// skipped silently.
///
/// ```ignore
/// let Some(_serial) = weir_tests::broker_test() else { return Ok(()) };
/// ```
pub fn broker_test() -> Option<MutexGuard<'static, ()>> {
    if std::env::var_os("WEIR_SKIP_BROKER_TESTS").is_some_and(|v| v == "1") {
        let current = std::thread::current();
        eprintln!(
            "skipping {}: WEIR_SKIP_BROKER_TESTS=1",
            current.name().unwrap_or("a broker test")
        );
        return None;
    }
    Some(serial())
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `path` if it exists, else an error naming `what` is missing and `how` to
/// get it.
///
/// # Errors
///
/// When `path` does not exist.
pub fn require(path: PathBuf, what: &str, how: &str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        bail!("{what} not found at {}; {how}", path.display())
    }
}

/// Polls `probe` every 50 ms until it returns `Some`, or fails after
/// `timeout` with `describe()` of the last state.
///
/// # Errors
///
/// On timeout, or when `probe` itself fails.
pub fn poll_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>>,
    describe: impl Fn() -> String,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}; last state: {}{}",
                describe(),
                keep_dirs_hint()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a one-shot command a test runs (`weir check`, `weir dlq …`, a
/// headless browser, promtool) may take before it is killed: far above
/// what any of them needs on a loaded machine, so that a command that hangs
/// fails its test instead of holding the whole run.
pub const COMMAND_WAIT: Duration = Duration::from_secs(300);

/// Runs `command` to its end like [`Command::output`], but kills it and
/// fails, with what it printed on stderr, when it is still running after
/// `limit`.
///
/// # Errors
///
/// When it cannot be started, or runs for longer than `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> Result<std::process::Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            bail!(
                "{:?} {:?} was still running after {limit:?} and was killed; stderr: {}",
                command.get_program(),
                command.get_args().collect::<Vec<_>>(),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Reads `pipe` to its end on a thread of its own, so that a child that
/// fills one pipe never blocks while another is waited on.
fn read_all<R: std::io::Read + Send + 'static>(
    pipe: Option<R>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// How long a server or client a test starts may take to become ready
/// (accept connections, answer a query, create a topic): sized for a 2-core
/// machine busy with other work. It costs nothing when the server is
/// quicker; it only bounds how long a server that never comes up holds the
/// test.
pub const START_WAIT: Duration = Duration::from_secs(60);

/// The longest a [`poll_progress`] wait may take even while its work keeps
/// moving: far more than any test needs on a loaded machine, so that a
/// wait that can never end fails instead of holding CI.
pub const PROGRESS_CEILING: Duration = Duration::from_secs(20 * 60);

/// Polls `probe` every 50 ms until it returns `Some`, for as long as the
/// work it waits on moves: fails only after `stall` during which
/// `progress()` (records read so far, messages handled, bytes written…)
/// did not change, with `describe()` of the last state. Give it measures
/// that only grow (the most records seen, not the last read's count), so
/// that a flickering read is not taken for progress. `progress` is
/// asked at most once a second (it may ask a broker). A slow or busy
/// machine makes the wait longer, not a failure; work that stopped fails
/// as soon as with a fixed deadline of `stall`; work that moves without
/// ever arriving (a retry loop) fails after [`PROGRESS_CEILING`].
///
/// # Errors
///
/// When nothing moved for `stall`, or when `probe` itself fails.
pub fn poll_progress<T, P: PartialEq>(
    stall: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>>,
    mut progress: impl FnMut() -> P,
    describe: impl Fn() -> String,
) -> Result<T> {
    const SAMPLE: Duration = Duration::from_secs(1);
    let ceiling = PROGRESS_CEILING.max(stall);
    let started = Instant::now();
    let mut last = progress();
    let mut moved = Instant::now();
    let mut sampled = Instant::now();
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if sampled.elapsed() < SAMPLE {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        sampled = Instant::now();
        if started.elapsed() > ceiling {
            bail!(
                "still not done after {:?}, although the work kept moving, waiting for {what}; last state: {}{}",
                started.elapsed(),
                describe(),
                keep_dirs_hint()
            );
        }
        let now = progress();
        if now != last {
            last = now;
            moved = Instant::now();
        } else if moved.elapsed() > stall {
            bail!(
                "no progress for {stall:?} (after {:?} in all) waiting for {what}; last state: {}{}",
                started.elapsed(),
                describe(),
                keep_dirs_hint()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How to keep a failed test's logs, unless they are kept already.
fn keep_dirs_hint() -> &'static str {
    if std::env::var_os("WEIR_KEEP_TEST_DIRS").is_some() {
        ""
    } else {
        " (logs are removed with the test's directory: rerun with WEIR_KEEP_TEST_DIRS=1 to keep them)"
    }
}

/// A free TCP port on loopback.
///
/// # Errors
///
/// When no port can be bound.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `N` different free loopback ports: all are held while the next is
/// chosen, so no two are the same (separate calls of [`free_port`] can
/// return one port twice).
///
/// # Errors
///
/// When no port can be bound.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let held = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&held) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// A tansu broker process with in-memory storage, in its own temporary
/// directory (kept with `WEIR_KEEP_TEST_DIRS`). Killed on drop.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub bootstrap: String,
    /// The broker's log file.
    pub log: PathBuf,
    // Dropped after `child` is killed (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts tansu on a free loopback port and waits until it accepts
    /// connections. (Clients retry until it also answers requests: see
    /// [`KafkaTool::create_topic`].)
    ///
    /// # Errors
    ///
    /// When tansu is not installed or does not become ready in time.
    pub fn start() -> Result<Self> {
        let port = free_port()?;
        Self::start_advertising(port, port)
    }

    /// tansu on a free port behind `stunnel` with `certs`: clients speak
    /// TLS to [`Broker::bootstrap`], the address tansu advertises.
    ///
    /// # Errors
    ///
    /// When tansu or stunnel is missing or does not become ready.
    pub fn start_behind_tls(certs: &tls::Certificates) -> Result<(Self, tls::Stunnel)> {
        let [port, tls_port] = free_ports()?;
        let mut broker = Self::start_advertising(port, tls_port)?;
        let stunnel = tls::Stunnel::start(certs, tls_port, port)?;
        broker.bootstrap = format!("127.0.0.1:{tls_port}");
        Ok((broker, stunnel))
    }

    /// tansu behind `stunnel` with `certs` that requires SASL
    /// authentication (SCRAM-SHA-512) of the one user `user`, whose
    /// password is `password`: clients speak `SASL_SSL` to
    /// [`Broker::bootstrap`]. Its storage is SQLite, which keeps SCRAM
    /// credentials (the in-memory storage keeps none): the user is created
    /// on a first run without authentication, which is then restarted with
    /// it.
    ///
    /// # Errors
    ///
    /// When tansu or stunnel is missing or does not become ready, or the
    /// user cannot be created.
    pub fn start_sasl_behind_tls(
        certs: &tls::Certificates,
        user: &str,
        password: &str,
    ) -> Result<(Self, tls::Stunnel)> {
        let [port, tls_port] = free_ports()?;
        let dir = scratch_dir("weir-broker-")?;
        let storage = ["--storage-engine", "sqlite://tansu.db"];
        let mut setup = Self::spawn(dir, port, tls_port, &storage, "tansu-setup.log")?;
        let created = output_within(
            Command::new(tansu_binary()?).args([
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{port}"),
                "--mechanism",
                "scram512",
                user,
                password,
            ]),
            COMMAND_WAIT,
        )?;
        ensure!(
            created.status.success(),
            "tansu user create: {}; see {}",
            String::from_utf8_lossy(&created.stderr),
            setup.log.display()
        );
        let _ = setup.child.kill();
        let _ = setup.child.wait();
        let dir = std::mem::replace(&mut setup._dir, scratch_dir("weir-broker-")?);
        drop(setup);
        let mut args = storage.to_vec();
        args.push("--authentication");
        let mut broker = Self::spawn(dir, port, tls_port, &args, "tansu.log")?;
        let stunnel = tls::Stunnel::start(certs, tls_port, port)?;
        broker.bootstrap = format!("127.0.0.1:{tls_port}");
        Ok((broker, stunnel))
    }

    /// tansu listening on `port` and telling clients to connect to
    /// `advertised`.
    fn start_advertising(port: u16, advertised: u16) -> Result<Self> {
        let dir = scratch_dir("weir-broker-")?;
        Self::spawn(
            dir,
            port,
            advertised,
            &["--storage-engine", "memory://tansu/"],
            "tansu.log",
        )
    }

    /// tansu with `args`, working in `dir` (its log there as `log_name`),
    /// listening on `port` and telling clients to connect to `advertised`.
    fn spawn(
        dir: tempfile::TempDir,
        port: u16,
        advertised: u16,
        args: &[&str],
        log_name: &str,
    ) -> Result<Self> {
        let tansu = tansu_binary()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let log = dir.path().join(log_name);
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(args)
            .current_dir(dir.path())
            // tansu reads these from the environment too: a developer's
            // settings must not change the broker under test.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("CLUSTER_ID")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", tansu.display()))?;
        let mut broker = Broker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let log = broker.log.clone();
        poll_until(
            START_WAIT,
            "the broker to accept connections",
            || {
                if let Some(status) = broker.child.try_wait()? {
                    bail!(
                        "tansu exited with {status} before accepting connections; see {}",
                        log.display()
                    );
                }
                Ok(TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()))
            },
            || format!("see {}", log.display()),
        )?;
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tansu from `$TANSU_BIN`, else the `PATH`, else `$CARGO_HOME/bin` (where
/// `.ci/install-test-tools` puts it).
fn tansu_binary() -> Result<PathBuf> {
    const HOW: &str = "install it with `bash .ci/install-test-tools` (or set TANSU_BIN), \
                       or set WEIR_SKIP_BROKER_TESTS=1 to skip the broker tests";
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return require(PathBuf::from(path), "the tansu broker ($TANSU_BIN)", HOW);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tansu"))
            .find(|candidate| candidate.is_file())
    });
    if let Some(path) = on_path {
        return Ok(path);
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    require(
        home.join("bin/tansu"),
        "the tansu broker (neither $TANSU_BIN nor the PATH has one)",
        HOW,
    )
}

/// One record to produce.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Target partition (`None`: the client's partitioner).
    pub partition: Option<i32>,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub value: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// A record with key `key`, payload `payload` and text headers, for the
    /// client's partitioner to place.
    pub fn keyed(key: &str, payload: &str, headers: &[(&str, &str)]) -> Self {
        Self {
            partition: None,
            key: Some(key.as_bytes().to_vec()),
            value: payload.as_bytes().to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    /// A request to a test handler that acts on a header: key and header
    /// `header` both `what`, payload `{}`, partition 0.
    pub fn request(header: &str, what: &str) -> Self {
        Self {
            partition: Some(0),
            key: Some(what.as_bytes().to_vec()),
            value: b"{}".to_vec(),
            headers: vec![(header.to_string(), what.as_bytes().to_vec())],
        }
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The independent client: kafka-python driven through
/// `tests/clients/kafka_tool.py`.
pub struct KafkaTool {
    client: ClientScript,
}

impl KafkaTool {
    /// A client for `broker`.
    ///
    /// # Errors
    ///
    /// When the test venv is missing.
    pub fn new(broker: &Broker) -> Result<Self> {
        Self::for_bootstrap(&broker.bootstrap)
    }

    /// A client for the broker at `bootstrap`.
    ///
    /// # Errors
    ///
    /// When the test venv is missing.
    pub fn for_bootstrap(bootstrap: &str) -> Result<Self> {
        Ok(Self {
            client: ClientScript::new("kafka_tool.py", "--bootstrap", bootstrap)?,
        })
    }

    /// A client speaking TLS to the broker at `bootstrap`, trusting `ca`.
    ///
    /// # Errors
    ///
    /// When the test venv is missing.
    pub fn for_tls(bootstrap: &str, ca: &Path) -> Result<Self> {
        let mut client = ClientScript::new("kafka_tool.py", "--bootstrap", bootstrap)?;
        client.extra = vec!["--ssl-cafile".into(), ca.display().to_string()];
        Ok(Self { client })
    }

    /// A client speaking TLS to the broker at `bootstrap`, trusting `ca`,
    /// and authenticating as `user` with `password` (SCRAM-SHA-512).
    ///
    /// # Errors
    ///
    /// When the test venv is missing.
    pub fn for_sasl(bootstrap: &str, ca: &Path, user: &str, password: &str) -> Result<Self> {
        let mut client = ClientScript::new("kafka_tool.py", "--bootstrap", bootstrap)?;
        client.extra = vec![
            "--ssl-cafile".into(),
            ca.display().to_string(),
            "--sasl-user".into(),
            user.into(),
            "--sasl-password".into(),
            password.into(),
        ];
        Ok(Self { client })
    }

    /// Runs one subcommand (`args[0]`) with the rest of `args`.
    fn call(&self, args: &[&str], stdin: Option<String>) -> Result<Value> {
        let (command, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("no kafka client command"))?;
        self.client.call(command, rest, stdin)
    }

    /// Creates `topic` (retrying until the broker is ready for it).
    ///
    /// # Errors
    ///
    /// When the topic cannot be created within [`START_WAIT`].
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let partitions = partitions.to_string();
        let mut last = String::new();
        poll_until(
            START_WAIT,
            "topic creation",
            || match self.call(
                &[
                    "create-topic",
                    "--topic",
                    topic,
                    "--partitions",
                    &partitions,
                ],
                None,
            ) {
                Ok(_) => Ok(Some(())),
                Err(err) => {
                    last = format!("{err:#}");
                    Ok(None)
                }
            },
            String::new,
        )
        .with_context(|| format!("the last attempt: {last}"))
    }

    /// Produces `records` with acks=all; returns their (partition, offset).
    ///
    /// # Errors
    ///
    /// When the broker does not acknowledge them.
    pub fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<(i32, i64)>> {
        let lines: Vec<String> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "partition": r.partition,
                    "key_hex": r.key.as_deref().map(hex),
                    "value_hex": hex(&r.value),
                    "headers": r.headers.iter().map(|(n, v)| [n.clone(), hex(v)]).collect::<Vec<_>>(),
                })
                .to_string()
            })
            .collect();
        let out = self.call(&["produce", "--topic", topic], Some(lines.join("\n")))?;
        serde_json::from_value(out).context("unexpected produce result")
    }

    /// Committed offset of `group` for every partition of `topic`.
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked.
    pub fn committed(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, Option<i64>>> {
        let out = self.call(&["committed", "--group", group, "--topic", topic], None)?;
        parse_partition_map(out)
    }

    /// Reads up to `max` records of `topic` from the beginning, to the end
    /// every partition reported when it answered (or, where that end is
    /// off, until `quiet` passes without a record once every partition has
    /// answered): a slow broker makes the read longer, not short.
    ///
    /// # Errors
    ///
    /// When the broker cannot be read.
    pub fn consume(&self, topic: &str, max: usize, quiet: Duration) -> Result<Vec<Value>> {
        let out = self.call(
            &[
                "consume",
                "--topic",
                topic,
                "--max",
                &max.to_string(),
                "--timeout-ms",
                &quiet.as_millis().to_string(),
            ],
            None,
        )?;
        serde_json::from_value(out).context("unexpected consume result")
    }
}

fn parse_partition_map(value: Value) -> Result<BTreeMap<i32, Option<i64>>> {
    let object = value
        .as_object()
        .ok_or_else(|| anyhow!("expected an object: {value}"))?;
    object
        .iter()
        .map(|(p, o)| Ok((p.parse()?, o.as_i64())))
        .collect()
}

/// A temporary directory, kept after the test when `WEIR_KEEP_TEST_DIRS`
/// is set (to read the logs of a failure).
pub(crate) fn scratch_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    if std::env::var_os("WEIR_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
    }
    Ok(dir)
}

/// Every test's weir serves its admin routes on a port of its own, so that
/// processes running side by side never contend for one.
const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// A directory with a weir configuration and handlers, for one test.
pub struct Deployment {
    /// The temporary directory (kept after the test when
    /// `WEIR_KEEP_TEST_DIRS` is set).
    pub dir: tempfile::TempDir,
}

impl Deployment {
    /// A configuration pointing at `broker`, with an empty handlers
    /// directory.
    ///
    /// # Errors
    ///
    /// When files cannot be written.
    pub fn new(broker: &Broker) -> Result<Self> {
        Self::with_source(&format!(
            "[source.kafka]\nbootstrap_servers = \"{}\"\n",
            broker.bootstrap
        ))
    }

    /// A configuration with `source` (a `[source.…]` table) after the
    /// `[runtime]` table, with an empty handlers directory.
    ///
    /// # Errors
    ///
    /// When files cannot be written.
    pub fn with_source(source: &str) -> Result<Self> {
        let dir = scratch_dir("weir-it-")?;
        std::fs::create_dir_all(dir.path().join("handlers"))?;
        std::fs::write(
            dir.path().join("weir.toml"),
            format!(
                "[runtime]\nhandlers_dir = \"handlers\"\ndata_dir = \"data\"\nshutdown_timeout = \"20s\"\nlag_log_interval = \"2s\"\ndlq_scan_interval = \"1s\"\n\n{ADMIN}\n{source}"
            ),
        )?;
        Ok(Self { dir })
    }

    /// A configuration with no `[source]`: the embedded broker.
    ///
    /// # Errors
    ///
    /// When files cannot be written.
    pub fn embedded() -> Result<Self> {
        let dir = scratch_dir("weir-it-")?;
        std::fs::create_dir_all(dir.path().join("handlers"))?;
        std::fs::write(
            dir.path().join("weir.toml"),
            format!(
                "[runtime]\nhandlers_dir = \"handlers\"\ndata_dir = \"data\"\nlag_log_interval = \"2s\"\ndlq_scan_interval = \"1s\"\n\n{ADMIN}\n[source.embedded]\npartitions = 3\n"
            ),
        )?;
        Ok(Self { dir })
    }

    /// The handlers directory.
    pub fn handlers(&self) -> PathBuf {
        self.dir.path().join("handlers")
    }

    /// Installs test handler `component` (from `target/test-handlers`) as
    /// `name`, with `manifest` as its manifest.
    ///
    /// # Errors
    ///
    /// When the component has not been built.
    pub fn add_handler(&self, component: &str, name: &str, manifest: &str) -> Result<()> {
        self.install(
            "target/test-handlers",
            "a test handler component",
            component,
            name,
            manifest,
        )
    }

    /// Installs example handler `component` (from `target/handlers`, where
    /// `.ci/build-handlers` puts the examples in every language) as `name`,
    /// with `manifest` as its manifest.
    ///
    /// # Errors
    ///
    /// When the component has not been built.
    pub fn add_example(&self, component: &str, name: &str, manifest: &str) -> Result<()> {
        self.install(
            "target/handlers",
            "an example handler component",
            component,
            name,
            manifest,
        )
    }

    /// Copies `<built>/<component>.wasm` to the handlers directory as
    /// `<name>.wasm`, with `manifest` beside it.
    fn install(
        &self,
        built: &str,
        what: &str,
        component: &str,
        name: &str,
        manifest: &str,
    ) -> Result<()> {
        let wasm = require(
            workspace().join(format!("{built}/{component}.wasm")),
            what,
            "build it with `bash .ci/build-handlers` (or set WEIR_SKIP_BROKER_TESTS=1)",
        )?;
        std::fs::copy(wasm, self.handlers().join(format!("{name}.wasm")))?;
        std::fs::write(self.handlers().join(format!("{name}.toml")), manifest)?;
        Ok(())
    }

    /// Starts a second `weir run` on the same handlers with its own data
    /// directory (each process has its own database), as another member of
    /// the same consumer groups.
    ///
    /// # Errors
    ///
    /// When the binary is missing or cannot start.
    pub fn start_another(&self, label: &str) -> Result<WeirProcess> {
        self.start_member(label, label)
    }

    /// Starts `weir run` as member `member`, with the data directory of
    /// [`start_another`](Self::start_another)`(member)` (so a member
    /// restarted after a kill finds what it left there), logging to
    /// `<log_label>.log`.
    ///
    /// # Errors
    ///
    /// When the binary is missing or cannot start.
    pub fn start_member(&self, member: &str, log_label: &str) -> Result<WeirProcess> {
        let config = std::fs::read_to_string(self.dir.path().join("weir.toml"))?.replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"data-{member}\""),
        );
        let path = self.dir.path().join(format!("weir-{member}.toml"));
        std::fs::write(&path, config)?;
        WeirProcess::spawn(
            &path,
            &self.dir.path().join(format!("{log_label}.log")),
            &[],
        )
    }

    /// Starts `weir run` on this deployment.
    ///
    /// # Errors
    ///
    /// When the binary is missing or cannot start.
    pub fn start(&self, label: &str) -> Result<WeirProcess> {
        self.start_with_env(label, &[])
    }

    /// Starts `weir run` with extra environment variables (e.g.
    /// `WEIR_FAULT`).
    ///
    /// # Errors
    ///
    /// When the binary is missing or cannot start.
    pub fn start_with_env(&self, label: &str, env: &[(&str, &str)]) -> Result<WeirProcess> {
        WeirProcess::spawn(
            &self.dir.path().join("weir.toml"),
            &self.dir.path().join(format!("{label}.log")),
            env,
        )
    }

    /// Serves the admin routes on `port` (instead of a free port chosen by
    /// weir).
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub fn admin_port(&self, port: u16) -> Result<()> {
        let path = self.dir.path().join("weir.toml");
        let config = std::fs::read_to_string(&path)?.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
        std::fs::write(path, config)?;
        Ok(())
    }

    /// The admin token the weir of this deployment generated at its last
    /// start (`admin.token` in its data directory).
    ///
    /// # Errors
    ///
    /// When no weir wrote one.
    pub fn admin_token(&self) -> Result<String> {
        let path = self.dir.path().join("data").join("admin.token");
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("no admin token at {}", path.display()))?;
        Ok(token.trim().to_string())
    }

    /// Appends `text` to the configuration file (e.g. a
    /// `[source.kafka.properties]` table).
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub fn append_config(&self, text: &str) -> Result<()> {
        let path = self.dir.path().join("weir.toml");
        let mut config = std::fs::read_to_string(&path)?;
        config.push_str(text);
        std::fs::write(path, config)?;
        Ok(())
    }

    /// Runs `weir <args> --config <this deployment's config>` to completion
    /// and returns its standard output.
    ///
    /// # Errors
    ///
    /// When it cannot run or exits with a failure (its stderr is included).
    pub fn weir(&self, args: &[&str]) -> Result<String> {
        self.weir_output(args).map(|(stdout, _)| stdout)
    }

    /// Runs `weir <args> --config <this deployment's config>` to completion
    /// and returns its standard output and standard error.
    ///
    /// # Errors
    ///
    /// When it cannot run or exits with a failure (its stderr is included).
    pub fn weir_output(&self, args: &[&str]) -> Result<(String, String)> {
        let output = output_within(
            Command::new(weir_binary()?)
                .args(args)
                .arg("--config")
                .arg(self.dir.path().join("weir.toml")),
            COMMAND_WAIT,
        )?;
        ensure!(
            output.status.success(),
            "weir {} exited with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok((
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

/// A running `weir run` process whose log lines are collected as they come.
pub struct WeirProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Where its output is also written.
    pub log: PathBuf,
}

/// `weir` from `$WEIR_BIN`, else the one built beside this test executable
/// (`cargo test --release --workspace` builds both), else
/// `target/release/weir` in the workspace.
///
/// # Errors
///
/// When it is nowhere to be found (the message says how to build it).
pub fn weir_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEIR_BIN") {
        return require(
            PathBuf::from(path),
            "the weir binary ($WEIR_BIN)",
            "fix WEIR_BIN",
        );
    }
    // The test executable lives in <target>/<profile>/deps.
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("weir"));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Ok(path);
    }
    require(
        workspace().join("target/release/weir"),
        "the weir binary (nor beside the test executable)",
        "build it with `cargo build --release -p weir` (or set WEIR_BIN), \
         or set WEIR_SKIP_BROKER_TESTS=1 to skip the broker tests",
    )
}

impl WeirProcess {
    fn spawn(config: &Path, log: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let mut child = Command::new(weir_binary()?)
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("WEIR_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start weir")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let file = Arc::new(Mutex::new(std::fs::File::create(log)?));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let lines = lines.clone();
            let file = file.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut f) = file.lock() {
                        let _ = writeln!(f, "{line}");
                    }
                    if let Ok(mut l) = lines.lock() {
                        l.push(line);
                    }
                }
            });
        }
        Ok(Self {
            child,
            lines,
            log: log.to_path_buf(),
        })
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Every JSON log record so far.
    pub fn records(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The guest-supplied fields of every record a handler logged with
    /// `message`.
    pub fn guest_records(&self, handler: &str, message: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| {
                r["target"] == "weir::guest" && r["handler"] == handler && r["message"] == message
            })
            .filter_map(|r| {
                r["fields"]
                    .as_str()
                    .and_then(|f| serde_json::from_str(f).ok())
            })
            .collect()
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit.
    ///
    /// # Errors
    ///
    /// When it does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let log = self.log.clone();
        poll_until(
            timeout,
            "weir to exit after SIGTERM",
            || Ok(self.child.try_wait()?),
            || format!("still running; see {}", log.display()),
        )
    }
}

impl WeirProcess {
    /// CPU time the process has used so far, user and system, over all its
    /// threads (from `/proc/<pid>/stat`, in clock ticks of 10 ms).
    ///
    /// # Errors
    ///
    /// When the process is gone or the file cannot be read.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may
        // hold spaces: state is field 3, utime 14 and stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow!("unexpected /proc stat: {stat}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            Ok(fields
                .get(i)
                .ok_or_else(|| anyhow!("short /proc stat: {stat}"))?
                .parse()?)
        };
        // USER_HZ is 100 on every Linux platform.
        Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
    }

    /// Waits up to `timeout` for the process to exit on its own; `None` if
    /// it is still running.
    ///
    /// # Errors
    ///
    /// When its status cannot be read.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to finish, commit or clean up.
    ///
    /// # Errors
    ///
    /// When the process cannot be killed.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to `timeout`) until `topic` holds at least `count` records,
/// and returns them (at most 1000); on timeout the error points at `weir`'s
/// log.
///
/// # Errors
///
/// On timeout, or when the client fails.
pub fn consume_at_least(
    kafka: &KafkaTool,
    topic: &str,
    count: usize,
    timeout: Duration,
    weir: &WeirProcess,
) -> Result<Vec<Value>> {
    poll_until(
        timeout,
        &format!("{count} records on {topic}"),
        || {
            let records = kafka.consume(topic, 1000, Duration::from_secs(2))?;
            Ok((records.len() >= count).then_some(records))
        },
        || format!("log: {}", weir.log.display()),
    )
}

/// The UTF-8 value of header `name` in a record from [`KafkaTool::consume`].
pub fn header(record: &Value, name: &str) -> Option<String> {
    record["headers"].as_array()?.iter().find_map(|h| {
        (h[0].as_str()? == name)
            .then(|| unhex(h[1].as_str()?).ok())
            .flatten()
            .and_then(|v| String::from_utf8(v).ok())
    })
}

/// Bytes from lowercase or uppercase hex.
///
/// # Errors
///
/// When `text` is not hex.
pub fn unhex(text: &str) -> Result<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| anyhow!("bad hex"))
        })
        .collect()
}

/// A numeric field of a probe record (its fields are strings).
pub fn field(record: &Value, name: &str) -> Option<i64> {
    record[name].as_str()?.parse().ok()
}

/// Stops `weir` with SIGTERM and checks that it exited 0.
///
/// # Errors
///
/// When it does not exit within 30 s or exits with a failure.
pub fn stop(weir: &mut WeirProcess) -> Result<()> {
    let status = weir.terminate(Duration::from_secs(30))?;
    anyhow::ensure!(
        status.success(),
        "weir exited with {status}; log: {}",
        weir.log.display()
    );
    Ok(())
}

/// A small deterministic generator (xorshift64*) for tests that do random
/// things, so that a failing run can be repeated with the seed it prints.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `WEIR_CRASH_SEED`, else the clock; prints the seed on
    /// stderr.
    pub fn from_env() -> Self {
        let seed = std::env::var("WEIR_CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("random seed: WEIR_CRASH_SEED={seed}");
        Rng(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
