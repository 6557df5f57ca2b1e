//! The migration stream: a versioned handshake that proves the one-time token, then
//! frames each carrying a sequence number and a keyed BLAKE3 MAC.
//!
//! ```text
//! destination -> source   hello   = MAGIC | version u32 | nonce_d [32]
//! source -> destination   hello   = MAGIC | version u32 | nonce_s [32] | stream u32 | proof_s [32]
//! destination -> source   proof_d [32]
//! then, source -> destination, frames:
//!   kind u8 | flags u8 | reserved u16 | len u32 | payload [len] | mac [16]
//!   mac = BLAKE3-keyed(session key, seq u64 | kind | flags | reserved | len | payload)[..16]
//! ```
//!
//! Both proofs are keyed BLAKE3 over both nonces with a key derived from the token, so
//! neither side learns anything it could replay, and a connection with a wrong token is
//! dropped before its first frame is read. The session key is derived from the token and
//! both nonces, so frames of one connection cannot be spliced into another; the
//! sequence number in every MAC stops reordering, dropping or replaying frames within
//! one. A frame is checked (length bound, then MAC) before any byte of it is used.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

/// First bytes of both hellos.
pub const MAGIC: [u8; 8] = *b"BERTHMIG";
/// The stream format version this build speaks. A peer with another version is refused.
pub const VERSION: u32 = 1;
/// Guest page size the stream moves memory in.
pub const PAGE_SIZE: usize = 4096;
/// The largest frame payload a receiver accepts; larger lengths are refused before any
/// allocation, so a hostile stream cannot exhaust the receiver's memory.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Bytes of MAC at the end of each frame.
pub const MAC_LEN: usize = 16;
/// Bytes of frame header.
pub const HEADER_LEN: usize = 8;

const PROOF_CONTEXT_SOURCE: &[u8] = b"berth migration v1 source proof";
const PROOF_CONTEXT_DEST: &[u8] = b"berth migration v1 destination proof";
const TOKEN_KEY_CONTEXT: &str = "berth migration v1 token key";
const SESSION_KEY_CONTEXT: &str = "berth migration v1 session key";
const REPLY_KEY_CONTEXT: &str = "berth migration v1 reply key";

/// Errors of the migration stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or closed.
    #[error("Cannot read or write the migration stream: {0}")]
    Io(#[from] io::Error),
    /// The stream ended in the middle of a frame or handshake.
    #[error("The migration stream was truncated")]
    Truncated,
    /// The peer is not a berth migration endpoint.
    #[error("The peer did not speak the berth migration protocol")]
    BadMagic,
    /// The peer speaks another version.
    #[error("The peer speaks migration stream version {0}, this build speaks {VERSION}")]
    Version(u32),
    /// The peer did not prove the one-time token.
    #[error("The peer did not prove the one-time migration token")]
    BadToken,
    /// A frame's length is beyond [`MAX_PAYLOAD`].
    #[error("A frame of {0} bytes is larger than the {MAX_PAYLOAD} bytes allowed")]
    FrameTooLarge(usize),
    /// A frame's MAC did not match: corrupted, reordered, or forged.
    #[error("Frame {seq} failed its integrity check (corrupted, reordered or forged)")]
    BadMac {
        /// The frame's sequence number.
        seq: u64,
    },
    /// A frame kind this version does not know.
    #[error("Unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame whose payload does not parse.
    #[error("Malformed {kind:?} frame: {reason}")]
    Malformed {
        /// The frame kind.
        kind: FrameKind,
        /// What is wrong.
        reason: String,
    },
    /// A page address outside guest memory.
    #[error("Page at guest address {gpa:#x} is outside guest memory")]
    OutOfBounds {
        /// The offending guest physical address.
        gpa: u64,
    },
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, WireError>;

fn read_exact_or_truncated<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Truncated,
        _ => WireError::Io(e),
    })
}

/// The one-time token a destination hands out for one incoming migration.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; 32]);

impl Token {
    /// A fresh random token from the OS.
    ///
    /// # Errors
    /// When the OS random source fails.
    pub fn generate() -> io::Result<Token> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(io::Error::other)?;
        Ok(Token(bytes))
    }

    /// The token as 64 lowercase hex digits, as it travels in control messages.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Token> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Token(bytes))
    }

    fn key(&self) -> [u8; 32] {
        blake3::derive_key(TOKEN_KEY_CONTEXT, &self.0)
    }
}

