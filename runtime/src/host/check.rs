//! Does a component fit the `handler` world of a contract version this
//! runtime serves? Which version? And if it fits none, what exactly is
//! wrong, said in words a handler author can act on.

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre, Linker};

use super::bindings::{Contract, v0_1, v0_2};
use super::instance::InstanceState;

/// A component linked and checked against the world of its contract
/// version, ready to instantiate.
#[derive(Clone)]
pub(super) enum WorldPre {
    /// Built for `weir:handler@0.1.0`.
    V0_1(v0_1::HandlerPre<InstanceState>),
    /// Built for `weir:handler@0.2.0`.
    V0_2(v0_2::HandlerPre<InstanceState>),
}

impl WorldPre {
    /// The contract version the component was built for.
    pub(super) fn contract(&self) -> Contract {
        match self {
            WorldPre::V0_1(_) => Contract::V0_1,
            WorldPre::V0_2(_) => Contract::V0_2,
        }
    }

    /// The linked component, whatever its version.
    pub(super) fn instance_pre(&self) -> &InstancePre<InstanceState> {
        match self {
            WorldPre::V0_1(pre) => pre.instance_pre(),
            WorldPre::V0_2(pre) => pre.instance_pre(),
        }
    }
}

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

/// Links `component` against the runtime's linker, finds the contract
/// version it was built for and checks its `handle` export against that
/// version's world.
///
/// The version is the one its `weir:handler/*` imports name. A component
/// that imports none of them (it never logs, keeps state, emits or reads
/// settings) is told by the type of its `handle` export, newest version
/// first.
pub(super) fn link(
    linker: &Linker<InstanceState>,
    component: &Component,
) -> Result<WorldPre, CheckError> {
    let engine = linker.engine();
    let ty = component.component_type();

    // Imports: the runtime provides `weir:handler/*` at every served
    // version and WASI 0.2 without HTTP. Explain an unknown version, mixed
    // versions or an HTTP import plainly, before the linker's generic error.
    let mut imported: Option<(Contract, String)> = None;
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix("weir:handler/") {
            let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("(none)");
            let Some(contract) = Contract::from_version(version) else {
                return Err(CheckError::Import(format!(
                    "the component imports `{name}`, built against weir:handler version {version}; \
                     this runtime serves {}. Rebuild the handler against one of them (the SDKs \
                     and `weir new` use {})",
                    Contract::served(),
                    Contract::LATEST
                )));
            };
            match &imported {
                Some((first, first_name)) if *first != contract => {
                    return Err(CheckError::Import(format!(
                        "the component imports `{first_name}` and `{name}`: two versions of \
                         weir:handler in one component. Build it against one version (the SDKs \
                         and `weir new` use {})",
                        Contract::LATEST
                    )));
                }
                Some(_) => {}
                None => imported = Some((contract, name.to_string())),
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
    let contract = imported.as_ref().map(|(c, _)| *c);
    let world = contract.unwrap_or(Contract::LATEST);
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
                 from the world {world}/handler"
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
    let candidates: Vec<Contract> = match contract {
        Some(contract) => vec![contract],
        None => Contract::ALL.into_iter().rev().collect(),
    };
    let mut mismatch = None;
    for candidate in candidates {
        let linked = match candidate {
            Contract::V0_1 => v0_1::HandlerPre::new(pre.clone()).map(WorldPre::V0_1),
            Contract::V0_2 => v0_2::HandlerPre::new(pre.clone()).map(WorldPre::V0_2),
        };
        match linked {
            Ok(linked) => return Ok(linked),
            Err(err) => {
                mismatch.get_or_insert(err);
            }
        }
    }
    let detail = mismatch.map_or_else(String::new, |err| format!(" ({err:#})"));
    let against = match contract {
        Some(contract) => format!("as defined by {contract}, the version the component imports"),
        None => format!("as defined by one of {}", Contract::served()),
    };
    Err(CheckError::Export(format!(
        "the component's `handle` export has the wrong type{detail}; it must be \
         `handle: func(event: event) -> result<_, handler-error>` {against} — rebuild \
         against the WIT shipped with this runtime"
    )))
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
