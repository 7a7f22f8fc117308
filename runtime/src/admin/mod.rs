//! The admin HTTP server: what an operator and Prometheus look at.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | a status page (`status.html`, self-contained): each handler's rate, lag, in flight, retries, dead letters and version, refreshed every 2 s |
//! | `GET /metrics` | every metric (see [`metrics`](crate::metrics)), Prometheus text format |
//! | `GET /health/live` | 200 while the process serves requests |
//! | `GET /health/ready` | 200 when every handler file loaded, every worker runs, every consumer joined (Kafka: its group is up; JetStream: its durable answers), every handler's dead letters can be written (its dead-letter topic exists or was created), the store's writer is alive and the outbox relay is not blocked (no topic failing for 5 s), else 503; JSON saying what is not ready and why |
//! | `GET /handlers` | JSON: each handler's name, version, contract, group, topics, whether its consumer joined, its partitions (lag, committed position age), in flight, instances, counters and last error |
//! | `GET /handlers/{name}/state?prefix=&limit=` | JSON: the handler's committed state entries (key order, at most [`MAX_STATE_LIMIT`]), and the outbox length; `?key=K` for one key; 404 for a handler not served here |
//! | `POST /handlers/{name}/rewind` (or its first name, `…/replay`) with `{"from": …, "reset_state": …}` | `weir rewind` done by this process: the handler's consumer stops, its marks (and state) are forgotten, its position moves back to `from` (`earliest`, an RFC 3339 time, an offset), and it is served again; JSON `{"done": [...]}` |
//!
//! Who may use which route is [`access`](mod@access): metrics and health are open; the
//! page and `/handlers` answer requests addressed to this server; state and
//! replay also need the admin token ([`token`]).
//!
//! It listens on `[admin] listen` (default `127.0.0.1:9464`). Invariants:
//! the `GET` routes only read (nothing they answer changes what the
//! runtime does); the one route that acts, `POST …/replay`, only asks the
//! runtime's main loop through a channel, which does it between reloads
//! (see `Runtime::rewind`); readiness and metrics read the store's figures
//! as [`health`] last read them, never the store itself; state is read off
//! the async threads, [`MAX_STATE_READS`] at a time; a port it cannot bind
//! is reported once and the process goes on consuming without it;
//! listening beyond loopback is said in the log.

mod access;
mod client;
mod health;
mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

pub use access::Access;
pub use client::{fetch, url_escape};
pub use token::{TOKEN_FILE, Token, for_client as client_token};

use crate::metrics::Metrics;
mod status;

use crate::store::Store;
pub use status::{HandlerView, Status};

/// Most entries one state request answers.
pub const MAX_STATE_LIMIT: usize = 1000;

/// Most state requests reading the store at once (the store's pool serves
/// the pipeline first).
pub const MAX_STATE_READS: usize = 2;

/// Largest request body accepted (a replay request is a few dozen bytes).
const MAX_BODY: usize = 16 * 1024;

