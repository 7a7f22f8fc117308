//! `weir dlq`: dead letters as an operator sees them — listed, replayed to
//! the topic they came from, purged.
//!
//! Everything here talks to the broker only (through an [`Archive`] and a
//! [`Publisher`]), never to a running weir or its database, so it works
//! whether weir runs or not.
//!
//! # Replay
//!
//! A replayed message is the original (key, payload, the headers it had)
//! with `weir.replay-of` (where the dead letter sits: `<dlq>/<position>`),
//! `weir.replayed-at` and `weir.replay-id`: the dead letter's event id with
//! `#replay:<dlq>/<position>` appended. Weir takes `weir.replay-id` as the
//! event's id ([`decode`](crate::pipeline::decode)), so:
//!
//! - the dedup mark the dead-lettered event left does not swallow the
//!   replay (a new id), and
//! - replaying the same dead letter twice handles it once (the same id).
//!
//! A replay leaves the dead letter where it is; `weir dlq purge` removes it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::message::{Message, Position};
use crate::pipeline::dlq::{ADDED, REPLAY_ID, REPLAY_OF, REPLAYED_AT, runtime_failure};
use crate::source::{Archive, Publisher};

/// One dead letter, read back from its dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The dead-letter topic (or subject) it sits in.
    pub dlq: String,
    /// The handler that gave up on it.
    pub handler: String,
    /// The event id the handler saw.
    pub event_id: String,
    /// The last error.
    pub error: String,
    /// `retryable`, `retry-after` or `permanent`.
    pub kind: String,
    /// The handler's error category, if it named one.
    pub category: Option<String>,
    /// Attempts made.
    pub attempts: Option<u32>,
    /// The topic it was consumed from.
    pub origin_topic: String,
    /// Where in it (`partition@offset`, `stream#sequence`).
    pub origin: String,
    /// When it was dead-lettered.
    pub failed_at: Option<SystemTime>,
    /// The dead letter as stored (its position is in the dead-letter topic).
    pub message: Message,
}

fn text(message: &Message, name: &str) -> Option<String> {
    message
        .header(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

impl DeadLetter {
    /// Reads a dead letter Weir wrote; `None` for any other message.
    pub fn parse(dlq: &str, message: Message) -> Option<Self> {
        let handler = text(&message, "weir.handler")?;
        let origin_topic = text(&message, "weir.origin.topic")?;
        // As `Position`'s display form: `2@41`, `orders#7`,
        // `orders:1526919030474-55`, or the origin's message id.
        let origin = match (
            text(&message, "weir.origin.partition"),
            text(&message, "weir.origin.offset"),
            text(&message, "weir.origin.stream"),
            text(&message, "weir.origin.sequence"),
        ) {
            (Some(partition), Some(offset), ..) => format!("{partition}@{offset}"),
            (_, _, Some(stream), Some(sequence)) => format!("{stream}#{sequence}"),
            (_, _, Some(stream), None) => match text(&message, "weir.origin.entry_id") {
                Some(entry) => format!("{stream}:{entry}"),
                None => stream,
            },
            _ => text(&message, "weir.origin.message_id").unwrap_or_default(),
        };
        Some(Self {
            dlq: dlq.to_string(),
            handler,
            event_id: text(&message, "weir.event-id").unwrap_or_default(),
            error: text(&message, "weir.error").unwrap_or_default(),
            kind: text(&message, "weir.error.kind").unwrap_or_default(),
            category: text(&message, "weir.error.category"),
            attempts: text(&message, "weir.attempts").and_then(|a| a.parse().ok()),
            origin_topic,
            origin,
            failed_at: text(&message, "weir.failed-at")
                .and_then(|t| humantime::parse_rfc3339(&t).ok()),
            message,
        })
    }

    /// How long ago it was dead-lettered.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.failed_at
            .map(|at| now.duration_since(at).unwrap_or_default())
    }

    /// Where it sits: `<dlq>/<position>`.
    pub fn address(&self) -> String {
        format!("{}/{}", self.dlq, self.message.position)
    }

    /// The message a replay sends to [`origin_topic`](Self::origin_topic):
    /// key, payload and the original headers, with the replay headers (see
    /// "Replay" above).
    pub fn replay_headers(&self, now: SystemTime) -> Vec<(String, Vec<u8>)> {
        let mut headers: Vec<(String, Vec<u8>)> = self
            .message
            .headers
            .iter()
            .filter(|(name, _)| {
                !ADDED.contains(&name.as_str())
                    && ![REPLAY_OF, REPLAY_ID, REPLAYED_AT].contains(&name.as_str())
            })
            .cloned()
            .collect();
        let address = self.address();
        headers.push((REPLAY_OF.to_string(), address.clone().into_bytes()));
        headers.push((
            REPLAY_ID.to_string(),
            format!("{}#replay:{address}", self.event_id).into_bytes(),
        ));
        headers.push((
            REPLAYED_AT.to_string(),
            humantime::format_rfc3339_millis(now)
                .to_string()
                .into_bytes(),
        ));
        headers
    }

    /// As `weir dlq list --json` prints it.
    pub fn to_json(&self, now: SystemTime) -> Value {
        json!({
            "dlq": self.dlq,
            "position": self.message.position.to_string(),
            "handler": self.handler,
            "event_id": self.event_id,
            "error": self.error,
            "kind": self.kind,
            "category": self.category,
            "attempts": self.attempts,
            "origin_topic": self.origin_topic,
            "origin": self.origin,
            "failed_at": self.failed_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            "age_seconds": self.age(now).map(|a| a.as_secs()),
            "key": self.message.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "payload_len": self.message.payload.len(),
        })
    }
}

/// Which dead letters a command acts on.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this handler's.
    pub handler: Option<String>,
    /// Only those dead-lettered at most this long ago.
    pub since: Option<Duration>,
    /// Only those dead-lettered at least this long ago.
    pub older_than: Option<Duration>,
    /// Only those of this kind, category or error type (`permanent`,
    /// `validation`, `timeout`, …).
    pub error_kind: Option<String>,
    /// Only these event ids.
    pub event_ids: Vec<String>,
}

