//! TLS to PostgreSQL, as libpq's users configure it: `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` in `[store] url`.
//!
//! | `sslmode` | TLS | the server's certificate |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it, else plaintext | not checked (with `sslrootcert`: as `verify-ca`) |
//! | `require` | always; a server without TLS is refused | not checked (with `sslrootcert`: as `verify-ca`) |
//! | `verify-ca` | always | signed by `sslrootcert` (else the system's CAs) |
//! | `verify-full` | always | as `verify-ca`, and names the host connected to |
//!
//! Invariants: a mode that verifies never connects to a server whose
//! certificate fails the check, and never falls back to plaintext (the
//! error names the server); `prefer` falls back only when the server says
//! it has no TLS, not when a handshake fails.

use std::path::PathBuf;
use std::str::FromStr;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `disable`.
    Disable,
    /// `prefer`.
    Prefer,
    /// `require`.
    Require,
    /// `verify-ca`.
    VerifyCa,
    /// `verify-full`.
    VerifyFull,
}

/// The TLS settings of `[store] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// How much TLS.
    pub mode: Mode,
    /// CA certificates (PEM) to trust instead of the system's.
    pub root_cert: Option<PathBuf>,
    /// Client certificate (PEM), for certificate authentication.
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
}

/// Percent-decodes a URL's user info or query value; a `%` not followed by
/// two hex digits stays as it is.
pub fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connection settings and TLS settings of `url` (libpq's URL or
/// `key=value` form): the TLS keys are taken out, since the driver knows
/// only `disable`, `prefer` and `require`.
///
/// # Errors
///
/// An `sslmode` libpq does not know, a client certificate without its key,
/// or a URL the driver cannot parse.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, Tls), String> {
    let mut tls = Tls {
        mode: Mode::Prefer,
        root_cert: None,
        cert: None,
        key: None,
    };
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => {
                tls.mode = match value.as_str() {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                        ));
                    }
                }
            }
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
            "sslcert" => tls.cert = Some(PathBuf::from(value)),
            "sslkey" => tls.key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(&percent_decoded(key), percent_decoded(value))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            match word.split_once('=') {
                Some((key, value)) if take(key.trim(), value.trim().to_string())? => {}
                _ => kept.push(word),
            }
        }
        kept.join(" ")
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err("sslcert and sslkey: set both or neither".into());
    }
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
    config.ssl_mode(match tls.mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    Ok((config, tls))
}

impl Tls {
    /// The connector every connection of the store uses.
    ///
    /// # Errors
    ///
    /// A certificate or key file that cannot be read.
    pub fn connector(&self) -> Result<MakeTlsConnector, String> {
        let mut builder = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        if let Some(root) = &self.root_cert {
            builder.set_ca_file(root).map_err(|e| {
                format!(
                    "sslrootcert {}: cannot be read as PEM certificates: {e}",
                    root.display()
                )
            })?;
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            builder.set_certificate_chain_file(cert).map_err(|e| {
                format!(
                    "sslcert {}: cannot be read as a PEM certificate: {e}",
                    cert.display()
                )
            })?;
            builder
                .set_private_key_file(key, openssl::ssl::SslFiletype::PEM)
                .map_err(|e| {
                    format!("sslkey {}: cannot be read as a PEM key: {e}", key.display())
                })?;
        }
        let verify = match self.mode {
            Mode::VerifyCa | Mode::VerifyFull => true,
            // libpq: with a root certificate, `require` verifies the chain.
            Mode::Prefer | Mode::Require => self.root_cert.is_some(),
            Mode::Disable => false,
        };
        builder.set_verify(if verify {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.mode != Mode::VerifyFull {
            connector.set_callback(|connect, _domain| {
                connect.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(connector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_keys_are_taken_out_of_the_url() {
        let (config, tls) = parse(
            "postgres://weir@db.example:5433/weir?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .expect("parses");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(config.get_application_name(), Some("x"));
        let (config, tls) = parse("postgres://weir@db/weir").expect("parses");
        assert_eq!(tls.mode, Mode::Prefer);
        assert_eq!(config.get_ssl_mode(), SslMode::Prefer);
        let (config, tls) =
            parse("host=db user=weir sslmode=verify-ca sslrootcert=/ca.pem").expect("parses");
        assert_eq!(tls.mode, Mode::VerifyCa);
        assert_eq!(config.get_user(), Some("weir"));
        assert_eq!(
            parse("postgres://db/weir?sslmode=disable").map(|(_, t)| t.mode),
            Ok(Mode::Disable)
        );
    }

    #[test]
    fn bad_tls_settings_are_named() {
        let err = parse("postgres://db/weir?sslmode=always").expect_err("bad mode");
        assert!(err.contains("sslmode \"always\""), "{err}");
        let err = parse("postgres://db/weir?sslcert=/c.pem").expect_err("no key");
        assert!(err.contains("sslkey"), "{err}");
        let tls = Tls {
            mode: Mode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
            cert: None,
            key: None,
        };
        let err = tls.connector().err().expect("unreadable root");
        assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
    }
}
