//! Stream entries as Redis returns them, and as Weir's messages (see the
//! field mapping in [`redis`](crate::source::redis)).

use std::borrow::Cow;

use redis::Value;

use super::super::packed::{PACKED, pack, unpack};
use super::super::{Message, Position};

/// The field holding the payload.
pub(super) const PAYLOAD: &str = "payload";
/// The field holding the key.
pub(super) const KEY: &str = "key";
/// The header carrying a key when there is no `key` field.
const KEY_HEADER: &str = "ce-partitionkey";

/// One stream entry: its ID and fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

fn bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes().to_vec()),
        _ => None,
    }
}

/// Text of a reply element (IDs, names).
pub(super) fn text(value: &Value) -> Option<String> {
    bytes(value).and_then(|b| String::from_utf8(b).ok())
}

fn items(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

/// The entries of an `XRANGE` reply, or of the entry list in an
/// `XREADGROUP` or `XAUTOCLAIM` reply. An entry whose fields are nil (it was
/// deleted while pending) has no fields.
pub(super) fn entries(value: &Value) -> Result<Vec<Entry>, String> {
    let Some(list) = items(value) else {
        return match value {
            Value::Nil => Ok(Vec::new()),
            other => Err(format!("expected a list of entries, got {other:?}")),
        };
    };
    list.iter()
        .map(|item| {
            let pair = items(item).ok_or_else(|| format!("expected an entry, got {item:?}"))?;
            let id = pair
                .first()
                .and_then(text)
                .ok_or_else(|| format!("an entry without an ID: {item:?}"))?;
            let mut fields = Vec::new();
            if let Some(flat) = pair.get(1).and_then(items) {
                for chunk in flat.chunks(2) {
                    if let [name, value] = chunk
                        && let (Some(name), Some(value)) = (bytes(name), bytes(value))
                    {
                        fields.push((name, value));
                    }
                }
            }
            Ok(Entry { id, fields })
        })
        .collect()
}

/// The streams and entries of an `XREADGROUP` reply (nil: nothing came).
pub(super) fn read_reply(value: &Value) -> Result<Vec<(String, Vec<Entry>)>, String> {
    let pairs: Vec<(&Value, &Value)> = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(list) => list
            .iter()
            .filter_map(|item| match items(item) {
                Some([name, entries]) => Some((name, entries)),
                _ => None,
            })
            .collect(),
        other => return Err(format!("unexpected XREADGROUP reply {other:?}")),
    };
    pairs
        .into_iter()
        .map(|(name, list)| {
            let stream = text(name).ok_or_else(|| format!("a stream name {name:?}"))?;
            Ok((stream, entries(list)?))
        })
        .collect()
}

/// The entries an `XAUTOCLAIM` reply hands over, and the next cursor
/// (`0-0` once the pending list has been scanned).
pub(super) fn autoclaim_reply(value: &Value) -> Result<(String, Vec<Entry>), String> {
    let parts = items(value).ok_or_else(|| format!("unexpected XAUTOCLAIM reply {value:?}"))?;
    let cursor = parts
        .first()
        .and_then(text)
        .ok_or_else(|| format!("XAUTOCLAIM reply without a cursor: {value:?}"))?;
    let claimed = parts.get(1).map(entries).transpose()?.unwrap_or_default();
    Ok((cursor, claimed))
}

/// The milliseconds part of an entry ID.
pub(super) fn millis(id: &str) -> Option<i64> {
    id.split('-').next().and_then(|ms| ms.parse().ok())
}

/// The message for `entry` of `stream`, consumed as topic number `scope`.
pub(super) fn to_message(stream: &str, scope: u64, entry: Entry) -> Message {
    let mut payload = None;
    let mut key = None;
    let mut headers = Vec::new();
    for (name, value) in &entry.fields {
        match name.as_slice() {
            b"payload" if payload.is_none() => payload = Some(value.clone()),
            b"key" if key.is_none() => key = Some(value.clone()),
            _ => headers.push((String::from_utf8_lossy(name).into_owned(), value.clone())),
        }
    }
    if let Some(at) = headers.iter().position(|(name, _)| name == PACKED)
        && let Some(pairs) = unpack(&headers[at].1)
    {
        headers.remove(at);
        headers.extend(pairs);
    }
    let payload = payload.unwrap_or_else(|| {
        // Not written for Weir: every field, as a JSON object.
        let object: serde_json::Map<String, serde_json::Value> = entry
            .fields
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                )
            })
            .collect();
        serde_json::Value::Object(object).to_string().into_bytes()
    });
    let key = key
        .or_else(|| {
            headers
                .iter()
                .find(|(n, v)| n == KEY_HEADER && !v.is_empty())
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| stream.as_bytes().to_vec());
    Message {
        topic: stream.to_string(),
        key: Some(key),
        payload,
        headers,
        timestamp_ms: millis(&entry.id),
        position: Position::Redis {
            stream: stream.to_string(),
            entry_id: entry.id,
        },
        scope,
    }
}

