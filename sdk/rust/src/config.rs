//! Read-only settings from the `[config]` table of the handler's manifest.
//!
//! ```
//! use weir_sdk::config;
//!
//! config::set_for_test("max_amount_cents", "50000");
//! let limit: u64 = config::parse("max_amount_cents").unwrap_or(100_000);
//! assert_eq!(limit, 50_000);
//! assert_eq!(config::get_or("currency", "EUR"), "EUR");
//! ```
//!
//! Natively (in `cargo test`) values come from [`set_for_test`].

use std::str::FromStr;

/// The value of `key`, if the manifest sets it.
pub fn get(key: &str) -> Option<String> {
    backend::get(key)
}

/// The value of `key`, or `default`.
pub fn get_or(key: &str, default: &str) -> String {
    get(key).unwrap_or_else(|| default.to_string())
}

/// The value of `key` parsed as `T`; `None` if unset or unparsable.
pub fn parse<T: FromStr>(key: &str) -> Option<T> {
    get(key)?.trim().parse().ok()
}

/// Every setting, sorted by key.
pub fn get_all() -> Vec<(String, String)> {
    backend::get_all()
}

/// Sets a value for native unit tests (does nothing in a component).
pub fn set_for_test(key: &str, value: &str) {
    backend::set(key, value);
}

/// Removes every value set with [`set_for_test`].
pub fn clear_for_test() {
    backend::clear();
}

#[cfg(target_arch = "wasm32")]
mod backend {
    use crate::bindings::weir::handler::config as wit;

    pub(super) fn get(key: &str) -> Option<String> {
        wit::get(key)
    }

    pub(super) fn get_all() -> Vec<(String, String)> {
        wit::get_all()
    }

    pub(super) fn set(_key: &str, _value: &str) {}

    pub(super) fn clear() {}
}

#[cfg(not(target_arch = "wasm32"))]
mod backend {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        static VALUES: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    }

    pub(super) fn get(key: &str) -> Option<String> {
        VALUES.with(|v| v.borrow().get(key).cloned())
    }

    pub(super) fn get_all() -> Vec<(String, String)> {
        VALUES.with(|v| {
            v.borrow()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }

    pub(super) fn set(key: &str, value: &str) {
        VALUES.with(|v| v.borrow_mut().insert(key.to_string(), value.to_string()));
    }

    pub(super) fn clear() {
        VALUES.with(|v| v.borrow_mut().clear());
    }
}
