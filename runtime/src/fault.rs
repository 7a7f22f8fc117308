//! Fault points for crash-consistency tests.
//!
//! The code that makes outcomes durable calls [`point`] at the moments where
//! a crash would hurt most (see [`store`](crate::store) and [`outbox`](crate::pipeline::outbox)). When
//! the environment variable `WEIR_FAULT` names a point, the process aborts
//! there, like a power cut: no destructors, no flush, no offset commit.
//!
//! `WEIR_FAULT` is a comma-separated list of `<point>@<n>`: abort the `n`-th
//! time (1-based) `<point>` is reached. For example
//! `WEIR_FAULT=after-commit@3,after-publish@1`. Unset (the normal case), a
//! point costs one relaxed atomic load.
//!
//! | point | where |
//! | --- | --- |
//! | `before-commit` | a batch of outcomes is staged but not yet durable |
//! | `after-commit` | the batch is durable; nobody was told, no offset was stored |
//! | `after-publish` | emitted events were acknowledged by the broker; their outbox rows are not yet deleted |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
static ANY: AtomicBool = AtomicBool::new(false);

/// Reads `WEIR_FAULT`. Call once at startup.
///
/// # Errors
///
/// When the variable is set but malformed.
pub fn init() -> Result<(), String> {
    let Ok(spec) = std::env::var("WEIR_FAULT") else {
        return Ok(());
    };
    let armed = parse(&spec)?;
    if !armed.is_empty() {
        tracing::warn!(faults = %spec, "fault injection armed: this process will abort on purpose");
        ANY.store(true, Ordering::Relaxed);
    }
    let _ = ARMED.set(armed);
    Ok(())
}

fn parse(spec: &str) -> Result<Vec<Armed>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (name, at) = item
                .split_once('@')
                .ok_or_else(|| format!("WEIR_FAULT: {item:?} is not <point>@<n>"))?;
            let at: u64 = at
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("WEIR_FAULT: {at:?} in {item:?} is not a count >= 1"))?;
            if !POINTS.contains(&name) {
                return Err(format!(
                    "WEIR_FAULT: unknown point {name:?}; known: {}",
                    POINTS.join(", ")
                ));
            }
            Ok(Armed {
                name: name.to_string(),
                at,
                hits: AtomicU64::new(0),
            })
        })
        .collect()
}

/// Every fault point in the code.
const POINTS: &[&str] = &["before-commit", "after-commit", "after-publish"];

/// Aborts the process if `name` is armed and this is the chosen hit.
pub fn point(name: &'static str) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    let Some(armed) = ARMED.get() else { return };
    for fault in armed.iter().filter(|f| f.name == name) {
        let hit = fault.hits.fetch_add(1, Ordering::Relaxed) + 1;
        if hit == fault.at {
            // Plain stderr: the log pipeline may not get to flush.
            eprintln!("weir: fault injection: aborting at {name} (hit {hit})");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_rejects_nonsense() {
        let armed = parse("after-commit@3, after-publish@1").expect("valid");
        assert_eq!(armed.len(), 2);
        assert_eq!((armed[0].name.as_str(), armed[0].at), ("after-commit", 3));
        assert!(parse("after-commit").is_err());
        assert!(parse("after-commit@0").is_err());
        let unknown = parse("somewhere@1").err().unwrap_or_default();
        assert!(unknown.contains("known: before-commit"), "{unknown}");
    }
}