impl fmt::Debug for Token {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

fn proof(token_key: &[u8; 32], context: &[u8], first: &[u8; 32], second: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(token_key);
    h.update(context);
    h.update(first);
    h.update(second);
    *h.finalize().as_bytes()
}

fn session_key(token: &Token, nonce_d: &[u8; 32], nonce_s: &[u8; 32], stream: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(SESSION_KEY_CONTEXT);
    h.update(&token.0);
    h.update(nonce_d);
    h.update(nonce_s);
    h.update(&stream.to_le_bytes());
    *h.finalize().as_bytes()
}

fn nonce() -> io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(io::Error::other)?;
    Ok(n)
}

/// Constant-time equality of two proofs.
fn proofs_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(*b)
}

/// The destination's side of the handshake. Returns the session key and the stream
/// number the source gave this connection.
///
/// # Errors
/// [`WireError::BadToken`] when the source cannot prove the token, and the errors of
/// the connection.
pub fn accept<S: Read + Write>(conn: &mut S, token: &Token) -> Result<(SessionKey, u32)> {
    let nonce_d = nonce()?;
    let mut hello = Vec::with_capacity(44);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&nonce_d);
    conn.write_all(&hello)?;
    conn.flush()?;

    let mut reply = [0u8; 8 + 4 + 32 + 4 + 32];
    read_exact_or_truncated(conn, &mut reply)?;
    if reply[..8] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let nonce_s: [u8; 32] = reply[12..44].try_into().expect("32 bytes");
    let stream = u32::from_le_bytes(reply[44..48].try_into().expect("4 bytes"));
    let proof_s: [u8; 32] = reply[48..80].try_into().expect("32 bytes");
    let key = token.key();
    if !proofs_match(
        &proof_s,
        &proof(&key, PROOF_CONTEXT_SOURCE, &nonce_d, &nonce_s),
    ) {
        return Err(WireError::BadToken);
    }
    conn.write_all(&proof(&key, PROOF_CONTEXT_DEST, &nonce_s, &nonce_d))?;
    conn.flush()?;
    Ok((
        SessionKey(session_key(token, &nonce_d, &nonce_s, stream)),
        stream,
    ))
}

/// The source's side of the handshake for connection number `stream`.
///
/// # Errors
/// [`WireError::BadToken`] when the destination cannot prove the token (it is not the
/// destination that handed it out), and the errors of the connection.
pub fn connect<S: Read + Write>(conn: &mut S, token: &Token, stream: u32) -> Result<SessionKey> {
    let mut hello = [0u8; 44];
    read_exact_or_truncated(conn, &mut hello)?;
    if hello[..8] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let nonce_d: [u8; 32] = hello[12..44].try_into().expect("32 bytes");
    let nonce_s = nonce()?;
    let key = token.key();
    let mut reply = Vec::with_capacity(80);
    reply.extend_from_slice(&MAGIC);
    reply.extend_from_slice(&VERSION.to_le_bytes());
    reply.extend_from_slice(&nonce_s);
    reply.extend_from_slice(&stream.to_le_bytes());
    reply.extend_from_slice(&proof(&key, PROOF_CONTEXT_SOURCE, &nonce_d, &nonce_s));
    conn.write_all(&reply)?;
    conn.flush()?;
    let mut proof_d = [0u8; 32];
    read_exact_or_truncated(conn, &mut proof_d)?;
    if !proofs_match(
        &proof_d,
        &proof(&key, PROOF_CONTEXT_DEST, &nonce_s, &nonce_d),
    ) {
        return Err(WireError::BadToken);
    }
    Ok(SessionKey(session_key(token, &nonce_d, &nonce_s, stream)))
}

