//! {{name}}: a Weir event handler.
//!
//! Weir calls `handle` once per message from the topics in `{{name}}.toml`.
//! Return `Ok(())` when done; `HandlerError::retryable` for a transient
//! failure (retried with backoff, then dead-lettered); and
//! `HandlerError::permanent` for an event that can never succeed
//! (dead-lettered at once). `.category(Category::…)` on an error says what
//! kind of failure it was, for operators counting failures by cause.

use serde::{Deserialize, Serialize};
use weir_sdk::{Event, Handler, HandlerError, config, export_handler, log, state};

/// What this handler expects in a payload (JSON).
#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    text: String,
}

/// What it keeps per key in its state.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Seen {
    count: u64,
}

struct {{type_name}};

impl Handler for {{type_name}} {
    fn handle(event: Event) -> Result<(), HandlerError> {
        // Malformed JSON becomes a permanent error (category `validation`):
        // dead-lettered, not retried.
        let message: Message = event.json()?;
        let key = format!("seen/{}", event.key_str().unwrap_or("-"));
        // State writes commit with the event's outcome, or not at all.
        let mut seen: Seen = state::get_json(&key)?.unwrap_or_default();
        seen.count += 1;
        state::set_json(&key, &seen)?;
        let greeting = config::get_or("greeting", "hello");
        log::info(
            &format!("{greeting}: {}", message.text),
            &[("key", &key), ("count", &seen.count.to_string())],
        );
        Ok(())
    }
}

export_handler!({{type_name}});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_messages_per_key() {
        let event = Event::new("{{name}}", r#"{"text": "hi"}"#).with_key("k");
        {{type_name}}::handle(event.clone()).expect("handled");
        {{type_name}}::handle(event).expect("handled");
        let seen: Option<Seen> = state::get_json("seen/k").expect("state");
        assert_eq!(seen.map(|s| s.count), Some(2));
    }

    #[test]
    fn malformed_json_is_permanent() {
        let err = {{type_name}}::handle(Event::new("{{name}}", "not json")).expect_err("not JSON");
        assert!(err.is_permanent(), "{err}");
        assert_eq!(err.category, Some(weir_sdk::Category::Validation));
    }
}
