//! The `weir dlq` command: which dead-letter topics a target means, the
//! broker to read them from, and what is printed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::dlq::{self, DeadLetter, Filter};
use crate::config::Config;
use crate::registry::{self, Manifest};
use crate::runtime::WithBroker;
use crate::source::Broker;

/// What `weir dlq` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Print the selected dead letters and a summary per dead-letter topic.
    List,
    /// Send the selected dead letters back to their topics.
    Replay,
    /// Remove the selected dead letters.
    Purge,
}

/// The command as given.
#[derive(Debug, Clone)]
pub struct Request {
    /// What to do.
    pub action: Action,
    /// A handler's name, a topic it consumes, or a dead-letter topic; none:
    /// every handler's dead-letter topics.
    pub target: Option<String>,
    /// Which dead letters.
    pub filter: Filter,
    /// At most this many (oldest first within each dead-letter topic).
    pub limit: Option<usize>,
    /// Say what would be done, do nothing.
    pub dry_run: bool,
    /// Purge: allowed without a filter.
    pub all: bool,
    /// Print JSON.
    pub json: bool,
}

/// The handlers in `dir` (those with a manifest and a component), by name,
/// found as `weir run` finds them ([`registry::discover`]).
fn handlers_in(dir: &Path) -> anyhow::Result<Vec<(String, Manifest)>> {
    let files = registry::discover(dir).map_err(|err| {
        anyhow::anyhow!(
            "cannot read the handlers directory {}: {err}",
            dir.display()
        )
    })?;
    let mut handlers = Vec::new();
    for wasm in files {
        let manifest = wasm.with_extension("toml");
        if manifest.exists() {
            let name = wasm
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            handlers.push((name, Manifest::load(&manifest)?));
        }
    }
    Ok(handlers)
}

/// Where Weir itself would write a dead letter: (dead-letter topic, handler,
/// origin topic) for every topic of every handler in `dir`. A replay goes
/// only along these routes, so a message shaped like a dead letter (a
/// producer can write one into a dead-letter topic, or set `weir.*` headers
/// of its own) can never make `weir dlq replay` publish to a topic of its
/// choosing.
fn routes(handlers: &[(String, Manifest)]) -> BTreeSet<(String, String, String)> {
    handlers
        .iter()
        .flat_map(|(name, manifest)| {
            manifest
                .topics
                .iter()
                .map(|topic| (manifest.dlq.destination(topic), name.clone(), topic.clone()))
        })
        .collect()
}

/// Why `letter` cannot be replayed, if it cannot: it sits where its
/// handler writes no dead letters of its origin topic (so Weir did not
/// write it), or it was sent without its payload.
fn refusal(letter: &DeadLetter, routes: &BTreeSet<(String, String, String)>) -> Option<String> {
    let route = (
        letter.dlq.clone(),
        letter.handler.clone(),
        letter.origin_topic.clone(),
    );
    if !routes.contains(&route) {
        return Some(format!(
            "handler {:?} writes no dead letters of topic {:?} there, so it is not Weir's",
            letter.handler, letter.origin_topic
        ));
    }
    letter
        .message
        .header(crate::pipeline::dlq::PAYLOAD_DROPPED)
        .map(|what| {
            format!(
                "its payload was left out ({})",
                String::from_utf8_lossy(what)
            )
        })
}

/// The dead-letter topics `target` means, given `handlers`, and the handler
/// it names (if it names one).
fn resolve(
    handlers: &[(String, Manifest)],
    target: Option<&str>,
) -> anyhow::Result<(Vec<String>, Option<String>)> {
    let mut dlqs: Vec<String> = match target {
        None => handlers
            .iter()
            .flat_map(|(_, m)| m.dead_letter_topics())
            .collect(),
        Some(target) => {
            if let Some((name, manifest)) = handlers.iter().find(|(name, _)| name == target) {
                return Ok((manifest.dead_letter_topics(), Some(name.clone())));
            }
            let consumed: Vec<String> = handlers
                .iter()
                .filter(|(_, m)| m.topics.iter().any(|t| t == target))
                .map(|(_, m)| m.dlq.destination(target))
                .collect();
            if consumed.is_empty() {
                // Taken as a dead-letter topic itself.
                vec![target.to_string()]
            } else {
                consumed
            }
        }
    };
    dlqs.sort();
    dlqs.dedup();
    Ok((dlqs, None))
}

/// Runs `request` against the broker of `config`; returns what to print.
///
/// # Errors
///
/// When the broker cannot be reached or refuses, or the request is not
/// allowed (a purge of everything without `--all`).
pub async fn run(config: &Config, request: Request) -> anyhow::Result<String> {
    let handlers = handlers_in(&config.runtime.handlers_dir)?;
    let routes = routes(&handlers);
    let (dlqs, handler) = resolve(&handlers, request.target.as_deref())?;
    if dlqs.is_empty() {
        anyhow::bail!(
            "no dead-letter topic to read: no handler in {} (name a topic to read it directly)",
            config.runtime.handlers_dir.display()
        );
    }
    let mut request = request;
    if handler.is_some() && request.filter.handler.is_none() {
        // A dead-letter topic may hold several handlers' dead letters.
        request.filter.handler = handler;
    }
    if request.action == Action::Purge && !request.all && no_filter(&request.filter) {
        anyhow::bail!(
            "refusing to purge without a filter (--since, --older-than, --error-kind, --event-id); \
             add --all to remove every dead letter of {}",
            dlqs.join(", ")
        );
    }
    if config.is_embedded() {
        anyhow::bail!(
            "the embedded broker lives inside `weir run` and keeps nothing after it; \
             to read its dead letters, point [source.kafka] bootstrap_servers at the address it printed"
        );
    }
    let connected = crate::runtime::connect(config, &[]).await?;
    connected
        .run(Executing {
            dlqs: &dlqs,
            routes: &routes,
            request,
        })
        .await
}

