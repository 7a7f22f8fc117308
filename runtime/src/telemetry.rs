//! Logging: human-readable or JSON lines on stderr, filtered by `WEIR_LOG`
//! (same syntax as `RUST_LOG`, e.g. `weir=debug,weir::guest=info`).

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Aligned, colored when stderr is a terminal.
    Pretty,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// Installs the global subscriber. `default_filter` applies when `WEIR_LOG`
/// is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Pretty => builder.compact().init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}