impl Filter {
    /// Whether `letter` is selected, `now`.
    pub fn matches(&self, letter: &DeadLetter, now: SystemTime) -> bool {
        let age = letter.age(now);
        self.handler.as_ref().is_none_or(|h| *h == letter.handler)
            && self
                .since
                .is_none_or(|since| age.is_some_and(|age| age <= since))
            && self
                .older_than
                .is_none_or(|older| age.is_some_and(|age| age >= older))
            && self.error_kind.as_ref().is_none_or(|wanted| {
                *wanted == letter.kind
                    || letter.category.as_ref() == Some(wanted)
                    || runtime_failure(&letter.error) == Some(wanted.as_str())
            })
            && (self.event_ids.is_empty() || self.event_ids.contains(&letter.event_id))
    }
}

/// The dead letters of `dlqs` that `filter` selects, and everything read
/// from each (for [`Archive::remove`]).
pub struct Listing {
    /// Selected, oldest first within each dead-letter topic.
    pub selected: Vec<DeadLetter>,
    /// Every position read, per dead-letter topic.
    pub read: BTreeMap<String, Vec<Position>>,
    /// Per dead-letter topic: every dead letter in it (depth), and the
    /// oldest one's age.
    pub summary: BTreeMap<String, (usize, Option<Duration>)>,
}

/// Reads `dlqs` and selects with `filter`.
///
/// # Errors
///
/// When a topic cannot be read.
pub async fn list<A: Archive>(
    archive: &A,
    dlqs: &[String],
    filter: &Filter,
    now: SystemTime,
) -> anyhow::Result<Listing> {
    let mut listing = Listing {
        selected: Vec::new(),
        read: BTreeMap::new(),
        summary: BTreeMap::new(),
    };
    for dlq in dlqs {
        let messages = archive.read_all(dlq).await?;
        let mut depth = 0;
        let mut oldest: Option<Duration> = None;
        let mut read = Vec::with_capacity(messages.len());
        for message in messages {
            read.push(message.position.clone());
            let Some(letter) = DeadLetter::parse(dlq, message) else {
                continue;
            };
            depth += 1;
            if let Some(age) = letter.age(now) {
                oldest = Some(oldest.map_or(age, |o| o.max(age)));
            }
            if filter.matches(&letter, now) {
                listing.selected.push(letter);
            }
        }
        listing.read.insert(dlq.clone(), read);
        listing.summary.insert(dlq.clone(), (depth, oldest));
    }
    Ok(listing)
}

/// Sends each of `letters` back to its origin topic (see "Replay" above);
/// returns how many were sent. Stops at the first that cannot be.
///
/// # Errors
///
/// When the broker does not acknowledge a replayed message.
pub async fn replay<P: Publisher>(
    publisher: &P,
    letters: &[&DeadLetter],
    now: SystemTime,
) -> anyhow::Result<usize> {
    let mut sent = 0;
    for letter in letters {
        let headers = letter.replay_headers(now);
        let id = headers
            .iter()
            .find(|(name, _)| name == REPLAY_ID)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::to_string);
        publisher
            .send(
                &letter.origin_topic,
                letter.message.key.as_deref(),
                &letter.message.payload,
                &headers,
                id.as_deref(),
            )
            .await
            .map_err(|err| {
                anyhow::anyhow!(
                    "replayed {sent} of {}; cannot replay {} (event {}) to {:?}: {err:#}",
                    letters.len(),
                    letter.address(),
                    letter.event_id,
                    letter.origin_topic
                )
            })?;
        tracing::info!(event = "dlq_replayed", handler = %letter.handler, event_id = %letter.event_id,
            dlq = %letter.dlq, position = %letter.message.position, topic = %letter.origin_topic,
            "dead letter replayed");
        sent += 1;
    }
    Ok(sent)
}

