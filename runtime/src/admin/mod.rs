//! The admin HTTP server: what an operator and Prometheus look at.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | a status page (`status.html`, self-contained): each handler's rate, lag, in flight, retries, dead letters and version, refreshed every 2 s |
//! | `GET /metrics` | every metric (see `metrics.rs`), Prometheus text format |
//! | `GET /health/live` | 200 while the process serves requests |
//! | `GET /health/ready` | 200 when every handler file loaded, every worker runs, every consumer joined (Kafka: its group is up; JetStream: its durable answers), every handler's dead letters can be written (its dead-letter topic exists or was created), the store's writer is alive and the outbox relay is not blocked (no topic failing for 5 s), else 503; JSON saying what is not ready and why |
//! | `GET /handlers` | JSON: each handler's name, version, contract, group, topics, whether its consumer joined, its partitions (lag, committed position age), in flight, instances, counters and last error |
//! | `GET /handlers/{name}/state?prefix=&limit=` | JSON: the handler's committed state entries (key order), and the outbox length; `?key=K` for one key |
//! | `POST /handlers/{name}/replay?from=&reset_state=` | `weir replay` done by this process: the handler's consumer stops, its marks (and state) are forgotten, its position moves back to `from` (`earliest`, an RFC 3339 time, an offset), and it is served again; JSON `{"done": [...]}` |
//!
//! It listens on `[admin] listen` (default `127.0.0.1:9464`). Invariants:
//! the `GET` routes only read (nothing they answer changes what the
//! runtime does); the one route that acts, `POST …/replay`, only asks the
//! runtime's main loop through a channel, which does it between reloads
//! (see `Runtime::replay`); a port it cannot bind is reported once and the
//! process goes on consuming without it; listening beyond loopback is
//! said in the log.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::runtime::Status;
use crate::store::Store;

/// What the runtime is asked to do through the admin server.
#[derive(Debug)]
pub enum Command {
    /// Replay a handler's input (see `Runtime::replay`).
    Replay {
        /// The handler.
        handler: String,
        /// Where its consumer starts again.
        from: crate::source::Rewind,
        /// Also forget its state and pending outbox rows.
        reset_state: bool,
        /// What was done, one line each, or why not.
        reply: tokio::sync::oneshot::Sender<Result<Vec<String>, String>>,
    },
}

/// What the routes read, and where commands go.
#[derive(Clone)]
struct Admin {
    metrics: Metrics,
    status: Status,
    store: Store,
    commands: Option<tokio::sync::mpsc::Sender<Command>>,
}

/// Serves the admin routes on `listen` until `stop` turns true. Returns the
/// address bound (useful with port 0), or `None` when it cannot listen
/// (logged).
pub async fn serve(
    listen: SocketAddr,
    metrics: Metrics,
    status: Status,
    store: Store,
    commands: Option<tokio::sync::mpsc::Sender<Command>>,
    mut stop: watch::Receiver<bool>,
) -> Option<SocketAddr> {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(listen = %listen, error = %err,
                "[admin] listen: cannot listen; metrics, health and the admin API are unavailable (weir goes on consuming)");
            return None;
        }
    };
    let bound = listener.local_addr().unwrap_or(listen);
    if bound.ip().is_loopback() {
        tracing::info!(address = %bound, "admin server listening (metrics at /metrics, health at /health/ready)");
    } else {
        tracing::warn!(address = %bound,
            "admin server listening beyond loopback: anyone who can reach this address can read metrics, handler state and versions");
    }
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics_route))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/handlers", get(handlers))
        .route("/handlers/{name}/state", get(state))
        .route("/handlers/{name}/replay", axum::routing::post(replay))
        .with_state(Admin {
            metrics,
            status,
            store,
            commands,
        });
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %err, "admin server stopped");
        }
    });
    Some(bound)
}