/// What `weir dlq` does once connected.
struct Executing<'a> {
    dlqs: &'a [String],
    routes: &'a BTreeSet<(String, String, String)>,
    request: Request,
}

impl WithBroker for Executing<'_> {
    type Output = String;

    async fn run<B: Broker>(self, broker: B) -> anyhow::Result<String> {
        let archive = broker.archive()?;
        execute(
            &archive,
            &broker.publisher(),
            self.dlqs,
            self.routes,
            self.request,
        )
        .await
    }
}

/// A filter that selects by nothing but the handler.
fn no_filter(filter: &Filter) -> bool {
    filter.since.is_none()
        && filter.older_than.is_none()
        && filter.error_kind.is_none()
        && filter.event_ids.is_empty()
}

async fn execute<A: crate::source::Archive, P: crate::source::Publisher>(
    archive: &A,
    publisher: &P,
    dlqs: &[String],
    routes: &BTreeSet<(String, String, String)>,
    request: Request,
) -> anyhow::Result<String> {
    let now = SystemTime::now();
    let listing = dlq::list(archive, dlqs, &request.filter, now).await?;
    let chosen: &[DeadLetter] = match request.limit {
        Some(limit) => &listing.selected[..listing.selected.len().min(limit)],
        None => &listing.selected,
    };
    // Replay only what Weir could have written where it sits, with its
    // payload.
    let (routed, refused): (Vec<&DeadLetter>, Vec<&DeadLetter>) =
        chosen.iter().partition(|l| refusal(l, routes).is_none());
    let letters: Vec<Value> = chosen.iter().map(|l| l.to_json(now)).collect();
    let summary: Vec<Value> = listing
        .summary
        .iter()
        .map(|(dlq, (depth, oldest))| {
            json!({"dlq": dlq, "depth": depth, "oldest_age_seconds": oldest.map(|a| a.as_secs())})
        })
        .collect();
    let (done, verb) = match (request.action, request.dry_run) {
        (Action::List, _) => (0, ""),
        (Action::Replay, true) | (Action::Purge, true) => (0, "would"),
        (Action::Replay, false) => (dlq::replay(publisher, &routed, now).await?, "replayed"),
        (Action::Purge, false) => (dlq::purge(archive, &listing, chosen).await?, "removed"),
    };
    if request.json {
        let mut out = json!({"dead_letters": letters, "summary": summary});
        match request.action {
            Action::List => {}
            Action::Replay => {
                out["replayed"] = json!(done);
                out["dry_run"] = json!(request.dry_run);
                out["refused"] = json!(refused.iter().map(|l| l.address()).collect::<Vec<_>>());
            }
            Action::Purge => {
                out["removed"] = json!(done);
                out["dry_run"] = json!(request.dry_run);
            }
        }
        return Ok(format!("{out}\n"));
    }
    let mut out = String::new();
    for (dlq, (depth, oldest)) in &listing.summary {
        let oldest = oldest.map_or(String::new(), |age| format!(", oldest {} ago", short(age)));
        out.push_str(&format!("{dlq}: {depth} dead letter(s){oldest}\n"));
    }
    for letter in chosen {
        out.push_str(&format!("  {}\n", line(letter, now)));
    }
    let selected = chosen.len();
    match (request.action, request.dry_run) {
        (Action::List, _) => {
            if selected < listing.selected.len() {
                out.push_str(&format!(
                    "{selected} of {} selected shown (--limit)\n",
                    listing.selected.len()
                ));
            }
        }
        (Action::Replay, true) => out.push_str(&format!(
            "{verb} replay {} dead letter(s) to their topics (dry run: nothing sent)\n",
            routed.len()
        )),
        (Action::Replay, false) => out.push_str(&format!(
            "{verb} {done} dead letter(s) to their topics; each is handled again once (weir.replay-id)\n"
        )),
        (Action::Purge, true) => out.push_str(&format!(
            "{verb} remove {selected} dead letter(s) (dry run: nothing removed)\n"
        )),
        (Action::Purge, false) => {
            out.push_str(&format!("{verb} {done} of {selected} selected dead letter(s)\n"));
            if done < selected {
                out.push_str(
                    "the rest sit behind dead letters the filter keeps: Kafka removes only a partition's oldest records\n",
                );
            }
        }
    }
    if request.action == Action::Replay {
        for letter in &refused {
            out.push_str(&format!(
                "refused {}: {}; not replayed\n",
                letter.address(),
                refusal(letter, routes).unwrap_or_default()
            ));
        }
    }
    Ok(out)
}

/// One dead letter on one line.
fn line(letter: &DeadLetter, now: SystemTime) -> String {
    let kind = match &letter.category {
        Some(category) => format!("{}/{category}", letter.kind),
        None => letter.kind.clone(),
    };
    let age = letter
        .age(now)
        .map_or_else(|| "?".to_string(), |a| format!("{} ago", short(a)));
    format!(
        "{position}  {handler}  {id}  {kind}  {attempts} attempt(s)  from {topic} {origin}  {age}  {error}",
        position = letter.message.position,
        handler = letter.handler,
        id = letter.event_id,
        attempts = letter
            .attempts
            .map_or_else(|| "?".to_string(), |a| a.to_string()),
        topic = letter.origin_topic,
        origin = letter.origin,
        error = letter.error,
    )
}

/// A duration in its largest unit or two: `45s`, `3m12s`, `2h5m`, `3d4h`.
fn short(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}
