//! The admin token: the bearer token the routes that reveal state or act
//! require (see [`super::access`](mod@super::access)).
//!
//! Where it comes from: `[admin] token` when set (usually a reference such
//! as `"${WEIR_ADMIN_TOKEN}"` or `"${file:/run/secrets/weir-admin}"`, see
//! [`crate::config::secrets`]); otherwise a new random token each time the
//! server starts, written to [`TOKEN_FILE`] in `[runtime] data_dir`,
//! readable by its owner only. The CLI on the same machine (`weir state`
//! while `weir run` holds the database) reads the same setting or the same
//! file, so the operator never types it. Invariants: the token is never
//! logged or answered; a request's token is compared by digest, in time that
//! does not depend on where it differs.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The file a generated token is written to, in the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// The token a running admin server requires, kept only as its digest.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

impl Token {
    /// The configured token, or a new random one written to
    /// [`TOKEN_FILE`] in `data_dir` (mode 0600, replacing an older one).
    /// Returns the token and, when generated, where it was written.
    ///
    /// # Errors
    ///
    /// When no random bytes can be had or the file cannot be written.
    pub fn resolve(
        configured: Option<&str>,
        data_dir: &Path,
    ) -> anyhow::Result<(Self, Option<PathBuf>)> {
        if let Some(token) = configured {
            return Ok((
                Self {
                    digest: digest(token.trim()),
                },
                None,
            ));
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|err| anyhow::anyhow!("cannot make an admin token: {err}"))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        crate::config::secrets::register(&token);
        let path = data_dir.join(TOKEN_FILE);
        write_private(&path, &token)?;
        Ok((
            Self {
                digest: digest(&token),
            },
            Some(path),
        ))
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &str) -> bool {
        let presented = digest(presented);
        presented
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// Writes `text` to `path` readable and writable by its owner only: into a
/// new file beside it, then renamed over it, so a reader never sees half.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|err| anyhow::anyhow!("cannot create {}: {err}", dir.display()))?;
    let partial = path.with_extension("token.partial");
    let _ = std::fs::remove_file(&partial);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, path)
    };
    write().map_err(|err| {
        anyhow::anyhow!(
            "[admin] token: cannot write a generated token to {}: {err}",
            path.display()
        )
    })
}

/// The token a client on this machine presents to the admin server of the
/// process configured alike: `[admin] token`, else the contents of
/// [`TOKEN_FILE`] in `data_dir` (`None` when there is none).
pub fn for_client(configured: Option<&str>, data_dir: &Path) -> Option<String> {
    if let Some(token) = configured {
        return Some(token.trim().to_string());
    }
    std::fs::read_to_string(data_dir.join(TOKEN_FILE))
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_private_and_what_a_client_reads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let (token, written) = Token::resolve(None, dir.path()).expect("token");
        let path = written.expect("written");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = for_client(None, dir.path()).expect("client token");
        assert_eq!(read.len(), 64);
        assert!(token.matches(&read));
        assert!(!token.matches(""));
        assert!(!token.matches(&read[1..]));
        // A second start replaces it.
        let (again, _) = Token::resolve(None, dir.path()).expect("token");
        assert!(!again.matches(&read));
    }

    #[test]
    fn a_configured_token_is_used_as_is_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (token, written) =
            Token::resolve(Some("s3cret-s3cret-s3cret"), dir.path()).expect("token");
        assert!(written.is_none());
        assert!(token.matches("s3cret-s3cret-s3cret"));
        assert!(!dir.path().join(TOKEN_FILE).exists());
        assert_eq!(format!("{token:?}"), "Token(…)");
    }
}