/// The key that authenticates the frames of one connection.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// The key of the frames going the other way (destination to source: `Loaded`,
    /// `Running`, `Abort`, `Info`). Each direction has its own key, so a frame cannot be
    /// reflected back to its sender.
    pub fn for_replies(&self) -> SessionKey {
        SessionKey(blake3::derive_key(REPLY_KEY_CONTEXT, &self.0))
    }

    fn mac(&self, seq: u64, header: &[u8; HEADER_LEN], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&seq.to_le_bytes());
        h.update(header);
        for part in parts {
            h.update(part);
        }
        let mut mac = [0u8; MAC_LEN];
        h.finalize_xof().fill(&mut mac);
        mac
    }
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// The guest spec and memory layout the source runs (JSON).
    Config = 1,
    /// Guest pages: `count u32 | 0u32 | gpa u64 * count | page data * count`.
    Pages = 2,
    /// Pages that are now all zeroes: `count u32 | 0u32 | gpa u64 * count`.
    ZeroPages = 3,
    /// The end of one pre-copy pass on this connection: `pass u32 | 0u32 | pages u64`.
    PassEnd = 4,
    /// vCPU, VM, device and payload state at switchover.
    State = 5,
    /// Destination -> source: everything is loaded; waiting for the go.
    Loaded = 6,
    /// Source -> destination: run the guest now.
    Commit = 7,
    /// Either way: give up; the guest stays on the source.
    Abort = 8,
    /// Destination -> source: the guest runs here.
    Running = 9,
    /// Progress or throttle information, informational only.
    Info = 10,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match v {
            1 => Config,
            2 => Pages,
            3 => ZeroPages,
            4 => PassEnd,
            5 => State,
            6 => Loaded,
            7 => Commit,
            8 => Abort,
            9 => Running,
            10 => Info,
            _ => return None,
        })
    }
}

fn header(kind: FrameKind, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Writes authenticated frames to one connection.
pub struct FrameWriter<W: Write> {
    inner: W,
    key: SessionKey,
    seq: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer for a connection whose handshake produced `key`.
    pub fn new(inner: W, key: SessionKey) -> Self {
        FrameWriter { inner, key, seq: 0 }
    }

    /// Sends one frame whose payload is the concatenation of `parts`, without copying
    /// them.
    ///
    /// # Errors
    /// [`WireError::FrameTooLarge`] for a payload over [`MAX_PAYLOAD`], and I/O errors.
    pub fn send(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD {
            return Err(WireError::FrameTooLarge(len));
        }
        let header = header(kind, len);
        let mac = self.key.mac(self.seq, &header, parts);
        self.seq += 1;
        let mut slices = Vec::with_capacity(parts.len() + 2);
        slices.push(IoSlice::new(&header));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        slices.push(IoSlice::new(&mac));
        write_all_vectored(&mut self.inner, &mut slices)?;
        Ok(())
    }

    /// Flushes buffered frames.
    ///
    /// # Errors
    /// I/O errors.
    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush()?;
        Ok(())
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One received, authenticated frame; the payload borrows the reader's buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    /// What it carries.
    pub kind: FrameKind,
    /// The payload, already authenticated.
    pub payload: &'a [u8],
}

/// Reads and authenticates frames from one connection.
pub struct FrameReader<R: Read> {
    inner: R,
    key: SessionKey,
    seq: u64,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// A reader for a connection whose handshake produced `key`.
    pub fn new(inner: R, key: SessionKey) -> Self {
        FrameReader {
            inner,
            key,
            seq: 0,
            buf: Vec::new(),
        }
    }

    /// Reads the next frame and checks its length bound and MAC before returning it.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the stream ends, [`WireError::FrameTooLarge`],
    /// [`WireError::BadMac`], [`WireError::UnknownKind`], and I/O errors.
    pub fn recv(&mut self) -> Result<Frame<'_>> {
        let mut header = [0u8; HEADER_LEN];
        read_exact_or_truncated(&mut self.inner, &mut header)?;
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::FrameTooLarge(len));
        }
        self.buf.resize(len + MAC_LEN, 0);
        read_exact_or_truncated(&mut self.inner, &mut self.buf)?;
        let (payload, mac) = self.buf.split_at(len);
        let expected = self.key.mac(self.seq, &header, &[payload]);
        // Constant-time comparison through blake3's Hash equality on padded values.
        let mut got = [0u8; 32];
        let mut want = [0u8; 32];
        got[..MAC_LEN].copy_from_slice(mac);
        want[..MAC_LEN].copy_from_slice(&expected);
        if !proofs_match(&got, &want) {
            return Err(WireError::BadMac { seq: self.seq });
        }
        self.seq += 1;
        let kind = FrameKind::from_u8(header[0]).ok_or(WireError::UnknownKind(header[0]))?;
        Ok(Frame { kind, payload })
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// The guest-physical ranges a receiver accepts pages into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBounds {
    ranges: Vec<(u64, u64)>,
}

