//! The guest's view of state and the outbox during one `handle` call.
//!
//! A [`Transaction`] buffers the call's writes and emitted events and records
//! what it read, so that the pipeline can commit them atomically with the
//! event's outcome (see [`store`](crate::store)) or drop them if the call fails. It
//! enforces the limits documented in the WIT.
//!
//! Reads come from the store's view, taken at the call's first state
//! access (redb: one snapshot; PostgreSQL: what is committed at each
//! read), with the call's own writes on top. Every committed key read is recorded
//! with its version, and every prefix listing with the committed entries it
//! was built from, so that the commit can reject the outcome if any of them
//! changed meanwhile.

use std::ops::Bound;
use std::sync::Arc;

use crate::store::{Effects, OutboxRecord, Scan, StateView, Store};

/// Longest state key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest state value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most distinct keys written per call.
pub const MAX_WRITES: usize = 10_000;
/// Most entries one `list-prefix` returns.
pub const MAX_LIST: usize = 1000;
/// Most distinct committed keys one call may read.
pub const MAX_READS: usize = 10_000;
/// Most prefix listings one call may make.
pub const MAX_SCANS: usize = 100;
/// Largest emitted event (key, payload and headers, each header counted
/// with a fixed overhead), in bytes.
pub const MAX_EMIT_BYTES: usize = 1 << 20;
/// Most events emitted per call.
pub const MAX_EMITS: usize = 1000;
/// Most bytes of writes and emitted events per call.
pub const MAX_TRANSACTION_BYTES: usize = 32 << 20;
/// Longest topic name Kafka accepts.
const MAX_TOPIC_CHARS: usize = 249;
/// What each header of an emitted event counts beyond its name and value
/// (about what it costs the host to hold): so that headers with nothing in
/// them are not free, and a million of them are over the limit.
const HEADER_OVERHEAD: usize = 32;

/// Why a state operation failed (mirrors the WIT's `state-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateFailure {
    /// Key longer than the limit.
    KeyTooLong(u32),
    /// Value larger than the limit.
    ValueTooLarge(u32),
    /// Too many writes in this call.
    TooManyWrites(u32),
    /// The call's effects would exceed the limit.
    TransactionTooLarge(u32),
    /// The database could not be read.
    Unavailable(String),
    /// This call already read the most distinct keys, or made the most
    /// listings, allowed (given): each is kept until the commit validates
    /// it, so their number bounds the host memory a call holds. The guest
    /// sees it as `unavailable` (the contract has no case of its own).
    TooManyReads(u32),
    /// A key no store can hold; says why (the contract has no case of its
    /// own for it: the guest sees it as `unavailable` with this text).
    InvalidKey(String),
}

/// Why an emit failed (mirrors the WIT's `emit-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmitFailure {
    /// Not a valid topic name; says why.
    InvalidTopic(String),
    /// The event is larger than the limit.
    TooLarge(u32),
    /// Too many events in this call.
    TooMany(u32),
    /// The call's effects would exceed the limit.
    TransactionTooLarge(u32),
}

/// The effects of one `handle` call in progress.
pub struct Transaction {
    store: Option<Store>,
    handler: Arc<str>,
    view: Option<StateView>,
    effects: Effects,
    bytes: usize,
}

impl Transaction {
    /// A transaction for `handler`, reading from `store` (without one, every
    /// state access fails as unavailable; emits still buffer).
    pub fn new(store: Option<Store>, handler: Arc<str>) -> Self {
        Self {
            store,
            handler,
            view: None,
            effects: Effects::default(),
            bytes: 0,
        }
    }

    /// What the call did, to commit with its outcome.
    pub fn finish(self) -> Effects {
        self.effects
    }

    fn view(&mut self) -> Result<&StateView, StateFailure> {
        if self.view.is_none() {
            let store = self.store.as_ref().ok_or_else(|| {
                StateFailure::Unavailable("this runtime has no state store".into())
            })?;
            let view = store
                .state_view()
                .map_err(|e| StateFailure::Unavailable(e.to_string()))?;
            self.view = Some(view);
        }
        self.view
            .as_ref()
            .ok_or_else(|| StateFailure::Unavailable("no snapshot".into()))
    }

