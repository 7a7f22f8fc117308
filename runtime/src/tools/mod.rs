//! Operator commands that act on the broker (and, later, the store)
//! outside the running pipeline: `weir dlq`, `weir replay`.

pub mod dlq;
pub mod dlq_command;
pub mod replay;
