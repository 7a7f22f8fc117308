//! Secrets in the configuration: where they come from, and that they are
//! never printed.
//!
//! # References
//!
//! Any string value in `weir.toml` may hold `${NAME}` (the environment
//! variable `NAME`) or `${file:PATH}` (the file's contents without its
//! trailing newline; a relative `PATH` is taken from the configuration
//! file's directory), the way container platforms hand secrets over
//! (environment, or a mounted secret file). `$${` is a literal `${`.
//! References are expanded when the file is read, before its shape is
//! checked, so every key of every broker and the store takes them; an unset
//! variable or unreadable file is an error naming the key.
//!
//! # Redaction
//!
//! Invariant: no secret reaches a log line, an error the CLI prints or an
//! admin answer. What counts as one is registered when the file is read:
//! the value of every key that says it is secret ([`secret_key`]:
//! passwords, tokens, secrets, private keys, nkeys, JAAS and OAUTHBEARER
//! configs), every value read from a `${file:…}` (a mounted secret), and
//! the password of every URL (`scheme://user:password@host`, also
//! percent-decoded). A value from `${NAME}` in any other key (a host name,
//! say) is configuration, not a secret, so errors can still name the
//! endpoint. [`redact`] replaces each registered value (and its JSON- and
//! Debug-escaped forms) with `***`, and the password of any URL it meets;
//! the log writer ([`crate::telemetry`]), the CLI's error output and the
//! admin server's answers pass through it. Values written inline shorter
//! than [`SHORTEST_INLINE`] (a test's `guest`) are masked inside URLs only:
//! masking every `guest` or `test` in the log would hide more than it
//! protects.

use std::borrow::Cow;
use std::path::Path;
use std::sync::RwLock;

use crate::lock::UnpoisonedRw;

/// What replaces a secret.
const MASK: &str = "***";

/// Shorter values are never registered: masking every `a` or `ab` in the
/// log would hide more than it protects (and such a secret protects
/// nothing).
const SHORTEST: usize = 4;

/// Shortest value written inline in the file that is registered.
pub const SHORTEST_INLINE: usize = 8;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers `value` as a secret: from now on [`redact`] masks it, as it
/// is and as JSON or `Debug` output escapes it.
pub fn register(value: &str) {
    if value.len() < SHORTEST {
        return;
    }
    let json = serde_json::to_string(value).unwrap_or_default();
    let debug = format!("{value:?}");
    let forms = [
        value,
        json.get(1..json.len().saturating_sub(1)).unwrap_or(value),
        debug.get(1..debug.len().saturating_sub(1)).unwrap_or(value),
    ];
    let mut secrets = SECRETS.write_locked();
    for form in forms {
        if !secrets.iter().any(|s| s == form) {
            secrets.push(form.to_string());
        }
    }
    // Longest first, so a secret containing another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Whether a key's name says its value is secret.
pub fn secret_key(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "jaas",
        "private",
        "nkey",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| name.contains(word))
        || name == "ssl.key.pem"
}

/// `text` with every registered secret and every URL's password masked.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    {
        let secrets = SECRETS.read_locked();
        for secret in secrets.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), MASK));
            }
        }
    }
    match mask_url_passwords(&out) {
        Some(masked) => Cow::Owned(masked),
        None => out,
    }
}

