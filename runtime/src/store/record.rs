//! The stored form of an emitted event: an outbox row's bytes, the same
//! in every backend.

/// One event a handler emitted, as stored in the outbox and published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Destination topic.
    pub topic: String,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Vec<u8>,
    /// Headers, including the derived `event_id`.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Format tag of an encoded [`OutboxRecord`]: 2 adds the commit time after
/// the tag; rows of format 1 (without it) are still read.
pub(crate) const OUTBOX_FORMAT: u8 = 2;
pub(crate) const OUTBOX_FORMAT_UNTIMED: u8 = 1;

impl OutboxRecord {
    /// The stored form: a format byte, the commit time (milliseconds since
    /// the Unix epoch, u64 little-endian), then length-prefixed fields.
    pub fn encode(&self, committed_ms: u64) -> Vec<u8> {
        fn put(out: &mut Vec<u8>, bytes: &[u8]) {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let mut out = Vec::with_capacity(
            32 + self.topic.len()
                + self.payload.len()
                + self.key.as_ref().map_or(0, Vec::len)
                + self
                    .headers
                    .iter()
                    .map(|(n, v)| 8 + n.len() + v.len())
                    .sum::<usize>(),
        );
        out.push(OUTBOX_FORMAT);
        out.extend_from_slice(&committed_ms.to_le_bytes());
        put(&mut out, self.topic.as_bytes());
        match &self.key {
            Some(key) => {
                out.push(1);
                put(&mut out, key);
            }
            None => out.push(0),
        }
        put(&mut out, &self.payload);
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (name, value) in &self.headers {
            put(&mut out, name.as_bytes());
            put(&mut out, value);
        }
        out
    }

    /// Parses the stored form.
    ///
    /// # Errors
    ///
    /// When the bytes are not a record this version wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        struct Reader<'a>(&'a [u8]);
        impl<'a> Reader<'a> {
            fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
                if self.0.len() < n {
                    return Err("truncated outbox record".into());
                }
                let (head, rest) = self.0.split_at(n);
                self.0 = rest;
                Ok(head)
            }
            fn u32(&mut self) -> Result<u32, String> {
                let b = self.take(4)?;
                Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            fn bytes(&mut self) -> Result<Vec<u8>, String> {
                let n = self.u32()? as usize;
                Ok(self.take(n)?.to_vec())
            }
            fn string(&mut self) -> Result<String, String> {
                String::from_utf8(self.bytes()?).map_err(|_| "outbox record: bad UTF-8".into())
            }
        }
        let mut r = Reader(bytes);
        match r.take(1)?[0] {
            OUTBOX_FORMAT => {
                r.take(8)?;
            }
            OUTBOX_FORMAT_UNTIMED => {}
            format => return Err(format!("unknown outbox record format {format}")),
        }
        let topic = r.string()?;
        let key = match r.take(1)?[0] {
            0 => None,
            _ => Some(r.bytes()?),
        };
        let payload = r.bytes()?;
        let count = r.u32()?;
        let mut headers = Vec::new();
        for _ in 0..count {
            headers.push((r.string()?, r.bytes()?));
        }
        if !r.0.is_empty() {
            return Err("outbox record: trailing bytes".into());
        }
        Ok(Self {
            topic,
            key,
            payload,
            headers,
        })
    }
}

/// When the stored outbox record `bytes` was committed (milliseconds since
/// the Unix epoch); `None` for rows written before commit times were kept.
pub(crate) fn committed_ms(bytes: &[u8]) -> Option<u64> {
    match bytes {
        [OUTBOX_FORMAT, time @ ..] => Some(u64::from_le_bytes(time.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}
