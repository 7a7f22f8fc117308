//! Watching the handlers directory for new, changed and removed files.
//!
//! File-system events are debounced: a burst of writes (a copy in progress,
//! an editor's save dance, a `.wasm` and its manifest written one after the
//! other) becomes one wake-up once the directory has been quiet for the
//! debounce period. The runtime then compares every file with what it
//! serves (see `Runtime::reload`), so a missed or merged event is harmless:
//! the next wake-up, or the periodic rescan, catches up. A file caught
//! half-written fails to load, is reported, and is loaded again when its
//! writer finishes (which is another change).

use std::path::Path;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use tokio::sync::mpsc;

/// How long the directory must be quiet before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Watches `dir`; each debounced burst of changes sends one `()` on the
/// returned channel. Watching stops when the [`Debouncer`] is dropped.
///
/// # Errors
///
/// When the directory cannot be watched.
pub fn watch(
    dir: &Path,
) -> notify::Result<(Debouncer<notify::RecommendedWatcher>, mpsc::Receiver<()>)> {
    let (tx, rx) = mpsc::channel(1);
    let mut debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| {
        match result {
            Ok(events) => {
                let relevant = events.iter().any(|e| {
                    e.path
                        .extension()
                        .is_some_and(|ext| ext == "wasm" || ext == "toml")
                });
                if relevant {
                    // Full means a reload is already pending: it will see
                    // this change too.
                    let _ = tx.try_send(());
                }
            }
            Err(err) => tracing::warn!(error = %err, "watching the handlers directory"),
        }
    })?;
    debouncer
        .watcher()
        .watch(dir, RecursiveMode::NonRecursive)?;
    Ok((debouncer, rx))
}
