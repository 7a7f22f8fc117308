//! Messages the client cannot read, read another way.
//!
//! `async-nats` never yields a message whose header block it cannot parse
//! (see [`super::raw`]): it drops its connection, or its connection task
//! stops. JetStream would redeliver such a message after every ack wait,
//! for ever, and each delivery would break the connection again. So after
//! every (re)connection and before pulling, each durable is swept: its
//! pending messages (from the ack floor up to the last delivered stream
//! sequence, on its filter subject) that the pipeline does not hold are
//! fetched through the message-get API, and one whose block
//! [`super::raw::readable`] refuses, or whose subject was not UTF-8
//! ([`super::raw::subject_unreadable`]: the client drops its connection on
//! one), is handed to the pipeline like any message: headers read by [`super::raw::headers`], key and position as
//! for a pulled message.
//!
//! Invariants:
//! - A rescued message is held like a pulled one: kept alive with `+WPI`
//!   from the moment it is found (so the server does not hand it to the
//!   client again) and acknowledged only when settled, through its ack
//!   subject `$JS.ACK.<stream>.<durable>.1.<sequence>.0.0.0`, which names
//!   the stream sequence (the server takes the delivery sequence from its
//!   own pending record).
//! - A message is never both pulled and rescued: the client can read what
//!   it yields and only what [`super::raw::readable`] refuses is rescued;
//!   one already held (pulled or rescued) is skipped, checked and inserted
//!   under one lock.
//! - A rescued message settled but whose acknowledgement was lost is
//!   rescued again by a later sweep, with the same position and so the
//!   same event id: a duplicate the dedup mark drops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use tokio::sync::mpsc;

use super::{ConsumerSpec, Held, NatsConnection, NatsDelivery, key_of, raw, unpack_headers};
use crate::lock::Unpoisoned;
use crate::source::{Message, Position};

/// Most stored messages one sweep of one durable reads beyond its
/// pending count (acknowledged ones above a pending one, other subjects
/// being skipped by the server).
const SWEEP_SLACK: u64 = 64;
/// Most stored messages one sweep of one durable reads in all.
const SWEEP_MAX: u64 = 10_000;

/// Finds the messages of one handler's durables that the client cannot
/// read and hands them to its consumer.
#[derive(Clone)]
pub(super) struct Rescuer {
    pub connection: NatsConnection,
    pub spec: ConsumerSpec,
    pub held: Arc<Mutex<HashMap<u64, Held>>>,
    pub next_delivery: Arc<AtomicU64>,
    pub found: mpsc::UnboundedSender<(Message, NatsDelivery)>,
}

impl Rescuer {
    /// Sweeps the durable of topic number `scope` (`topic`), whose state
    /// is `info`. Failures are logged: the next sweep tries again.
    pub async fn sweep(&self, scope: u64, topic: &str, info: &jetstream::consumer::Info) {
        if info.num_ack_pending == 0 {
            return;
        }
        let durable = &info.name;
        let stream = &info.stream_name;
        let last = info.delivered.stream_sequence;
        let mut budget = (info.num_ack_pending as u64 + SWEEP_SLACK).min(SWEEP_MAX);
        let mut from = info.ack_floor.stream_sequence + 1;
        let client = self.connection.client();
        while from <= last && budget > 0 {
            let stored = match raw::get(&client, stream, from, topic).await {
                Ok(Some(stored)) if stored.sequence <= last => stored,
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(durable = %durable, error = %format!("{err:#}"),
                        "cannot look for messages the NATS client cannot read; trying at the next reconnection");
                    return;
                }
            };
            budget -= 1;
            from = stored.sequence + 1;
            if raw::readable(&stored.block) && !raw::subject_unreadable(&stored.subject) {
                continue;
            }
            self.hand_over(scope, durable, stream, stored);
        }
    }

    /// Holds `stored` and queues it for the consumer, unless it is held.
    fn hand_over(&self, scope: u64, durable: &str, stream: &str, stored: raw::Stored) {
        let reply = format!("$JS.ACK.{stream}.{durable}.1.{}.0.0.0", stored.sequence);
        let id = self.next_delivery.fetch_add(1, Ordering::Relaxed);
        {
            let mut held = self.held.locked();
            if held
                .values()
                .any(|h| h.scope == scope && h.sequence == stored.sequence)
            {
                return;
            }
            held.insert(
                id,
                Held {
                    reply: reply.clone().into(),
                    scope,
                    sequence: stored.sequence,
                },
            );
        }
        tracing::warn!(durable = %durable, stream = %stream, sequence = stored.sequence,
            subject = %stored.subject.escape_debug(),
            "a message the NATS client cannot read (a subject or headers not UTF-8, a header line without ':', a carriage return in a value, or a status line) is handled as read from the stream");
        let mut headers = raw::headers(&stored.block);
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        unpack_headers(&mut headers);
        let key = key_of(&headers, &stored.subject);
        let message = Message {
            topic: stored.subject,
            key: Some(key),
            payload: stored.payload,
            headers,
            timestamp_ms: stored.stored_ms,
            // Delivered at least once before: to a client that lost it.
            position: Position::JetStream {
                stream: stream.to_string(),
                sequence: stored.sequence,
                delivered: 2,
            },
            scope,
        };
        let delivery = NatsDelivery {
            id,
            reply: reply.into(),
            scope,
        };
        if self.found.send((message, delivery)).is_err() {
            self.held.locked().remove(&id);
        }
    }
}
