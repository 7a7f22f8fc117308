//! Weir: a runtime for event handlers written as WebAssembly components.
//!
//! Weir consumes messages from a broker, hands each to a handler component
//! (any language that compiles to the `weir:handler` world) inside a
//! wasmtime sandbox, retries transient failures, dead-letters poison
//! messages, and commits a message's offset only once its outcome is
//! durable.
//!
//! The crate is laid out along the path of a message:
//!
//! - [`source`]: brokers (Kafka through librdkafka; the embedded broker).
//! - [`pipeline`]: decode → invoke → retry / dead-letter → acknowledge.
//! - [`host`]: the wasmtime engine, the linker granting the world, limits.
//! - [`registry`]: handler files, manifests, loading.
//! - [`runtime`]: wiring the above into a running process.

pub mod admin;
pub mod config;
pub mod demo;
pub mod fault;
pub mod host;
pub mod lock;
pub mod message;
pub mod metrics;
pub mod parse;
pub mod pipeline;
pub mod registry;
pub mod runtime;
pub mod scaffold;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod tools;
