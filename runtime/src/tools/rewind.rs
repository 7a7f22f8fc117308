//! `weir rewind` (first named `weir replay`): rebuild what a handler computed by handling its input
//! again — move its consumer back, forget its dedup marks (and, for a
//! rebuild, its state and pending outbox rows).
//!
//! From the command line it works on a stopped weir: it opens the
//! handler's database (which a running weir holds) and commits consumer
//! positions from outside the group (which the broker refuses while a
//! member is running). It says exactly what it will do, and does it only
//! with `--yes`. A running weir does the same through its admin API
//! (`POST /handlers/{name}/rewind`, `Runtime::rewind`), stopping the
//! handler's consumer around it.
//!
//! Order, and what a stop halfway leaves: the broker is asked first
//! whether it can move the position (a queue broker never can; a Kafka
//! group or JetStream durable with an active consumer cannot now), and a
//! refusal ends the rewind with nothing forgotten. Then the store forgets
//! (one durable transaction), then the broker position moves. Stopped
//! between the two, nothing is handled twice and nothing is lost: the
//! handler simply continues where it was with empty marks (and state, with
//! `--reset-state`); running the same rewind again completes it.

use std::fmt::Write as _;

use crate::config::Config;
use crate::registry::Manifest;
use crate::runtime::{WithBroker, subscription};
use crate::source::progress::Progress;
use crate::source::{Broker, Rewind};
use crate::store::{Footprint, Write};

/// The command as given.
#[derive(Debug, Clone)]
pub struct Request {
    /// The handler (its file stem).
    pub handler: String,
    /// Where its consumer starts again.
    pub from: Rewind,
    /// Also forget its state and pending outbox rows (a rebuild).
    pub reset_state: bool,
    /// Do it (otherwise only say what would be done).
    pub yes: bool,
}

/// Runs `request`; returns what to print.
///
/// # Errors
///
/// When the handler, its database or its broker cannot be reached, or the
/// broker refuses (a weir serving the handler is running).
pub async fn run(config: &Config, request: &Request) -> anyhow::Result<String> {
    let manifest_path = config
        .runtime
        .handlers_dir
        .join(format!("{}.toml", request.handler));
    let manifest = Manifest::load(&manifest_path)
        .map_err(|err| anyhow::anyhow!("handler {:?}: {err}", request.handler))?;
    let group = manifest.group_for(&request.handler);
    let store = crate::runtime::open_store(config).await.map_err(|err| {
        anyhow::anyhow!(
            "{err:#}: if a running weir holds it, stop it first, or ask it: \
             curl -X POST 'http://<[admin] listen>/handlers/{}/rewind?from=earliest&reset_state=true'",
            request.handler
        )
    })?;
    let footprint = store.footprint(&request.handler).await?;
    let mut out = String::new();
    let verb = if request.yes { "" } else { "would " };
    let _ = writeln!(
        out,
        "weir rewind {} (group {group}, topics {}):",
        request.handler,
        manifest.topics.join(", ")
    );
    describe_store(&mut out, verb, &footprint, request.reset_state);
    if config.is_embedded() {
        anyhow::bail!(
            "the embedded broker keeps nothing after `weir run` stops: there is nothing to rewind"
        );
    }
    let connected = crate::runtime::connect(config, &[]).await?;
    let mut out = connected
        .run(Rewinding {
            handler: &request.handler,
            manifest,
            group,
            request,
            store,
            out,
        })
        .await?;
    if request.yes {
        out.push_str("done: start weir to handle the rewound messages\n");
    } else {
        out.push_str("nothing done: run again with --yes to do it\n");
    }
    Ok(out)
}

/// The broker's part of a rewind, after the store's was described.
struct Rewinding<'a> {
    handler: &'a str,
    manifest: Manifest,
    group: String,
    request: &'a Request,
    store: crate::store::Store,
    out: String,
}

impl WithBroker for Rewinding<'_> {
    type Output = String;

    async fn run<B: Broker>(self, broker: B) -> anyhow::Result<String> {
        let Rewinding {
            handler,
            manifest,
            group,
            request,
            store,
            mut out,
        } = self;
        let consumer = subscription::<B>(handler, &manifest, &group, Progress::default());
        // Whether the broker can rewind, asked before anything is
        // forgotten (see "Order" above): a refusal leaves the store
        // untouched.
        let moves = broker
            .rewind(&consumer, request.from, false)
            .await
            .map_err(|err| anyhow::anyhow!("{err:#}; nothing was forgotten"))?;
        if request.yes {
            // The store first (see "Order" above).
            store
                .write(Write::Forget {
                    handler: handler.to_string(),
                    state: request.reset_state,
                })
                .await?;
            drop(store);
            for line in broker.rewind(&consumer, request.from, true).await? {
                let _ = writeln!(out, "  {line}");
            }
        } else {
            drop(store);
            for line in moves {
                let _ = writeln!(out, "  {line}");
            }
        }
        Ok(out)
    }
}

fn describe_store(out: &mut String, verb: &str, footprint: &Footprint, reset: bool) {
    let _ = writeln!(
        out,
        "  {verb}forget {} dedup mark(s) and {} attempt count(s)",
        footprint.marks, footprint.attempts
    );
    if reset {
        let _ = writeln!(
            out,
            "  {verb}delete {} state key(s) and {} emitted event(s) not yet published",
            footprint.state_keys, footprint.outbox_rows
        );
    } else if footprint.state_keys > 0 {
        let _ = writeln!(
            out,
            "  keep its {} state key(s) (--reset-state to rebuild them from the input)",
            footprint.state_keys
        );
    }
}
