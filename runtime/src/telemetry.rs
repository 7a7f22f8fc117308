//! Logging: human-readable or JSON lines on stderr, filtered by `WEIR_LOG`
//! (same syntax as `RUST_LOG`, e.g. `weir=debug,weir::guest=info`).
//!
//! Invariant: every line passes through
//! [`crate::config::secrets::redact`] on its way out ([`Redacting`]), so a
//! secret that a library puts in an error (a URL with its password, a
//! property) is masked whoever logged it.

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
        .with_writer(Redacting)
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

/// Standard error, with secrets masked. The formatter writes each event
/// with one call, so a secret is never split between two writes.
pub struct Redacting;

/// One event's output on its way to standard error.
pub struct RedactingWriter(std::io::Stderr);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Redacting {
    type Writer = RedactingWriter;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(std::io::stderr())
    }
}

impl std::io::Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let shown = crate::config::secrets::redact(&text);
        self.0.write_all(shown.as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
