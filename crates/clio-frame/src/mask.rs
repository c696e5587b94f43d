//! In-place masking (RFC 6455 §5.3) and a source of fresh mask keys.
//!
//! Client→upstream frames arrive masked with the client's key and must leave
//! masked with a key the client cannot predict. Instead of unmasking and
//! masking again, the relay XORs the payload once with `client ⊕ fresh`.

use ring::rand::{SecureRandom, SystemRandom};

/// XORs `buf` in place with the 4-byte `key`, starting at key position
/// `phase` (the payload offset of `buf[0]` modulo 4), so a payload that
/// arrives in several reads can be processed piece by piece.
///
/// Allocation-free; works 8 bytes at a time on the aligned middle.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], phase: usize) {
    let mut key = key;
    key.rotate_left(phase & 3);
    // Head: bytes until 8-byte alignment.
    // SAFETY: every bit pattern is a valid u8 and a valid u64, so viewing
    // the aligned middle as u64s (what `align_to_mut` requires) is sound.
    let (head, middle, tail) = unsafe { buf.align_to_mut::<u64>() };
    for (i, b) in head.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
    key.rotate_left(head.len() & 3);
    let k32 = u32::from_ne_bytes(key);
    let k64 = (k32 as u64) | ((k32 as u64) << 32);
    for word in middle.iter_mut() {
        *word ^= k64;
    }
    for (i, b) in tail.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// The plain byte loop, kept as the reference `apply_mask` is tested and
/// benchmarked against.
pub fn apply_mask_bytewise(buf: &mut [u8], key: [u8; 4], phase: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(i + phase) & 3];
    }
}

/// The XOR of two mask keys: masking with it turns a payload masked with
/// `from` into the same payload masked with `to`.
#[inline]
pub fn rekey(from: [u8; 4], to: [u8; 4]) -> [u8; 4] {
    [
        from[0] ^ to[0],
        from[1] ^ to[1],
        from[2] ^ to[2],
        from[3] ^ to[3],
    ]
}

/// Fresh, unpredictable mask keys from the kernel's CSPRNG, fetched 256 at a
/// time so a frame costs no system call. One per shard.
pub struct MaskKeys {
    rng: SystemRandom,
    pool: [u8; 1024],
    next: usize,
}

impl std::fmt::Debug for MaskKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskKeys")
            .field("left", &((1024 - self.next) / 4))
            .finish()
    }
}

impl Default for MaskKeys {
    fn default() -> Self {
        MaskKeys {
            rng: SystemRandom::new(),
            pool: [0; 1024],
            next: 1024,
        }
    }
}

impl MaskKeys {
    /// The next key. Refills the pool from the OS when it runs out.
    #[inline]
    pub fn next_key(&mut self) -> [u8; 4] {
        if self.next == self.pool.len() {
            self.rng
                .fill(&mut self.pool)
                .expect("the OS random source failed");
            self.next = 0;
        }
        let k = &self.pool[self.next..self.next + 4];
        self.next += 4;
        [k[0], k[1], k[2], k[3]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_bytewise_for_every_alignment_phase_and_split() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        let key = [0xA1, 0x02, 0xF3, 0x44];
        for start in 0..8 {
            for len in [0, 1, 3, 7, 8, 9, 63, 64, 65, 200] {
                for phase in 0..4 {
                    let mut a = data.clone();
                    let mut b = data.clone();
                    apply_mask(&mut a[start..start + len], key, phase);
                    apply_mask_bytewise(&mut b[start..start + len], key, phase);
                    assert_eq!(a, b, "start {start} len {len} phase {phase}");
                }
            }
        }
        // A payload processed in pieces equals one pass.
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = data.clone();
        let mut at = 0;
        for cut in [5usize, 11, 64, 3, 217] {
            apply_mask(&mut pieces[at..at + cut], key, at);
            at += cut;
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn rekey_turns_one_masking_into_another() {
        let plain = b"audio bytes here".to_vec();
        let (old, new) = ([1, 2, 3, 4], [200, 100, 50, 25]);
        let mut wire = plain.clone();
        apply_mask(&mut wire, old, 0);
        apply_mask(&mut wire, rekey(old, new), 0);
        apply_mask(&mut wire, new, 0);
        assert_eq!(wire, plain);
    }

    #[test]
    fn keys_are_fresh() {
        let mut keys = MaskKeys::default();
        let all: Vec<[u8; 4]> = (0..600).map(|_| keys.next_key()).collect();
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        // 600 draws from 2^32: a repeat is possible but vanishingly rare.
        assert!(distinct.len() >= 598, "{} distinct", distinct.len());
    }
}
