//! Reading settings files: the grammar `weir.toml` and handler manifests
//! share. Errors name the file, the key and the line; durations are written
//! like `"5s"`, sizes like `"64MiB"`.
//!
//! A leaf: it imports nothing of the crate, so every layer can read its own
//! settings with it.

use std::path::{Path, PathBuf};

/// Errors from reading a configuration or manifest file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the expected shape.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key (and line) involved.
        message: String,
    },
}

/// Parses a TOML document into `T`, turning errors into messages that name
/// the file, the key and the line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|err| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: describe_toml_error(text, &err),
    })
}

fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end().to_string();
    match err.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// Reads and parses a TOML file into `T`.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Serde helpers for durations written like `"250ms"`, `"5s"` or `"1m 30s"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Reads a duration written like `"5s"`.
    ///
    /// # Errors
    ///
    /// Saying how to write one.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({err}); write it like \"250ms\", \"5s\" or \"2m\""
            ))
        })
    }
}

/// Serde helpers for sizes written like `"64MiB"`, `"512KiB"` or `"1GiB"`.
pub mod byte_size {
    use serde::{Deserialize, Deserializer};

    /// Reads a size written like `"64MiB"`.
    ///
    /// # Errors
    ///
    /// Saying how to write one.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size {text:?}; write it like \"64MiB\", \"512KiB\" or \"1GiB\""
            ))
        })
    }

    /// Parses `<number><unit>` with units B, KiB, MiB, GiB (and KB/MB/GB as
    /// powers of 1000).
    pub fn parse(text: &str) -> Option<u64> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        number.checked_mul(scale)
    }
}