/// The fields of an entry Weir writes: `key`, `payload`, then the headers.
/// A header that would collide with those fields (one called `key`,
/// `payload` or `weir.headers`) is packed into `weir.headers`
/// ([`crate::source::packed`]), which [`to_message`] unpacks.
pub(super) fn fields<'a>(
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    headers: &'a [(String, Vec<u8>)],
) -> Vec<(&'a [u8], Cow<'a, [u8]>)> {
    let mut fields = Vec::with_capacity(headers.len() + 2);
    if let Some(key) = key {
        fields.push((KEY.as_bytes(), Cow::Borrowed(key)));
    }
    fields.push((PAYLOAD.as_bytes(), Cow::Borrowed(payload)));
    let mut packed: Vec<(&str, &[u8])> = Vec::new();
    for (name, value) in headers {
        if name == KEY || name == PAYLOAD || name == PACKED {
            packed.push((name.as_str(), value.as_slice()));
        } else {
            fields.push((name.as_bytes(), Cow::Borrowed(value.as_slice())));
        }
    }
    if !packed.is_empty() {
        fields.push((PACKED.as_bytes(), Cow::Owned(pack(&packed).into_bytes())));
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn entries_written_by_weir_and_by_others_become_messages() -> Result<(), String> {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1700000000000-0"),
                    Value::Array(vec![
                        bulk("key"),
                        bulk("k1"),
                        bulk("payload"),
                        Value::BulkString(vec![0xff, 0x00]),
                        bulk("ce_id"),
                        bulk("e1"),
                    ]),
                ]),
                Value::Array(vec![
                    bulk("1700000000001-3"),
                    Value::Array(vec![bulk("order_id"), bulk("7")]),
                ]),
            ]),
        ])]);
        let mut read = read_reply(&reply)?;
        let (stream, entries) = read.pop().ok_or("no stream")?;
        assert_eq!(stream, "orders");
        let mut messages = entries.into_iter().map(|e| to_message(&stream, 0, e));
        let weir = messages.next().ok_or("first")?;
        assert_eq!(weir.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(weir.payload, vec![0xff, 0x00]);
        assert_eq!(weir.headers, vec![("ce_id".to_string(), b"e1".to_vec())]);
        assert_eq!(weir.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(
            weir.position.fallback_id("orders"),
            "orders/1700000000000-0"
        );
        let foreign = messages.next().ok_or("second")?;
        assert_eq!(foreign.payload, br#"{"order_id":"7"}"#.to_vec());
        assert_eq!(foreign.key.as_deref(), Some(&b"orders"[..]));
        assert_eq!(read_reply(&Value::Nil)?, Vec::new());
        Ok(())
    }

    #[test]
    fn headers_that_would_collide_with_fields_travel_packed() -> Result<(), String> {
        let headers = vec![
            ("payload".to_string(), b"x".to_vec()),
            ("h".to_string(), b"v".to_vec()),
        ];
        let written = fields(Some(b"k"), b"p", &headers);
        let packed = pack(&[("payload", b"x")]).into_bytes();
        assert_eq!(
            written,
            vec![
                (&b"key"[..], Cow::Borrowed(&b"k"[..])),
                (&b"payload"[..], Cow::Borrowed(&b"p"[..])),
                (&b"h"[..], Cow::Borrowed(&b"v"[..])),
                (PACKED.as_bytes(), Cow::Owned(packed)),
            ]
        );
        let entry = Entry {
            id: "1-0".into(),
            fields: written
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v.into_owned()))
                .collect(),
        };
        let message = to_message("s", 0, entry);
        assert_eq!(message.payload, b"p");
        assert_eq!(
            message.headers,
            headers.into_iter().rev().collect::<Vec<_>>()
        );
        Ok(())
    }
}
