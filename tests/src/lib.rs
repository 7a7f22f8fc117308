//! Harness for Weir's integration tests: a real Kafka-protocol broker process
//! (tansu), an independent client (kafka-python), and the real `weir`
//! binary, each on loopback with its own temporary directory.
//!
//! Nothing here sleeps and hopes: every wait polls for an observable effect
//! until a deadline, and a timeout reports the last state seen and where the
//! logs are.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Integration tests share two cores: run them one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn require(path: PathBuf, what: &str, how: &str) -> Result<PathBuf> {
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
                "timed out after {timeout:?} waiting for {what}; last state: {}",
                describe()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
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

/// A tansu broker process with in-memory storage. Killed on drop.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub bootstrap: String,
    /// The broker's log file.
    pub log: PathBuf,
}

impl Broker {
    /// Starts tansu on a free loopback port and waits until it answers.
    ///
    /// # Errors
    ///
    /// When tansu is not installed or does not become ready in time.
    pub fn start(dir: &Path) -> Result<Self> {
        let tansu = tansu_binary()?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = dir.join("tansu.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", tansu.display()))?;
        let broker = Broker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
            log,
        };
        poll_until(
            Duration::from_secs(20),
            "the broker to accept connections",
            || Ok(TcpStream::connect(&broker.bootstrap).ok().map(|_| ())),
            || format!("see {}", broker.log.display()),
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

fn tansu_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return Ok(PathBuf::from(path));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    require(
        home.join("bin/tansu"),
        "the tansu broker",
        "install it with `bash .ci/install-test-tools`",
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

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The independent client: kafka-python driven through
/// `tests/clients/kafka_tool.py`.
pub struct KafkaTool {
    python: PathBuf,
    script: PathBuf,
    bootstrap: String,
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
        let python = match std::env::var_os("WEIR_TEST_PYTHON") {
            Some(p) => PathBuf::from(p),
            None => require(
                workspace().join("target/test-venv/bin/python"),
                "the test venv (kafka-python)",
                "create it with `bash .ci/install-test-tools`",
            )?,
        };
        Ok(Self {
            python,
            script: workspace().join("tests/clients/kafka_tool.py"),
            bootstrap: bootstrap.to_string(),
        })
    }

    fn call(&self, args: &[&str], stdin: Option<String>) -> Result<Value> {
        let mut child = Command::new(&self.python)
            .arg(&self.script)
            .arg(args[0])
            .args(["--bootstrap", &self.bootstrap])
            .args(&args[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run the kafka client")?;
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(stdin.unwrap_or_default().as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "kafka client {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        serde_json::from_slice(&output.stdout).context("kafka client printed no JSON")
    }

    /// Creates `topic` (retrying until the broker is ready for it).
    ///
    /// # Errors
    ///
    /// When the topic cannot be created within 20 s.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let partitions = partitions.to_string();
        let mut last = String::new();
        poll_until(
            Duration::from_secs(20),
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
                    last = err.to_string();
                    Ok(None)
                }
            },
            String::new,
        )
        .with_context(|| last.clone())
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

    /// Reads up to `max` records of `topic` from the beginning.
    ///
    /// # Errors
    ///
    /// When the broker cannot be read.
    pub fn consume(&self, topic: &str, max: usize, timeout: Duration) -> Result<Vec<Value>> {
        let out = self.call(
            &[
                "consume",
                "--topic",
                topic,
                "--max",
                &max.to_string(),
                "--timeout-ms",
                &timeout.as_millis().to_string(),
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
fn scratch_dir() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix("weir-it-").tempdir()?;
    if std::env::var_os("WEIR_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
    }
    Ok(dir)
}

/// A directory with a weir configuration and handlers, for one test.
pub struct Deployment {
    /// The temporary directory (kept on failure for inspection: see
    /// `keep()`).
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
        let dir = scratch_dir()?;
        std::fs::create_dir_all(dir.path().join("handlers"))?;
        std::fs::write(
            dir.path().join("weir.toml"),
            format!(
                "[runtime]\nhandlers_dir = \"handlers\"\ndata_dir = \"data\"\nshutdown_timeout = \"20s\"\n\n[source.kafka]\nbootstrap_servers = \"{}\"\n",
                broker.bootstrap
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
        let dir = scratch_dir()?;
        std::fs::create_dir_all(dir.path().join("handlers"))?;
        std::fs::write(
            dir.path().join("weir.toml"),
            "[runtime]\nhandlers_dir = \"handlers\"\ndata_dir = \"data\"\n\n[source.embedded]\npartitions = 3\n",
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
        let built = require(
            workspace().join(format!("target/test-handlers/{component}.wasm")),
            "a test handler component",
            "build it with `bash .ci/build-handlers`",
        )?;
        std::fs::copy(built, self.handlers().join(format!("{name}.wasm")))?;
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
        let config = std::fs::read_to_string(self.dir.path().join("weir.toml"))?.replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"data-{label}\""),
        );
        let path = self.dir.path().join(format!("weir-{label}.toml"));
        std::fs::write(&path, config)?;
        WeirProcess::spawn(&path, &self.dir.path().join(format!("{label}.log")))
    }

    /// Starts `weir run` on this deployment.
    ///
    /// # Errors
    ///
    /// When the binary is missing or cannot start.
    pub fn start(&self, label: &str) -> Result<WeirProcess> {
        WeirProcess::spawn(
            &self.dir.path().join("weir.toml"),
            &self.dir.path().join(format!("{label}.log")),
        )
    }
}

/// A running `weir run` process whose log lines are collected as they come.
pub struct WeirProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Where its output is also written.
    pub log: PathBuf,
}

fn weir_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEIR_BIN") {
        return Ok(PathBuf::from(path));
    }
    // The test executable lives in target/<profile>/deps; the binary built
    // by the same cargo invocation is in target/<profile>.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    require(
        profile_dir.join("weir"),
        "the weir binary",
        "build it with `cargo build --release -p weir`",
    )
}

impl WeirProcess {
    fn spawn(config: &Path, log: &Path) -> Result<Self> {
        let mut child = Command::new(weir_binary()?)
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("WEIR_LOG", "info")
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
