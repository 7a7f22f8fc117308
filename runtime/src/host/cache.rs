//! The compiled-component cache: compiling a component takes from tens of
//! milliseconds to seconds, so the compiled form is kept on disk and reused
//! on the next start.
//!
//! An entry is keyed by the SHA-256 of the component and the engine's
//! compatibility hash (wasmtime version, target and every setting that
//! affects code), so a changed component or engine never hits a stale
//! entry. Each entry starts with the SHA-256 of the rest; an entry that is
//! truncated, corrupt or rejected by the engine is ignored, recompiled and
//! overwritten. Entries are written to a temporary file and renamed, so a
//! crash never leaves a half-written one under the real name.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A directory of compiled components for one engine.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
    engine_key: String,
}

impl ModuleCache {
    /// A cache in `dir` for components compiled by `engine`.
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Self {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        }
    }

    fn path(&self, bytes: &[u8]) -> PathBuf {
        let digest = Sha256::digest(bytes);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}-{}.cwasm", self.engine_key))
    }

    /// The compiled form of `bytes`, if a valid entry exists.
    pub fn load(&self, engine: &Engine, bytes: &[u8]) -> Option<Component> {
        let path = self.path(bytes);
        let entry = std::fs::read(&path).ok()?;
        let (checksum, compiled) = entry.split_at_checked(32)?;
        if Sha256::digest(compiled).as_slice() != checksum {
            tracing::warn!(entry = %path.display(), "corrupt compiled-component cache entry; recompiling");
            return None;
        }
        // SAFETY: `Component::deserialize` runs machine code from the given
        // bytes, so they must come from `Component::serialize` of a
        // compatible engine. They do: the entry lives in the runtime's own
        // data directory, was written by `store` below from `serialize`, is
        // keyed by this engine's compatibility hash (and wasmtime checks
        // compatibility again), and its checksum was just verified, so a
        // truncated or corrupted file is never deserialized.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, compiled) };
        match component {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(entry = %path.display(), error = %err, "unusable compiled-component cache entry; recompiling");
                None
            }
        }
    }

    /// Stores the compiled form of `bytes`. Failures are logged, never
    /// fatal: the cache only saves time.
    pub fn store(&self, bytes: &[u8], component: &Component) {
        let path = self.path(bytes);
        let result = (|| -> anyhow::Result<()> {
            let compiled = component.serialize()?;
            std::fs::create_dir_all(&self.dir)?;
            let mut entry = Sha256::digest(&compiled).to_vec();
            entry.extend_from_slice(&compiled);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &entry)?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        })();
        if let Err(err) = result {
            tracing::warn!(dir = %self.dir.display(), error = %err, "cannot write the compiled-component cache");
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_ones_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        let engine = Engine::new(&config).expect("engine");
        let cache = ModuleCache::new(dir.path().join("compiled"), &engine);
        let bytes = wat::parse_str("(component (core module (func (export \"f\"))))").expect("wat");
        assert!(cache.load(&engine, &bytes).is_none(), "empty cache");
        let component = Component::new(&engine, &bytes).expect("compile");
        cache.store(&bytes, &component);
        assert!(
            cache.load(&engine, &bytes).is_some(),
            "stored entry is used"
        );

        let other = wat::parse_str("(component (core module (func (export \"g\"))))").expect("wat");
        assert!(cache.load(&engine, &other).is_none(), "keyed by content");

        let path = cache.path(&bytes);
        let mut entry = std::fs::read(&path).expect("entry");
        let last = entry.len() - 1;
        entry[last] ^= 0xff;
        std::fs::write(&path, &entry).expect("corrupt");
        assert!(
            cache.load(&engine, &bytes).is_none(),
            "corrupt entry ignored"
        );
        std::fs::write(&path, &entry[..10]).expect("truncate");
        assert!(
            cache.load(&engine, &bytes).is_none(),
            "truncated entry ignored"
        );
        cache.store(&bytes, &component);
        assert!(cache.load(&engine, &bytes).is_some(), "rebuilt");
    }
}
