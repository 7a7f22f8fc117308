//! Publishing to JetStream: dead letters and emitted events, with their
//! key in `ce-partitionkey` and their id as `Nats-Msg-Id`, and the headers
//! NATS cannot carry packed (the [parent](super)'s "Headers").

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;

use super::{KEY_HEADER, NatsConnection};
use crate::lock::Unpoisoned;
use crate::source::packed::{PACKED, pack, unpack};
use crate::source::{Publisher, Receipt, Refused};

/// Whether NATS carries a header of this name and value as it is:
/// `async-nats` asserts that a name is visible ASCII without `:` and that a
/// value has no CR or LF, and its values are text. A `Nats-*` header is
/// an instruction to the server (`Nats-Expected-Stream`, `Nats-Rollup`,
/// `Nats-TTL`, …) or its note on a stored message (`Nats-Sequence`), never
/// Weir's to give: one copied from a consumed message onto its dead letter
/// would make the server refuse or alter that publish, so it travels
/// packed like the others. (Weir's own `Nats-Msg-Id` is set after.)
fn carried<'a>(name: &str, value: &'a [u8]) -> Option<&'a str> {
    let name_ok = !name.is_empty()
        && name != PACKED
        && !name
            .get(..5)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
        && name.chars().all(|c| c.is_ascii_graphic() && c != ':');
    let value = std::str::from_utf8(value).ok()?;
    (name_ok && !value.contains(['\r', '\n'])).then_some(value)
}

/// The headers of a message to publish, with `key` as [`KEY_HEADER`] (when
/// the headers have none) and `id` as `Nats-Msg-Id`.
///
/// Invariant: nothing here can panic, whatever the bytes: headers NATS
/// cannot carry as they are (see [`carried`]) are packed into
/// [`PACKED`] (see [`crate::source::packed`]) and unpacked again by
/// [`unpack_headers`] on receive; an id with a line break is
/// percent-encoded (`%0A`, `%0D`, `%25`), which keeps distinct ids
/// distinct.
pub(super) fn header_map(
    headers: &[(String, Vec<u8>)],
    key: Option<&[u8]>,
    id: Option<&str>,
) -> HeaderMap {
    let mut map = HeaderMap::new();
    let mut packed: Vec<(&str, &[u8])> = Vec::new();
    for (name, value) in headers {
        // Replaced by the id given, as the insert below always did.
        if id.is_some() && name == "Nats-Msg-Id" {
            continue;
        }
        match carried(name, value) {
            Some(text) => map.append(name.as_str(), text),
            None => packed.push((name.as_str(), value.as_slice())),
        }
    }
    if let Some(key) = key
        && !headers.iter().any(|(name, _)| name == KEY_HEADER)
    {
        match carried(KEY_HEADER, key) {
            Some(text) => map.insert(KEY_HEADER, text),
            None => packed.push((KEY_HEADER, key)),
        }
    }
    if !packed.is_empty() {
        map.insert(PACKED, pack(&packed).as_str());
    }
    if let Some(id) = id {
        if id.contains(['\r', '\n']) {
            let encoded = id
                .replace('%', "%25")
                .replace('\r', "%0D")
                .replace('\n', "%0A");
            map.insert("Nats-Msg-Id", encoded.as_str());
        } else {
            map.insert("Nats-Msg-Id", id);
        }
    }
    map
}

/// Replaces a [`PACKED`] header Weir wrote with the headers it holds, after
/// the others; one that is not Weir's packing stays as it came.
pub(super) fn unpack_headers(headers: &mut Vec<(String, Vec<u8>)>) {
    let Some(at) = headers.iter().position(|(name, _)| name == PACKED) else {
        return;
    };
    if let Some(pairs) = unpack(&headers[at].1) {
        headers.remove(at);
        headers.extend(pairs);
    }
}

/// Publishes dead letters and emitted events to JetStream subjects.
#[derive(Clone)]
pub struct NatsPublisher {
    pub(super) connection: NatsConnection,
}

impl Publisher for NatsPublisher {
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        id: Option<&str>,
    ) -> anyhow::Result<Receipt> {
        let map = header_map(headers, key, id);
        let payload = bytes::Bytes::copy_from_slice(payload);
        let covered = self.connection.covered.locked().contains(topic);
        if !covered {
            self.connection.stream_for(topic).await?;
        }
        let ack = self
            .connection
            .js()
            .publish_with_headers(topic.to_string(), map, payload)
            .await
            .map_err(|err| {
                if err.kind() == PublishErrorKind::MaxPayloadExceeded {
                    anyhow::Error::new(Refused(format!("publish to {topic:?}: {err}")))
                } else {
                    anyhow::anyhow!("publish to {topic:?} failed: {err}")
                }
            })?;
        match ack.await {
            Ok(ack) => Ok(Receipt {
                partition: 0,
                offset: i64::try_from(ack.sequence).unwrap_or(i64::MAX),
            }),
            Err(err) => {
                if err.kind() == PublishErrorKind::StreamNotFound {
                    // The stream went away since: the caller's next try
                    // makes it again.
                    self.connection.covered.locked().remove(topic);
                }
                Err(anyhow::anyhow!(
                    "publish to {topic:?} not acknowledged: {err}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::packed::PACKED;

    fn owned(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    /// Every value `async-nats` would assert on is packed instead, and
    /// reading the map back gives every header again.
    #[test]
    fn headers_nats_cannot_carry_are_packed_not_asserted_on() {
        let sent = owned(&[
            ("fine", b"v"),
            ("weir.error", b"Traceback:\n  line 1\r\nValueError"),
            ("with space", b"x"),
            ("colon:name", b"x"),
            ("binary", &[0xff, 0]),
            ("", b"empty name"),
            ("Nats-Expected-Stream", b"orders"),
            ("nats-rollup", b"sub"),
        ]);
        let map = header_map(&sent, Some(b"key\nwith break"), Some("id\n1%"));
        assert_eq!(map.get("fine").map(|v| v.as_str()), Some("v"));
        // A producer's instructions to the server never reach it.
        assert!(map.get("Nats-Expected-Stream").is_none());
        assert!(map.get("nats-rollup").is_none());
        assert_eq!(
            map.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some("id%0A1%25")
        );
        let mut back: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, values) in map.iter() {
            for value in values {
                back.push((name.to_string(), value.as_str().as_bytes().to_vec()));
            }
        }
        back.retain(|(name, _)| name != "Nats-Msg-Id");
        unpack_headers(&mut back);
        let mut want = sent.clone();
        want.push((KEY_HEADER.into(), b"key\nwith break".to_vec()));
        want.sort();
        back.sort();
        assert_eq!(back, want);
    }

    /// A producer's own `weir.headers` that is not Weir's packing is kept.
    #[test]
    fn a_foreign_packed_header_is_kept_as_it_came() {
        let mut headers = owned(&[(PACKED, b"not json"), ("a", b"b")]);
        unpack_headers(&mut headers);
        assert_eq!(headers, owned(&[(PACKED, b"not json"), ("a", b"b")]));
        let carried_key = header_map(&[], Some(b"plain"), None);
        assert_eq!(
            carried_key.get(KEY_HEADER).map(|v| v.as_str()),
            Some("plain")
        );
        assert!(carried_key.get(PACKED).is_none());
    }
}
