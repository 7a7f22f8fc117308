//! Rust types generated from `wit/handler.wit`: the `handler` world as the
//! host sees it.

// Generated code: documented by the WIT file it is generated from.
#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "weir:handler/handler",
});

pub use weir::handler::emit::EmitError;
pub use weir::handler::log::Level;
pub use weir::handler::state::StateError;
pub use weir::handler::types::RetryAfter;

/// The package and version of the contract this runtime implements.
pub const WORLD_PACKAGE: &str = "weir:handler@0.1.0";
