//! Durable key-value state, private to the handler and committed atomically
//! with the event being handled.
//!
//! Writes made during `handle` are committed together with the event's
//! deduplication mark and the events it emitted, only if `handle` returns
//! `Ok`; if it fails, traps or times out they are discarded. Reads see the
//! state as of the call's first access plus the call's own writes. If an
//! event running in parallel changed something this call read, Weir runs
//! the call again on the new state, so read-modify-write never loses an
//! update. See `wit/handler.wit` for the whole model.
//!
//! ```
//! use weir_sdk::state;
//!
//! # fn main() -> Result<(), weir_sdk::HandlerError> {
//! let seen: u64 = state::get_json("orders/seen")?.unwrap_or(0);
//! state::set_json("orders/seen", &(seen + 1))?;
//! assert_eq!(state::get_json::<u64>("orders/seen")?, Some(seen + 1));
//! # Ok(())
//! # }
//! ```
//!
//! Natively (in `cargo test`) state is a per-thread map: writes apply at
//! once and [`clear`] resets it; the transactional discard on failure
//! happens only inside Weir.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Category, HandlerError};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most entries one [`list_prefix`] returns.
pub const MAX_LIST: u32 = 1000;

/// Why a state operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The key is longer than the limit (bytes).
    KeyTooLong(u32),
    /// The value is larger than the limit (bytes).
    ValueTooLarge(u32),
    /// The call already buffered the most writes allowed.
    TooManyWrites(u32),
    /// The call's writes and emitted events exceed the limit (bytes).
    TransactionTooLarge(u32),
    /// The state could not be read.
    Unavailable(String),
    /// A stored value is not the JSON expected by [`get_json`].
    BadJson(String),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KeyTooLong(n) => write!(f, "state key longer than {n} bytes"),
            Self::ValueTooLarge(n) => write!(f, "state value larger than {n} bytes"),
            Self::TooManyWrites(n) => write!(f, "more than {n} state writes in one call"),
            Self::TransactionTooLarge(n) => {
                write!(f, "writes and emitted events exceed {n} bytes in one call")
            }
            Self::Unavailable(m) => write!(f, "state unavailable: {m}"),
            Self::BadJson(m) => write!(f, "stored value is not the expected JSON: {m}"),
        }
    }
}

impl std::error::Error for StateError {}

/// An unavailable store is transient: retryable, category
/// `service-unavailable`. Limits (and a stored value that is not the JSON
/// expected) are the handler's own doing and will not change on retry:
/// permanent, category `internal`.
impl From<StateError> for HandlerError {
    fn from(err: StateError) -> Self {
        match err {
            StateError::Unavailable(_) => {
                HandlerError::retryable(err.to_string()).category(Category::ServiceUnavailable)
            }
            _ => HandlerError::permanent(err.to_string()).category(Category::Internal),
        }
    }
}

/// The value stored under `key`, if any.
///
/// # Errors
///
/// A key over the limit, or the store is unavailable.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, StateError> {
    backend::get(key)
}

/// Stores `value` under `key`.
///
/// # Errors
///
/// A key or value over the limit, or too much written in this call.
pub fn set(key: &str, value: &[u8]) -> Result<(), StateError> {
    backend::set(key, value)
}

/// Removes `key` (a missing key is fine).
///
/// # Errors
///
/// A key over the limit, or too much written in this call.
pub fn delete(key: &str) -> Result<(), StateError> {
    backend::delete(key)
}

/// Entries whose key starts with `prefix`, in key order, after
/// `start_after` (for paging), at most `limit` (capped at [`MAX_LIST`]).
///
/// # Errors
///
/// A prefix over the key limit, or the store is unavailable.
pub fn list_prefix(
    prefix: &str,
    start_after: Option<&str>,
    limit: u32,
) -> Result<Vec<(String, Vec<u8>)>, StateError> {
    backend::list_prefix(prefix, start_after, limit.min(MAX_LIST))
}

