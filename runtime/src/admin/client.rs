//! Asking a running weir's admin server from the CLI on the same machine
//! (`weir state` while `weir run` holds the database): one HTTP/1.1
//! request on a fresh connection, with the admin token.

use std::net::SocketAddr;

/// `GET path` from the admin server at `listen` (an unspecified address
/// means this host), presenting `token` when there is one: the status
/// code and body.
///
/// # Errors
///
/// When nothing answers there, or the answer is not HTTP.
pub fn fetch(listen: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|err| anyhow::anyhow!("no admin server answers at {addr}: {err}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("the admin server at {addr} sent no HTTP answer"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the admin server at {addr} sent no HTTP status"))?;
    Ok((code, body.to_string()))
}

/// `text` escaped for a URL's path or query.
pub fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
