//! Who may use which admin route: the operator holding the token, a
//! browser on the operator's own page, and Prometheus and probes.
//!
//! | routes | who |
//! | --- | --- |
//! | `GET /metrics`, `/health/live`, `/health/ready` | anyone who reaches the port: Prometheus and orchestrator probes address a process by its IP and carry no secret |
//! | `GET /`, `GET /handlers` | requests addressed to this server ([`host_allowed`]): a page of another site that rebinds its DNS name to this address is refused |
//! | `GET /handlers/{name}/state`, `POST /handlers/{name}/rewind` (`…/replay`) | the same, with `Authorization: Bearer <token>` ([`super::token`]); a request that changes anything also comes from no other site ([`same_origin`]) and carries a JSON body (see the route) |
//!
//! Invariants: a refused request does nothing and reveals nothing beyond
//! why it was refused; at most [`MAX_REQUESTS`] requests are served at once
//! (more are answered 503 at once), so a flood of admin requests cannot
//! hold the process's threads or the store's connections.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::Semaphore;

use super::token::Token;

/// Most admin requests served at once.
pub const MAX_REQUESTS: usize = 32;

/// What the routes demand of a request.
#[derive(Clone, Debug)]
pub struct Access {
    token: Token,
    /// Names besides IP addresses and `localhost` a request may be
    /// addressed to (`[admin] hosts`), lower case.
    hosts: Arc<Vec<String>>,
    requests: Arc<Semaphore>,
}

impl Access {
    /// Requests must present `token` where it is required, and be addressed
    /// to an IP address, `localhost` or one of `hosts`.
    pub fn new(token: Token, hosts: &[String]) -> Self {
        Self {
            token,
            hosts: Arc::new(hosts.iter().map(|h| h.to_ascii_lowercase()).collect()),
            requests: Arc::new(Semaphore::new(MAX_REQUESTS)),
        }
    }
}

fn refuse(code: StatusCode, why: &str) -> Response {
    (code, axum::Json(json!({"error": why}))).into_response()
}

/// The host part of a `Host` header value (`name`, `name:port`,
/// `[v6]:port`), lower case; `None` when it is malformed.
fn host_name(value: &str) -> Option<String> {
    let value = value.trim();
    let name = if let Some(rest) = value.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inside
    } else {
        match value.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return None,
            None => value,
        }
    };
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a request with these headers is addressed to this server: its
/// `Host` is an IP address (a DNS rebinding attack needs a name), `localhost`,
/// or a configured name.
pub fn host_allowed(headers: &HeaderMap, hosts: &[String]) -> bool {
    let Some(name) = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(host_name)
    else {
        return false;
    };
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || hosts.contains(&name)
}

/// Whether a request comes from no other site: no `Origin`, or one whose
/// `host[:port]` is the request's own `Host`; and no `Sec-Fetch-Site` other
/// than `same-origin` or `none` (typed by the user).
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or_default();
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return false;
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(Ok(host))) = (
        origin.to_str(),
        headers.get(header::HOST).map(|h| h.to_str()),
    ) else {
        return false;
    };
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        // `null` (a sandboxed frame, a file) and anything else.
        return false;
    };
    authority
        .trim_end_matches('/')
        .eq_ignore_ascii_case(host.trim())
}

/// The bearer token a request presents, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Every route: at most [`MAX_REQUESTS`] at once.
pub async fn bounded(State(access): State<Access>, request: Request, next: Next) -> Response {
    let Ok(_permit) = access.requests.clone().try_acquire_owned() else {
        let mut answer = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the admin server is busy; try again",
        );
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return answer;
    };
    next.run(request).await
}

/// `/` and `/handlers`: only requests addressed to this server.
pub async fn addressed(State(access): State<Access>, request: Request, next: Next) -> Response {
    if !host_allowed(request.headers(), &access.hosts) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this admin server answers requests addressed to its IP address, localhost or a name in [admin] hosts",
        );
    }
    next.run(request).await
}

/// The routes that reveal state or act: addressed to this server, from no
/// other site when they change anything, with the token.
pub async fn operator(State(access): State<Access>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if !host_allowed(headers, &access.hosts) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this admin server answers requests addressed to its IP address, localhost or a name in [admin] hosts",
        );
    }
    if request.method() != Method::GET && !same_origin(headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "a request from another site cannot act on this admin server",
        );
    }
    match bearer(headers) {
        Some(token) if access.token.matches(token) => next.run(request).await,
        presented => {
            let why = if presented.is_some() {
                "the admin token is not the one this server requires"
            } else {
                "this route needs the admin token: send `Authorization: Bearer <token>` ([admin] token, or the generated admin.token in [runtime] data_dir)"
            };
            let mut answer = refuse(StatusCode::UNAUTHORIZED, why);
            answer.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"weir\""),
            );
            answer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn hosts_that_a_rebinding_page_cannot_use_are_allowed() {
        let hosts = vec!["weir.internal".to_string()];
        for host in [
            "127.0.0.1:9464",
            "127.0.0.1",
            "10.1.2.3:9464",
            "[::1]:9464",
            "[::1]",
            "localhost:9464",
            "LOCALHOST",
            "weir.internal:9464",
            "Weir.Internal",
        ] {
            assert!(host_allowed(&headers(&[("host", host)]), &hosts), "{host}");
        }
        for host in [
            "evil.example:9464",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "",
            ":9464",
            "[::1",
            "[::1]x",
            "host:port",
            "weir.internal.evil:9464",
        ] {
            assert!(!host_allowed(&headers(&[("host", host)]), &hosts), "{host}");
        }
        assert!(!host_allowed(&HeaderMap::new(), &hosts), "no Host");
    }

    #[test]
    fn only_the_same_origin_may_act() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:9464")])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:9464"),
            ("origin", "http://127.0.0.1:9464")
        ])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:9464"),
            ("origin", "http://127.0.0.1:9464"),
            ("sec-fetch-site", "same-origin")
        ])));
        for (origin, site) in [
            ("http://evil.example", "cross-site"),
            ("http://evil.example", ""),
            ("null", ""),
            ("http://127.0.0.1:9465", ""),
            ("http://127.0.0.1:9464", "same-site"),
        ] {
            let mut pairs = vec![("host", "127.0.0.1:9464"), ("origin", origin)];
            if !site.is_empty() {
                pairs.push(("sec-fetch-site", site));
            }
            assert!(!same_origin(&headers(&pairs)), "{origin} {site}");
        }
    }

    #[test]
    fn the_bearer_token_is_read_from_its_header() {
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(bearer(&headers(&[("authorization", "Basic abc")])), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
