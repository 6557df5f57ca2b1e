//! Sealing with AES-128-GCM from AWS-LC, also straight out of the memory of a running
//! guest.
//!
//! The sender encrypts guest pages from where they lie into the buffer it sends
//! (`EVP_AEAD_CTX_seal_scatter` with `in != out`): one pass over the pages, no copy
//! first. The guest may write those pages meanwhile, so they are handed to AWS-LC as a
//! raw pointer and length ([`SharedBytes`]), never as a Rust reference (which would
//! claim that nobody changes them). AES-GCM reads each plaintext byte once, XORs it
//! with the key stream and authenticates the ciphertext it wrote to the output, so a
//! page changed during the read yields a ciphertext and tag that agree with each other
//! (the receiver gets some mix of old and new bytes, which the dirty log sends again),
//! never a frame that fails its tag.

use std::marker::PhantomData;
use std::ptr::NonNull;

use aws_lc_sys as lc;

/// Bytes of an AES-128 key.
pub const KEY_LEN: usize = 16;
/// Bytes of a GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a GCM nonce.
pub const NONCE_LEN: usize = 12;

/// Bytes to seal that another party may write while they are read: the pages of a
/// running guest (or, for tests and small frames, an ordinary slice).
#[derive(Debug, Clone, Copy)]
pub struct SharedBytes<'a> {
    ptr: *const u8,
    len: usize,
    _memory: PhantomData<&'a [u8]>,
}