/// The password of a URL's user info (`scheme://user:password@host…`).
pub fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// `text` with the password of every URL in it masked, or `None` when it
/// holds none.
fn mask_url_passwords(text: &str) -> Option<String> {
    if !text.contains("://") {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends at the first character no URL authority holds.
        let end = after
            .find(|c: char| {
                c == '/'
                    || c == '?'
                    || c == '#'
                    || c.is_whitespace()
                    || c == '"'
                    || c == '\''
                    || c == ','
                    || c == ';'
                    || c == '>'
                    || c == ')'
            })
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split(':').next().unwrap_or_default();
                out.push_str(user);
                out.push(':');
                out.push_str(MASK);
                out.push('@');
                out.push_str(host);
                changed = true;
            }
            _ => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// Why a reference could not be expanded.
#[derive(Debug, PartialEq, Eq)]
pub struct Unresolved(pub String);

/// What [`expand`] made of a value.
#[derive(Debug, PartialEq, Eq)]
pub struct Expanded {
    /// The value, its references replaced.
    pub text: String,
    /// Whether it held a reference (or a `$${`).
    pub any: bool,
    /// The contents of each `${file:…}` it read (secrets).
    pub from_files: Vec<String>,
}

/// `value` with its references expanded (see the module documentation).
///
/// # Errors
///
/// An unset variable, an unreadable file, or a `${` without its `}`.
pub fn expand(value: &str, base: &Path) -> Result<Expanded, Unresolved> {
    if !value.contains("${") {
        return Ok(Expanded {
            text: value.to_string(),
            any: false,
            from_files: Vec::new(),
        });
    }
    let mut from_files = Vec::new();
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut any = false;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            // `$${`: a literal `${`.
            out.push_str(&rest[..at - 1]);
            out.push_str("${");
            rest = &rest[at + 2..];
            any = true;
            continue;
        }
        out.push_str(&rest[..at]);
        let inside = &rest[at + 2..];
        let Some(end) = inside.find('}') else {
            return Err(Unresolved(
                "a reference `${` has no closing `}` (write `$${` for a literal `${`)".into(),
            ));
        };
        let reference = &inside[..end];
        let resolved = if let Some(file) = reference.strip_prefix("file:") {
            let path = base.join(file);
            let text = std::fs::read_to_string(&path).map_err(|err| {
                Unresolved(format!(
                    "${{file:{file}}}: cannot read {}: {err}",
                    path.display()
                ))
            })?;
            let contents = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string();
            from_files.push(contents.clone());
            contents
        } else {
            let valid = !reference.is_empty()
                && reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(Unresolved(format!(
                    "${{{reference}}} is neither an environment variable name nor file:PATH"
                )));
            }
            std::env::var(reference).map_err(|_| {
                Unresolved(format!(
                    "${{{reference}}}: the environment variable {reference} is not set"
                ))
            })?
        };
        out.push_str(&resolved);
        any = true;
        rest = &inside[end + 1..];
    }
    out.push_str(rest);
    Ok(Expanded {
        text: out,
        any,
        from_files,
    })
}

/// Expands the references in every string of `table` (arrays included),
/// registers the secrets written inline, and says whether any reference
/// was found.
///
/// # Errors
///
/// The first reference that cannot be expanded, naming its key as
/// `[table] key`.
pub fn expand_table(table: &mut toml::Table, base: &Path) -> Result<bool, String> {
    fn walk(
        value: &mut toml::Value,
        path: &mut Vec<String>,
        base: &Path,
        any: &mut bool,
    ) -> Result<(), String> {
        match value {
            toml::Value::String(text) => {
                let expanded = expand(text, base)
                    .map_err(|Unresolved(why)| format!("{}: {why}", key_name(path)))?;
                *any |= expanded.any;
                *text = expanded.text;
                // A value from a reference is registered whatever its
                // length; one written inline only when long enough.
                let shortest = if expanded.any { 0 } else { SHORTEST_INLINE };
                let name = path.last().map(String::as_str).unwrap_or_default();
                if secret_key(name) && text.len() >= shortest {
                    register(text);
                }
                for contents in &expanded.from_files {
                    register(contents);
                }
                if let Some(password) = url_password(text) {
                    let decoded = crate::store::percent_decoded(password);
                    for form in [password, decoded.as_str()] {
                        if form.len() >= shortest {
                            register(form);
                        }
                    }
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    walk(item, path, base, any)?;
                }
            }
            toml::Value::Table(table) => {
                for (key, item) in table.iter_mut() {
                    path.push(key.clone());
                    walk(item, path, base, any)?;
                    path.pop();
                }
            }
            _ => {}
        }
        Ok(())
    }
    let mut any = false;
    let mut path = Vec::new();
    for (key, item) in table.iter_mut() {
        path.push(key.clone());
        walk(item, &mut path, base, &mut any)?;
        path.pop();
    }
    Ok(any)
}

