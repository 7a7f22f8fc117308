//! The interfaces a handler imports — log, state, emit, config — implemented
//! once and served to every contract version.
//!
//! Their meaning is the same in every released version of `weir:handler`;
//! only the generated Rust types differ, one set per version. Each
//! operation is written once as a method of `InstanceState`; `serve!` then
//! implements a version's generated traits by converting its types and
//! delegating, so a version is served by one line, `serve!(v0_x)`.

use super::bindings::{v0_1, v0_2};
use super::instance::InstanceState;
use super::transaction::{EmitFailure, StateFailure};

/// Longest log message or field value a guest can write; longer ones are cut.
const MAX_LOG_TEXT: usize = 8 * 1024;

/// Severity of a guest's log record, whatever its contract version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GuestLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl InstanceState {
    /// `log.log`: one record under target `weir::guest`, tagged with the
    /// handler, its version and where the event being handled sits.
    fn guest_log(&mut self, level: GuestLevel, message: String, fields: Vec<(String, String)>) {
        // Bounded per call: a handler that logs in a loop fills no disk.
        self.logged = self.logged.saturating_add(1);
        if self.logged > MAX_LOG_RECORDS {
            if self.logged == MAX_LOG_RECORDS + 1 {
                let at = self.current.as_ref();
                tagged_event!(target: "weir::guest", tracing::Level::WARN, at, stream,
                    handler = &*self.handler, version = &*self.version,
                    "the handler logged more than {MAX_LOG_RECORDS} records in this call; the rest of the call's are dropped");
            }
            return;
        }
        let message = clip(message);
        let total = fields.len();
        let mut fields: serde_json::Map<String, serde_json::Value> = fields
            .into_iter()
            .take(MAX_LOG_FIELDS)
            .map(|(k, v)| (clip(k), serde_json::Value::String(clip(v))))
            .collect();
        if total > MAX_LOG_FIELDS {
            fields.insert(
                "fields_dropped".into(),
                serde_json::Value::from(total - MAX_LOG_FIELDS),
            );
        }
        let fields = serde_json::Value::Object(fields).to_string();
        let handler = &*self.handler;
        let version = &*self.version;
        let at = self.current.as_ref();
        macro_rules! emit {
            ($level:expr) => {
                tagged_event!(target: "weir::guest", $level, at, stream,
                    handler, version, fields = %fields, "{message}")
            };
        }
        match level {
            GuestLevel::Trace => emit!(tracing::Level::TRACE),
            GuestLevel::Debug => emit!(tracing::Level::DEBUG),
            GuestLevel::Info => emit!(tracing::Level::INFO),
            GuestLevel::Warn => emit!(tracing::Level::WARN),
            GuestLevel::Error => emit!(tracing::Level::ERROR),
        }
    }

    /// `state.get`.
    async fn state_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StateFailure> {
        self.txn().get(key).await
    }

    /// `state.set`.
    fn state_set(&mut self, key: &str, value: Vec<u8>) -> Result<(), StateFailure> {
        self.txn().set(key, value)
    }

    /// `state.delete`.
    fn state_delete(&mut self, key: &str) -> Result<(), StateFailure> {
        self.txn().delete(key)
    }

    /// `state.list-prefix`.
    async fn state_list_prefix(
        &mut self,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StateFailure> {
        self.txn().list_prefix(prefix, start_after, limit).await
    }

    /// `emit.send`.
    fn emit_send(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    ) -> Result<(), EmitFailure> {
        self.txn().emit(topic, key, payload, headers)
    }

    /// `config.get`.
    fn config_get(&self, key: &str) -> Option<String> {
        self.config.get(key).cloned()
    }

    /// `config.get-all`, sorted by key.
    fn config_all(&self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Most log records one call may write; the rest are dropped, said once.
pub const MAX_LOG_RECORDS: u32 = 1000;
/// Most fields one log record keeps; how many more is said in
/// `fields_dropped`.
pub const MAX_LOG_FIELDS: usize = 64;

fn clip(mut text: String) -> String {
    if text.len() > MAX_LOG_TEXT {
        let mut end = MAX_LOG_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Implements the generated `Host` traits of contract module `$v` (and the
/// error conversions they need) by delegating to the methods above.
macro_rules! serve {
    ($v:ident) => {
        impl $v::weir::handler::types::Host for InstanceState {}

        impl $v::weir::handler::log::Host for InstanceState {
            fn log(
                &mut self,
                level: $v::weir::handler::log::Level,
                message: String,
                fields: Vec<(String, String)>,
            ) {
                use $v::weir::handler::log::Level as L;
                let level = match level {
                    L::Trace => GuestLevel::Trace,
                    L::Debug => GuestLevel::Debug,
                    L::Info => GuestLevel::Info,
                    L::Warn => GuestLevel::Warn,
                    L::Error => GuestLevel::Error,
                };
                self.guest_log(level, message, fields);
            }
        }

        impl From<StateFailure> for $v::weir::handler::state::StateError {
            fn from(failure: StateFailure) -> Self {
                match failure {
                    StateFailure::KeyTooLong(n) => Self::KeyTooLong(n),
                    StateFailure::ValueTooLarge(n) => Self::ValueTooLarge(n),
                    StateFailure::TooManyWrites(n) => Self::TooManyWrites(n),
                    StateFailure::TransactionTooLarge(n) => Self::TransactionTooLarge(n),
                    StateFailure::Unavailable(m) | StateFailure::InvalidKey(m) => {
                        Self::Unavailable(m)
                    }
                    StateFailure::TooManyReads(n) => Self::Unavailable(format!(
                        "this call reached its limit of {n} distinct keys read or listings made"
                    )),
                }
            }
        }

        impl $v::weir::handler::state::Host for InstanceState {
            async fn get(
                &mut self,
                key: String,
            ) -> Result<Option<Vec<u8>>, $v::weir::handler::state::StateError> {
                Ok(self.state_get(&key).await?)
            }

            async fn set(
                &mut self,
                key: String,
                value: Vec<u8>,
            ) -> Result<(), $v::weir::handler::state::StateError> {
                Ok(self.state_set(&key, value)?)
            }

            async fn delete(
                &mut self,
                key: String,
            ) -> Result<(), $v::weir::handler::state::StateError> {
                Ok(self.state_delete(&key)?)
            }

            async fn list_prefix(
                &mut self,
                prefix: String,
                start_after: Option<String>,
                limit: u32,
            ) -> Result<Vec<(String, Vec<u8>)>, $v::weir::handler::state::StateError> {
                Ok(self
                    .state_list_prefix(&prefix, start_after.as_deref(), limit)
                    .await?)
            }
        }

        impl From<EmitFailure> for $v::weir::handler::emit::EmitError {
            fn from(failure: EmitFailure) -> Self {
                match failure {
                    EmitFailure::InvalidTopic(m) => Self::InvalidTopic(m),
                    EmitFailure::TooLarge(n) => Self::TooLarge(n),
                    EmitFailure::TooMany(n) => Self::TooMany(n),
                    EmitFailure::TransactionTooLarge(n) => Self::TransactionTooLarge(n),
                }
            }
        }

        impl $v::weir::handler::emit::Host for InstanceState {
            fn send(
                &mut self,
                topic: String,
                key: Option<Vec<u8>>,
                payload: Vec<u8>,
                headers: Vec<(String, Vec<u8>)>,
            ) -> Result<(), $v::weir::handler::emit::EmitError> {
                Ok(self.emit_send(topic, key, payload, headers)?)
            }
        }

        impl $v::weir::handler::config::Host for InstanceState {
            fn get(&mut self, key: String) -> Option<String> {
                self.config_get(&key)
            }

            fn get_all(&mut self) -> Vec<(String, String)> {
                self.config_all()
            }
        }
    };
}

serve!(v0_1);
serve!(v0_2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        let short = clip("é".repeat(10));
        assert_eq!(short, "é".repeat(10));
        let long = clip("é".repeat(MAX_LOG_TEXT));
        assert!(long.ends_with('…'));
        assert!(long.len() <= MAX_LOG_TEXT + '…'.len_utf8());
    }
}
