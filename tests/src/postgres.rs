//! PostgreSQL for the shared-store tests: a private server (`initdb` and
//! `pg_ctl` from Debian's `postgresql`) on a free loopback port, with its
//! data directory in a temporary directory of its own, and `psql` as the
//! independent client.
//!
//! PostgreSQL refuses to run as root: as root, every server command runs
//! as the `postgres` user (`runuser -u postgres`), which owns the
//! directory. The server trusts every connection on loopback as user
//! `postgres`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::{Deployment, START_WAIT, free_port, poll_until, require, scratch_dir};

/// What to do when the PostgreSQL programs are missing.
const HOW: &str = "install Debian's postgresql package (`bash .ci/install-test-tools` does, \
                   as root; or `apt-get install postgresql`), or set PG_BIN_DIR to the \
                   directory holding initdb, pg_ctl and psql, or set \
                   WEIR_SKIP_BROKER_TESTS=1 to skip the broker tests";

/// How long `pg_ctl` may take to start or stop the server.
const PG_CTL_WAIT: Duration = Duration::from_secs(60);

/// A private PostgreSQL server, stopped on drop (the directory is kept with
/// `WEIR_KEEP_TEST_DIRS`). [`stop`](Self::stop), [`crash`](Self::crash)
/// and [`start_again`](Self::start_again) take it down and bring it back
/// on the same port with the same data, for tests of a store that goes
/// away mid-run.
pub struct PgServer {
    bin: PgBin,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    /// The server's log (every run of it, appended).
    pub log: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    as_postgres: bool,
    running: bool,
    /// More `-c` settings of the server (TLS).
    options: String,
    // Dropped after the server is stopped (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

/// Where `initdb`, `pg_ctl` and `psql` are.
#[derive(Debug, Clone)]
struct PgBin {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    psql: PathBuf,
}

impl PgServer {
    /// Creates a database cluster in a new temporary directory and starts
    /// the server on a free loopback port; returns once it answers a query.
    ///
    /// # Errors
    ///
    /// When the PostgreSQL programs are missing (the message says how to
    /// install them), or the server does not start.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// As [`PgServer::start`], with TLS on (`ssl=on`, `certs`' server
    /// certificate); plaintext connections are still accepted.
    ///
    /// # Errors
    ///
    /// As [`PgServer::start`].
    pub fn start_tls(certs: &crate::tls::Certificates) -> Result<Self> {
        Self::start_with(Some(certs))
    }

