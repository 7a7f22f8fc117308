//! Group lookups: the dedup lookups and state reads of every message in
//! flight, gathered into one query per kind, as the writer gathers writes
//! into one transaction.
//!
//! Every message asks for its dedup mark and attempts, and a stateful
//! handler for its keys; one query per ask would cost a round trip and a
//! statement each. One task takes whatever is queued (at most
//! [`MAX_LOOKUPS`]), asks PostgreSQL once per kind with arrays, and answers
//! each asker; asks arriving meanwhile form the next group.
//!
//! Invariant ("Lookups" in [`store`](crate::store)): a lookup is queued after its
//! caller's earlier writes returned, and the query that answers it starts
//! after it was queued, so it sees every commit that returned before it was
//! asked.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{Seen, Shared};
use crate::store::now_ms;

/// Most asks answered by one round of queries.
const MAX_LOOKUPS: usize = 1024;

type Answer<T> = oneshot::Sender<Result<T, String>>;
/// A state value and its version, if the key is set.
type Value = Option<(u64, Vec<u8>)>;

/// One ask.
pub(super) enum Lookup {
    /// The event's mark and attempts.
    Seen {
        handler: String,
        id: String,
        answer: Answer<Seen>,
    },
    /// A state key's version and value.
    Get {
        handler: String,
        key: String,
        answer: Answer<Value>,
    },
}

/// The statements of one schema.
pub(super) struct Statements {
    seen: String,
    get: String,
}

impl Statements {
    /// `s` is the quoted schema name.
    pub(super) fn new(s: &str) -> Self {
        Self {
            seen: format!(
                "SELECT t.h, t.i, d.expires_ms, a.attempts \
                 FROM unnest($1::text[], $2::text[]) AS t(h, i) \
                 LEFT JOIN {s}.dedup d ON d.handler = t.h AND d.event_id = t.i \
                 LEFT JOIN {s}.attempts a ON a.handler = t.h AND a.event_id = t.i"
            ),
            get: format!(
                "SELECT s.handler, s.key, s.version, s.value \
                 FROM unnest($1::text[], $2::text[]) AS t(h, k) \
                 JOIN {s}.state s ON s.handler = t.h AND s.key = t.k"
            ),
        }
    }
}

/// Answers asks until every sender is gone.
pub(super) async fn run(shared: Arc<Shared>, mut asks: mpsc::UnboundedReceiver<Lookup>) {
    let mut group = Vec::new();
    while asks.recv_many(&mut group, MAX_LOOKUPS).await > 0 {
        answer(&shared, std::mem::take(&mut group)).await;
    }
}

type Pair = (String, String);

async fn answer(shared: &Shared, group: Vec<Lookup>) {
    let mut seen: Vec<(Pair, Answer<Seen>)> = Vec::new();
    let mut gets: Vec<(Pair, Answer<Value>)> = Vec::new();
    for ask in group {
        match ask {
            Lookup::Seen {
                handler,
                id,
                answer,
            } => seen.push(((handler, id), answer)),
            Lookup::Get {
                handler,
                key,
                answer,
            } => gets.push(((handler, key), answer)),
        }
    }
    let result = query(shared, &seen, &gets).await;
    match result {
        Ok((marks, values)) => {
            let now = now_ms() as i64;
            for (pair, answer) in seen {
                let (expires, attempts) = marks.get(&pair).copied().unwrap_or_default();
                let _ = answer.send(Ok(Seen {
                    done: expires.is_some_and(|at| at > now),
                    attempts: attempts.map_or(0, |n| n.max(0) as u32),
                }));
            }
            for (pair, answer) in gets {
                let _ = answer.send(Ok(values.get(&pair).cloned()));
            }
        }
        Err(err) => {
            for (_, answer) in seen {
                let _ = answer.send(Err(err.clone()));
            }
            for (_, answer) in gets {
                let _ = answer.send(Err(err.clone()));
            }
        }
    }
}

type Marks = HashMap<Pair, (Option<i64>, Option<i32>)>;
type Values = HashMap<Pair, (u64, Vec<u8>)>;

/// Both queries, sent together on one connection.
async fn query(
    shared: &Shared,
    seen: &[(Pair, Answer<Seen>)],
    gets: &[(Pair, Answer<Value>)],
) -> Result<(Marks, Values), String> {
    let client = shared.pool.get().await.map_err(|e| e.to_string())?;
    let sql = &shared.sql.lookup;
    let seen_statement = client
        .prepare_cached(&sql.seen)
        .await
        .map_err(|e| e.to_string())?;
    let get_statement = client
        .prepare_cached(&sql.get)
        .await
        .map_err(|e| e.to_string())?;
    let (sh, si): (Vec<&str>, Vec<&str>) = seen
        .iter()
        .map(|((h, i), _)| (h.as_str(), i.as_str()))
        .unzip();
    let (gh, gk): (Vec<&str>, Vec<&str>) = gets
        .iter()
        .map(|((h, k), _)| (h.as_str(), k.as_str()))
        .unzip();
    let marks = async {
        if sh.is_empty() {
            Ok(Vec::new())
        } else {
            client.query(&seen_statement, &[&sh, &si]).await
        }
    };
    let values = async {
        if gh.is_empty() {
            Ok(Vec::new())
        } else {
            client.query(&get_statement, &[&gh, &gk]).await
        }
    };
    let (marks, values) = tokio::try_join!(marks, values).map_err(|e| e.to_string())?;
    Ok((
        marks
            .iter()
            .map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3))))
            .collect(),
        values
            .iter()
            .map(|row| {
                (
                    (row.get(0), row.get(1)),
                    (row.get::<_, i64>(2) as u64, row.get(3)),
                )
            })
            .collect(),
    ))
}
