//! The end-to-end benchmark's handler.
//!
//! Without settings it does nothing and succeeds, so a run measures the
//! runtime and not the handler. With config `echo_topic` set it emits each
//! event's payload, with its key, to that topic: the benchmark reads the
//! echo to time a message from produce to handled and committed.

use weir_sdk::{Event, Handler, HandlerError, config, emit, export_handler};

struct Noop;

impl Handler for Noop {
    fn handle(event: Event) -> Result<(), HandlerError> {
        if let Some(topic) = config::get("echo_topic") {
            emit::send(&topic, event.key(), event.payload(), &[])?;
        }
        Ok(())
    }
}

export_handler!(Noop);