/// A key path as the example files spell it: `[source.kafka.properties]
/// "sasl.password"`.
fn key_name(path: &[String]) -> String {
    let quote = |k: &String| {
        if k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            k.clone()
        } else {
            format!("{k:?}")
        }
    };
    match path.split_last() {
        Some((last, [])) => quote(last),
        Some((last, tables)) => format!(
            "[{}] {}",
            tables.iter().map(quote).collect::<Vec<_>>().join("."),
            quote(last)
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_expanded_from_the_environment_and_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pw"), "from-a-file\n").expect("write");
        let name = "WEIR_SECRETS_TEST_VARIABLE";
        assert_eq!(
            expand(&format!("${{{name}}}"), dir.path()),
            Err(Unresolved(format!(
                "${{{name}}}: the environment variable {name} is not set"
            )))
        );
        let expanded = expand("user:${file:pw}@host $${literal}", dir.path()).expect("expand");
        assert_eq!(expanded.text, "user:from-a-file@host ${literal}");
        assert!(expanded.any);
        assert_eq!(expanded.from_files, vec!["from-a-file".to_string()]);
        assert!(expand("${unclosed", dir.path()).is_err());
        assert!(expand("${no spaces}", dir.path()).is_err());
        assert!(expand("${file:missing}", dir.path()).is_err());
        assert_eq!(
            expand("plain", dir.path()),
            Ok(Expanded {
                text: "plain".to_string(),
                any: false,
                from_files: Vec::new()
            })
        );
    }

    #[test]
    fn url_passwords_are_masked_wherever_they_appear() {
        assert_eq!(
            redact("cannot parse redis://:hunter2hunter@127.0.0.1:6379/0 (bad)"),
            "cannot parse redis://:***@127.0.0.1:6379/0 (bad)"
        );
        assert_eq!(
            redact("amqps://weir:pa%40ss@mq.example:5671/%2f, postgres://u:p@h/db"),
            "amqps://weir:***@mq.example:5671/%2f, postgres://u:***@h/db"
        );
        assert_eq!(redact("http://127.0.0.1:9464/x"), "http://127.0.0.1:9464/x");
        assert_eq!(redact("nats://user@host"), "nats://user@host");
        assert_eq!(url_password("postgres://u:p@h:5432/db"), Some("p"));
        assert_eq!(url_password("postgres://h:5432/db"), None);
    }

    #[test]
    fn inline_secrets_are_registered_by_their_key_or_url() {
        let mut table: toml::Table = toml::from_str(
            r#"
            [source.kafka.properties]
            "sasl.password" = "inline-kafka-secret"
            "sasl.username" = "visible-user"
            [store]
            url = "postgres://weir:inline-pg%40secret@db/weir"
            [source.rabbitmq]
            url = "amqp://guest:guest@127.0.0.1:5672/%2f"
            [source.sqs]
            secret_access_key = "test"
            "#,
        )
        .expect("toml");
        let any = expand_table(&mut table, Path::new(".")).expect("expand");
        assert!(!any);
        let shown = redact(
            "inline-kafka-secret inline-pg%40secret inline-pg@secret visible-user weir::guest test",
        );
        assert_eq!(shown, "*** *** *** visible-user weir::guest test");
        // Masked as JSON and Debug output escape it, too.
        register("quote\"back\\slash");
        assert_eq!(
            redact(r#"{"error":"quote\"back\\slash"}"#),
            r#"{"error":"***"}"#
        );
    }

    #[test]
    fn a_host_from_the_environment_is_not_a_secret_but_a_file_is() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("token"), "file-secret-2b7c\n").expect("write");
        let mut table: toml::Table = toml::from_str(
            r#"
            [admin]
            hosts = ["${file:token}"]
            [source.kafka]
            bootstrap_servers = "${PATH}"
            "#,
        )
        .expect("toml");
        assert!(expand_table(&mut table, dir.path()).expect("expand"));
        assert_eq!(redact("file-secret-2b7c"), "***");
        let path = std::env::var("PATH").expect("PATH");
        assert_eq!(redact(&path), path);
    }

    #[test]
    fn an_unresolved_reference_names_its_key() {
        let mut table: toml::Table = toml::from_str(
            r#"
            [source.kafka.properties]
            "sasl.password" = "${WEIR_SECRETS_TEST_UNSET}"
            "#,
        )
        .expect("toml");
        let err = expand_table(&mut table, Path::new(".")).expect_err("unset");
        assert!(
            err.starts_with(
                "[source.kafka.properties] \"sasl.password\": ${WEIR_SECRETS_TEST_UNSET}"
            ),
            "{err}"
        );
    }

    #[test]
    fn secret_keys_are_recognised() {
        for key in [
            "password",
            "sasl.password",
            "ssl.key.password",
            "token",
            "secret_access_key",
            "sasl.jaas.config",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
        ] {
            assert!(secret_key(key), "{key}");
        }
        for key in [
            "user",
            "url",
            "bootstrap.servers",
            "ssl.ca.location",
            "sasl.mechanism",
        ] {
            assert!(!secret_key(key), "{key}");
        }
    }
}