    /// A key every store can hold: at most [`MAX_KEY_BYTES`], and no NUL
    /// (PostgreSQL's `text` cannot hold one; refusing it in every store
    /// keeps a handler's state portable between them, and keeps one key
    /// from failing a whole group commit).
    fn check_key(key: &str) -> Result<(), StateFailure> {
        if key.len() > MAX_KEY_BYTES {
            return Err(StateFailure::KeyTooLong(MAX_KEY_BYTES as u32));
        }
        if key.contains('\0') {
            return Err(StateFailure::InvalidKey(
                "a state key cannot contain NUL (U+0000)".into(),
            ));
        }
        Ok(())
    }

    /// The value of `key`: this call's own write if it made one, else the
    /// snapshot's.
    ///
    /// # Errors
    ///
    /// A key over the limit, or an unreadable database.
    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StateFailure> {
        Self::check_key(key)?;
        if let Some(written) = self.effects.writes.get(key) {
            return Ok(written.clone());
        }
        if self.effects.reads.len() >= MAX_READS && !self.effects.reads.contains_key(key) {
            return Err(StateFailure::TooManyReads(MAX_READS as u32));
        }
        let handler = self.handler.clone();
        let found = self
            .view()?
            .get(&handler, key)
            .await
            .map_err(|e| StateFailure::Unavailable(e.to_string()))?;
        self.effects
            .reads
            .entry(key.to_string())
            .or_insert(found.as_ref().map(|(version, _)| *version));
        Ok(found.map(|(_, value)| value))
    }

    fn buffer(&mut self, key: &str, value: Option<Vec<u8>>) -> Result<(), StateFailure> {
        Self::check_key(key)?;
        let size = key.len() + value.as_ref().map_or(0, Vec::len);
        if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE_BYTES) {
            return Err(StateFailure::ValueTooLarge(MAX_VALUE_BYTES as u32));
        }
        let previous = self.effects.writes.get(key);
        if previous.is_none() && self.effects.writes.len() >= MAX_WRITES {
            return Err(StateFailure::TooManyWrites(MAX_WRITES as u32));
        }
        let replaced = previous.map_or(0, |v| key.len() + v.as_ref().map_or(0, Vec::len));
        let bytes = self.bytes - replaced + size;
        if bytes > MAX_TRANSACTION_BYTES {
            return Err(StateFailure::TransactionTooLarge(
                MAX_TRANSACTION_BYTES as u32,
            ));
        }
        self.bytes = bytes;
        self.effects.writes.insert(key.to_string(), value);
        Ok(())
    }

    /// Buffers `key = value`.
    ///
    /// # Errors
    ///
    /// A key or value over the limit, or too many writes.
    pub fn set(&mut self, key: &str, value: Vec<u8>) -> Result<(), StateFailure> {
        self.buffer(key, Some(value))
    }

    /// Buffers the removal of `key`.
    ///
    /// # Errors
    ///
    /// A key over the limit, or too many writes.
    pub fn delete(&mut self, key: &str) -> Result<(), StateFailure> {
        self.buffer(key, None)
    }

    /// Up to `limit` (at most [`MAX_LIST`]) entries whose key starts with
    /// `prefix`, after `start_after`, in key order: the snapshot merged with
    /// this call's writes.
    ///
    /// # Errors
    ///
    /// A prefix over the key limit, or an unreadable database.
    pub async fn list_prefix(
        &mut self,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StateFailure> {
        Self::check_key(prefix)?;
        if let Some(after) = start_after {
            Self::check_key(after)?;
        }
        let limit = (limit as usize).min(MAX_LIST);
        if limit == 0 {
            return Ok(Vec::new());
        }
        if self.effects.scans.len() >= MAX_SCANS {
            return Err(StateFailure::TooManyReads(MAX_SCANS as u32));
        }
        // This call's writes in the listed range.
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let own: Vec<(&String, &Option<Vec<u8>>)> = self
            .effects
            .writes
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        let deleted = own.iter().filter(|(_, v)| v.is_none()).count();
        let mut merged: std::collections::BTreeMap<String, Vec<u8>> = own
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| ((*k).clone(), v.clone())))
            .collect();
        let own_keys: std::collections::HashSet<String> =
            own.iter().map(|(k, _)| (*k).clone()).collect();
        // Fetch enough committed entries that, after this call's deletes,
        // the first `limit` keys of the merge are all known.
        let fetched = limit + deleted;
        let handler = self.handler.clone();
        let committed = self
            .view()?
            .scan(&handler, prefix, start_after, fetched)
            .await
            .map_err(|e| StateFailure::Unavailable(e.to_string()))?;
        let seen = committed.iter().map(|(k, v, _)| (k.clone(), *v)).collect();
        for (key, _, value) in committed {
            if !own_keys.contains(&key) {
                merged.insert(key, value);
            }
        }
        self.effects.scans.push(Scan {
            prefix: prefix.to_string(),
            start_after: start_after.map(str::to_string),
            fetched,
            seen,
        });
        Ok(merged.into_iter().take(limit).collect())
    }

    /// Buffers an event for the outbox.
    ///
    /// # Errors
    ///
    /// An invalid topic, an event over the size limit, or too many events.
    pub fn emit(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    ) -> Result<(), EmitFailure> {
        check_topic(&topic)?;
        let size = key.as_ref().map_or(0, Vec::len)
            + payload.len()
            + headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + HEADER_OVERHEAD)
                .sum::<usize>();
        if size > MAX_EMIT_BYTES {
            return Err(EmitFailure::TooLarge(MAX_EMIT_BYTES as u32));
        }
        if self.effects.emits.len() >= MAX_EMITS {
            return Err(EmitFailure::TooMany(MAX_EMITS as u32));
        }
        if self.bytes + size > MAX_TRANSACTION_BYTES {
            return Err(EmitFailure::TransactionTooLarge(
                MAX_TRANSACTION_BYTES as u32,
            ));
        }
        self.bytes += size;
        self.effects.emits.push(OutboxRecord {
            topic,
            key,
            payload,
            headers,
        });
        Ok(())
    }
}

