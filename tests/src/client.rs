//! The independent test clients (`tests/clients/*.py`) run as subprocesses
//! of the test venv's Python: one JSON document out per call, killed when
//! it hangs.
//!
//! A client's deadline is set by its progress, not by the clock: a client
//! that writes a progress line on stderr (each batch it reads or sends) may
//! run as long as it keeps writing them, and is killed only after
//! [`CLIENT_STALL`] without a new byte. A slow or busy machine makes a
//! long read longer, never a failure.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{poll_progress, require, workspace};

/// How long a client may go without writing anything before it is taken
/// for hung: longer than any one request of a client to a server that
/// still answers, on a loaded machine (and as long as a whole command
/// could take before progress counted, so no command that passed then
/// fails now).
pub(crate) const CLIENT_STALL: Duration = Duration::from_secs(120);

/// The Python that runs the clients: `$WEIR_TEST_PYTHON`, else
/// `target/test-venv/bin/python` (made by `.ci/install-test-tools`, with
/// kafka-python and nats-py).
///
/// # Errors
///
/// When the venv is missing.
pub(crate) fn test_python() -> Result<PathBuf> {
    match std::env::var_os("WEIR_TEST_PYTHON") {
        Some(p) => Ok(PathBuf::from(p)),
        None => require(
            workspace().join("target/test-venv/bin/python"),
            "the test venv (kafka-python, nats-py)",
            "create it with `bash .ci/install-test-tools` (or set WEIR_TEST_PYTHON \
             to a python with kafka-python and nats-py), or set WEIR_SKIP_BROKER_TESTS=1",
        ),
    }
}

/// One client script bound to one server: every call runs
/// `python <script> <command> <connect_flag> <endpoint> <args…>`.
pub(crate) struct ClientScript {
    /// The interpreter.
    pub(crate) python: PathBuf,
    /// The script, e.g. `tests/clients/kafka_tool.py`.
    pub(crate) script: PathBuf,
    /// The flag naming the server, e.g. `--bootstrap`.
    pub(crate) connect_flag: &'static str,
    /// The server, e.g. `127.0.0.1:9092`.
    pub(crate) endpoint: String,
    /// Arguments every call passes after the server (e.g. TLS settings).
    pub(crate) extra: Vec<String>,
}

impl ClientScript {
    /// `tests/clients/<script>` run by the test venv's Python against
    /// `endpoint`.
    pub(crate) fn new(script: &str, connect_flag: &'static str, endpoint: &str) -> Result<Self> {
        Ok(Self {
            python: test_python()?,
            script: workspace().join("tests/clients").join(script),
            connect_flag,
            endpoint: endpoint.to_string(),
            extra: Vec::new(),
        })
    }

    fn name(&self) -> String {
        self.script
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.script.display().to_string())
    }

    /// Runs `command` with `args`, feeding `stdin`; a client that hangs (a
    /// server that stopped answering) is killed after [`CLIENT_STALL`]
    /// without progress.
    /// Returns the JSON it printed.
    pub(crate) fn call(
        &self,
        command: &str,
        args: &[&str],
        stdin: Option<String>,
    ) -> Result<Value> {
        run_json(
            &self.python,
            &self.script,
            command,
            [self.connect_flag, &self.endpoint],
            &self.extra,
            args,
            stdin,
        )
        .with_context(|| format!("{} {command} {args:?}", self.name()))
    }
}

/// Runs `python script command connect args…` and parses its stdout.
fn run_json(
    python: &Path,
    script: &Path,
    command: &str,
    connect: [&str; 2],
    extra: &[String],
    args: &[&str],
    stdin: Option<String>,
) -> Result<Value> {
    let mut child = Command::new(python)
        .arg(script)
        .arg(command)
        .args(connect)
        .args(extra)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run the test client {}", python.display()))?;
    let input = child.stdin.take().map(|mut pipe| {
        let text = stdin.unwrap_or_default();
        std::thread::spawn(move || pipe.write_all(text.as_bytes()))
    });
    // Every byte the client writes, on either stream, is progress.
    let written = Arc::new(AtomicUsize::new(0));
    let read = |stream: Option<Box<dyn Read + Send>>| {
        let written = Arc::clone(&written);
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut stream) = stream {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = stream.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    bytes.extend_from_slice(&chunk[..n]);
                    written.fetch_add(n, Ordering::Relaxed);
                }
            }
            bytes
        })
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let stderr = read(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let waited = poll_progress(
        CLIENT_STALL,
        "the client to finish",
        || Ok(child.try_wait()?),
        || written.load(Ordering::Relaxed),
        || format!("still running against {}", connect[1]),
    );
    let status = match waited {
        Ok(status) => status,
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            return Err(err.context(format!(
                "it wrote on stderr: {}",
                tail(&String::from_utf8_lossy(&stderr))
            )));
        }
    };
    if let Some(input) = input {
        // A client that failed early may not have read its input.
        let _ = input.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "the client failed ({status}): {}",
            tail(&String::from_utf8_lossy(&stderr))
        );
    }
    serde_json::from_slice(&stdout).with_context(|| {
        format!(
            "the client printed no JSON: {}",
            String::from_utf8_lossy(&stdout)
        )
    })
}

/// The last lines of what a client wrote on stderr: its error, after the
/// progress lines that led to it.
fn tail(text: &str) -> String {
    const LINES: usize = 30;
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(LINES);
    let shown = lines[skipped..].join("\n");
    if skipped == 0 {
        shown
    } else {
        format!("[{skipped} earlier lines]\n{shown}")
    }
}
