//! Does a component fit the `handler` world? And if not, what exactly is
//! wrong, said in words a handler author can act on.

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};

use super::bindings::{HandlerPre, WORLD_PACKAGE};
use super::instance::StoreState;

/// Why a file cannot serve as a handler.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly file (it does not start with the \\0asm magic bytes)")]
    NotWasm,
    /// A core module was given where a component is needed.
    #[error(
        "this is a core WebAssembly module, not a component; build for the \
         wasm32-wasip2 target (Rust), with componentize-py (Python) or jco (JavaScript), \
         or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    /// The component does not compile.
    #[error("invalid component: {0}")]
    Compile(String),
    /// The component imports something this runtime does not provide.
    #[error("{0}")]
    Import(String),
    /// The `handle` export is missing or has the wrong type.
    #[error("{0}")]
    Export(String),
}

/// Checks the header so that obvious mistakes get a precise message before
/// the compiler's generic one.
pub(super) fn sniff(bytes: &[u8]) -> Result<(), CheckError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(CheckError::NotWasm);
    }
    // Bytes 4..8: version and layer. Core modules are `01 00 00 00`;
    // components have layer 1 (`xx xx 01 00`).
    if bytes[6..8] == [0, 0] {
        return Err(CheckError::CoreModule);
    }
    Ok(())
}

/// Links `component` against the runtime's linker and checks its exports.
pub(super) fn link(
    linker: &Linker<StoreState>,
    component: &Component,
) -> Result<HandlerPre<StoreState>, CheckError> {
    let engine = linker.engine();
    let ty = component.component_type();

    // Imports: the runtime provides `weir:handler/*` at WORLD_PACKAGE's
    // version and WASI 0.2 without HTTP. Explain a version skew or an HTTP
    // import plainly, before the linker's generic error.
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix("weir:handler/") {
            let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("(none)");
            if !WORLD_PACKAGE.ends_with(&format!("@{version}")) {
                return Err(CheckError::Import(format!(
                    "the component imports `{name}`, built against weir:handler version {version}; \
                     this runtime provides {WORLD_PACKAGE}. Rebuild the handler against the WIT \
                     shipped with this runtime"
                )));
            }
        }
        if name.starts_with("wasi:http/") {
            return Err(CheckError::Import(format!(
                "the component imports `{name}`, but handlers have no HTTP access. \
                 JavaScript built with componentize-js imports it unless built with \
                 `--disable http fetch-event`"
            )));
        }
    }
    let pre = linker.instantiate_pre(component).map_err(|err| {
        CheckError::Import(format!(
            "{err:#}. A handler may import only the `weir:handler` interfaces and WASI 0.2 \
             (wasi:cli, wasi:io, wasi:clocks, wasi:random, wasi:filesystem, wasi:sockets); \
             run `weir check` to see the component's imports"
        ))
    })?;

    // Exports: `handle: func(event: event) -> result<_, handler-error>`.
    let mut exports = Vec::new();
    let mut handle = None;
    for (name, item) in ty.exports(engine) {
        if name == "handle" {
            handle = Some(item.ty);
        }
        exports.push(name.to_string());
    }
    match handle {
        None => {
            let listed = if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            };
            return Err(CheckError::Export(format!(
                "the component does not export a function `handle` (it exports: {listed}); \
                 a handler must export `handle: func(event: event) -> result<_, handler-error>` \
                 from the world {WORLD_PACKAGE}/handler"
            )));
        }
        Some(ComponentItem::ComponentFunc(_)) => {}
        Some(_) => {
            return Err(CheckError::Export(
                "the component's export `handle` is not a function; it must be \
                 `handle: func(event: event) -> result<_, handler-error>`"
                    .into(),
            ));
        }
    }
    HandlerPre::new(pre).map_err(|err| {
        CheckError::Export(format!(
            "the component's `handle` export has the wrong type ({err:#}); it must be \
             `handle: func(event: event) -> result<_, handler-error>` as defined by \
             {WORLD_PACKAGE} — rebuild against the WIT shipped with this runtime"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_tells_core_modules_from_components() {
        assert!(matches!(sniff(b"hello world"), Err(CheckError::NotWasm)));
        assert!(matches!(sniff(b"\0asm"), Err(CheckError::NotWasm)));
        assert!(matches!(
            sniff(b"\0asm\x01\0\0\0"),
            Err(CheckError::CoreModule)
        ));
        assert!(sniff(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