async fn metrics_route(State(admin): State<Admin>) -> Response {
    if let (Ok(rows), Ok(oldest)) = (
        admin.store.outbox_len().await,
        admin.store.outbox_oldest_ms().await,
    ) {
        let age = oldest.map_or(std::time::Duration::ZERO, |committed| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.saturating_sub(std::time::Duration::from_millis(committed))
        });
        admin.metrics.outbox(rows, age);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.encode(),
    )
        .into_response()
}

/// The status page: one file, no external resources.
const STATUS_PAGE: &str = include_str!("status.html");

async fn page() -> Response {
    axum::response::Html(STATUS_PAGE).into_response()
}

async fn live() -> Response {
    (StatusCode::OK, axum::Json(json!({"live": true}))).into_response()
}

/// How long publishing to a topic may keep failing before the outbox relay
/// counts as blocked (shorter failures are retried without a word here).
const RELAY_BLOCKED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// What keeps the process from being ready, one reason per line.
async fn not_ready(admin: &Admin) -> Vec<Value> {
    let mut problems = Vec::new();
    let handlers = admin.status.handlers();
    if handlers.is_empty() {
        problems.push(json!({"check": "handlers", "reason": "no handlers"}));
    }
    for view in &handlers {
        if !view.alive.load(Ordering::SeqCst) {
            problems.push(json!({"check": "worker", "handler": view.name,
                "reason": "its worker stopped (see the log)"}));
        }
    }
    for (file, error) in admin.status.rejected() {
        problems.push(json!({"check": "load", "file": file, "reason": error}));
    }
    for view in &handlers {
        if let Some(why) = view.stats.dead_letters_blocked() {
            problems.push(json!({"check": "dead_letters", "handler": view.name, "reason": why}));
        }
        if let Some(why) = view.progress.joining() {
            problems.push(json!({"check": "consumer", "handler": view.name, "reason": why}));
        }
    }
    if let Some(why) = admin.store.probe().await {
        problems.push(json!({"check": "store", "database": admin.store.describe(), "reason": why}));
    }
    if let Some(relay) = admin.status.relay() {
        for (topic, failing, error) in relay.blocked(RELAY_BLOCKED_AFTER) {
            problems.push(json!({"check": "outbox", "topic": topic,
                "reason": format!("publishing emitted events to {topic:?} has failed for {} s: {error}", failing.as_secs())}));
        }
    }
    problems
}

async fn ready(State(admin): State<Admin>) -> Response {
    let problems = not_ready(&admin).await;
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"ready": problems.is_empty(), "not_ready": problems})),
    )
        .into_response()
}

async fn handlers(State(admin): State<Admin>) -> Response {
    let list: Vec<Value> = admin
        .status
        .handlers()
        .iter()
        .map(|view| {
            let partitions = view.progress.snapshot();
            // The group's lag over its partitions, where any is known.
            let known: Vec<i64> = partitions.iter().filter_map(|p| p.lag).collect();
            let lag = (!known.is_empty()).then(|| known.iter().sum::<i64>());
            let partitions: Vec<Value> = partitions
                .iter()
                .map(|p| {
                    json!({"topic": p.topic, "partition": p.partition, "lag": p.lag,
                        "position_age_seconds": p.position_age.as_secs_f64()})
                })
                .collect();
            let stats = &view.stats;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            json!({
                "name": view.name,
                "version": view.version,
                "contract": view.contract,
                "group": view.group,
                "topics": view.topics,
                "running": view.alive.load(Ordering::SeqCst),
                "joined": view.progress.joining().is_none(),
                "partitions": partitions,
                "in_flight": load(&stats.in_flight),
                "lag": lag,
                "instances_busy": load(&stats.instances_busy),
                "instances_idle": load(&stats.instances_idle),
                "last_error": stats.last_error(),
                "breaker": stats.breaker_state(),
                "handled": load(&stats.handled),
                "duplicates": load(&stats.duplicates),
                "dead_lettered": load(&stats.dead_lettered),
                "retries": load(&stats.retries),
                "conflicts": load(&stats.conflicts),
                "calls": load(&stats.calls),
            })
        })
        .collect();
    axum::Json(json!({"handlers": list})).into_response()
}