impl<'a> SharedBytes<'a> {
    /// Bytes at `ptr..ptr + len`.
    ///
    /// # Safety
    /// The range must stay mapped and readable for `'a`. Others may write it meanwhile
    /// (a reader then sees some mix of old and new bytes), but no Rust reference to it
    /// may exist while it is read.
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> SharedBytes<'a> {
        SharedBytes {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// The bytes of `bytes`.
    pub fn from_slice(bytes: &'a [u8]) -> SharedBytes<'a> {
        SharedBytes {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _memory: PhantomData,
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Sealing failed: AWS-LC refused the call (a length over GCM's limit per nonce).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealFailed;

/// An AES-128-GCM key for sealing: one AWS-LC AEAD context.
pub struct SealingKey {
    ctx: NonNull<lc::EVP_AEAD_CTX>,
}

// SAFETY: the context is owned by this value alone and freed only in `Drop`; AWS-LC
// contexts have no tie to the thread that made them (aead.h: seal and open "may be
// called concurrently" on one context), so moving it to another thread is fine.
unsafe impl Send for SealingKey {}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    /// A sealing key from 16 key bytes.
    ///
    /// # Panics
    /// When AWS-LC cannot allocate the context (out of memory).
    pub fn new(key: &[u8; KEY_LEN]) -> SealingKey {
        // CPU feature detection, so the VAES/AVX-512 code is chosen (idempotent).
        aws_lc_rs::init();
        // SAFETY: `key` is valid for KEY_LEN bytes; AWS-LC copies the expanded key into
        // the context it allocates and returns (or null).
        let ctx = unsafe {
            lc::EVP_AEAD_CTX_new(lc::EVP_aead_aes_128_gcm(), key.as_ptr(), KEY_LEN, TAG_LEN)
        };
        SealingKey {
            ctx: NonNull::new(ctx).expect("AWS-LC could not allocate an AEAD context"),
        }
    }

    /// Encrypts `plain` into `out` (of the same length) and returns the tag over
    /// `aad` and the ciphertext.
    ///
    /// # Errors
    /// [`SealFailed`] when the lengths differ, `plain` overlaps `out`, or AWS-LC
    /// refuses.
    pub fn seal_into(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plain: SharedBytes<'_>,
        out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SealFailed> {
        let (p, o) = (plain.ptr as usize, out.as_ptr() as usize);
        let overlap = p < o + out.len() && o < p + plain.len;
        if plain.len != out.len() || (overlap && !plain.is_empty()) {
            return Err(SealFailed);
        }
        // SAFETY: `plain` is readable for its length ([`SharedBytes`]'s contract) and
        // does not overlap `out`, which is ours to write for the same length.
        unsafe { self.seal_raw(nonce, aad, plain.ptr, out.as_mut_ptr(), out.len()) }
    }

    /// Encrypts `in_out` where it lies and returns the tag.
    ///
    /// # Errors
    /// [`SealFailed`] when AWS-LC refuses.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SealFailed> {
        let ptr = in_out.as_mut_ptr();
        // SAFETY: input and output are the same buffer, ours to read and write
        // (aead.h allows `in == out`).
        unsafe { self.seal_raw(nonce, aad, ptr, ptr, in_out.len()) }
    }

    /// # Safety
    /// `plain` readable and `out` writable for `len` bytes; they are equal or do not
    /// overlap.
    unsafe fn seal_raw(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plain: *const u8,
        out: *mut u8,
        len: usize,
    ) -> Result<[u8; TAG_LEN], SealFailed> {
        let mut tag = [0u8; TAG_LEN];
        let mut tag_len = 0usize;
        // SAFETY: the context is live (owned by `self`); the caller vouches for `plain`
        // and `out`; nonce, tag and aad are local or borrowed buffers of the lengths
        // given; no extra input.
        let ok = unsafe {
            lc::EVP_AEAD_CTX_seal_scatter(
                self.ctx.as_ptr(),
                out,
                tag.as_mut_ptr(),
                &mut tag_len,
                TAG_LEN,
                nonce.as_ptr(),
                NONCE_LEN,
                plain,
                len,
                std::ptr::null(),
                0,
                aad.as_ptr(),
                aad.len(),
            )
        };
        if ok != 1 || tag_len != TAG_LEN {
            return Err(SealFailed);
        }
        Ok(tag)
    }
}

impl Drop for SealingKey {
    fn drop(&mut self) {
        // SAFETY: the context came from EVP_AEAD_CTX_new and is freed once, here.
        unsafe { lc::EVP_AEAD_CTX_free(self.ctx.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

    #[test]
    fn sealed_out_of_place_or_in_place_opens_with_the_same_key() {
        let key = [7u8; KEY_LEN];
        let seal = SealingKey::new(&key);
        let open = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap());
        let plain: Vec<u8> = (0..10_000u32).map(|i| (i * 31) as u8).collect();
        let nonce = [1u8; NONCE_LEN];
        let mut out = vec![0u8; plain.len()];
        let tag = seal
            .seal_into(&nonce, b"head", SharedBytes::from_slice(&plain), &mut out)
            .unwrap();
        assert_ne!(out, plain);
        let mut in_place = plain.clone();
        assert_eq!(
            seal.seal_in_place(&nonce, b"head", &mut in_place).unwrap(),
            tag
        );
        assert_eq!(in_place, out);
        open.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"head"),
            &tag,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, plain);
        // Another associated data fails, and the output is zeroed.
        let mut again = in_place.clone();
        assert!(open
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(b"Head"),
                &tag,
                &mut again,
            )
            .is_err());
        assert!(again.iter().all(|&b| b == 0));
    }

    #[test]
    fn lengths_must_match_and_buffers_must_not_overlap() {
        let seal = SealingKey::new(&[1; KEY_LEN]);
        let nonce = [0u8; NONCE_LEN];
        let plain = [5u8; 64];
        let mut out = [0u8; 63];
        assert_eq!(
            seal.seal_into(&nonce, &[], SharedBytes::from_slice(&plain), &mut out),
            Err(SealFailed)
        );
        let mut buf = [0u8; 128];
        // SAFETY: the first 64 bytes of `buf` are readable; no reference to them is
        // used while `seal_into` reads (it refuses before reading).
        let shared = unsafe { SharedBytes::from_raw(buf.as_ptr(), 64) };
        assert_eq!(
            seal.seal_into(&nonce, &[], shared, &mut buf[32..96]),
            Err(SealFailed)
        );
    }
}
