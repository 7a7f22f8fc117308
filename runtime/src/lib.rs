//! Weir: a runtime for event handlers written as WebAssembly components.
//!
//! Weir consumes messages from a broker, hands each to a handler component
//! (any language that compiles to the `weir:handler` world) inside a
//! wasmtime sandbox, retries transient failures, dead-letters poison
//! messages, and commits a message's offset only once its outcome is
//! durable.
//!
//! The crate is laid out along the path of a message (`ARCHITECTURE.md`
//! walks one through it):
//!
//! - [`source`]: the brokers, behind [`source::Broker`] — Kafka (librdkafka),
//!   NATS JetStream, RabbitMQ, Redis Streams, Amazon SQS, and an embedded
//!   Kafka-protocol broker.
//! - [`pipeline`]: lanes → dedup → invoke → retry / dead-letter → commit →
//!   settle, knowing no broker.
//! - [`host`]: the wasmtime engine, the linker granting the world, limits.
//! - [`store`]: dedup marks, attempts, state and the outbox (redb or
//!   PostgreSQL).
//! - [`registry`]: handler files and manifests.
//! - [`runtime`]: wiring the above into a running process; the one place
//!   that names the brokers ([`runtime::connect`]).
//! - [`admin`], [`tools`]: the admin server, and the operator commands.
//!
//! Imports between these modules point one way (a test checks it).

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
pub mod shutdown;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod tools;
