//! Adapter signatures: an ed25519 signature over an adapter's `manifest.json`, kept beside
//! it as `manifest.sig` (the 64 signature bytes in hex). The manifest holds the SHA-256 of
//! the ONNX file, which every load checks, so a signed manifest vouches for the model too.
//!
//! With trusted public keys configured (`--trusted-keys`: one hex key per line, `#`
//! comments), a signature that is present must verify against one of them, and with
//! `--require-signatures` an adapter without one is refused as well. Every path that
//! loads an adapter (start-up, admin API, repository watch, the model repository
//! extension, reload after eviction) goes through [`Trust::check`].

use std::path::{Path, PathBuf};

use ring::signature::{ED25519, UnparsedPublicKey};

use crate::repository::manifest::MANIFEST_FILE;

/// The signature file's name, beside `manifest.json`.
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Why an adapter's signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// Signatures are required and there is none.
    #[error("{0}: unsigned, and signatures are required (manifest.sig is missing)")]
    Unsigned(PathBuf),
    /// The signature does not verify against any trusted key.
    #[error(
        "{0}: manifest.sig does not verify against any trusted key: the manifest was changed or signed by someone else"
    )]
    Invalid(PathBuf),
    /// The signature file is not 64 bytes in hex.
    #[error("{path}: manifest.sig is not an ed25519 signature in hex: {reason}")]
    Malformed {
        /// The adapter folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The trusted keys and whether a signature is required.
#[derive(Clone, Debug)]
pub struct Trust {
    keys: Vec<[u8; 32]>,
    required: bool,
}

impl Trust {
    /// Keys from `path` (one 64-hex-digit ed25519 public key per line; `#` starts a
    /// comment); `required`: refuse unsigned adapters.
    pub fn load(path: &Path, required: bool) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("trusted_keys {}: {e}", path.display()))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut key = [0u8; 32];
            hex::decode_to_slice(line, &mut key).map_err(|e| {
                format!(
                    "trusted_keys {} line {}: not a 64-hex-digit ed25519 public key: {e}",
                    path.display(),
                    n + 1
                )
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(format!("trusted_keys {} holds no key", path.display()));
        }
        Ok(Trust { keys, required })
    }

    /// How many keys are trusted.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Whether unsigned adapters are refused.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Checks the adapter folder `dir`'s signature; returns the manifest bytes it covers,
    /// which the caller must find unchanged when it reads the manifest.
    pub fn check(&self, dir: &Path) -> Result<Vec<u8>, SignatureError> {
        let io = |path: PathBuf| move |source| SignatureError::Io { path, source };
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = std::fs::read(&manifest_path).map_err(io(manifest_path))?;
        let signature_path = dir.join(SIGNATURE_FILE);
        let text = match std::fs::read_to_string(&signature_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return if self.required {
                    Err(SignatureError::Unsigned(dir.to_path_buf()))
                } else {
                    Ok(manifest)
                };
            }
            Err(e) => return Err(io(signature_path)(e)),
        };
        let mut signature = [0u8; 64];
        hex::decode_to_slice(text.trim(), &mut signature).map_err(|e| {
            SignatureError::Malformed {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let trusted = self.keys.iter().any(|key| {
            UnparsedPublicKey::new(&ED25519, key)
                .verify(&manifest, &signature)
                .is_ok()
        });
        if trusted {
            Ok(manifest)
        } else {
            Err(SignatureError::Invalid(dir.to_path_buf()))
        }
    }
}