/// The query of `POST /handlers/{name}/replay`.
#[derive(serde::Deserialize)]
struct ReplayQuery {
    /// `earliest`, an RFC 3339 time, or an offset.
    from: String,
    /// Also forget the handler's state and pending outbox rows.
    #[serde(default)]
    reset_state: bool,
}

async fn replay(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    Query(query): Query<ReplayQuery>,
) -> Response {
    let answer = |code: StatusCode, body: Value| (code, axum::Json(body)).into_response();
    let from = match crate::tools::replay::parse_from(&query.from) {
        Ok(from) => from,
        Err(why) => return answer(StatusCode::BAD_REQUEST, json!({"error": why})),
    };
    if !admin.status.handlers().iter().any(|view| view.name == name) {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no handler {name:?} is served here")}),
        );
    }
    let Some(commands) = &admin.commands else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "this process does not take commands"}),
        );
    };
    let (reply, replied) = tokio::sync::oneshot::channel();
    let command = Command::Replay {
        handler: name,
        from,
        reset_state: query.reset_state,
        reply,
    };
    if commands.send(command).await.is_err() {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the runtime is stopping"}),
        );
    }
    match replied.await {
        Ok(Ok(done)) => answer(StatusCode::OK, json!({"done": done})),
        Ok(Err(why)) => answer(StatusCode::CONFLICT, json!({"error": why})),
        Err(_) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the runtime stopped before answering"}),
        ),
    }
}

/// The query of `GET /handlers/{name}/state`.
#[derive(serde::Deserialize)]
struct StateQuery {
    /// Entries whose key starts with this.
    #[serde(default)]
    prefix: String,
    /// Most entries returned (default 100).
    limit: Option<usize>,
    /// Just this key.
    key: Option<String>,
}

/// One state entry as JSON: the value as text when it is UTF-8, and always
/// as hex.
fn entry(key: &str, version: u64, value: &[u8]) -> Value {
    json!({
        "key": key,
        "value": std::str::from_utf8(value).ok(),
        "value_hex": value.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "version": version,
    })
}

/// A handler's committed state as `weir state` and
/// `GET /handlers/{name}/state` show it: `{"handler", "entries": [...],
/// "outbox"}` with one entry for `key`, else up to `limit` entries whose key
/// starts with `prefix`.
///
/// # Errors
///
/// When the database cannot be read.
pub async fn read_state(
    store: &Store,
    handler: &str,
    key: Option<&str>,
    prefix: &str,
    limit: usize,
) -> Result<Value, crate::store::StoreError> {
    let view = store.state_view()?;
    let entries: Vec<Value> = match key {
        Some(key) => view
            .get(handler, key)
            .await?
            .map(|(version, value)| entry(key, version, &value))
            .into_iter()
            .collect(),
        None => view
            .scan(handler, prefix, None, limit)
            .await?
            .iter()
            .map(|(key, version, value)| entry(key, *version, value))
            .collect(),
    };
    Ok(json!({
        "handler": handler,
        "entries": entries,
        "outbox": store.outbox_len().await?,
    }))
}

async fn state(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    Query(query): Query<StateQuery>,
) -> Response {
    match read_state(
        &admin.store,
        &name,
        query.key.as_deref(),
        &query.prefix,
        query.limit.unwrap_or(100),
    )
    .await
    {
        Ok(body) => axum::Json(body).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": err.to_string()})),
        )
            .into_response(),
    }
}

/// `GET path` from a running weir's admin server at `listen` (an unspecified
/// address means this host): the status code and body. For `weir state`
/// while `weir run` holds the database.
///
/// # Errors
///
/// When nothing answers there, or the answer is not HTTP.
pub fn fetch(listen: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|err| anyhow::anyhow!("no admin server answers at {addr}: {err}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("the admin server at {addr} sent no HTTP answer"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the admin server at {addr} sent no HTTP status"))?;
    Ok((code, body.to_string()))
}

/// `text` escaped for a URL's path or query.
pub fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
