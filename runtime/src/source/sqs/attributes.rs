//! Headers ↔ SQS message attributes, and payloads ↔ message bodies.
//!
//! # Headers
//!
//! Each header becomes a message attribute of the same name: `String` when
//! its value is text SQS accepts, else `Binary`. On receive every attribute
//! becomes a header (`String` and `Number` values as their text, `Binary`
//! as their bytes), in name order.
//!
//! SQS takes at most 10 attributes per message, names of
//! `[A-Za-z0-9_.-]` (no leading, trailing or doubled `.`, no `AWS.` or
//! `Amazon.` prefix) and no empty values, while a dead letter carries more
//! headers than that. When a message's headers do not all fit, the first 9
//! that can be attributes are, and the rest are packed into one `String`
//! attribute, [`PACKED`] (`weir.headers`, see [`crate::source::packed`]).
//! Weir unpacks it on receive, after the attributes.
//!
//! # Bodies
//!
//! A body is text of the characters XML allows. A payload that is such text
//! is sent as it is; any other is sent base64-encoded, with attribute
//! [`BODY_ENCODING`] = `base64`, and decoded again on receive.

use std::collections::HashMap;

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;

pub use crate::source::packed::PACKED;
use crate::source::packed::{base64, pack, unpack};

/// The attribute saying the body is base64 of the payload.
pub const BODY_ENCODING: &str = "weir.body-encoding";

/// Most message attributes SQS takes on one message.
pub const MAX_ATTRIBUTES: usize = 10;

/// A message ready to send: its body and attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The body.
    pub body: String,
    /// The message attributes.
    pub attributes: HashMap<String, MessageAttributeValue>,
}

impl Encoded {
    /// Roughly the bytes SQS counts against its message size limit.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(name, value)| {
                    name.len()
                        + value.data_type().len()
                        + value.string_value().map_or(0, str::len)
                        + value.binary_value().map_or(0, |b| b.as_ref().len())
                })
                .sum::<usize>()
    }
}

/// Whether `name` can be a message attribute's name.
pub fn valid_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
}

/// `bytes` as text SQS accepts in a body or a `String` value: UTF-8 of the
/// characters XML allows.
pub fn sqs_text(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.chars()
        .all(|c| matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..))
        .then_some(text)
}

fn attribute(value: &[u8]) -> MessageAttributeValue {
    let builder = match sqs_text(value) {
        Some(text) => MessageAttributeValue::builder()
            .data_type("String")
            .string_value(text),
        None => MessageAttributeValue::builder()
            .data_type("Binary")
            .binary_value(Blob::new(value.to_vec())),
    };
    match builder.build() {
        Ok(value) => value,
        // The data type, the only required field, is set.
        Err(_) => unreachable!("a message attribute with its data type set"),
    }
}

/// The body and attributes for `payload` with `headers` (see the module
/// documentation).
pub fn encode(payload: &[u8], headers: &[(String, Vec<u8>)]) -> Encoded {
    let mut attributes = HashMap::new();
    let body = match sqs_text(payload) {
        Some(text) => text.to_string(),
        None => {
            attributes.insert(BODY_ENCODING.to_string(), attribute(b"base64"));
            base64::encode(payload)
        }
    };
    let room = MAX_ATTRIBUTES - attributes.len();
    let fits = |name: &str, value: &[u8]| {
        valid_name(name) && name != PACKED && name != BODY_ENCODING && !value.is_empty()
    };
    let mut seen = std::collections::HashSet::new();
    let own: Vec<bool> = headers
        .iter()
        .map(|(name, value)| fits(name, value) && seen.insert(name.as_str()))
        .collect();
    let all_fit = own.iter().all(|o| *o) && headers.len() <= room;
    // One attribute is kept for the packed rest unless everything fits.
    let most = if all_fit { room } else { room - 1 };
    let mut direct = 0;
    let mut packed = Vec::new();
    for ((name, value), own) in headers.iter().zip(own) {
        if own && direct < most {
            attributes.insert(name.clone(), attribute(value));
            direct += 1;
        } else {
            packed.push((name.as_str(), value.as_slice()));
        }
    }
    if !packed.is_empty() {
        attributes.insert(PACKED.to_string(), attribute(pack(&packed).as_bytes()));
    }
    Encoded { body, attributes }
}

/// The payload and headers of a received message with `body` and
/// `attributes` (see the module documentation). Something Weir cannot
/// unpack (a `weir.headers` that is not what Weir writes, a body that is not
/// base64) is kept as it came.
pub fn decode(
    body: &str,
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut direct: Vec<(&String, &MessageAttributeValue)> =
        attributes.map(|a| a.iter().collect()).unwrap_or_default();
    direct.sort_by(|a, b| a.0.cmp(b.0));
    let mut headers = Vec::with_capacity(direct.len());
    let mut payload = None;
    let mut packed = None;
    for (name, value) in direct {
        let bytes = value_bytes(value);
        if name == BODY_ENCODING && bytes == b"base64" {
            if let Some(decoded) = base64::decode(body) {
                payload = Some(decoded);
                continue;
            }
        } else if name == PACKED
            && let Some(pairs) = unpack(&bytes)
        {
            packed = Some(pairs);
            continue;
        }
        headers.push((name.clone(), bytes));
    }
    headers.extend(packed.unwrap_or_default());
    (payload.unwrap_or_else(|| body.as_bytes().to_vec()), headers)
}

