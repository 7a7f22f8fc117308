//! Reloading, decided without doing it: which served handlers retire, and
//! what a newly loaded version of a handler needs — a start, a swap of the
//! compiled component under the running consumer, or a restart of the
//! consumer. [`Runtime::reload`](super::Runtime::reload) carries it out.
//!
//! Invariant: a version is swapped in only when every manifest field the
//! running worker and consumer were built from is unchanged. [`swappable`]
//! names every field of [`Manifest`] (no `..`), so a new field does not
//! compile until it is sorted into "travels with the component" or "needs
//! a restart".

use std::collections::BTreeSet;

use crate::registry::{Manifest, ManifestLimits};

/// What a newly loaded version of a handler needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// Not served yet: start a worker and a consumer.
    Start,
    /// Served with the same consumer and pipeline settings: swap the
    /// compiled component in; the consumer keeps its group membership and
    /// position.
    Swap,
    /// Served with other consumer or pipeline settings: the worker drains,
    /// commits and leaves its group, then starts again with the new ones.
    Restart,
}

/// What the version of a handler with manifest `new` needs, when the one
/// served now has manifest `served` (`None`: not served).
pub(super) fn change(served: Option<&Manifest>, new: &Manifest) -> Change {
    match served {
        None => Change::Start,
        Some(old) if swappable(old, new) => Change::Swap,
        Some(_) => Change::Restart,
    }
}

/// The handlers among `served` whose file is no longer among `present`:
/// they drain and leave their groups.
pub(super) fn retired<'a>(
    served: impl IntoIterator<Item = &'a String>,
    present: &BTreeSet<String>,
) -> Vec<String> {
    served
        .into_iter()
        .filter(|name| !present.contains(*name))
        .cloned()
        .collect()
}

/// Whether a worker built from manifest `a` can serve a version whose
/// manifest is `b`: they differ at most in what travels with the compiled
/// component — `[limits]` other than `concurrency` (resolved into the
/// component's limits), `[config]` and `[sandbox]`.
fn swappable(a: &Manifest, b: &Manifest) -> bool {
    // Every field, so that a new one must be placed (see the module
    // documentation).
    let Manifest {
        topics,
        group,
        start,
        ordering,
        key,
        max_in_flight,
        dedup,
        retry,
        limits,
        dlq,
        breaker,
        config: _,
        sandbox: _,
        nats,
        rabbitmq,
        redis,
        sqs,
    } = a;
    let ManifestLimits {
        concurrency,
        memory: _,
        timeout: _,
        fuel: _,
        table_elements: _,
        instances: _,
    } = limits;
    *topics == b.topics
        && *group == b.group
        && *start == b.start
        && *ordering == b.ordering
        && *key == b.key
        && *max_in_flight == b.max_in_flight
        && *dedup == b.dedup
        && *retry == b.retry
        && *concurrency == b.limits.concurrency
        && *dlq == b.dlq
        && *breaker == b.breaker
        && *nats == b.nats
        && *rabbitmq == b.rabbitmq
        && *redis == b.redis
        && *sqs == b.sqs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(text: &str) -> Manifest {
        crate::parse::parse_toml(std::path::Path::new("m.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = "topics = [\"orders\"]\n";

    #[test]
    fn a_new_handler_starts() {
        assert_eq!(change(None, &manifest(BASE)), Change::Start);
    }

    #[test]
    fn what_travels_with_the_component_is_swapped_in() {
        let old = manifest(BASE);
        for new in [
            BASE.to_string(),
            format!("{BASE}[limits]\nmemory = \"32MiB\"\ntimeout = \"2s\"\n"),
            format!("{BASE}[config]\ngreeting = \"hello\"\n"),
            format!("{BASE}[sandbox.env]\nLANG = \"C\"\n"),
        ] {
            assert_eq!(change(Some(&old), &manifest(&new)), Change::Swap, "{new}");
        }
    }

    #[test]
    fn consumer_and_pipeline_settings_restart_the_consumer() {
        let old = manifest(BASE);
        for new in [
            "topics = [\"orders\", \"refunds\"]\n".to_string(),
            format!("{BASE}group = \"other\"\n"),
            format!("{BASE}start = \"latest\"\n"),
            format!("{BASE}ordering = \"partition\"\n"),
            format!("{BASE}key = [\"header:customer\"]\n"),
            format!("{BASE}max_in_flight = 7\n"),
            format!("{BASE}[dedup]\nenabled = false\n"),
            format!("{BASE}[retry]\nmax_attempts = 2\n"),
            format!("{BASE}[limits]\nconcurrency = 1\n"),
            format!("{BASE}[dlq]\nsuffix = \".dead\"\n"),
            // The breaker is built with the worker: a swap would keep the
            // old one.
            format!("{BASE}[breaker]\n"),
            format!("{BASE}[nats]\nack_wait = \"5s\"\n"),
        ] {
            assert_eq!(
                change(Some(&old), &manifest(&new)),
                Change::Restart,
                "{new}"
            );
        }
    }

    #[test]
    fn handlers_whose_file_is_gone_retire() {
        let served = ["a".to_string(), "b".to_string(), "c".to_string()];
        let present: BTreeSet<String> = ["b".to_string(), "d".to_string()].into();
        assert_eq!(retired(&served, &present), ["a", "c"]);
    }
}
