//! The guest's stdout and stderr, captured line by line into the log.
//!
//! Each complete line becomes one log record (target `weir::guest`) with the
//! handler's name, the stream (`stream = stdout` or `stderr`) and where the
//! event being handled sits: `topic`, `partition`, `offset` for Kafka;
//! `topic`, `jetstream` (the stream's name, since `stream` is taken) and
//! `sequence` for JetStream. A line longer
//! than [`MAX_LINE`] is split. At most [`MAX_PER_CALL`] bytes per call are
//! logged; the rest is dropped with one notice, so a handler printing in a
//! loop cannot flood the log. A partial line is flushed when the call ends.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use super::event::Origin;
use crate::lock::Unpoisoned;

/// Longest line logged as one record.
pub const MAX_LINE: usize = 4096;
/// Most output bytes logged per call.
pub const MAX_PER_CALL: usize = 64 * 1024;

struct Capture {
    handler: Arc<str>,
    stream: &'static str,
    partial: Vec<u8>,
    /// Bytes logged in the current call.
    logged: usize,
    /// Whether the truncation notice was given in this call.
    truncated: bool,
    current: Option<Arc<Origin>>,
}

impl Capture {
    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    self.partial.extend_from_slice(&bytes[..end]);
                    self.emit_partial();
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.partial.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
            while self.partial.len() > MAX_LINE {
                let rest = self.partial.split_off(MAX_LINE);
                self.emit_partial();
                self.partial = rest;
            }
        }
    }

    fn emit_partial(&mut self) {
        let line = std::mem::take(&mut self.partial);
        if self.logged >= MAX_PER_CALL {
            if !self.truncated {
                self.truncated = true;
                tracing::warn!(target: "weir::guest", handler = %self.handler, stream = self.stream,
                    "more than {MAX_PER_CALL} bytes of output in one call; the rest of this call's output is dropped");
            }
            return;
        }
        self.logged += line.len();
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\r');
        let handler = &*self.handler;
        let stream = self.stream;
        let at = self.current.as_ref();
        if stream == "stderr" {
            tagged_event!(target: "weir::guest", tracing::Level::WARN, at, jetstream,
                handler, stream, "{text}");
        } else {
            tagged_event!(target: "weir::guest", tracing::Level::INFO, at, jetstream,
                handler, stream, "{text}");
        }
    }
}

/// One captured stream; clones share the buffer.
#[derive(Clone)]
pub struct GuestOutput {
    capture: Arc<Mutex<Capture>>,
}

impl GuestOutput {
    /// A capture of `stream` (`"stdout"` or `"stderr"`) for `handler`.
    pub fn new(handler: Arc<str>, stream: &'static str) -> Self {
        Self {
            capture: Arc::new(Mutex::new(Capture {
                handler,
                stream,
                partial: Vec::new(),
                logged: 0,
                truncated: false,
                current: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        self.capture.locked()
    }

    /// A call for this event begins: tag lines with it and reset the
    /// per-call budget.
    pub fn begin(&self, current: Option<Arc<Origin>>) {
        let mut capture = self.lock();
        capture.current = current;
        capture.logged = 0;
        capture.truncated = false;
    }

    /// The call ended: log any unterminated line.
    pub fn end(&self) {
        let mut capture = self.lock();
        if !capture.partial.is_empty() {
            capture.emit_partial();
        }
        capture.current = None;
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.lock().write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.lock().write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_long_lines_and_caps_a_call() {
        let out = GuestOutput::new("h".into(), "stdout");
        out.begin(None);
        {
            let mut c = out.lock();
            c.write(b"one\ntw");
            assert!(c.partial == b"tw");
            c.write(b"o\n");
            assert!(c.partial.is_empty());
            assert_eq!(c.logged, 6);
            c.write(&vec![b'x'; MAX_LINE * 2 + 5]);
            assert_eq!(c.partial.len(), 5, "long lines are cut at MAX_LINE");
        }
        out.end();
        assert!(out.lock().partial.is_empty());
        out.begin(None);
        {
            let mut c = out.lock();
            for _ in 0..(MAX_PER_CALL / 9 + 10) {
                c.write(b"012345678\n");
            }
            assert!(c.truncated, "output past the per-call budget is dropped");
            assert!(c.logged <= MAX_PER_CALL + 10);
        }
        out.begin(None);
        assert!(!out.lock().truncated, "each call gets a fresh budget");
    }
}
