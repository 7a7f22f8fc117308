//! What one handler's calls may use: memory, time, fuel, tables,
//! instances. The registry resolves them from the manifest and the
//! runtime's defaults; the host enforces them.

use std::time::Duration;

/// Limits in force for one handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear-memory cap in bytes.
    pub memory: u64,
    /// Wall-clock limit for one call.
    pub timeout: Duration,
    /// Fuel per call, when metered.
    pub fuel: Option<u64>,
    /// Most elements in any one table.
    pub table_elements: u32,
    /// Most core instances.
    pub instances: u32,
}