impl MemoryBounds {
    /// Bounds made of `(start, length)` ranges.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        MemoryBounds {
            ranges: ranges.into_iter().collect(),
        }
    }

    /// Whether the page at `gpa` is page-aligned and lies wholly inside one range.
    pub fn contains_page(&self, gpa: u64) -> bool {
        gpa % PAGE_SIZE as u64 == 0
            && self.ranges.iter().any(|&(start, len)| {
                match (gpa.checked_add(PAGE_SIZE as u64), start.checked_add(len)) {
                    (Some(page_end), Some(range_end)) => gpa >= start && page_end <= range_end,
                    _ => false,
                }
            })
    }
}

/// Splits a `Pages` or `ZeroPages` payload into its addresses and (for `Pages`) the
/// page data, checking every address against `bounds` first.
///
/// # Errors
/// [`WireError::Malformed`] when the lengths do not add up, [`WireError::OutOfBounds`]
/// for an address outside guest memory or not page-aligned.
pub fn parse_pages<'a>(
    kind: FrameKind,
    payload: &'a [u8],
    bounds: &MemoryBounds,
) -> Result<(Vec<u64>, &'a [u8])> {
    let malformed = |reason: String| WireError::Malformed { kind, reason };
    if payload.len() < 8 {
        return Err(malformed(format!("{} bytes, no page count", payload.len())));
    }
    let count = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    let per_page = match kind {
        FrameKind::Pages => 8 + PAGE_SIZE,
        FrameKind::ZeroPages => 8,
        other => return Err(malformed(format!("{other:?} frames carry no pages"))),
    };
    let expected = count
        .checked_mul(per_page)
        .and_then(|n| n.checked_add(8))
        .ok_or_else(|| malformed(format!("page count {count} overflows")))?;
    if payload.len() != expected {
        return Err(malformed(format!(
            "{count} pages need {expected} bytes, the frame has {}",
            payload.len()
        )));
    }
    let addrs_end = 8 + 8 * count;
    let gpas: Vec<u64> = payload[8..addrs_end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Some(&gpa) = gpas.iter().find(|&&gpa| !bounds.contains_page(gpa)) {
        return Err(WireError::OutOfBounds { gpa });
    }
    Ok((gpas, &payload[addrs_end..]))
}

/// The head of a `Pages`/`ZeroPages` payload for `gpas`: count, padding, addresses.
pub fn pages_head(gpas: &[u64]) -> Vec<u8> {
    let mut head = Vec::with_capacity(8 + 8 * gpas.len());
    head.extend_from_slice(&(gpas.len() as u32).to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    for gpa in gpas {
        head.extend_from_slice(&gpa.to_le_bytes());
    }
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    type DestSide = thread::JoinHandle<Result<(SessionKey, u32, TcpStream)>>;

    fn pair(dest_token: Token, source_token: Token) -> (DestSide, Result<(SessionKey, TcpStream)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dest = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let (key, stream) = accept(&mut conn, &dest_token)?;
            Ok((key, stream, conn))
        });
        let mut conn = TcpStream::connect(addr).unwrap();
        let source = connect(&mut conn, &source_token, 3).map(|k| (k, conn));
        (dest, source)
    }

    #[test]
    fn token_hex_round_trip() {
        let t = Token::generate().unwrap();
        assert_eq!(Token::from_hex(&t.to_hex()), Some(t.clone()));
        assert_eq!(Token::from_hex("zz"), None);
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn frames_flow_after_a_good_handshake() {
        let token = Token::generate().unwrap();
        let (dest, source) = pair(token.clone(), token);
        let (skey, sconn) = source.unwrap();
        let (dkey, stream, dconn) = dest.join().unwrap().unwrap();
        assert_eq!(stream, 3);
        let mut w = FrameWriter::new(sconn, skey);
        let page = [7u8; PAGE_SIZE];
        let head = pages_head(&[0x1000, 0x3000]);
        w.send(FrameKind::Pages, &[&head, &page, &page]).unwrap();
        w.send(FrameKind::Commit, &[]).unwrap();
        let mut r = FrameReader::new(dconn, dkey);
        let f = r.recv().unwrap();
        assert_eq!(f.kind, FrameKind::Pages);
        let bounds = MemoryBounds::new([(0, 1 << 20)]);
        let (gpas, data) = parse_pages(f.kind, f.payload, &bounds).unwrap();
        assert_eq!(gpas, vec![0x1000, 0x3000]);
        assert_eq!(data.len(), 2 * PAGE_SIZE);
        assert!(data.iter().all(|&b| b == 7));
        assert_eq!(r.recv().unwrap().kind, FrameKind::Commit);
    }

    #[test]
    fn replies_cannot_be_reflected() {
        let (bytes, key) = frames_bytes(&[(FrameKind::Loaded, Vec::new())]);
        let mut r = FrameReader::new(&bytes[..], key.for_replies());
        assert!(matches!(r.recv(), Err(WireError::BadMac { seq: 0 })));
        let mut w = FrameWriter::new(Vec::new(), key.for_replies());
        w.send(FrameKind::Loaded, &[]).unwrap();
        let mut r = FrameReader::new(&w.inner[..], key.for_replies());
        assert_eq!(r.recv().unwrap().kind, FrameKind::Loaded);
    }

    #[test]
    fn a_wrong_token_is_refused_on_both_sides() {
        let (dest, source) = pair(Token::generate().unwrap(), Token::generate().unwrap());
        assert!(matches!(dest.join().unwrap(), Err(WireError::BadToken)));
        // The destination hung up without a proof: the source sees a truncated stream.
        assert!(matches!(
            source,
            Err(WireError::Truncated) | Err(WireError::Io(_))
        ));
    }

    fn frames_bytes(kinds: &[(FrameKind, Vec<u8>)]) -> (Vec<u8>, SessionKey) {
        let key = SessionKey([9; 32]);
        let mut w = FrameWriter::new(Vec::new(), key.clone());
        for (kind, payload) in kinds {
            w.send(*kind, &[payload]).unwrap();
        }
        (w.inner, key)
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let (bytes, key) = frames_bytes(&[(FrameKind::State, b"vcpu state".to_vec())]);
        for i in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[i] ^= 0x01;
            let mut r = FrameReader::new(&corrupt[..], key.clone());
            assert!(r.recv().is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_reordering_and_oversize_are_caught() {
        let (bytes, key) = frames_bytes(&[
            (FrameKind::Info, b"one".to_vec()),
            (FrameKind::Info, b"two".to_vec()),
        ]);
        let one = HEADER_LEN + 3 + MAC_LEN;
        for cut in [1, HEADER_LEN, one - 1] {
            let mut r = FrameReader::new(&bytes[..cut], key.clone());
            assert!(
                matches!(r.recv(), Err(WireError::Truncated)),
                "cut at {cut}"
            );
        }
        // The second frame alone fails: its MAC binds sequence number 1.
        let mut r = FrameReader::new(&bytes[one..], key.clone());
        assert!(matches!(r.recv(), Err(WireError::BadMac { seq: 0 })));
        let mut huge = header(FrameKind::Pages, 0).to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&huge[..], key);
        assert!(matches!(r.recv(), Err(WireError::FrameTooLarge(_))));
    }

    #[test]
    fn pages_outside_guest_memory_are_refused() {
        let bounds = MemoryBounds::new([(0, 16 * PAGE_SIZE as u64)]);
        let page = [0u8; PAGE_SIZE];
        for gpa in [16 * PAGE_SIZE as u64, !0xfffu64, 0x1001] {
            let mut payload = pages_head(&[gpa]);
            payload.extend_from_slice(&page);
            assert!(matches!(
                parse_pages(FrameKind::Pages, &payload, &bounds),
                Err(WireError::OutOfBounds { .. })
            ));
        }
        let mut payload = pages_head(&[0, 0x1000]);
        payload.extend_from_slice(&page);
        assert!(matches!(
            parse_pages(FrameKind::Pages, &payload, &bounds),
            Err(WireError::Malformed { .. })
        ));
        let mut lying = pages_head(&[]);
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_pages(FrameKind::Pages, &lying, &bounds).is_err());
        let zero = pages_head(&[0x2000]);
        let (gpas, data) = parse_pages(FrameKind::ZeroPages, &zero, &bounds).unwrap();
        assert_eq!((gpas, data.len()), (vec![0x2000], 0));
    }
}
