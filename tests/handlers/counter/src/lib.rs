//! A handler for crash-consistency tests.
//!
//! For every event it:
//!
//! 1. takes the key (UTF-8, lossy; `-` without a key), reads the state key
//!    `count/<key>` (a decimal number, absent = 0), adds one and writes it
//!    back;
//! 2. emits one event to the topic in config `output_topic` (default
//!    `counts`) with the same key and the JSON payload
//!    `{"source_id": <event id>, "key": <key>, "count": <new count>}`;
//! 3. sleeps config `work_ms` milliseconds (default 0), so calls overlap;
//! 4. if the header `counter.fail-attempts` is N and this is attempt N or
//!    earlier, fails with a retryable error, after having written and
//!    emitted: the runtime must discard both;
//! 5. logs `counted` with `id`, `key`, `count` and `attempt`.
//!
//! Since the count is committed atomically with the event's dedup mark and
//! the emitted event, a run with crashes and duplicates must end with every
//! count equal to the number of distinct events of its key.

use std::time::Duration;

use weir_sdk::{Event, Handler, HandlerError, config, emit, export_handler, log, state};

struct Counter;

impl Handler for Counter {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let key_bytes = event.key().map(<[u8]>::to_vec);
        let key = key_bytes.as_deref().map_or_else(
            || "-".to_string(),
            |k| String::from_utf8_lossy(k).into_owned(),
        );
        let state_key = format!("count/{key}");
        let count = match state::get(&state_key)? {
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| HandlerError::permanent(format!("{state_key} is not a number")))?,
            None => 0,
        } + 1;
        state::set(&state_key, count.to_string().as_bytes())?;

        let topic = config::get("output_topic").unwrap_or_else(|| "counts".to_string());
        let payload = serde_json::json!({
            "source_id": event.id(),
            "key": key,
            "count": count,
        })
        .to_string();
        emit::send(&topic, key_bytes.as_deref(), payload.as_bytes(), &[])?;

        if let Some(ms) = config::get("work_ms").and_then(|v| v.parse::<u64>().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let fail_until = event
            .header_str("counter.fail-attempts")
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        log::info(
            "counted",
            &[
                ("id", event.id()),
                ("key", &key),
                ("count", &count.to_string()),
                ("attempt", &event.attempt().to_string()),
            ],
        );
        if event.attempt() <= fail_until {
            return Err(HandlerError::retryable(format!(
                "asked to fail on attempt {}",
                event.attempt()
            )));
        }
        Ok(())
    }
}

export_handler!(Counter);
