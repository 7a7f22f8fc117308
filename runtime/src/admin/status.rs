//! The runtime as the admin server sees it: the handlers served, the files
//! rejected and the outbox relay, kept current by the runtime (which writes
//! it; the admin server only reads it).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use crate::lock::UnpoisonedRw;
use crate::pipeline::HandlerStats;
use crate::pipeline::outbox::RelayStats;
use crate::source::progress::Progress;

/// What the admin server shows of one handler being served.
#[derive(Clone)]
pub struct HandlerView {
    /// Its name (file stem).
    pub name: String,
    /// The version being served (content hash).
    pub version: String,
    /// The contract it was built for (`0.1.0`, `0.2.0`).
    pub contract: String,
    /// Its consumer group (Kafka) or durable (NATS JetStream).
    pub group: String,
    /// The topics or subjects it consumes.
    pub topics: Vec<String>,
    /// Where its dead letters go.
    pub dead_letter_topics: Vec<String>,
    /// Its counters.
    pub stats: Arc<HandlerStats>,
    /// False once its worker stopped on its own.
    pub alive: Arc<AtomicBool>,
    /// Its consumer as its source sees it: joined, partitions, lag.
    pub progress: Progress,
}

/// The runtime as the admin server sees it: the handlers served and the
/// files rejected, kept current by the runtime. Cheap to clone.
#[derive(Clone, Default)]
pub struct Status {
    inner: Arc<RwLock<StatusInner>>,
}

#[derive(Default)]
pub(crate) struct StatusInner {
    pub(crate) handlers: BTreeMap<String, HandlerView>,
    pub(crate) rejected: BTreeMap<String, String>,
    pub(crate) relay: Option<Arc<RelayStats>>,
}

impl Status {
    /// The handlers served, by name.
    pub fn handlers(&self) -> Vec<HandlerView> {
        self.read().handlers.values().cloned().collect()
    }

    /// Files that failed to load, with why (the version served before, if
    /// any, keeps serving).
    pub fn rejected(&self) -> BTreeMap<String, String> {
        self.read().rejected.clone()
    }

    /// The outbox relay's counters and failing topics.
    pub fn relay(&self) -> Option<Arc<RelayStats>> {
        self.read().relay.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, StatusInner> {
        self.inner.read_locked()
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, StatusInner> {
        self.inner.write_locked()
    }
}