    fn start_with(certs: Option<&crate::tls::Certificates>) -> Result<Self> {
        let bin = PgBin::find()?;
        let dir = scratch_dir("weir-pg-")?;
        let as_postgres = is_root()?;
        if as_postgres {
            // The server runs as `postgres`: it must own its directory.
            run(Command::new("chown").arg("postgres").arg(dir.path()))
                .context("cannot give the test directory to the postgres user")?;
        }
        let mut server = Self {
            bin,
            port: free_port()?,
            log: dir.path().join("pg.log"),
            data: dir.path().join("pg"),
            socket_dir: dir.path().to_path_buf(),
            as_postgres,
            running: false,
            options: String::new(),
            _dir: dir,
        };
        if let Some(certs) = certs {
            // The server reads its key only when its own user owns it and
            // nobody else can read it.
            let (cert, key) = (
                server.socket_dir.join("server.crt"),
                server.socket_dir.join("server.key"),
            );
            std::fs::copy(&certs.cert, &cert)?;
            std::fs::copy(&certs.key, &key)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
            if as_postgres {
                run(Command::new("chown").arg("postgres").arg(&cert).arg(&key))
                    .context("cannot give the certificate to the postgres user")?;
            }
            server.options = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        let mut initdb = server.server_command(&server.bin.initdb);
        initdb
            .arg("-D")
            .arg(&server.data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        run(&mut initdb).context("initdb failed")?;
        server.start_again()?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Whether the server was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts the server (again) on the same port with the same data, after
    /// [`stop`](Self::stop) or [`crash`](Self::crash); returns once it
    /// answers a query.
    ///
    /// # Errors
    ///
    /// When it is running already, or does not start in time.
    pub fn start_again(&mut self) -> Result<()> {
        ensure!(
            !self.running,
            "PostgreSQL is running already: stop() it first"
        );
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200{}",
            self.port,
            self.socket_dir.display(),
            self.options
        );
        let mut start = self.server_command(&self.bin.pg_ctl);
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &options, "-w"])
            .args(["-t", &PG_CTL_WAIT.as_secs().to_string()])
            .arg("start");
        run(&mut start)
            .with_context(|| format!("PostgreSQL did not start; see {}", self.log.display()))?;
        self.running = true;
        let log = self.log.clone();
        poll_until(
            START_WAIT,
            "PostgreSQL to answer a query",
            || Ok(self.query("select 1").ok().map(drop)),
            || format!("see {}", log.display()),
        )
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`: open sessions are
    /// ended, everything is written out) and waits until it has exited.
    /// Stopping a stopped server does nothing.
    ///
    /// # Errors
    ///
    /// When `pg_ctl` fails.
    pub fn stop(&mut self) -> Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Stops the server like a crash (`pg_ctl stop -m immediate`: no
    /// shutdown checkpoint; the next start recovers from the write-ahead
    /// log) and waits until it has exited.
    ///
    /// # Errors
    ///
    /// When `pg_ctl` fails.
    pub fn crash(&mut self) -> Result<()> {
        self.pg_ctl_stop("immediate")
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let mut stop = self.server_command(&self.bin.pg_ctl);
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w"])
            .args(["-t", &PG_CTL_WAIT.as_secs().to_string()])
            .arg("stop");
        run(&mut stop)
            .with_context(|| format!("pg_ctl stop -m {mode} failed; see {}", self.log.display()))?;
        self.running = false;
        Ok(())
    }

    /// Runs `sql` through `psql -h 127.0.0.1 -p <port> -U postgres -d
    /// postgres -Atc <sql>` and returns what it printed: one line per row,
    /// columns separated by `|`.
    ///
    /// # Errors
    ///
    /// When psql cannot connect or the statement fails (the message has
    /// psql's).
    pub fn query(&self, sql: &str) -> Result<String> {
        let port = self.port.to_string();
        let output = Command::new(&self.bin.psql)
            .args(["-X", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(["-d", "postgres", "-Atc", sql])
            // A developer's settings must not change what is asked.
            .env_remove("PGSERVICE")
            .env_remove("PGPASSWORD")
            .env_remove("PGSSLMODE")
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGOPTIONS", "-c statement_timeout=30000")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.bin.psql.display()))?;
        ensure!(
            output.status.success(),
            "psql {sql:?} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The tables of schema `schema`, by name.
    ///
    /// # Errors
    ///
    /// When the server cannot be asked.
    pub fn tables(&self, schema: &str) -> Result<Vec<String>> {
        let out = self.query(&format!(
            "select table_name from information_schema.tables \
             where table_schema = {} order by table_name",
            quote_literal(schema)
        ))?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// The columns of table `schema.table`, in order.
    ///
    /// # Errors
    ///
    /// When the server cannot be asked.
    pub fn columns(&self, schema: &str, table: &str) -> Result<Vec<String>> {
        let out = self.query(&format!(
            "select column_name from information_schema.columns \
             where table_schema = {} and table_name = {} order by ordinal_position",
            quote_literal(schema),
            quote_literal(table)
        ))?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// A command that runs `program` as the server's user, from its
    /// directory.
    fn server_command(&self, program: &Path) -> Command {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command
            .current_dir(&self.socket_dir)
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        command
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
    }
}

impl Deployment {
    /// Keeps this deployment's dedup marks, attempt counts, handler state
    /// and outbox in `server` (a `[store]` table with its URL and, when
    /// given, `schema`), so that every process started from it shares
    /// them. Append it before starting any process.
    ///
    /// # Errors
    ///
    /// When the configuration cannot be written.
    pub fn store_in(&self, server: &PgServer, schema: Option<&str>) -> Result<()> {
        let mut table = format!("\n[store]\nurl = \"{}\"\n", server.url());
        if let Some(schema) = schema {
            table.push_str(&format!("schema = \"{schema}\"\n"));
        }
        self.append_config(&table)
    }
}

impl PgBin {
    /// `$PG_BIN_DIR`, else `initdb` and `pg_ctl` on the `PATH`, else the
    /// newest `/usr/lib/postgresql/<version>/bin` (Debian's layout). `psql`
    /// comes from the same directory, else from the `PATH`.
    fn find() -> Result<Self> {
        if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
            let dir = PathBuf::from(dir);
            return Ok(Self {
                initdb: require(dir.join("initdb"), "initdb ($PG_BIN_DIR)", HOW)?,
                pg_ctl: require(dir.join("pg_ctl"), "pg_ctl ($PG_BIN_DIR)", HOW)?,
                psql: match dir.join("psql") {
                    psql if psql.is_file() => psql,
                    _ => on_path("psql").ok_or_else(|| {
                        anyhow!("psql is neither in $PG_BIN_DIR nor on the PATH; {HOW}")
                    })?,
                },
            });
        }
        let dir = match (on_path("initdb"), on_path("pg_ctl")) {
            (Some(initdb), Some(_)) => initdb.parent().map(Path::to_path_buf),
            _ => debian_bin_dir()?,
        };
        let Some(dir) = dir else {
            bail!(
                "initdb and pg_ctl are neither on the PATH nor in /usr/lib/postgresql/*/bin; {HOW}"
            );
        };
        let initdb = require(dir.join("initdb"), "initdb", HOW)?;
        let pg_ctl = require(dir.join("pg_ctl"), "pg_ctl", HOW)?;
        let psql = on_path("psql")
            .or_else(|| Some(dir.join("psql")).filter(|p| p.is_file()))
            .ok_or_else(|| anyhow!("psql is not on the PATH; {HOW}"))?;
        Ok(Self {
            initdb,
            pg_ctl,
            psql,
        })
    }
}

/// `name` on the `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The newest `/usr/lib/postgresql/<major>/bin` that holds `initdb`.
fn debian_bin_dir() -> Result<Option<PathBuf>> {
    let root = Path::new("/usr/lib/postgresql");
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    let mut versions: Vec<(u32, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let bin = entry.path().join("bin");
        let major = entry
            .file_name()
            .to_str()
            .and_then(|name| name.split('.').next()?.parse().ok());
        if let Some(major) = major
            && bin.join("initdb").is_file()
        {
            versions.push((major, bin));
        }
    }
    Ok(versions.into_iter().max().map(|(_, bin)| bin))
}

/// Whether this process runs as root (PostgreSQL's programs then run as
/// `postgres`).
fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no effective uid in /proc/self/status"))?;
    Ok(uid == "0")
}

/// Runs `command` to completion; an error with its output when it fails.
fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} exited with {}: {} {}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// `text` as an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `name` as an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