/// Removes `letters` from their dead-letter topics as far as the broker
/// allows (see [`Archive::remove`]); returns how many were removed.
///
/// # Errors
///
/// When the broker refuses.
pub async fn purge<A: Archive>(
    archive: &A,
    listing: &Listing,
    letters: &[DeadLetter],
) -> anyhow::Result<usize> {
    let mut by_dlq: BTreeMap<&str, Vec<Position>> = BTreeMap::new();
    for letter in letters {
        by_dlq
            .entry(letter.dlq.as_str())
            .or_default()
            .push(letter.message.position.clone());
    }
    let mut removed = 0;
    for (dlq, selected) in by_dlq {
        let read = listing.read.get(dlq).map_or(&[][..], Vec::as_slice);
        removed += archive.remove(dlq, &selected, read).await?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_letter(kind: &str, category: Option<&str>, failed_at: &str) -> Message {
        let mut headers: Vec<(String, Vec<u8>)> = vec![
            ("event_id".into(), b"ev-1".to_vec()),
            ("traceparent".into(), b"00-a-b-01".to_vec()),
        ];
        for (name, value) in [
            ("weir.handler", "orders"),
            ("weir.error", "bad"),
            ("weir.error.kind", kind),
            ("weir.attempts", "3"),
            ("weir.origin.topic", "orders"),
            ("weir.origin.partition", "1"),
            ("weir.origin.offset", "42"),
            ("weir.event-id", "ev-1"),
            ("weir.failed-at", failed_at),
        ] {
            headers.push((name.into(), value.as_bytes().to_vec()));
        }
        if let Some(category) = category {
            headers.push(("weir.error.category".into(), category.as_bytes().to_vec()));
        }
        Message {
            topic: "orders.dlq".into(),
            key: Some(b"k".to_vec()),
            payload: b"{}".to_vec(),
            headers,
            timestamp_ms: None,
            position: Position::Kafka {
                partition: 0,
                offset: 7,
            },
            scope: 0,
        }
    }

    #[test]
    fn a_dead_letter_reads_back_and_replays_as_the_original() {
        let now = humantime::parse_rfc3339("2026-11-26T10:00:00Z").expect("time");
        let letter = DeadLetter::parse(
            "orders.dlq",
            dead_letter("permanent", Some("validation"), "2026-11-26T09:00:00.000Z"),
        )
        .expect("a dead letter");
        assert_eq!(letter.origin, "1@42");
        assert_eq!(letter.attempts, Some(3));
        assert_eq!(letter.age(now), Some(Duration::from_secs(3600)));
        let headers = letter.replay_headers(now);
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["event_id", "traceparent", REPLAY_OF, REPLAY_ID, REPLAYED_AT]
        );
        assert_eq!(headers[3].1, b"ev-1#replay:orders.dlq/0@7".to_vec());
        assert!(
            DeadLetter::parse(
                "orders.dlq",
                Message {
                    headers: vec![],
                    ..dead_letter("permanent", None, "")
                }
            )
            .is_none()
        );
    }

    #[test]
    fn filters_select_by_handler_age_and_kind() {
        let now = humantime::parse_rfc3339("2026-11-26T10:00:00Z").expect("time");
        let letter = DeadLetter::parse(
            "orders.dlq",
            dead_letter("retryable", None, "2026-11-26T09:59:00Z"),
        )
        .expect("a dead letter");
        let filter = |f: Filter| f.matches(&letter, now);
        assert!(filter(Filter::default()));
        assert!(filter(Filter {
            handler: Some("orders".into()),
            since: Some(Duration::from_secs(120)),
            error_kind: Some("retryable".into()),
            ..Filter::default()
        }));
        assert!(!filter(Filter {
            since: Some(Duration::from_secs(30)),
            ..Filter::default()
        }));
        assert!(!filter(Filter {
            older_than: Some(Duration::from_secs(120)),
            ..Filter::default()
        }));
        assert!(!filter(Filter {
            error_kind: Some("validation".into()),
            ..Filter::default()
        }));
        assert!(!filter(Filter {
            event_ids: vec!["ev-2".into()],
            ..Filter::default()
        }));
    }
}