/// An attribute's value: the text of a `String` or `Number`, the bytes of
/// a `Binary` (custom types like `String.json` alike).
pub fn value_bytes(value: &MessageAttributeValue) -> Vec<u8> {
    match (value.string_value(), value.binary_value()) {
        (Some(text), _) if !value.data_type().starts_with("Binary") => text.as_bytes().to_vec(),
        (_, Some(blob)) => blob.as_ref().to_vec(),
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, None) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn few_headers_become_attributes_of_their_own() {
        let sent = headers(&[
            ("ce-partitionkey", b"k1"),
            ("bin", &[0, 255]),
            ("ce_id", b"e1"),
        ]);
        let encoded = encode(b"hello", &sent);
        assert_eq!(encoded.body, "hello");
        assert_eq!(encoded.attributes.len(), 3);
        assert_eq!(encoded.attributes["bin"].data_type(), "Binary");
        assert_eq!(encoded.attributes["ce_id"].data_type(), "String");
        let (payload, got) = decode(&encoded.body, Some(&encoded.attributes));
        assert_eq!(payload, b"hello");
        let mut want = sent.clone();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn headers_beyond_ten_are_packed_and_unpacked() {
        let mut sent: Vec<(String, Vec<u8>)> = (0..14)
            .map(|i| (format!("weir.h{i:02}"), format!("v{i}").into_bytes()))
            .collect();
        sent.push(("not valid:name".into(), b"x".to_vec()));
        sent.push(("empty".into(), Vec::new()));
        sent.push(("binary".into(), vec![0xff, 0]));
        sent.push(("weir.h00".into(), b"again".to_vec()));
        let encoded = encode(b"{}", &sent);
        assert_eq!(encoded.attributes.len(), MAX_ATTRIBUTES);
        assert!(encoded.attributes.contains_key(PACKED));
        let (_, got) = decode(&encoded.body, Some(&encoded.attributes));
        let mut got_sorted = got.clone();
        got_sorted.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(got_sorted, want);
    }

    #[test]
    fn binary_payloads_travel_as_base64() {
        let encoded = encode(&[0, 1, 0xff], &[]);
        assert_eq!(encoded.body, "AAH/");
        assert_eq!(
            encoded.attributes[BODY_ENCODING].string_value(),
            Some("base64")
        );
        let (payload, headers) = decode(&encoded.body, Some(&encoded.attributes));
        assert_eq!(payload, vec![0, 1, 0xff]);
        assert!(headers.is_empty());
        // Control characters XML forbids are not text to SQS either.
        assert!(
            encode(b"a\x01b", &[])
                .attributes
                .contains_key(BODY_ENCODING)
        );
        // With ten headers besides, one is packed.
        let ten: Vec<(String, Vec<u8>)> =
            (0..10).map(|i| (format!("h{i}"), b"v".to_vec())).collect();
        let encoded = encode(&[0xff], &ten);
        assert_eq!(encoded.attributes.len(), MAX_ATTRIBUTES);
        let (payload, mut got) = decode(&encoded.body, Some(&encoded.attributes));
        got.sort();
        assert_eq!((payload, got), (vec![0xff], ten));
    }

    #[test]
    fn foreign_attributes_are_kept_as_they_came() {
        let mut attributes = HashMap::new();
        attributes.insert(PACKED.to_string(), attribute(b"not json"));
        attributes.insert(
            "n".to_string(),
            MessageAttributeValue::builder()
                .data_type("Number")
                .string_value("12")
                .build()
                .unwrap_or_else(|_| unreachable!()),
        );
        attributes.insert(BODY_ENCODING.to_string(), attribute(b"base64"));
        let (payload, headers) = decode("not base64!", Some(&attributes));
        assert_eq!(payload, b"not base64!");
        assert_eq!(
            headers,
            vec![
                ("n".to_string(), b"12".to_vec()),
                (BODY_ENCODING.to_string(), b"base64".to_vec()),
                (PACKED.to_string(), b"not json".to_vec()),
            ]
        );
    }

    #[test]
    fn attribute_names_follow_the_rules() {
        assert!(valid_name("weir.origin.topic"));
        assert!(valid_name("ce-partitionkey"));
        assert!(!valid_name(".x") && !valid_name("x.") && !valid_name("a..b"));
        assert!(!valid_name("AWS.x") && !valid_name("amazon.x"));
        assert!(!valid_name("a b") && !valid_name(""));
    }
}
