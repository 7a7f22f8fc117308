//! The handlers a runtime serves: found in the handlers directory as
//! `<name>.wasm` with a `<name>.toml` manifest beside it, compiled and checked
//! against the world before they serve a single event.

mod manifest;
pub mod watch;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use manifest::{
    BreakerSettings, DedupSettings, DlqSettings, IdSource, KeySource, Manifest, ManifestLimits,
    Ordering, RetryPolicy,
};

use crate::config::LimitsSection;
use crate::host::{CheckError, CompiledHandler, Host};
use crate::parse::ConfigError;
use crate::source::BrokerKind;

/// A handler that is ready to serve.
#[derive(Clone)]
pub struct LoadedHandler {
    /// The handler's name: the file stem of its `.wasm`.
    pub name: String,
    /// Where the component was loaded from.
    pub wasm_path: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The compiled component.
    pub compiled: CompiledHandler,
}

impl LoadedHandler {
    /// The consumer group this handler consumes in.
    pub fn group(&self) -> String {
        self.manifest.group_for(&self.name)
    }
}

/// Why a handler could not be loaded. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The `.wasm` file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file name is not usable as a handler name.
    #[error("{}: the file name must be <name>.wasm with a name of letters, digits, '-' or '_'", path.display())]
    BadName {
        /// The file.
        path: PathBuf,
    },
    /// No manifest beside the `.wasm`.
    #[error("{}: no manifest; create {} with at least `topics = [\"...\"]`", wasm.display(), manifest.display())]
    MissingManifest {
        /// The component.
        wasm: PathBuf,
        /// Where the manifest was expected.
        manifest: PathBuf,
    },
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ConfigError),
    /// A directory granted in `[sandbox] dirs` does not exist.
    #[error("{}: sandbox.dirs: {guest:?} maps to {}, which is not a directory", path.display(), host.display())]
    MissingDir {
        /// The manifest.
        path: PathBuf,
        /// The path the guest would see.
        guest: String,
        /// The directory on the host.
        host: PathBuf,
    },
    /// The manifest sets a fuel limit but the runtime does not meter fuel.
    #[error("{}: limits.fuel needs fuel metering, which is off: set [limits] fuel in the runtime configuration to turn it on", path.display())]
    FuelNotMetered {
        /// The manifest.
        path: PathBuf,
    },
    /// The component does not fit the world.
    #[error("{}: {source}", path.display())]
    Check {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: CheckError,
    },
}

impl LoadError {
    /// The file the error is about.
    pub fn file(&self) -> PathBuf {
        match self {
            LoadError::Read { path, .. }
            | LoadError::BadName { path }
            | LoadError::FuelNotMetered { path }
            | LoadError::MissingDir { path, .. }
            | LoadError::Check { path, .. } => path.clone(),
            LoadError::MissingManifest { wasm, .. } => wasm.clone(),
            LoadError::Manifest(ConfigError::Read { path, .. })
            | LoadError::Manifest(ConfigError::Invalid { path, .. }) => path.clone(),
        }
    }
}

/// Lists the `<name>.wasm` files in `dir`, sorted by name.
///
/// # Errors
///
/// When the directory cannot be read.
pub fn discover(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// The short content hash that identifies a handler version.
pub fn content_version(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Reads, compiles and checks one handler. CPU-heavy: call from a blocking
/// thread.
///
/// # Errors
///
/// [`LoadError`], naming the file and what is wrong with it.
pub fn load(
    host: &Host,
    wasm_path: &Path,
    defaults: &LimitsSection,
    broker: BrokerKind,
) -> Result<LoadedHandler, LoadError> {
    let name = handler_name(wasm_path).ok_or_else(|| LoadError::BadName {
        path: wasm_path.to_path_buf(),
    })?;
    let manifest_path = wasm_path.with_extension("toml");
    if !manifest_path.is_file() {
        return Err(LoadError::MissingManifest {
            wasm: wasm_path.to_path_buf(),
            manifest: manifest_path,
        });
    }
    let manifest = Manifest::load(&manifest_path)?;
    manifest
        .check_broker(broker)
        .map_err(|message| ConfigError::Invalid {
            path: manifest_path.clone(),
            message,
        })?;
    let bytes = std::fs::read(wasm_path).map_err(|source| LoadError::Read {
        path: wasm_path.to_path_buf(),
        source,
    })?;
    let version = content_version(&bytes);
    if manifest.limits.fuel.is_some() && !host.meters_fuel() {
        return Err(LoadError::FuelNotMetered {
            path: manifest_path,
        });
    }
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let mut dirs = Vec::new();
    for (guest, host_dir) in &manifest.sandbox.dirs {
        let host_dir = base.join(host_dir);
        if !host_dir.is_dir() {
            return Err(LoadError::MissingDir {
                path: manifest_path,
                guest: guest.clone(),
                host: host_dir,
            });
        }
        dirs.push((host_dir, guest.clone()));
    }
    let limits = manifest.limits.resolve(defaults);
    let compiled = host
        .compile(&name, &version, &bytes, limits)
        .map_err(|source| LoadError::Check {
            path: wasm_path.to_path_buf(),
            source,
        })?
        .with_config(manifest.config.clone())
        .with_env(&manifest.sandbox.env)
        .with_dirs(dirs);
    let has_effects = compiled.imports().iter().any(|import| {
        import.starts_with("weir:handler/state@") || import.starts_with("weir:handler/emit@")
    });
    if has_effects && !manifest.dedup.enabled {
        tracing::warn!(handler = %name, manifest = %manifest_path.display(),
            "the handler uses state or emit but [dedup] enabled = false: a message redelivered \
             after a crash applies its state writes and emits again. Enable dedup for exactly-once effects");
    }
    Ok(LoadedHandler {
        name,
        wasm_path: wasm_path.to_path_buf(),
        manifest,
        compiled,
    })
}

fn handler_name(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    let valid = !stem.is_empty()
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| stem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_file_stems() {
        assert_eq!(
            handler_name(Path::new("/h/orders.wasm")).as_deref(),
            Some("orders")
        );
        assert_eq!(
            handler_name(Path::new("log-events.wasm")).as_deref(),
            Some("log-events")
        );
        assert_eq!(handler_name(Path::new("bad name.wasm")), None);
        assert_eq!(handler_name(Path::new(".wasm")), None);
    }

    #[test]
    fn version_is_a_stable_short_hash() {
        assert_eq!(content_version(b"abc"), "ba7816bf8f01");
        assert_ne!(content_version(b"abc"), content_version(b"abd"));
    }

    #[test]
    fn missing_manifest_names_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wasm = dir.path().join("lonely.wasm");
        std::fs::write(&wasm, b"\0asm\x0d\0\x01\0").expect("write");
        let host = Host::new(&crate::host::HostSettings::default()).expect("host");
        let err = load(&host, &wasm, &LimitsSection::default(), BrokerKind::Kafka)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            err.contains("lonely.wasm") && err.contains("lonely.toml"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_reported_as_not_wasm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wasm = dir.path().join("junk.wasm");
        std::fs::write(&wasm, b"definitely not wasm").expect("write");
        std::fs::write(dir.path().join("junk.toml"), "topics = [\"t\"]").expect("write");
        let host = Host::new(&crate::host::HostSettings::default()).expect("host");
        let err = load(&host, &wasm, &LimitsSection::default(), BrokerKind::Kafka)
            .err()
            .expect("must fail");
        assert_eq!(err.file(), wasm);
        assert!(err.to_string().contains("not a WebAssembly file"), "{err}");
    }
}
