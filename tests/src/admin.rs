//! Talking to a running weir's admin server: plain HTTP/1.1 requests on
//! loopback (with the admin token where a route needs it) and the samples
//! of a Prometheus text exposition.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

/// `GET path` on `127.0.0.1:port`: (status code, body). The answer may
/// take up to 30 s, which a loaded machine's slowest scrape stays far
/// below.
///
/// # Errors
///
/// When nothing answers, or the answer is not HTTP.
pub fn get(port: u16, path: &str) -> Result<(u16, String)> {
    request(port, "GET", path, &[], None, Duration::from_secs(30))
}

/// `GET path` on `127.0.0.1:port` presenting the admin `token`.
///
/// # Errors
///
/// When nothing answers, or the answer is not HTTP.
pub fn get_with_token(port: u16, path: &str, token: &str) -> Result<(u16, String)> {
    let authorization = format!("Bearer {token}");
    request(
        port,
        "GET",
        path,
        &[("Authorization", &authorization)],
        None,
        Duration::from_secs(30),
    )
}

/// `POST path` on `127.0.0.1:port` with the admin `token` and the JSON
/// `body`, waiting up to `timeout` for the answer: (status code, body).
///
/// # Errors
///
/// When nothing answers, or the answer is not HTTP.
pub fn post_json(
    port: u16,
    path: &str,
    token: &str,
    body: &Value,
    timeout: Duration,
) -> Result<(u16, String)> {
    let authorization = format!("Bearer {token}");
    request(
        port,
        "POST",
        path,
        &[
            ("Authorization", &authorization),
            ("Content-Type", "application/json"),
        ],
        Some(body.to_string().as_bytes()),
        timeout,
    )
}

/// One request on `127.0.0.1:port` with `headers` (a `Host` of
/// `127.0.0.1:port` unless `headers` names one): (status code, body).
///
/// # Errors
///
/// When nothing answers, or the answer is not HTTP.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or_default();
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// The samples of a Prometheus text exposition: `name{labels}` → value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The samples of `/metrics` on `port` (empty when it cannot be read).
pub fn scrape(port: u16) -> BTreeMap<String, f64> {
    match get(port, "/metrics") {
        Ok((200, text)) => samples(&text),
        _ => BTreeMap::new(),
    }
}

/// `GET /health/ready` on `port` until `done` accepts the answer (status
/// code, JSON body), up to `timeout`: that answer. On timeout the error
/// shows the last answer and points at `log`.
///
/// # Errors
///
/// On timeout, or when an answer is not JSON.
pub fn ready_until(
    port: u16,
    what: &str,
    timeout: Duration,
    log: &std::path::Path,
    done: impl Fn(u16, &Value) -> bool,
) -> Result<Value> {
    crate::poll_until(
        timeout,
        what,
        || {
            let Ok((code, body)) = get(port, "/health/ready") else {
                return Ok(None);
            };
            let body: Value = serde_json::from_str(&body).context("ready JSON")?;
            Ok(done(code, &body).then_some(body))
        },
        || {
            let last = get(port, "/health/ready")
                .map_or_else(|e| format!("{e:#}"), |(c, b)| format!("{c} {b}"));
            format!("last answer: {last}; log: {}", log.display())
        },
    )
}
