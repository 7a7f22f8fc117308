//! The PostgreSQL schema: its tables, its version, and the migrations that
//! bring an older schema up to this version.
//!
//! # Tables (in the configured schema, `weir` by default)
//!
//! | table | primary key | columns | meaning |
//! | --- | --- | --- | --- |
//! | `meta` | `name` | `value bigint` | `schema_version` |
//! | `dedup` | (`handler`, `event_id`) | `expires_ms` | the event's outcome is final until then; index `dedup_expiry` on `expires_ms` |
//! | `attempts` | (`handler`, `event_id`) | `attempts` | failed attempts of an unfinished event |
//! | `state` | (`handler`, `key` collated "C") | `version`, `value bytea` | a handler's key-value state, in byte order of keys |
//! | `outbox` | `seq` (bigserial) | `handler`, `record bytea` | emitted events not yet acknowledged by the broker |
//!
//! Sequence `state_version` gives each committing transaction its state
//! version; function `lock_all` takes a transaction's advisory locks in
//! the order given (see [`commit`](crate::store::postgres::commit)).
//!
//! # Migrations
//!
//! Each entry of [`MIGRATIONS`] takes the schema from version `i` to
//! `i + 1`; `meta.schema_version` says how far a database is. Weir applies
//! the missing ones at start, in one transaction, under an advisory lock,
//! so that processes starting together migrate once. A schema newer than
//! this version is refused rather than misread.

use tokio_postgres::Client;

/// The schema version this build writes and reads.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// The SQL of each migration; `{s}` stands for the quoted schema name.
const MIGRATIONS: &[&str] = &[
    // 1: the tables of the first shared store.
    r#"
    CREATE TABLE {s}.dedup (
        handler text NOT NULL,
        event_id text NOT NULL,
        expires_ms bigint NOT NULL,
        PRIMARY KEY (handler, event_id)
    );
    CREATE INDEX dedup_expiry ON {s}.dedup (expires_ms);
    CREATE TABLE {s}.attempts (
        handler text NOT NULL,
        event_id text NOT NULL,
        attempts integer NOT NULL,
        PRIMARY KEY (handler, event_id)
    );
    CREATE TABLE {s}.state (
        handler text NOT NULL,
        key text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (handler, key)
    );
    CREATE SEQUENCE {s}.state_version;
    CREATE TABLE {s}.outbox (
        seq bigserial PRIMARY KEY,
        handler text NOT NULL,
        record bytea NOT NULL
    );
    CREATE INDEX outbox_handler ON {s}.outbox (handler);
    CREATE FUNCTION {s}.lock_all(keys bigint[], exclusive boolean[]) RETURNS integer
    LANGUAGE plpgsql AS $$
    DECLARE
        n integer := coalesce(array_length(keys, 1), 0);
    BEGIN
        FOR i IN 1 .. n LOOP
            IF exclusive[i] THEN
                PERFORM pg_advisory_xact_lock(keys[i]);
            ELSE
                PERFORM pg_advisory_xact_lock_shared(keys[i]);
            END IF;
        END LOOP;
        RETURN n;
    END
    $$;
    "#,
];

/// Whether `name` may be used as the schema: a plain lower-case SQL
/// identifier, so that it needs no quoting rules beyond double quotes.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Creates the schema or brings it up to [`VERSION`]; returns the version
/// it was at (0: new).
///
/// # Errors
///
/// When a statement fails, or the schema is newer than this build.
pub async fn migrate(client: &mut Client, schema: &str, lock: i64) -> Result<i64, String> {
    let quoted = format!("\"{schema}\"");
    let txn = client.transaction().await.map_err(|e| e.to_string())?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await
        .map_err(|e| e.to_string())?;
    txn.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}; \
         CREATE TABLE IF NOT EXISTS {quoted}.meta (name text PRIMARY KEY, value bigint NOT NULL);"
    ))
    .await
    .map_err(|e| e.to_string())?;
    let found: i64 = txn
        .query_opt(
            &format!("SELECT value FROM {quoted}.meta WHERE name = 'schema_version'"),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .map_or(0, |row| row.get(0));
    if found > VERSION {
        return Err(format!(
            "schema {schema} is at version {found}, newer than this weir's {VERSION}: \
             upgrade weir, or give this deployment its own [store] schema"
        ));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        txn.batch_execute(&migration.replace("{s}", &quoted))
            .await
            .map_err(|e| format!("migration to schema version {}: {e}", i + 1))?;
    }
    txn.execute(
        &format!(
            "INSERT INTO {quoted}.meta (name, value) VALUES ('schema_version', $1) \
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value"
        ),
        &[&VERSION],
    )
    .await
    .map_err(|e| e.to_string())?;
    txn.commit().await.map_err(|e| e.to_string())?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["weir", "weir_prod", "_w2"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "Weir",
            "2weir",
            "we-ir",
            "weir\"; drop",
            &"w".repeat(64),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
