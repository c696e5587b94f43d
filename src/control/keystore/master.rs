//! The master key: the 256-bit AES-GCM key the store file is sealed under.

use std::fmt;
use std::path::Path;

use super::StoreError;

/// Length of a master key in bytes (AES-256).
pub const MASTER_KEY_BYTES: usize = 32;

/// The key the store file is encrypted under: 32 bytes, read from an
/// environment variable or a file (a systemd credential), written as 64 hex
/// digits (`openssl rand -hex 32`).
///
/// It has no `Display`; `Debug` shows only a check value (see
/// [`MasterKey::check`]), and the bytes are overwritten when it is dropped.
pub struct MasterKey([u8; MASTER_KEY_BYTES]);

impl MasterKey {
    /// Parses 64 hex digits; surrounding whitespace (a trailing newline from
    /// `openssl rand -hex 32 > file`) is ignored. Errors never quote the text.
    pub fn from_hex(text: &str) -> Result<MasterKey, StoreError> {
        let text = text.trim();
        if text.len() != 2 * MASTER_KEY_BYTES {
            return Err(StoreError::BadMasterKey(format!(
                "expected {} hex digits, got {} characters",
                2 * MASTER_KEY_BYTES,
                text.chars().count()
            )));
        }
        let mut key = [0u8; MASTER_KEY_BYTES];
        for (out, pair) in key.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            match (hex_digit(pair[0]), hex_digit(pair[1])) {
                (Some(hi), Some(lo)) => *out = hi << 4 | lo,
                _ => {
                    return Err(StoreError::BadMasterKey(
                        "not hexadecimal (only 0-9, a-f, A-F are allowed)".to_string(),
                    ))
                }
            }
        }
        Ok(MasterKey(key))
    }

    /// Reads the key from the environment variable `var` (64 hex digits).
    pub fn from_env(var: &str) -> Result<MasterKey, StoreError> {
        match std::env::var(var) {
            Ok(text) => MasterKey::from_hex(&text).map_err(|e| match e {
                StoreError::BadMasterKey(why) => {
                    StoreError::BadMasterKey(format!("environment variable {var}: {why}"))
                }
                other => other,
            }),
            Err(std::env::VarError::NotPresent) => Err(StoreError::BadMasterKey(format!(
                "environment variable {var} is not set"
            ))),
            Err(std::env::VarError::NotUnicode(_)) => Err(StoreError::BadMasterKey(format!(
                "environment variable {var} is not valid UTF-8"
            ))),
        }
    }

    /// Reads the key from a file: 64 hex digits (surrounding whitespace
    /// ignored), or exactly 32 raw bytes (what `systemd-creds` or
    /// `head -c 32 /dev/urandom` produce).
    pub fn from_file(path: &Path) -> Result<MasterKey, StoreError> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| StoreError::io(format!("master key file {}", path.display()), e))?;
        let looks_hex = bytes
            .iter()
            .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace());
        let result = if bytes.len() == MASTER_KEY_BYTES && !looks_hex {
            let mut key = [0u8; MASTER_KEY_BYTES];
            key.copy_from_slice(&bytes);
            Ok(MasterKey(key))
        } else {
            match std::str::from_utf8(&bytes) {
                Ok(text) => MasterKey::from_hex(text),
                Err(_) => Err(StoreError::BadMasterKey(format!(
                    "expected 64 hex digits or 32 raw bytes, got {} bytes",
                    bytes.len()
                ))),
            }
        };
        wipe(&mut bytes);
        result.map_err(|e| match e {
            StoreError::BadMasterKey(why) => {
                StoreError::BadMasterKey(format!("master key file {}: {why}", path.display()))
            }
            other => other,
        })
    }

    /// A key made from raw bytes (tests, or a caller that derived one).
    pub fn from_bytes(bytes: [u8; MASTER_KEY_BYTES]) -> MasterKey {
        MasterKey(bytes)
    }

    /// A short check value of the key (16 hex digits of HMAC-SHA256 under a
    /// fixed label): stored in the file so a wrong key is told apart from a
    /// damaged file, and safe to log. It reveals nothing usable about the key.
    pub fn check(&self) -> String {
        let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let tag = ring::hmac::sign(&mac, b"clio-relay keystore key check v1");
        tag.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The key bytes, for the AEAD only.
    pub(super) fn bytes(&self) -> &[u8; MASTER_KEY_BYTES] {
        &self.0
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(check:{})", self.check())
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Overwrites secret bytes before their memory is released (best effort:
/// volatile writes, so the compiler cannot drop them as dead stores).
pub(super) fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to a u8.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}
