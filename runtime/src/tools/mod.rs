//! Operator commands that act on the broker (and, later, the store)
//! outside the running pipeline: `weir dlq`, `weir rewind`.

pub mod dlq;
pub mod dlq_command;
pub mod rewind;
