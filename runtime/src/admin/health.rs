//! What the admin server reports of the store, read by one task every
//! [`REFRESH`] instead of once per request.
//!
//! Invariants: `/health/ready` and `/metrics` never query the store
//! themselves, so probes and scrapes (however many) cost the store one
//! probe and two outbox reads per [`REFRESH`]; the figures they answer are
//! at most [`REFRESH`] plus one probe old; the first figures are read
//! before the server answers anything.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::lock::Unpoisoned;
use crate::store::Store;

/// How often the store is probed and its outbox measured.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The store as last read.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Why the store cannot serve, if it cannot.
    pub problem: Option<String>,
    /// Rows waiting in the outbox and how long its oldest has waited, when
    /// they could be read.
    pub outbox: Option<(u64, Duration)>,
}

/// The latest [`Figures`], shared with the routes.
#[derive(Clone)]
pub struct Health {
    figures: Arc<Mutex<Figures>>,
}

async fn read(store: &Store) -> Figures {
    let problem = store.probe().await;
    let outbox = match (store.outbox_len().await, store.outbox_oldest_ms().await) {
        (Ok(rows), Ok(oldest)) => {
            let age = oldest.map_or(Duration::ZERO, |committed| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                now.saturating_sub(Duration::from_millis(committed))
            });
            Some((rows, age))
        }
        _ => None,
    };
    Figures { problem, outbox }
}

impl Health {
    /// Reads the store once, then again every [`REFRESH`] until `stop`
    /// turns true.
    pub async fn start(store: Store, mut stop: watch::Receiver<bool>) -> Self {
        let figures = Arc::new(Mutex::new(read(&store).await));
        let shared = figures.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                // Off the async threads: an embedded store reads
                // synchronously.
                let runtime = tokio::runtime::Handle::current();
                let store = store.clone();
                if let Ok(latest) =
                    tokio::task::spawn_blocking(move || runtime.block_on(read(&store))).await
                {
                    *shared.locked() = latest;
                }
            }
        });
        Self { figures }
    }

    /// The latest figures.
    pub fn figures(&self) -> Figures {
        self.figures.locked().clone()
    }
}
