//! From an AMQP delivery to a [`Message`], and from a record to AMQP
//! headers (see "Properties and headers" in the module documentation).

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString};

use super::KEY_HEADER;
use crate::message::{Message, Position};
use crate::source::packed::{PACKED, pack, unpack};

/// The header a `correlation_id` property is exposed as.
pub(super) const CORRELATION_HEADER: &str = "correlation_id";

/// Timestamps above this are taken as milliseconds: as seconds they would
/// be after the year 5000.
const SECONDS_LIMIT: u64 = 100_000_000_000;

/// The message of `delivery`, consumed from `queue` as scope `scope`.
pub(super) fn message(queue: &str, scope: u64, delivery: &Delivery) -> Message {
    let properties = &delivery.properties;
    let mut headers: Vec<(String, Vec<u8>)> = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(name, value)| (name.as_str().to_string(), bytes(value)))
                .collect()
        })
        .unwrap_or_default();
    if let Some(at) = headers.iter().position(|(name, _)| name == PACKED)
        && let Some(pairs) = unpack(&headers[at].1)
    {
        headers.remove(at);
        headers.extend(pairs);
    }
    if let Some(correlation) = properties.correlation_id()
        && !headers.iter().any(|(n, _)| n == CORRELATION_HEADER)
    {
        headers.push((
            CORRELATION_HEADER.to_string(),
            correlation.as_str().as_bytes().to_vec(),
        ));
    }
    let key = headers
        .iter()
        .find(|(n, v)| n == KEY_HEADER && !v.is_empty())
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| delivery.routing_key.as_str().as_bytes().to_vec());
    let timestamp_ms = properties.timestamp().and_then(|t| {
        let ms = if t >= SECONDS_LIMIT {
            t
        } else {
            t.saturating_mul(1000)
        };
        i64::try_from(ms).ok()
    });
    Message {
        topic: queue.to_string(),
        key: Some(key),
        payload: delivery.data.clone(),
        headers,
        timestamp_ms,
        position: Position::Rabbit {
            exchange: delivery.exchange.as_str().to_string(),
            routing_key: delivery.routing_key.as_str().to_string(),
            delivery_tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string()),
        },
        scope,
    }
}

/// A header value as bytes: strings and byte arrays as they are, scalars
/// as text, arrays and tables as JSON.
pub(super) fn bytes(value: &AMQPValue) -> Vec<u8> {
    match value {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Void => Vec::new(),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => json(value).to_string().into_bytes(),
        scalar => match json(scalar) {
            serde_json::Value::String(s) => s.into_bytes(),
            other => other.to_string().into_bytes(),
        },
    }
}

/// A header value as JSON (bytes that are not UTF-8 replaced).
fn json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => {
            let scale = 10f64.powi(i32::from(d.scale));
            Value::from(f64::from(d.value) / scale)
        }
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// The properties of a published record: persistent, its headers (UTF-8
/// values as long strings, others as byte arrays), its key in
/// `ce-partitionkey` unless a header says otherwise, its `id` as
/// `message_id` and the time now. A header a field table cannot hold (a
/// name longer than 255 bytes, a name repeated) is packed into
/// `weir.headers` ([`crate::source::packed`]), which [`message`] unpacks.
pub(super) fn properties(
    key: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
    id: Option<&str>,
) -> BasicProperties {
    let mut table = FieldTable::default();
    let mut packed: Vec<(&str, &[u8])> = Vec::new();
    for (name, value) in headers {
        if name.len() > 255 || name == PACKED || table.contains_key(name) {
            packed.push((name.as_str(), value.as_slice()));
        } else {
            table.insert(name.as_str().into(), value_of(value));
        }
    }
    if !packed.is_empty() {
        table.insert(PACKED.into(), value_of(pack(&packed).as_bytes()));
    }
    if let Some(key) = key
        && !table.contains_key(KEY_HEADER)
    {
        table.insert(KEY_HEADER.into(), value_of(key));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(now)
        .with_headers(table);
    if let Some(id) = id.filter(|id| id.len() <= 255) {
        properties = properties.with_message_id(id.into());
    }
    properties
}

fn value_of(bytes: &[u8]) -> AMQPValue {
    if std::str::from_utf8(bytes).is_ok() {
        AMQPValue::LongString(LongString::from(bytes.to_vec()))
    } else {
        AMQPValue::ByteArray(bytes.to_vec().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray};

    #[test]
    fn header_values_become_bytes() {
        assert_eq!(bytes(&AMQPValue::LongString("é".into())), "é".as_bytes());
        assert_eq!(
            bytes(&AMQPValue::ByteArray(vec![0xff, 0].into())),
            [0xff, 0]
        );
        assert_eq!(bytes(&AMQPValue::LongLongInt(-7)), b"-7");
        assert_eq!(bytes(&AMQPValue::Boolean(true)), b"true");
        assert_eq!(bytes(&AMQPValue::Timestamp(1_700_000_000)), b"1700000000");
        assert_eq!(
            bytes(&AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1234
            })),
            b"12.34"
        );
        assert_eq!(
            bytes(&AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString("a".into())
            ]))),
            b"[1,\"a\"]"
        );
        assert_eq!(bytes(&AMQPValue::Void), b"");
    }

    #[test]
    fn published_properties_carry_the_key_and_id() {
        let headers = vec![
            ("a".to_string(), b"x".to_vec()),
            ("bin".to_string(), vec![0xff]),
            ("a".to_string(), b"second".to_vec()),
        ];
        let p = properties(Some(b"k1"), &headers, Some("id-1"));
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("id-1"));
        let Some(table) = p.headers() else {
            panic!("no headers");
        };
        let get = |n: &str| table.inner().get(n).map(bytes);
        assert_eq!(get("a"), Some(b"x".to_vec()));
        // The repeat travels packed.
        assert_eq!(
            get(PACKED).and_then(|v| unpack(&v)),
            Some(vec![("a".to_string(), b"second".to_vec())])
        );
        assert_eq!(get("bin"), Some(vec![0xff]));
        assert_eq!(get(KEY_HEADER), Some(b"k1".to_vec()));
        assert!(matches!(
            table.inner().get("bin"),
            Some(AMQPValue::ByteArray(_))
        ));
    }
}
