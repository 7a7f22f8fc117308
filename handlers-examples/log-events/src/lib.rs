//! Logs every event it receives: the smallest useful handler.

use weir_sdk::{Event, Handler, HandlerError, export_handler, log};

/// Logs each event's identity, position, key and size.
pub struct LogEvents;

impl Handler for LogEvents {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let key = match (event.key_str(), event.key()) {
            (Some(text), _) => text.to_string(),
            (None, Some(bytes)) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
            (None, None) => "-".to_string(),
        };
        log::info(
            "event",
            &[
                ("id", event.id()),
                ("topic", event.topic()),
                ("partition", &event.partition().to_string()),
                ("offset", &event.offset().to_string()),
                ("attempt", &event.attempt().to_string()),
                ("key", &key),
                ("bytes", &event.payload().len().to_string()),
            ],
        );
        Ok(())
    }
}

export_handler!(LogEvents);
