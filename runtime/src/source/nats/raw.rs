//! Stored JetStream messages read without the client library's header
//! parser.
//!
//! NATS servers relay a header block as the producer wrote it: a raw
//! protocol client (or a Go producer, whose header values are any bytes)
//! can publish one that is not UTF-8, has a line without `:`, a name the
//! client refuses, a carriage return inside a value, or a status in its
//! version line. `async-nats` cannot yield such a message: it drops its
//! connection on the first kinds and its connection task panics on a
//! carriage return (its `HeaderValue` asserts). [`readable`] says which
//! blocks it takes, using the client's own name parser; [`headers`] reads
//! any block without failing; [`get`] fetches a stored message through the
//! stream's message-get API (`$JS.API.STREAM.MSG.GET`), whose answer
//! carries the block in base64 inside JSON, so no client parser sees it.
//!
//! Invariant: nothing here can panic or fail on the bytes of a message:
//! a block that is not text is read with U+FFFD in names and values kept
//! byte for byte.

use std::str::FromStr;
use std::time::UNIX_EPOCH;

use async_nats::HeaderName;
use serde_json::Value;

use crate::source::packed::base64;

/// A message as the stream keeps it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its subject.
    pub subject: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// Its header block as published (empty without headers).
    pub block: Vec<u8>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// When the stream stored it (Unix milliseconds).
    pub stored_ms: Option<i64>,
}

/// The first message on `subject` (wildcards allowed) at or after
/// sequence `from` in stream `stream`; `None` when there is none.
///
/// # Errors
///
/// When the server does not answer or answers with another error than
/// "no message found".
pub async fn get(
    client: &async_nats::Client,
    stream: &str,
    from: u64,
    subject: &str,
) -> anyhow::Result<Option<Stored>> {
    let request = serde_json::json!({ "seq": from, "next_by_subj": subject });
    let answer = client
        .request(
            format!("$JS.API.STREAM.MSG.GET.{stream}"),
            request.to_string().into(),
        )
        .await
        .map_err(|err| anyhow::anyhow!("cannot read stream {stream:?}: {err}"))?;
    let answer: Value = serde_json::from_slice(&answer.payload)
        .map_err(|err| anyhow::anyhow!("stream {stream:?} answered with no JSON: {err}"))?;
    if let Some(error) = answer.get("error") {
        // 10037: no message found.
        if error.get("err_code").and_then(Value::as_u64) == Some(10037)
            || error.get("code").and_then(Value::as_u64) == Some(404)
        {
            return Ok(None);
        }
        anyhow::bail!("cannot read stream {stream:?}: {error}");
    }
    let message = answer
        .get("message")
        .ok_or_else(|| anyhow::anyhow!("stream {stream:?} answered without a message"))?;
    let text = |field: &str| message.get(field).and_then(Value::as_str).unwrap_or("");
    let decoded = |field: &str| {
        base64::decode(text(field))
            .ok_or_else(|| anyhow::anyhow!("stream {stream:?} answered with bad base64 {field}"))
    };
    let stored_ms = humantime::parse_rfc3339_weak(text("time"))
        .ok()
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .and_then(|since| i64::try_from(since.as_millis()).ok());
    Ok(Some(Stored {
        subject: text("subject").to_string(),
        sequence: message.get("seq").and_then(Value::as_u64).unwrap_or(from),
        block: decoded("hdrs")?,
        payload: decoded("data")?,
        stored_ms,
    }))
}

/// Whether a subject [`get`] returned was not UTF-8 when published: the
/// server's JSON answer replaces each byte that is not with U+FFFD (which
/// a producer could also send as it is: such a message is then rescued
/// although the client could read it, a duplicate delivery at worst,
/// which the dedup mark drops). `async-nats` drops its connection on a
/// message whose subject is not UTF-8.
pub fn subject_unreadable(subject: &str) -> bool {
    subject.contains('\u{FFFD}')
}

/// Whether `async-nats` yields a message with header block `block` (empty:
/// no headers) as a message: its parser accepts the block, no value holds
/// a carriage return it would assert on, and the version line has no
/// status (a status makes it a control message the pull stream keeps).
pub fn readable(block: &[u8]) -> bool {
    if block.is_empty() {
        return true;
    }
    let Ok(text) = std::str::from_utf8(block) else {
        return false;
    };
    let mut lines = text.lines().peekable();
    match lines.next().and_then(|line| line.strip_prefix("NATS/1.0")) {
        Some(rest) if rest.trim().is_empty() => {}
        _ => return false,
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return false;
        };
        if line.contains('\r') || HeaderName::from_str(name).is_err() {
            return false;
        }
        while let Some(more) = lines.next_if(|l| l.starts_with(char::is_whitespace)) {
            if more.contains('\r') {
                return false;
            }
        }
    }
    true
}

/// The headers of block `block`, whatever its bytes: one per `name: value`
/// line, the value with surrounding blanks trimmed and continuation lines
/// (starting with a blank) appended as they are, as the client does; a line without `:` is a header of
/// that name with an empty value; names read with U+FFFD for what is not
/// UTF-8, values kept byte for byte.
pub fn headers(block: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut lines = block.split(|b| *b == b'\n').map(|line| match line {
        [rest @ .., b'\r'] => rest,
        line => line,
    });
    // The version line (`NATS/1.0`, perhaps with a status).
    let _ = lines.next();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if matches!(line.first(), Some(b' ' | b'\t'))
            && let Some((_, value)) = out.last_mut()
        {
            value.extend_from_slice(line.trim_ascii_end());
            continue;
        }
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(at) => (&line[..at], line[at + 1..].trim_ascii()),
            None => (line, &[][..]),
        };
        out.push((
            String::from_utf8_lossy(name.trim_ascii()).into_owned(),
            value.to_vec(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocks_the_client_cannot_take_are_told_apart() {
        assert!(readable(b""));
        assert!(readable(b"NATS/1.0\r\nA: b\r\nC: d\r\n  more\r\n\r\n"));
        for bad in [
            &b"NATS/1.0\r\nX: \xff\xfe\r\n\r\n"[..],
            b"NATS/1.0\r\nX: a\rb\r\n\r\n",
            b"NATS/1.0\r\nno colon here\r\n\r\n",
            b"NATS/1.0\r\nbad name: v\r\n\r\n",
            b"NATS/1.0 503\r\n\r\n",
            b"HTTP/1.1\r\nA: b\r\n\r\n",
        ] {
            assert!(!readable(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn any_block_is_read_without_failing() {
        let block =
            b"NATS/1.0\r\nX: \xff\xfe\r\nY: a\rb\r\nno colon\r\nZ: one\r\n two\r\n\xc3(: v\r\n\r\n";
        assert_eq!(
            headers(block),
            vec![
                ("X".to_string(), vec![0xff, 0xfe]),
                ("Y".to_string(), b"a\rb".to_vec()),
                ("no colon".to_string(), Vec::new()),
                ("Z".to_string(), b"one two".to_vec()),
                ("\u{fffd}(".to_string(), b"v".to_vec()),
            ]
        );
        assert!(headers(b"").is_empty());
        assert!(headers(b"\n\r\n:").len() <= 1);
    }
}
