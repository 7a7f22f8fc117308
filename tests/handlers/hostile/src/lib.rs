//! A handler for sandbox tests: misbehaves as the `hostile.do` header asks.
//!
//! | `hostile.do`     | what it does                                            |
//! |------------------|---------------------------------------------------------|
//! | absent or `ok`   | returns `ok`                                            |
//! | `loop`           | spins forever (the timeout must stop it)                |
//! | `log-flood`      | writes 2,000 log records `flood` of 100 fields each, then `ok` |
//! | `sleep`          | sleeps 60 s in the host (`wasi:clocks`; the timeout must stop it) |
//! | `alloc-4g`       | grows linear memory by 4 GiB (the memory limit must stop it) |
//! | `grow`           | grows a vector 1 MiB at a time, forever                 |
//! | `stack-overflow` | recurses without end                                    |
//! | `unreachable`    | executes `unreachable` (a trap)                         |
//! | `open-file`      | opens `/etc/passwd`; returns a permanent error saying what happened |
//! | `read-env`       | reads the environment; returns a permanent error listing what it saw |
//! | `print:TEXT`     | prints TEXT to stdout and `err: TEXT` to stderr, then `ok` |
//! | `read:PATH`      | reads PATH; a permanent error quoting it, or saying why not (a FIFO blocks it in the host) |
//! | `write:PATH`     | writes PATH; a permanent error saying what happened    |
//!
//! Any other value is a permanent error saying so.

use std::hint::black_box;

use weir_sdk::{Event, Handler, HandlerError, export_handler};

struct Hostile;

/// Recursion that keeps nothing in linear memory, so that it exhausts the
/// engine's call stack (rather than the shadow stack Rust keeps in linear
/// memory).
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    recurse(black_box(depth + 1)).wrapping_add(black_box(depth))
}

impl Handler for Hostile {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let request = event.header_str("hostile.do").unwrap_or("ok").to_string();
        match request.as_str() {
            "ok" => Ok(()),
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "log-flood" => {
                let names: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
                let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
                for _ in 0..2000 {
                    weir_sdk::log::info("flood", &fields);
                }
                Ok(())
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(60));
                Err(HandlerError::permanent(
                    "slept 60 s: the timeout did not stop a sleep in the host",
                ))
            }
            "alloc-4g" => {
                // 65536 pages of 64 KiB: all of a 32-bit address space.
                #[cfg(target_arch = "wasm32")]
                let grown = core::arch::wasm32::memory_grow(0, 65536);
                #[cfg(not(target_arch = "wasm32"))]
                let grown = usize::MAX;
                Err(HandlerError::permanent(format!(
                    "memory.grow by 4 GiB returned {grown} instead of being stopped"
                )))
            }
            "grow" => {
                let mut chunks: Vec<Vec<u8>> = Vec::new();
                loop {
                    chunks.push(vec![1; 1 << 20]);
                    black_box(&chunks);
                }
            }
            "stack-overflow" => {
                let depth = recurse(0);
                Err(HandlerError::permanent(format!(
                    "recursion returned {depth}"
                )))
            }
            "unreachable" => {
                // The `unreachable` instruction itself.
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_arch = "wasm32"))]
                unreachable!("hostile: unreachable")
            }
            "open-file" => match std::fs::read("/etc/passwd") {
                Ok(bytes) => Err(HandlerError::permanent(format!(
                    "read {} bytes of /etc/passwd: the sandbox is open",
                    bytes.len()
                ))),
                Err(err) => Err(HandlerError::permanent(format!(
                    "open /etc/passwd denied: {err}"
                ))),
            },
            "read-env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                Err(HandlerError::permanent(format!(
                    "environment has {} variables: [{}]",
                    vars.len(),
                    vars.join(",")
                )))
            }
            other => {
                if let Some(text) = other.strip_prefix("print:") {
                    println!("{text}");
                    eprintln!("err: {text}");
                    return Ok(());
                }
                if let Some(path) = other.strip_prefix("read:") {
                    return Err(HandlerError::permanent(
                        match std::fs::read_to_string(path) {
                            Ok(text) => format!("read {path}: {}", text.trim()),
                            Err(err) => format!("read {path} denied: {err}"),
                        },
                    ));
                }
                if let Some(path) = other.strip_prefix("write:") {
                    return Err(HandlerError::permanent(match std::fs::write(path, b"x") {
                        Ok(()) => format!("wrote {path}: the sandbox is writable"),
                        Err(err) => format!("write {path} denied: {err}"),
                    }));
                }
                Err(HandlerError::permanent(format!(
                    "hostile: unknown request {other:?}"
                )))
            }
        }
    }
}

export_handler!(Hostile);