/// Kafka's rules for topic names.
fn check_topic(topic: &str) -> Result<(), EmitFailure> {
    let reason = if topic.is_empty() {
        "the topic name is empty".to_string()
    } else if topic.len() > MAX_TOPIC_CHARS {
        format!("the topic name is longer than {MAX_TOPIC_CHARS} characters")
    } else if topic == "." || topic == ".." {
        format!("{topic:?} is not a valid topic name")
    } else if let Some(bad) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!("topic {topic:?} contains {bad:?}; use ASCII letters, digits, '.', '_' and '-'")
    } else {
        return Ok(());
    };
    Err(EmitFailure::InvalidTopic(reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Applied, Write};
    use std::time::Duration;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("weir.redb")).expect("open");
        (dir, store)
    }

    async fn commit(store: &Store, id: &str, txn: Transaction) -> Applied {
        store
            .write(Write::Finished {
                handler: "h".into(),
                id: id.into(),
                ttl: Duration::from_secs(60),
                dedup: true,
                effects: Some(Arc::new(txn.finish())),
            })
            .await
            .expect("write")
    }

    fn txn(store: &Store) -> Transaction {
        Transaction::new(Some(store.clone()), "h".into())
    }

    #[tokio::test]
    async fn reads_see_own_writes_and_commits_are_atomic() {
        let (_dir, store) = store();
        let mut t = txn(&store);
        assert_eq!(t.get("a").await.expect("get"), None);
        t.set("a", b"1".to_vec()).expect("set");
        t.set("b", b"2".to_vec()).expect("set");
        assert_eq!(t.get("a").await.expect("get"), Some(b"1".to_vec()));
        t.emit("out".into(), None, b"e".to_vec(), vec![])
            .expect("emit");
        assert_eq!(commit(&store, "e1", t).await, Applied::Done);

        let mut t = txn(&store);
        assert_eq!(t.get("b").await.expect("get"), Some(b"2".to_vec()));
        t.delete("b").expect("delete");
        assert_eq!(t.get("b").await.expect("get"), None);
        // Dropped without commit: nothing changes.
        drop(t);
        assert_eq!(
            txn(&store).get("b").await.expect("get"),
            Some(b"2".to_vec())
        );
        assert_eq!(store.outbox_len().await.expect("len"), 1);
    }

    #[tokio::test]
    async fn a_stale_read_is_a_conflict_and_applies_nothing() {
        let (_dir, store) = store();
        let mut first = txn(&store);
        let mut second = txn(&store);
        // Both read the counter, both increment it.
        assert_eq!(first.get("n").await.expect("get"), None);
        assert_eq!(second.get("n").await.expect("get"), None);
        first.set("n", b"1".to_vec()).expect("set");
        second.set("n", b"1".to_vec()).expect("set");
        second
            .emit("out".into(), None, b"x".to_vec(), vec![])
            .expect("emit");
        assert_eq!(commit(&store, "e1", first).await, Applied::Done);
        assert_eq!(commit(&store, "e2", second).await, Applied::Conflict);
        assert_eq!(
            store.outbox_len().await.expect("len"),
            0,
            "the loser emitted nothing"
        );
        assert!(
            !store.seen("h", "e2").await.expect("seen").done,
            "nor was it marked"
        );
        // Run again on the new state: it commits.
        let mut again = txn(&store);
        assert_eq!(again.get("n").await.expect("get"), Some(b"1".to_vec()));
        again.set("n", b"2".to_vec()).expect("set");
        assert_eq!(commit(&store, "e2", again).await, Applied::Done);
    }

    #[tokio::test]
    async fn a_listing_conflicts_with_a_new_key_in_its_range() {
        let (_dir, store) = store();
        let mut seed = txn(&store);
        seed.set("item/1", b"a".to_vec()).expect("set");
        assert_eq!(commit(&store, "seed", seed).await, Applied::Done);

        let mut lister = txn(&store);
        let listed = lister.list_prefix("item/", None, 10).await.expect("list");
        assert_eq!(listed, vec![("item/1".to_string(), b"a".to_vec())]);
        lister.set("count", b"1".to_vec()).expect("set");

        let mut inserter = txn(&store);
        inserter.set("item/2", b"b".to_vec()).expect("set");
        assert_eq!(commit(&store, "ins", inserter).await, Applied::Done);
        assert_eq!(commit(&store, "list", lister).await, Applied::Conflict);

        // A write outside the listed range does not conflict.
        let mut lister = txn(&store);
        lister.list_prefix("item/", None, 10).await.expect("list");
        lister.set("count", b"2".to_vec()).expect("set");
        let mut other = txn(&store);
        other.set("zzz", b"c".to_vec()).expect("set");
        assert_eq!(commit(&store, "other", other).await, Applied::Done);
        assert_eq!(commit(&store, "list2", lister).await, Applied::Done);
    }

    #[tokio::test]
    async fn listing_merges_own_writes_and_pages() {
        let (_dir, store) = store();
        let mut seed = txn(&store);
        for i in 0..5 {
            seed.set(&format!("k/{i}"), vec![i]).expect("set");
        }
        seed.set("other", vec![9]).expect("set");
        assert_eq!(commit(&store, "seed", seed).await, Applied::Done);

        let mut t = txn(&store);
        t.delete("k/0").expect("delete");
        t.delete("k/1").expect("delete");
        t.set("k/2", vec![20]).expect("set");
        t.set("k/25", vec![25]).expect("set");
        let keys = |entries: Vec<(String, Vec<u8>)>| -> Vec<String> {
            entries.into_iter().map(|(k, _)| k).collect()
        };
        let page = t.list_prefix("k/", None, 2).await.expect("list");
        assert_eq!(page[0], ("k/2".to_string(), vec![20]));
        assert_eq!(keys(page), ["k/2", "k/25"]);
        let rest = t.list_prefix("k/", Some("k/25"), 10).await.expect("list");
        assert_eq!(keys(rest), ["k/3", "k/4"]);
        assert!(t.list_prefix("k/", None, 0).await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn a_duplicate_outcome_applies_nothing() {
        let (_dir, store) = store();
        let mut t = txn(&store);
        t.set("n", b"1".to_vec()).expect("set");
        assert_eq!(commit(&store, "e1", t).await, Applied::Done);
        let mut again = txn(&store);
        again.set("n", b"2".to_vec()).expect("set");
        again
            .emit("out".into(), None, vec![], vec![])
            .expect("emit");
        assert_eq!(commit(&store, "e1", again).await, Applied::Duplicate);
        assert_eq!(
            txn(&store).get("n").await.expect("get"),
            Some(b"1".to_vec())
        );
        assert_eq!(store.outbox_len().await.expect("len"), 0);
    }

    /// Reads and listings a call keeps for validation are bounded.
    #[tokio::test]
    async fn reads_and_listings_per_call_are_bounded() {
        let (_dir, store) = store();
        let mut t = txn(&store);
        for i in 0..MAX_READS {
            assert_eq!(t.get(&format!("k{i}")).await, Ok(None));
        }
        assert!(matches!(
            t.get("one-more").await,
            Err(StateFailure::TooManyReads(_))
        ));
        // A key read already is read again.
        assert_eq!(t.get("k7").await, Ok(None));
        let mut t = txn(&store);
        for _ in 0..MAX_SCANS {
            assert!(t.list_prefix("p/", None, 10).await.is_ok());
        }
        assert!(matches!(
            t.list_prefix("p/", None, 10).await,
            Err(StateFailure::TooManyReads(_))
        ));
    }

    #[tokio::test]
    async fn limits_give_clear_errors() {
        let mut t = Transaction::new(None, "h".into());
        assert!(matches!(
            t.set("a\0b", b"v".to_vec()),
            Err(StateFailure::InvalidKey(_))
        ));
        assert!(matches!(
            t.get("\0").await,
            Err(StateFailure::InvalidKey(_))
        ));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            t.set(&long, vec![]),
            Err(StateFailure::KeyTooLong(MAX_KEY_BYTES as u32))
        );
        assert_eq!(
            t.set("k", vec![0; MAX_VALUE_BYTES + 1]),
            Err(StateFailure::ValueTooLarge(MAX_VALUE_BYTES as u32))
        );
        assert!(matches!(
            t.get("k").await,
            Err(StateFailure::Unavailable(_))
        ));
        for bad in ["", "a b", "über", ".."] {
            assert!(
                matches!(
                    t.emit(bad.into(), None, vec![], vec![]),
                    Err(EmitFailure::InvalidTopic(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            t.emit("t".into(), None, vec![0; MAX_EMIT_BYTES + 1], vec![]),
            Err(EmitFailure::TooLarge(MAX_EMIT_BYTES as u32))
        );
        // Empty headers are not free: as many as would fit in memory are
        // over the limit.
        let empty = vec![(String::new(), Vec::new()); MAX_EMIT_BYTES / HEADER_OVERHEAD + 1];
        assert_eq!(
            t.emit("t".into(), None, vec![], empty),
            Err(EmitFailure::TooLarge(MAX_EMIT_BYTES as u32))
        );
        for i in 0..MAX_EMITS {
            t.emit("t".into(), None, vec![], vec![])
                .unwrap_or_else(|e| panic!("emit {i}: {e:?}"));
        }
        assert_eq!(
            t.emit("t".into(), None, vec![], vec![]),
            Err(EmitFailure::TooMany(MAX_EMITS as u32))
        );
        let mut t = Transaction::new(None, "h".into());
        let value = vec![0; MAX_VALUE_BYTES];
        let mut result = Ok(());
        for i in 0..64 {
            result = t.set(&format!("k{i}"), value.clone());
            if result.is_err() {
                break;
            }
        }
        assert_eq!(
            result,
            Err(StateFailure::TransactionTooLarge(
                MAX_TRANSACTION_BYTES as u32
            ))
        );
    }
}
