//! The store file's bytes: three text lines.
//!
//! ```text
//! CLIO-KEYSTORE v1
//! key <16 hex digits: MasterKey::check() of the key it is sealed under>
//! <base64 (standard, padded) of: 12-byte nonce || AES-256-GCM ciphertext || 16-byte tag>
//! ```
//!
//! Every line ends in `\n`, so a file cut short anywhere lacks its final
//! newline and is reported as [`StoreError::Corrupt`]. The first two lines
//! (with their newlines) are the AEAD's associated data, so neither can be
//! changed without the tag failing. The key check line tells a wrong master
//! key ([`StoreError::WrongMasterKey`]) from a damaged file
//! ([`StoreError::Corrupt`]) before anything is decrypted. The nonce is fresh
//! from the system RNG on every save (at 2^32 saves per key the chance of a
//! repeat is still negligible for a store written by hand-driven changes).

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::master::{wipe, MasterKey};
use super::StoreError;

/// The first line of every store file.
pub const MAGIC: &str = "CLIO-KEYSTORE v1";

/// What every store file starts with, whatever its version.
const MAGIC_PREFIX: &str = "CLIO-KEYSTORE ";

const TAG_LEN: usize = 16;

/// Encrypts `plaintext` (the JSON document) into the file's bytes.
pub fn seal(master: &MasterKey, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
    let header = header(master);
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| StoreError::Crypto("the system random number generator failed".into()))?;
    let mut buf = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    buf.extend_from_slice(&nonce);
    buf.extend_from_slice(plaintext);
    let tag = aead_key(master)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header.as_bytes()),
            &mut buf[NONCE_LEN..],
        )
        .map_err(|_| StoreError::Crypto("encryption failed".into()))?;
    buf.extend_from_slice(tag.as_ref());
    let mut out = header;
    base64::engine::general_purpose::STANDARD.encode_string(&buf, &mut out);
    out.push('\n');
    Ok(out.into_bytes())
}

/// Checks the framing and decrypts; returns the plaintext JSON (the caller
/// wipes it after parsing).
pub fn open(master: &MasterKey, file: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(why.to_string());
    let text = std::str::from_utf8(file).map_err(|_| corrupt("not a text file"))?;
    let Some(body) = text.strip_suffix('\n') else {
        return Err(corrupt("truncated (no final newline)"));
    };
    let mut lines = body.split('\n');
    let magic = lines.next().unwrap_or_default();
    if magic != MAGIC {
        return Err(if let Some(version) = magic.strip_prefix(MAGIC_PREFIX) {
            StoreError::Corrupt(format!(
                "store format {version:.16} is not supported (this build reads {MAGIC})"
            ))
        } else {
            corrupt("not a clio-relay key store (bad first line)")
        });
    }
    let check = lines
        .next()
        .and_then(|l| l.strip_prefix("key "))
        .filter(|c| c.len() == 16 && c.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| corrupt("bad key check line"))?;
    let payload = lines.next().ok_or_else(|| corrupt("no payload line"))?;
    if lines.next().is_some() {
        return Err(corrupt("extra lines after the payload"));
    }
    if check != master.check() {
        return Err(StoreError::WrongMasterKey);
    }
    let mut buf = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|_| corrupt("payload is not base64"))?;
    if buf.len() < NONCE_LEN + TAG_LEN {
        return Err(corrupt("payload too short"));
    }
    let nonce =
        Nonce::try_assume_unique_for_key(&buf[..NONCE_LEN]).map_err(|_| corrupt("bad nonce"))?;
    let header_len = magic.len() + 1 + "key ".len() + check.len() + 1;
    let aad = Aad::from(&file[..header_len]);
    let plain_len = aead_key(master)
        .open_in_place(nonce, aad, &mut buf[NONCE_LEN..])
        .map_err(|_| corrupt("authentication failed: the file was changed or damaged"))?
        .len();
    let plaintext = buf[NONCE_LEN..NONCE_LEN + plain_len].to_vec();
    wipe(&mut buf);
    Ok(plaintext)
}

/// The two header lines for `master`, newlines included (the AAD).
fn header(master: &MasterKey) -> String {
    format!("{MAGIC}\nkey {}\n", master.check())
}

fn aead_key(master: &MasterKey) -> LessSafeKey {
    let unbound =
        UnboundKey::new(&AES_256_GCM, master.bytes()).expect("a 32-byte key fits AES-256-GCM");
    LessSafeKey::new(unbound)
}