/// The JSON value stored under `key`, if any.
///
/// # Errors
///
/// As [`get`], or [`StateError::BadJson`] when the value does not parse as
/// `T`.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, StateError> {
    match get(key)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::BadJson(format!("{key}: {e}"))),
        None => Ok(None),
    }
}

/// Stores `value` as JSON under `key`.
///
/// # Errors
///
/// As [`set`].
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StateError::BadJson(e.to_string()))?;
    set(key, &bytes)
}

/// Empties this thread's native state (for unit tests; does nothing in a
/// component).
pub fn clear() {
    backend::clear();
}

#[cfg(target_arch = "wasm32")]
mod backend {
    use super::StateError;
    use crate::bindings::weir::handler::state as wit;

    fn convert(err: wit::StateError) -> StateError {
        match err {
            wit::StateError::KeyTooLong(n) => StateError::KeyTooLong(n),
            wit::StateError::ValueTooLarge(n) => StateError::ValueTooLarge(n),
            wit::StateError::TooManyWrites(n) => StateError::TooManyWrites(n),
            wit::StateError::TransactionTooLarge(n) => StateError::TransactionTooLarge(n),
            wit::StateError::Unavailable(m) => StateError::Unavailable(m),
        }
    }

    pub(super) fn get(key: &str) -> Result<Option<Vec<u8>>, StateError> {
        wit::get(key).map_err(convert)
    }

    pub(super) fn set(key: &str, value: &[u8]) -> Result<(), StateError> {
        wit::set(key, value).map_err(convert)
    }

    pub(super) fn delete(key: &str) -> Result<(), StateError> {
        wit::delete(key).map_err(convert)
    }

    pub(super) fn list_prefix(
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        wit::list_prefix(prefix, start_after, limit).map_err(convert)
    }

    pub(super) fn clear() {}
}

#[cfg(not(target_arch = "wasm32"))]
mod backend {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::ops::Bound;

    use super::{MAX_KEY_BYTES, MAX_VALUE_BYTES, StateError};

    thread_local! {
        static MAP: RefCell<BTreeMap<String, Vec<u8>>> = const { RefCell::new(BTreeMap::new()) };
    }

    fn check(key: &str) -> Result<(), StateError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(StateError::KeyTooLong(MAX_KEY_BYTES as u32));
        }
        Ok(())
    }

    pub(super) fn get(key: &str) -> Result<Option<Vec<u8>>, StateError> {
        check(key)?;
        Ok(MAP.with(|m| m.borrow().get(key).cloned()))
    }

    pub(super) fn set(key: &str, value: &[u8]) -> Result<(), StateError> {
        check(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(StateError::ValueTooLarge(MAX_VALUE_BYTES as u32));
        }
        MAP.with(|m| m.borrow_mut().insert(key.to_string(), value.to_vec()));
        Ok(())
    }

    pub(super) fn delete(key: &str) -> Result<(), StateError> {
        check(key)?;
        MAP.with(|m| m.borrow_mut().remove(key));
        Ok(())
    }

    pub(super) fn list_prefix(
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        check(prefix)?;
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        Ok(MAP.with(|m| {
            m.borrow()
                .range((lower, Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(limit as usize)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }))
    }

    pub(super) fn clear() {
        MAP.with(|m| m.borrow_mut().clear());
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn native_state_lists_by_prefix_and_pages() {
        clear();
        for key in ["a/1", "a/2", "a/3", "b/1"] {
            set(key, key.as_bytes()).expect("set");
        }
        let keys = |e: Vec<(String, Vec<u8>)>| e.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(list_prefix("a/", None, 2).expect("list")),
            ["a/1", "a/2"]
        );
        assert_eq!(
            keys(list_prefix("a/", Some("a/2"), 10).expect("list")),
            ["a/3"]
        );
        delete("a/1").expect("delete");
        assert_eq!(get("a/1").expect("get"), None);
        assert_eq!(
            set(&"k".repeat(MAX_KEY_BYTES + 1), b""),
            Err(StateError::KeyTooLong(MAX_KEY_BYTES as u32))
        );
        set("n", b"not json").expect("set");
        assert!(matches!(get_json::<u64>("n"), Err(StateError::BadJson(_))));
    }
}