/// What the runtime is asked to do through the admin server.
#[derive(Debug)]
pub enum Command {
    /// Rewind a handler's consumer (see `Runtime::rewind`).
    Rewind {
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
    health: health::Health,
    state_reads: Arc<Semaphore>,
    commands: Option<tokio::sync::mpsc::Sender<Command>>,
}

/// The admin server's [`Access`] as `[admin]` sets it: its token (a
/// generated one is written to [`TOKEN_FILE`] in `data_dir`, and where is
/// logged) and the names requests may be addressed to.
///
/// # Errors
///
/// When a token has to be generated and cannot be written.
pub fn access(
    section: &crate::config::AdminSection,
    data_dir: &std::path::Path,
) -> anyhow::Result<Access> {
    let (token, written) = Token::resolve(section.token.as_deref(), data_dir)?;
    if let Some(path) = written {
        tracing::info!(file = %path.display(),
            "admin token generated (state and replay need it; `weir state` reads it from this file; set [admin] token to choose one)");
    }
    Ok(Access::new(token, &section.hosts))
}

/// Serves the admin routes on `listen` until `stop` turns true. Returns the
/// address bound (useful with port 0), or `None` when it cannot listen
/// (logged).
pub async fn serve(
    listen: SocketAddr,
    access: Access,
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
            "admin server listening beyond loopback: anyone who can reach this address can read metrics, health and handler counters (state and replay need the admin token)");
    }
    let health = health::Health::start(store.clone(), stop.clone()).await;
    let admin = Admin {
        metrics,
        status,
        store,
        health,
        state_reads: Arc::new(Semaphore::new(MAX_STATE_READS)),
        commands,
    };
    let open = Router::new()
        .route("/metrics", get(metrics_route))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready));
    let addressed = Router::new()
        .route("/", get(page))
        .route("/handlers", get(handlers))
        .route_layer(from_fn_with_state(access.clone(), access::addressed));
    let operator = Router::new()
        .route("/handlers/{name}/state", get(state))
        .route("/handlers/{name}/rewind", post(rewind))
        // The route's first name, kept for scripts.
        .route("/handlers/{name}/replay", post(rewind))
        .route_layer(from_fn_with_state(access.clone(), access::operator));
    let app = open
        .merge(addressed)
        .merge(operator)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(from_fn_with_state(access, access::bounded))
        .with_state(admin);
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
    if let Some((rows, age)) = admin.health.figures().outbox {
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
fn not_ready(admin: &Admin) -> Vec<Value> {
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
    if let Some(why) = admin.health.figures().problem {
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
    let problems = not_ready(&admin);
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    answer(
        code,
        json!({"ready": problems.is_empty(), "not_ready": problems}),
    )
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
    answer(StatusCode::OK, json!({"handlers": list}))
}

/// The body of `POST /handlers/{name}/replay`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// `earliest`, an RFC 3339 time, or an offset.
    from: String,
    /// Also forget the handler's state and pending outbox rows.
    #[serde(default)]
    reset_state: bool,
}

/// A JSON answer, with every secret masked (see
/// [`crate::config::secrets`]): errors and last errors quote what brokers
/// and the store said, which may hold a URL or a property.
fn answer(code: StatusCode, body: Value) -> Response {
    let text = body.to_string();
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        crate::config::secrets::redact(&text).into_owned(),
    )
        .into_response()
}

/// Whether `name` is a handler this process serves.
fn served(admin: &Admin, name: &str) -> bool {
    admin.status.handlers().iter().any(|view| view.name == name)
}

fn not_served(name: &str) -> Response {
    answer(
        StatusCode::NOT_FOUND,
        json!({"error": format!("no handler {name:?} is served here")}),
    )
}

async fn rewind(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    body: Result<axum::Json<ReplayRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(axum::Json(request)) => request,
        Err(rejection) => {
            return answer(
                rejection.status(),
                json!({"error": format!(
                    "{}; send a JSON body with Content-Type: application/json, e.g. {{\"from\": \"earliest\", \"reset_state\": true}}",
                    rejection.body_text()
                )}),
            );
        }
    };
    let from = match crate::source::Rewind::parse(&request.from) {
        Ok(from) => from,
        Err(why) => return answer(StatusCode::BAD_REQUEST, json!({"error": why})),
    };
    if !served(&admin, &name) {
        return not_served(&name);
    }
    let Some(commands) = &admin.commands else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "this process does not take commands"}),
        );
    };
    let (reply, replied) = tokio::sync::oneshot::channel();
    let command = Command::Rewind {
        handler: name,
        from,
        reset_state: request.reset_state,
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
    query: Result<Query<StateQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return answer(rejection.status(), json!({"error": rejection.body_text()}));
        }
    };
    let limit = query.limit.unwrap_or(100);
    if limit > MAX_STATE_LIMIT {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("limit is at most {MAX_STATE_LIMIT}; page with prefix")}),
        );
    }
    if !served(&admin, &name) {
        return not_served(&name);
    }
    let Ok(permit) = admin.state_reads.clone().try_acquire_owned() else {
        let mut busy = answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("{MAX_STATE_READS} state reads are running; try again")}),
        );
        busy.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return busy;
    };
    // Off the async threads: an embedded store reads synchronously.
    let runtime = tokio::runtime::Handle::current();
    let store = admin.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        // Held until the read ends, even when the client has gone.
        let _permit = permit;
        runtime.block_on(read_state(
            &store,
            &name,
            query.key.as_deref(),
            &query.prefix,
            limit,
        ))
    })
    .await;
    match read {
        Ok(Ok(body)) => axum::Json(body).into_response(),
        Ok(Err(err)) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": err.to_string()}),
        ),
        Err(_) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "the state read stopped"}),
        ),
    }
}
