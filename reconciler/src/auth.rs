//! Shared secrets and the two checks made with them: the GitHub-style webhook signature
//! (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`) and the fleet secret
//! peers present as `Authorization: Bearer <secret>`.
//!
//! Both comparisons take the same time whatever the input, so a caller cannot learn a
//! secret (or a valid signature) byte by byte from response times.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header GitHub puts the body's HMAC-SHA256 in.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read the secret file {path}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds nothing but whitespace.
    #[error("the secret file {0} is empty")]
    Empty(String),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No secret is configured, so nothing can be verified and everything is refused.
    #[error("no secret is configured; requests are refused")]
    NotConfigured,
    /// The request carries no signature or credentials.
    #[error("missing credentials")]
    Missing,
    /// The signature or credentials are malformed.
    #[error("malformed credentials")]
    Malformed,
    /// The signature or credentials do not match.
    #[error("invalid credentials")]
    Mismatch,
}

/// A shared secret. Its `Debug` output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret with these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// Reads a secret from a file; surrounding whitespace (the newline an editor adds)
    /// is not part of it.
    ///
    /// # Errors
    /// When the file cannot be read or holds only whitespace.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let trimmed = bytes.trim_ascii();
        if trimmed.is_empty() {
            return Err(SecretError::Empty(path.display().to_string()));
        }
        Ok(Secret(trimmed.to_vec()))
    }

    /// The hex HMAC-SHA256 of `body` under this secret, as GitHub sends it (without
    /// the `sha256=` prefix).
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        hex(&mac.finalize().into_bytes())
    }

    /// The `Authorization` header value that presents this secret.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Checks a `X-Hub-Signature-256` header value against `body`.
///
/// # Errors
/// [`AuthError`] saying why the signature is not accepted.
pub fn verify_signature(
    secret: Option<&Secret>,
    header: Option<&[u8]>,
    body: &[u8],
) -> Result<(), AuthError> {
    let secret = secret.ok_or(AuthError::NotConfigured)?;
    let header = header.ok_or(AuthError::Missing)?;
    let hex_digest = header
        .strip_prefix(b"sha256=")
        .ok_or(AuthError::Malformed)?;
    let digest = unhex(hex_digest).ok_or(AuthError::Malformed)?;
    let mut mac = secret.mac();
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&digest).map_err(|_| AuthError::Mismatch)
}

/// Checks an `Authorization: Bearer <secret>` header value against the fleet secret.
///
/// # Errors
/// [`AuthError`] saying why the credentials are not accepted.
pub fn verify_bearer(secret: Option<&Secret>, header: Option<&[u8]>) -> Result<(), AuthError> {
    let secret = secret.ok_or(AuthError::NotConfigured)?;
    let header = header.ok_or(AuthError::Missing)?;
    let presented = header
        .strip_prefix(b"Bearer ")
        .ok_or(AuthError::Malformed)?;
    // Comparing digests of equal length hides the secret's length as well.
    let (a, b) = (
        Sha256::digest(presented.trim_ascii()),
        Sha256::digest(&secret.0),
    );
    if bool::from(a.ct_eq(&b)) {
        Ok(())
    } else {
        Err(AuthError::Mismatch)
    }
}

/// Lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    text.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's documented example ("Validating webhook deliveries"): secret
    /// "It's a Secret to Everybody", payload "Hello, World!". The expected digest is
    /// computed here from the HMAC definition (RFC 2104) over SHA-256 rather than
    /// copied, so the test checks the HMAC wiring and not just a string.
    #[test]
    fn github_example_signature() {
        let secret = Secret::new("It's a Secret to Everybody");
        let body = b"Hello, World!";
        let expected = rfc2104_hmac_sha256(b"It's a Secret to Everybody", body);
        assert_eq!(secret.sign(body), expected);
        let header = format!("sha256={expected}");
        assert_eq!(
            verify_signature(Some(&secret), Some(header.as_bytes()), body),
            Ok(())
        );
        // Upper-case hex digits are still the same digest.
        let upper = format!("sha256={}", expected.to_uppercase());
        assert_eq!(
            verify_signature(Some(&secret), Some(upper.as_bytes()), body),
            Ok(())
        );
    }

    /// HMAC by its definition: H((K ^ opad) || H((K ^ ipad) || m)), 64-byte blocks.
    fn rfc2104_hmac_sha256(key: &[u8], message: &[u8]) -> String {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| block.map(|k| k ^ byte);
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(message)
            .finalize();
        hex(&Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize())
    }

    #[test]
    fn refuses_bad_signatures() {
        let secret = Secret::new("s3cret");
        let body = b"{\"ref\":\"refs/heads/main\"}";
        let good = format!("sha256={}", secret.sign(body));
        let check =
            |header: Option<&str>| verify_signature(Some(&secret), header.map(str::as_bytes), body);
        assert_eq!(check(Some(&good)), Ok(()));
        assert_eq!(check(None), Err(AuthError::Missing));
        assert_eq!(check(Some(&good[7..])), Err(AuthError::Malformed));
        assert_eq!(check(Some("sha256=zz")), Err(AuthError::Malformed));
        assert_eq!(check(Some("sha256=abc")), Err(AuthError::Malformed));
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            verify_signature(Some(&secret), Some(&flipped), body),
            Err(AuthError::Mismatch)
        );
        // A signature of another body, or under another secret, does not verify.
        assert_eq!(
            verify_signature(Some(&secret), Some(good.as_bytes()), b"{}"),
            Err(AuthError::Mismatch)
        );
        let other = format!("sha256={}", Secret::new("other").sign(body));
        assert_eq!(check(Some(&other)), Err(AuthError::Mismatch));
        // Without a configured secret nothing verifies, not even an empty signature.
        assert_eq!(
            verify_signature(None, Some(good.as_bytes()), body),
            Err(AuthError::NotConfigured)
        );
    }

    #[test]
    fn bearer_secret() {
        let secret = Secret::new("fleet-secret");
        let check = |h: &str| verify_bearer(Some(&secret), Some(h.as_bytes()));
        assert_eq!(check("Bearer fleet-secret"), Ok(()));
        assert_eq!(check("Bearer fleet-secreT"), Err(AuthError::Mismatch));
        assert_eq!(
            check("Bearer fleet-secret-longer"),
            Err(AuthError::Mismatch)
        );
        assert_eq!(check("Bearer "), Err(AuthError::Mismatch));
        assert_eq!(check("Basic fleet-secret"), Err(AuthError::Malformed));
        assert_eq!(verify_bearer(Some(&secret), None), Err(AuthError::Missing));
        assert_eq!(
            verify_bearer(None, Some(b"Bearer fleet-secret")),
            Err(AuthError::NotConfigured)
        );
    }

    #[test]
    fn secret_files_are_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "  hunter2\n").expect("write");
        let secret = Secret::from_file(&path).expect("read");
        assert_eq!(secret, Secret::new("hunter2"));
        assert_eq!(format!("{secret:?}"), "Secret(..)");
        std::fs::write(&path, "\n").expect("write");
        assert!(matches!(
            Secret::from_file(&path),
            Err(SecretError::Empty(_))
        ));
        assert!(Secret::from_file(&dir.path().join("none")).is_err());
    }
}
