//! Headers a broker cannot carry one by one, packed into one header.
//!
//! Brokers limit headers differently: SQS takes ten message attributes with
//! names of `[A-Za-z0-9_.-]`, NATS takes names of visible ASCII without `:`
//! and values of UTF-8 without CR or LF. Weir never drops a header for
//! that and never hands a client library one it asserts on: the headers
//! that do not fit travel together in one header, [`PACKED`]
//! (`weir.headers`), whose value is a JSON array of `[name, value]` pairs in
//! their original order, a value being a JSON string, or `{"base64": "…"}`
//! when it is not UTF-8. JSON escapes every control character, so the
//! packed value itself is UTF-8 with no line breaks. Weir's consumers
//! unpack it on receive and put the pairs after the other headers; any
//! other client reads it as JSON.

use serde_json::Value;

/// The header holding the headers that do not fit one by one.
pub const PACKED: &str = "weir.headers";

/// `pairs` as [`PACKED`]'s value (see the module documentation).
pub fn pack(pairs: &[(&str, &[u8])]) -> String {
    let packed: Vec<Value> = pairs
        .iter()
        .map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(text) => Value::String(text.to_string()),
                Err(_) => serde_json::json!({ "base64": base64::encode(value) }),
            };
            Value::Array(vec![Value::String((*name).to_string()), value])
        })
        .collect();
    Value::Array(packed).to_string()
}

/// The pairs a [`PACKED`] value holds; `None` when it is not what
/// [`pack`] writes (a producer's own header of that name), which the caller
/// then keeps as it came.
pub fn unpack(json: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let Value::Array(pairs) = serde_json::from_slice::<Value>(json).ok()? else {
        return None;
    };
    pairs
        .iter()
        .map(|pair| {
            let [Value::String(name), value] = pair.as_array()?.as_slice() else {
                return None;
            };
            let bytes = match value {
                Value::String(text) => text.as_bytes().to_vec(),
                Value::Object(map) => base64::decode(map.get("base64")?.as_str()?)?,
                _ => return None,
            };
            Some((name.clone(), bytes))
        })
        .collect()
}

/// Standard base64 with padding.
pub mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// `bytes` in base64.
    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// The bytes `text` encodes, if it is base64 (padded, no whitespace).
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let bytes = text.as_bytes();
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
        for (index, chunk) in bytes.chunks(4).enumerate() {
            let last = index + 1 == bytes.len() / 4;
            let pad = chunk.iter().rev().take_while(|b| **b == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &b in &chunk[..4 - pad] {
                let v = ALPHABET.iter().position(|a| *a == b)? as u32;
                n = (n << 6) | v;
            }
            n <<= 6 * pad as u32;
            let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&decoded[..3 - pad]);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for input in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0, 255, 128, 7],
        ] {
            let encoded = base64::encode(input);
            assert_eq!(
                base64::decode(&encoded).as_deref(),
                Some(input),
                "{encoded}"
            );
        }
        assert_eq!(base64::encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64::encode(b"fo"), "Zm8=");
        assert_eq!(base64::decode("Zm9vYg=="), Some(b"foob".to_vec()));
        assert_eq!(base64::decode("Zm9=vYg="), None);
        assert_eq!(base64::decode("Zm9"), None);
        assert_eq!(base64::decode("Zm9*"), None);
    }

    #[test]
    fn packed_headers_round_trip_and_carry_no_line_breaks() {
        let pairs: Vec<(&str, &[u8])> = vec![
            ("multi\nline name", b"a\r\nb"),
            ("binary", &[0, 0xff, b'\n']),
            ("", b""),
            ("ok", "caf\u{e9}".as_bytes()),
        ];
        let packed = pack(&pairs);
        assert!(!packed.contains(['\r', '\n']), "{packed}");
        let back = unpack(packed.as_bytes()).unwrap_or_default();
        let want: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect();
        assert_eq!(back, want);
        assert_eq!(unpack(b"not json"), None);
        assert_eq!(unpack(b"[[1, 2]]"), None);
    }
}
