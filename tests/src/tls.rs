//! TLS for the test servers: a private CA and a server certificate for
//! `localhost` and `127.0.0.1`, made per test with the `openssl` command,
//! a second CA that signed nothing (the wrong CA), and `stunnel` in front
//! of a plaintext server (tansu).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::{COMMAND_WAIT, START_WAIT, output_within, poll_until, scratch_dir};

/// Certificates made for one test.
pub struct Certificates {
    /// The CA that signed the server's (and the client's) certificate.
    pub ca: PathBuf,
    /// The server's certificate (`localhost`, `127.0.0.1`).
    pub cert: PathBuf,
    /// The server's key.
    pub key: PathBuf,
    /// A client certificate signed by the CA (for mutual TLS).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA, which signed nothing here.
    pub wrong_ca: PathBuf,
    /// Where they are.
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let output = output_within(
        Command::new("openssl").args(args).current_dir(dir),
        COMMAND_WAIT,
    )
    .context("openssl (Debian package openssl)")?;
    ensure!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

impl Certificates {
    /// Makes them in a new directory (files readable by every user, so
    /// servers running as their own user read them).
    ///
    /// # Errors
    ///
    /// When `openssl` is missing or fails.
    pub fn new() -> Result<Self> {
        let dir = scratch_dir("weir-tls-")?;
        let d = dir.path();
        for (name, subject) in [
            ("ca", "/CN=weir-test-ca"),
            ("wrong-ca", "/CN=weir-wrong-ca"),
        ] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.crt"),
                    "-days",
                    "2",
                    "-subj",
                    subject,
                ],
            )?;
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (name, subject) in [("server", "/CN=localhost"), ("client", "/CN=weir")] {
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    subject,
                ],
            )?;
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.crt"),
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            )?;
        }
        for entry in std::fs::read_dir(d)? {
            let path = entry?.path();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            ca: d.join("ca.crt"),
            cert: d.join("server.crt"),
            key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            wrong_ca: d.join("wrong-ca.crt"),
            dir,
        })
    }
}

/// `stunnel` terminating TLS on a loopback port and forwarding to a
/// plaintext one. Killed on drop.
pub struct Stunnel {
    child: Child,
    /// The TLS port.
    pub port: u16,
    /// Its log.
    pub log: PathBuf,
}

impl Stunnel {
    /// Accepts TLS on `port` with `certs`' server certificate and forwards
    /// each connection to `127.0.0.1:target`; waits until it accepts.
    ///
    /// # Errors
    ///
    /// When stunnel is missing (Debian package stunnel4) or does not start.
    pub fn start(certs: &Certificates, port: u16, target: u16) -> Result<Self> {
        let conf = certs.dir.path().join(format!("stunnel-{port}.conf"));
        let log = certs.dir.path().join(format!("stunnel-{port}.log"));
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\ndebug = notice\n[tls]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target}\ncert = {}\nkey = {}\n",
                certs.cert.display(),
                certs.key.display()
            ),
        )?;
        let out = std::fs::File::create(&log)?;
        let child = Command::new("stunnel")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start stunnel (Debian package stunnel4)")?;
        let mut stunnel = Self { child, port, log };
        let log = stunnel.log.clone();
        poll_until(
            START_WAIT,
            "stunnel to accept connections",
            || {
                if let Some(status) = stunnel.child.try_wait()? {
                    bail!("stunnel exited with {status}; see {}", log.display());
                }
                Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ()))
            },
            || format!("see {}", log.display()),
        )?;
        Ok(stunnel)
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
