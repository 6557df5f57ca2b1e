//! The migration stream: a versioned handshake that proves the one-time token and
//! derives per-connection, per-direction keys, then frames each sealed with AES-128-GCM.
//!
//! ```text
//! destination -> source   hello   = MAGIC | version u32 | nonce_d [32]
//! source -> destination   hello   = MAGIC | version u32 | nonce_s [32] | stream u32 | proof_s [32]
//! destination -> source   proof_d [32]
//! then frames, each way:
//!   kind u8 | flags u8 | reserved u16 | len u32 | ciphertext [len] | tag [16]
//!   ciphertext, tag = AES-128-GCM(direction key, nonce = 0u32 | seq u64 (big-endian),
//!                                 associated data = the 8 header bytes, payload)
//! ```
//!
//! Guest pages travel as a pair of frames: `Pages` names a run of pages (its first
//! address and count, encrypted like any payload), and the next frame, `PageData`,
//! holds exactly their bytes. The sender encrypts the pages straight out of guest
//! memory into the buffer it sends ([`FrameWriter::send_pages`], [`super::seal`]). A
//! receiver checks the run (inside guest memory, on the right connection) once `Pages`
//! authenticated, then reads `PageData`'s ciphertext straight into the guest pages and
//! decrypts it there ([`FrameReader::recv_pages_into`]), so page bytes are copied by
//! the kernel only. Those bytes are used by no one before their tag checked out: the
//! guest does not run before the switchover, a bad tag ends the migration (the
//! destination is discarded), and AWS-LC zeroes what it decrypted when the tag does not
//! match.
//!
//! Keys come from HKDF-SHA256 (RFC 5869): the token is the input key material, both
//! nonces are the salt, and the info names the purpose and the stream number. The
//! proofs are HMAC-SHA256 under keys expanded for them, over the whole hello
//! transcript, so neither side learns anything it could replay, and a connection with
//! a wrong token is dropped before its first frame is read. Each connection has two
//! frame keys of its own (source to destination, destination to source), so frames of
//! one connection cannot be spliced into another, nor reflected back to their sender.
//!
//! `seq` counts the frames of one direction of one connection from 0 and is never sent:
//! both sides keep it, so a replayed, reordered or dropped frame fails its tag, as does
//! any changed bit of header, payload or tag; a frame cut short is
//! [`WireError::Truncated`]. A frame is checked (length bound, then tag) before any
//! byte of it is used. Every byte of guest memory and state is in the ciphertext; the
//! header (kind and length) travels in the clear, authenticated. GCM both encrypts and
//! authenticates in one pass, so no byte is processed twice for integrity.

use std::fmt;
use std::io::{self, BufReader, IoSlice, Read, Write};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use aws_lc_rs::{hkdf, hmac};

use super::seal::{SealingKey, SharedBytes, NONCE_LEN};

/// First bytes of both hellos.
pub const MAGIC: [u8; 8] = *b"BERTHMIG";
/// The stream format version this build speaks. A peer with another version is refused.
/// Version 4: the source answers `Running` with `Done`, after which the destination
/// removes its committed marker. Version 3 had no `Done`; it sent pages as `Pages` +
/// `PageData` pairs, decrypted in place in guest memory, as version 4 does.
/// Version 2 had AES-128-GCM frames with the pages and their addresses in one frame;
/// version 1 carried clear pages under a keyed BLAKE3 MAC.
pub const VERSION: u32 = 4;
/// Guest page size the stream moves memory in.
pub const PAGE_SIZE: usize = 4096;
/// The largest frame payload a receiver accepts; larger lengths are refused before any
/// allocation, so a hostile stream cannot exhaust the receiver's memory.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Bytes of a frame key (AES-128: GCM's cost per byte is what bounds a migration on a
/// loaded host, and AES-128-GCM is TLS 1.3's default suite; measured 1.4-1.7x faster than
/// AES-256-GCM here, see BENCHMARKS.md).
const KEY_LEN: usize = 16;
/// Bytes of authentication tag at the end of each frame.
pub const TAG_LEN: usize = 16;
/// Bytes of frame header.
pub const HEADER_LEN: usize = 8;
/// A `Pages` run lies within one aligned span of this many bytes (2 MiB, the unit
/// the sender assigns to connections).
pub const RUN_SPAN: u64 = 2 << 20;
/// Bytes of a `Pages` payload.
pub const RUN_LEN: usize = 16;
/// Bytes a receiver reads ahead of the frame it is in (the tag, the next header and a
/// `Pages` frame); larger reads go straight where they belong, page data into guest
/// memory.
const READ_AHEAD: usize = 512;
/// Bytes of the source's hello (the destination's is [`HELLO_D_LEN`]).
pub const HELLO_S_LEN: usize = 8 + 4 + 32 + 4 + 32;
/// Bytes of the destination's hello.
pub const HELLO_D_LEN: usize = 8 + 4 + 32;

const PROOF_SOURCE: &[u8] = b"berth migration v2 source proof";
const PROOF_DEST: &[u8] = b"berth migration v2 destination proof";
const KEY_TO_DEST: &[u8] = b"berth migration v2 source to destination";
const KEY_TO_SOURCE: &[u8] = b"berth migration v2 destination to source";

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
    /// A frame failed authentication: corrupted, reordered, replayed, or forged.
    #[error("Frame {seq} failed authentication (corrupted, reordered, replayed or forged)")]
    BadTag {
        /// The frame's sequence number.
        seq: u64,
    },
    /// This direction of the connection sent 2^64 - 1 frames: its nonces are spent.
    #[error("The connection's frame counter is exhausted")]
    Exhausted,
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
}

impl fmt::Debug for Token {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What the handshake of one connection derives from the token and both nonces.
struct Handshake {
    prk: hkdf::Prk,
    stream: u32,
    transcript: Vec<u8>,
}

impl Handshake {
    /// `hello_d` and the first 48 bytes of `hello_s` (all but the proof) are the
    /// transcript both proofs cover.
    fn new(token: &Token, hello_d: &[u8], hello_s_head: &[u8], stream: u32) -> Handshake {
        let nonce_d = &hello_d[12..44];
        let nonce_s = &hello_s_head[12..44];
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &[nonce_d, nonce_s].concat());
        Handshake {
            prk: salt.extract(&token.0),
            stream,
            transcript: [hello_d, hello_s_head].concat(),
        }
    }

    fn proof_key(&self, label: &[u8]) -> hmac::Key {
        let stream = self.stream.to_le_bytes();
        let info = [label, &stream[..]];
        let okm = self
            .prk
            .expand(&info, hmac::HMAC_SHA256)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        hmac::Key::from(okm)
    }

    fn proof(&self, label: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.proof_key(label), &self.transcript);
        tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    /// Constant-time check of a peer's proof.
    fn check(&self, label: &[u8], proof: &[u8]) -> Result<()> {
        hmac::verify(&self.proof_key(label), &self.transcript, proof)
            .map_err(|_| WireError::BadToken)
    }

    fn frame_key(&self, label: &[u8]) -> [u8; KEY_LEN] {
        let stream = self.stream.to_le_bytes();
        let info = [label, &stream[..]];
        let mut key = [0u8; KEY_LEN];
        self.prk
            .expand(&info, &AES_128_GCM)
            .and_then(|okm| okm.fill(&mut key))
            .expect("16 bytes is within HKDF-SHA256's output limit");
        key
    }

    fn session_key(&self) -> SessionKey {
        SessionKey {
            frames: self.frame_key(KEY_TO_DEST),
            replies: self.frame_key(KEY_TO_SOURCE),
        }
    }
}

fn nonce() -> io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(io::Error::other)?;
    Ok(n)
}

fn check_hello_head(hello: &[u8]) -> Result<()> {
    if hello[..8] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    Ok(())
}

/// The destination's side of the handshake. Returns the session key and the stream
/// number the source gave this connection.
///
/// # Errors
/// [`WireError::BadToken`] when the source cannot prove the token, and the errors of
/// the connection.
pub fn accept<S: Read + Write>(conn: &mut S, token: &Token) -> Result<(SessionKey, u32)> {
    let mut hello_d = Vec::with_capacity(HELLO_D_LEN);
    hello_d.extend_from_slice(&MAGIC);
    hello_d.extend_from_slice(&VERSION.to_le_bytes());
    hello_d.extend_from_slice(&nonce()?);
    conn.write_all(&hello_d)?;
    conn.flush()?;

    let mut hello_s = [0u8; HELLO_S_LEN];
    read_exact_or_truncated(conn, &mut hello_s)?;
    check_hello_head(&hello_s)?;
    let stream = u32::from_le_bytes(hello_s[44..48].try_into().expect("4 bytes"));
    let hs = Handshake::new(token, &hello_d, &hello_s[..48], stream);
    hs.check(PROOF_SOURCE, &hello_s[48..])?;
    conn.write_all(&hs.proof(PROOF_DEST))?;
    conn.flush()?;
    Ok((hs.session_key(), stream))
}

/// The source's side of the handshake for connection number `stream`.
///
/// # Errors
/// [`WireError::BadToken`] when the destination cannot prove the token (it is not the
/// destination that handed it out), and the errors of the connection.
pub fn connect<S: Read + Write>(conn: &mut S, token: &Token, stream: u32) -> Result<SessionKey> {
    let mut hello_d = [0u8; HELLO_D_LEN];
    read_exact_or_truncated(conn, &mut hello_d)?;
    check_hello_head(&hello_d)?;
    let mut hello_s = Vec::with_capacity(HELLO_S_LEN);
    hello_s.extend_from_slice(&MAGIC);
    hello_s.extend_from_slice(&VERSION.to_le_bytes());
    hello_s.extend_from_slice(&nonce()?);
    hello_s.extend_from_slice(&stream.to_le_bytes());
    let hs = Handshake::new(token, &hello_d, &hello_s, stream);
    hello_s.extend_from_slice(&hs.proof(PROOF_SOURCE));
    conn.write_all(&hello_s)?;
    conn.flush()?;
    let mut proof_d = [0u8; 32];
    read_exact_or_truncated(conn, &mut proof_d)?;
    hs.check(PROOF_DEST, &proof_d)?;
    Ok(hs.session_key())
}

/// The keys of one connection, as seen from one direction: `frames` seals what this
/// direction carries, `replies` the other way.
#[derive(Clone)]
pub struct SessionKey {
    frames: [u8; KEY_LEN],
    replies: [u8; KEY_LEN],
}

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
        SessionKey {
            frames: self.replies,
            replies: self.frames,
        }
    }

    fn opening(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &self.frames).expect("a 16-byte key"))
    }

    fn sealing(&self) -> SealingKey {
        SealingKey::new(&self.frames)
    }

    /// A key pair from fixed bytes, for tests of frame handling.
    #[doc(hidden)]
    pub fn for_tests(seed: u8) -> SessionKey {
        SessionKey {
            frames: [seed; KEY_LEN],
            replies: [seed ^ 0xff; KEY_LEN],
        }
    }
}

/// The nonce of frame `seq`: unique per key, since `seq` only counts up.
fn frame_nonce_bytes(seq: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

fn frame_nonce(seq: u64) -> Nonce {
    Nonce::assume_unique_for_key(frame_nonce_bytes(seq))
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// The guest spec and memory layout the source runs (JSON).
    Config = 1,
    /// A run of guest pages, all in one 2 MiB chunk: `gpa u64 | count u32 | 0u32`. The
    /// next frame of the connection is their `PageData`.
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
    /// The bytes of the run the `Pages` frame before it names (`count * 4096`).
    PageData = 11,
    /// Source -> destination: `Running` arrived; the source drops its copy, so nobody
    /// will ask the destination whether it runs the guest.
    Done = 12,
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
            11 => PageData,
            12 => Done,
            _ => return None,
        })
    }
}

fn header(kind: u8, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Writes sealed frames to one connection.
pub struct FrameWriter<W: Write> {
    inner: W,
    key: SealingKey,
    seq: u64,
    /// Where [`FrameWriter::send`] gathers and seals a payload.
    scratch: Vec<u8>,
    /// Where [`FrameWriter::send_pages`] puts the ciphertext of a run.
    sealed_pages: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer for a connection whose handshake produced `key`.
    pub fn new(inner: W, key: SessionKey) -> Self {
        FrameWriter {
            inner,
            key: key.sealing(),
            seq: 0,
            scratch: Vec::new(),
            sealed_pages: Vec::new(),
        }
    }

    /// Sends one frame whose payload is the concatenation of `parts` (copied into the
    /// writer's buffer, where it is encrypted).
    ///
    /// # Errors
    /// [`WireError::FrameTooLarge`] for a payload over [`MAX_PAYLOAD`], and I/O errors.
    pub fn send(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<()> {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        for part in parts {
            payload.extend_from_slice(part);
        }
        let sent = self.send_in_place(kind, &mut payload);
        self.scratch = payload;
        sent
    }

    /// Sends one frame with `payload`, encrypting it where it lies: afterwards
    /// `payload` holds the ciphertext.
    ///
    /// # Errors
    /// [`WireError::FrameTooLarge`] for a payload over [`MAX_PAYLOAD`],
    /// [`WireError::Exhausted`], and I/O errors.
    pub fn send_in_place(&mut self, kind: FrameKind, payload: &mut [u8]) -> Result<()> {
        self.seal_and_write(kind as u8, payload)
    }

    /// Sends a frame of any kind byte, also one this version does not know (for tests
    /// of a hostile peer that holds the keys).
    #[doc(hidden)]
    pub fn send_raw_kind(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        let mut payload = payload.to_vec();
        self.seal_and_write(kind, &mut payload)
    }

    fn seal_and_write(&mut self, kind: u8, payload: &mut [u8]) -> Result<()> {
        let len = payload.len();
        if len > MAX_PAYLOAD {
            return Err(WireError::FrameTooLarge(len));
        }
        if self.seq == u64::MAX {
            return Err(WireError::Exhausted);
        }
        let header = header(kind, len);
        let tag = self
            .key
            .seal_in_place(&frame_nonce_bytes(self.seq), &header, payload)
            .map_err(|_| WireError::FrameTooLarge(len))?;
        self.seq += 1;
        let mut slices = [
            IoSlice::new(&header),
            IoSlice::new(payload),
            IoSlice::new(&tag),
        ];
        write_all_vectored(&mut self.inner, &mut slices)?;
        Ok(())
    }

    /// Sends the run of pages from `gpa` whose bytes are `pages` (a whole number of
    /// pages, at most a [`RUN_SPAN`], read where they lie, in guest memory) as a `Pages`
    /// frame and its `PageData`: the pages are encrypted straight into the writer's
    /// buffer, one pass and no copy first, and both frames go out in one system call.
    /// Returns the bytes put on the wire.
    ///
    /// # Errors
    /// [`WireError::Malformed`] for a length that is not a whole run,
    /// [`WireError::Exhausted`], and I/O errors.
    pub fn send_pages(&mut self, gpa: u64, pages: SharedBytes<'_>) -> Result<usize> {
        let len = pages.len();
        if len == 0 || len % PAGE_SIZE != 0 || len as u64 > RUN_SPAN {
            return Err(WireError::Malformed {
                kind: FrameKind::Pages,
                reason: format!("a run of {len} bytes is not 1 to 512 whole pages"),
            });
        }
        if self.seq >= u64::MAX - 1 {
            return Err(WireError::Exhausted);
        }
        let mut run = run_payload(gpa, (len / PAGE_SIZE) as u32);
        let run_header = header(FrameKind::Pages as u8, run.len());
        let run_tag = self
            .key
            .seal_in_place(&frame_nonce_bytes(self.seq), &run_header, &mut run)
            .map_err(|_| WireError::FrameTooLarge(RUN_LEN))?;
        // Grown once to the largest run; never shrunk, never zeroed again.
        if self.sealed_pages.len() < len {
            self.sealed_pages.resize(len, 0);
        }
        let data = &mut self.sealed_pages[..len];
        let data_header = header(FrameKind::PageData as u8, len);
        let data_tag = self
            .key
            .seal_into(&frame_nonce_bytes(self.seq + 1), &data_header, pages, data)
            .map_err(|_| WireError::FrameTooLarge(len))?;
        self.seq += 2;
        let mut slices = [
            IoSlice::new(&run_header),
            IoSlice::new(&run),
            IoSlice::new(&run_tag),
            IoSlice::new(&data_header),
            IoSlice::new(data),
            IoSlice::new(&data_tag),
        ];
        write_all_vectored(&mut self.inner, &mut slices)?;
        Ok(2 * (HEADER_LEN + TAG_LEN) + RUN_LEN + len)
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

/// The run of one `Pages` + `PageData` pair being gathered: the addresses only (the
/// pages are read where they lie when the run is sent).
#[derive(Debug)]
pub struct PageBatch {
    start: u64,
    len: usize,
    capacity: usize,
}

impl PageBatch {
    /// A batch of at most `capacity` pages (at least 1, at most a [`RUN_SPAN`]).
    pub fn new(capacity: usize) -> PageBatch {
        PageBatch {
            start: 0,
            len: 0,
            capacity: capacity.clamp(1, RUN_SPAN as usize / PAGE_SIZE),
        }
    }

    /// Whether the page at `gpa` extends the run: the batch is empty, or the page
    /// follows its last one in the same [`RUN_SPAN`] and the batch is not full.
    pub fn takes(&self, gpa: u64) -> bool {
        let end = self.start + (self.len * PAGE_SIZE) as u64;
        self.len == 0 || (!self.is_full() && gpa == end && gpa / RUN_SPAN == self.start / RUN_SPAN)
    }

    /// Adds the page at `gpa` to the run.
    ///
    /// # Panics
    /// When the page does not extend the run ([`PageBatch::takes`]).
    pub fn push(&mut self, gpa: u64) {
        assert!(self.takes(gpa), "page {gpa:#x} does not extend the run");
        if self.len == 0 {
            self.start = gpa;
        }
        self.len += 1;
    }

    /// The run gathered (first address, pages), if any, and empties the batch.
    pub fn take(&mut self) -> Option<(u64, usize)> {
        let pages = std::mem::take(&mut self.len);
        (pages > 0).then_some((self.start, pages))
    }

    /// Pages gathered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no page is gathered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the batch holds `capacity` pages.
    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }
}

/// One received, authenticated and decrypted frame; the payload borrows the reader's
/// buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    /// What it carries.
    pub kind: FrameKind,
    /// The payload, authenticated and decrypted.
    pub payload: &'a [u8],
}

/// Reads, authenticates and decrypts frames from one connection.
pub struct FrameReader<R: Read> {
    inner: BufReader<R>,
    key: LessSafeKey,
    seq: u64,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// A reader for a connection whose handshake produced `key`.
    pub fn new(inner: R, key: SessionKey) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(READ_AHEAD, inner),
            key: key.opening(),
            seq: 0,
            buf: Vec::new(),
        }
    }

    /// Reads the `PageData` frame that follows a `Pages` frame naming `dst.len() /
    /// 4096` pages: its ciphertext straight into `dst` (the pages, in guest memory),
    /// where it is authenticated and decrypted. On any error `dst` holds garbage (AWS-LC
    /// zeroes it on a bad tag) and the stream is unusable: the caller discards the
    /// guest, which never ran on it.
    ///
    /// # Errors
    /// [`WireError::Malformed`] for another frame or another length (before anything is
    /// read into `dst`), [`WireError::Truncated`], [`WireError::BadTag`],
    /// [`WireError::UnknownKind`], and I/O errors.
    pub fn recv_pages_into(&mut self, dst: &mut [u8]) -> Result<()> {
        let mut header = [0u8; HEADER_LEN];
        read_exact_or_truncated(&mut self.inner, &mut header)?;
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        let kind = FrameKind::from_u8(header[0]).ok_or(WireError::UnknownKind(header[0]))?;
        if kind != FrameKind::PageData || len != dst.len() {
            return Err(WireError::Malformed {
                kind: FrameKind::Pages,
                reason: format!(
                    "a run of {} bytes is followed by {kind:?} of {len} bytes, not its PageData",
                    dst.len()
                ),
            });
        }
        if self.seq == u64::MAX {
            return Err(WireError::Exhausted);
        }
        read_exact_or_truncated(&mut self.inner, dst)?;
        let mut tag = [0u8; TAG_LEN];
        read_exact_or_truncated(&mut self.inner, &mut tag)?;
        let seq = self.seq;
        self.key
            .open_in_place_separate_tag(frame_nonce(seq), Aad::from(&header), &tag, dst)
            .map_err(|_| WireError::BadTag { seq })?;
        self.seq += 1;
        Ok(())
    }

    /// Bytes read from the connection but not yet taken by a frame.
    pub fn read_ahead(&self) -> &[u8] {
        self.inner.buffer()
    }

    /// Reads the next frame, checks its length bound and its tag, and decrypts it in
    /// the reader's buffer: nothing of a frame is returned before all of it is
    /// authenticated.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the stream ends, [`WireError::FrameTooLarge`],
    /// [`WireError::BadTag`], [`WireError::UnknownKind`], and I/O errors.
    pub fn recv(&mut self) -> Result<Frame<'_>> {
        let mut header = [0u8; HEADER_LEN];
        read_exact_or_truncated(&mut self.inner, &mut header)?;
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::FrameTooLarge(len));
        }
        if self.seq == u64::MAX {
            return Err(WireError::Exhausted);
        }
        // Grown once to the largest frame seen; never shrunk, never zeroed again.
        if self.buf.len() < len + TAG_LEN {
            self.buf.resize(len + TAG_LEN, 0);
        }
        let sealed = &mut self.buf[..len + TAG_LEN];
        read_exact_or_truncated(&mut self.inner, sealed)?;
        let seq = self.seq;
        let payload = self
            .key
            .open_in_place(frame_nonce(seq), Aad::from(&header), sealed)
            .map_err(|_| WireError::BadTag { seq })?;
        self.seq += 1;
        let kind = FrameKind::from_u8(header[0]).ok_or(WireError::UnknownKind(header[0]))?;
        Ok(Frame { kind, payload })
    }

    /// The connection (bytes already read ahead from it are in
    /// [`FrameReader::read_ahead`]).
    pub fn get_mut(&mut self) -> &mut R {
        self.inner.get_mut()
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
        self.contains_run(gpa, 1)
    }

    /// Whether the `pages` pages from `gpa` are page-aligned and lie wholly inside one
    /// range.
    pub fn contains_run(&self, gpa: u64, pages: u32) -> bool {
        let bytes = u64::from(pages) * PAGE_SIZE as u64;
        gpa % PAGE_SIZE as u64 == 0
            && self.ranges.iter().any(|&(start, len)| {
                match (gpa.checked_add(bytes), start.checked_add(len)) {
                    (Some(run_end), Some(range_end)) => gpa >= start && run_end <= range_end,
                    _ => false,
                }
            })
    }
}

/// The run a `Pages` payload names: its first address and page count, checked to be
/// inside guest memory and within one [`RUN_SPAN`].
///
/// # Errors
/// [`WireError::Malformed`] for a payload of another length, no page or a run across
/// spans, [`WireError::OutOfBounds`] for a run outside guest memory or not
/// page-aligned.
pub fn parse_run(payload: &[u8], bounds: &MemoryBounds) -> Result<(u64, u32)> {
    let malformed = |reason: String| WireError::Malformed {
        kind: FrameKind::Pages,
        reason,
    };
    if payload.len() != RUN_LEN {
        return Err(malformed(format!("{} bytes, not {RUN_LEN}", payload.len())));
    }
    let gpa = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let pages = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes"));
    if pages == 0 || u64::from(pages) > RUN_SPAN / PAGE_SIZE as u64 {
        return Err(malformed(format!("a run of {pages} pages")));
    }
    if !bounds.contains_run(gpa, pages) {
        return Err(WireError::OutOfBounds { gpa });
    }
    let last = gpa + (u64::from(pages) - 1) * PAGE_SIZE as u64;
    if gpa / RUN_SPAN != last / RUN_SPAN {
        return Err(malformed(format!(
            "the run of {pages} pages at {gpa:#x} crosses a 2 MiB boundary"
        )));
    }
    Ok((gpa, pages))
}

/// A `Pages` payload: the run of `pages` pages from `gpa`.
pub fn run_payload(gpa: u64, pages: u32) -> [u8; RUN_LEN] {
    let mut p = [0u8; RUN_LEN];
    p[..8].copy_from_slice(&gpa.to_le_bytes());
    p[8..12].copy_from_slice(&pages.to_le_bytes());
    p
}

/// The addresses a `ZeroPages` payload lists, every one checked against `bounds`.
///
/// # Errors
/// [`WireError::Malformed`] when the lengths do not add up, [`WireError::OutOfBounds`]
/// for an address outside guest memory or not page-aligned.
pub fn parse_zero_pages(payload: &[u8], bounds: &MemoryBounds) -> Result<Vec<u64>> {
    let malformed = |reason: String| WireError::Malformed {
        kind: FrameKind::ZeroPages,
        reason,
    };
    if payload.len() < 8 {
        return Err(malformed(format!("{} bytes, no page count", payload.len())));
    }
    let count = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    let expected = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(8))
        .ok_or_else(|| malformed(format!("page count {count} overflows")))?;
    if payload.len() != expected {
        return Err(malformed(format!(
            "{count} pages need {expected} bytes, the frame has {}",
            payload.len()
        )));
    }
    let gpas: Vec<u64> = payload[8..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Some(&gpa) = gpas.iter().find(|&&gpa| !bounds.contains_page(gpa)) {
        return Err(WireError::OutOfBounds { gpa });
    }
    Ok(gpas)
}

/// A `ZeroPages` payload for `gpas`: count, padding, addresses.
pub fn zero_pages_payload(gpas: &[u64]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + 8 * gpas.len());
    payload.extend_from_slice(&(gpas.len() as u32).to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    for gpa in gpas {
        payload.extend_from_slice(&gpa.to_le_bytes());
    }
    payload
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
        let mut batch = PageBatch::new(4);
        for gpa in [0x1000, 0x2000] {
            assert!(batch.takes(gpa));
            batch.push(gpa);
        }
        // Not the next page, nor across 2 MiB: another run.
        assert!(!batch.takes(0x4000));
        assert_eq!(batch.take(), Some((0x1000, 2)));
        assert!(batch.is_empty());
        let mut pages = vec![7u8; 2 * PAGE_SIZE];
        pages[PAGE_SIZE..].fill(8);
        let sent = w
            .send_pages(0x1000, SharedBytes::from_slice(&pages))
            .unwrap();
        assert_eq!(sent, 2 * (HEADER_LEN + TAG_LEN) + RUN_LEN + 2 * PAGE_SIZE);
        batch.push(RUN_SPAN - 0x1000);
        assert!(!batch.takes(RUN_SPAN));
        assert_eq!(batch.take(), Some((RUN_SPAN - 0x1000, 1)));
        w.send_pages(RUN_SPAN - 0x1000, SharedBytes::from_slice(&[9; PAGE_SIZE]))
            .unwrap();
        // Not whole pages: refused before anything is sent.
        assert!(matches!(
            w.send_pages(0, SharedBytes::from_slice(&[1; 100])),
            Err(WireError::Malformed { .. })
        ));
        w.send(FrameKind::Commit, &[]).unwrap();
        let mut r = FrameReader::new(dconn, dkey);
        let bounds = MemoryBounds::new([(0, 4 << 20)]);
        for (want_gpa, want_pages, fills) in
            [(0x1000, 2, &[7u8, 8][..]), (RUN_SPAN - 0x1000, 1, &[9])]
        {
            let f = r.recv().unwrap();
            assert_eq!(f.kind, FrameKind::Pages);
            let (gpa, pages) = parse_run(f.payload, &bounds).unwrap();
            assert_eq!((gpa, pages), (want_gpa, want_pages));
            let mut data = vec![0u8; pages as usize * PAGE_SIZE];
            r.recv_pages_into(&mut data).unwrap();
            for (page, fill) in data.chunks(PAGE_SIZE).zip(fills) {
                assert!(page.iter().all(|b| b == fill));
            }
        }
        assert_eq!(r.recv().unwrap().kind, FrameKind::Commit);
    }

    #[test]
    fn replies_cannot_be_reflected() {
        let (bytes, key) = frames_bytes(&[(FrameKind::Loaded, Vec::new())]);
        let mut r = FrameReader::new(&bytes[..], key.for_replies());
        assert!(matches!(r.recv(), Err(WireError::BadTag { seq: 0 })));
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
        let key = SessionKey::for_tests(9);
        let mut w = FrameWriter::new(Vec::new(), key.clone());
        for (kind, payload) in kinds {
            w.send(*kind, &[payload]).unwrap();
        }
        (w.inner, key)
    }

    #[test]
    fn the_payload_is_encrypted_on_the_wire() {
        let marker = b"berth guest memory marker 0123456789";
        let (bytes, key) = frames_bytes(&[(FrameKind::State, marker.repeat(100))]);
        assert!(!bytes.windows(marker.len()).any(|w| w == marker));
        let mut r = FrameReader::new(&bytes[..], key);
        assert_eq!(r.recv().unwrap().payload, marker.repeat(100));
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
        let one = HEADER_LEN + 3 + TAG_LEN;
        for cut in [1, HEADER_LEN, one - 1] {
            let mut r = FrameReader::new(&bytes[..cut], key.clone());
            assert!(
                matches!(r.recv(), Err(WireError::Truncated)),
                "cut at {cut}"
            );
        }
        // The second frame alone fails: its nonce is sequence number 1.
        let mut r = FrameReader::new(&bytes[one..], key.clone());
        assert!(matches!(r.recv(), Err(WireError::BadTag { seq: 0 })));
        // Replayed: the first frame twice.
        let replayed = [&bytes[..one], &bytes[..one]].concat();
        let mut r = FrameReader::new(&replayed[..], key.clone());
        assert_eq!(r.recv().unwrap().payload, b"one");
        assert!(matches!(r.recv(), Err(WireError::BadTag { seq: 1 })));
        // Reordered: the second before the first.
        let swapped = [&bytes[one..], &bytes[..one]].concat();
        let mut r = FrameReader::new(&swapped[..], key.clone());
        assert!(matches!(r.recv(), Err(WireError::BadTag { seq: 0 })));
        let mut huge = header(FrameKind::Pages as u8, 0).to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&huge[..], key);
        assert!(matches!(r.recv(), Err(WireError::FrameTooLarge(_))));
    }

    #[test]
    fn pages_outside_guest_memory_are_refused() {
        let bounds = MemoryBounds::new([(0, 16 * PAGE_SIZE as u64)]);
        for (gpa, pages) in [
            (16 * PAGE_SIZE as u64, 1),
            (!0xfffu64, 1),
            (0x1001, 1),
            (0xf000, 2),
        ] {
            assert!(matches!(
                parse_run(&run_payload(gpa, pages), &bounds),
                Err(WireError::OutOfBounds { .. })
            ));
            assert!(
                matches!(
                    parse_zero_pages(&zero_pages_payload(&[gpa]), &bounds),
                    Err(WireError::OutOfBounds { .. })
                ) || pages > 1
            );
        }
        assert_eq!(
            parse_run(&run_payload(0xf000, 1), &bounds).unwrap(),
            (0xf000, 1)
        );
        // No pages, more than a span, across a span, a wrong length.
        let big = MemoryBounds::new([(0, 8 * RUN_SPAN)]);
        for payload in [
            run_payload(0, 0),
            run_payload(0, 513),
            run_payload(RUN_SPAN - 0x1000, 2),
        ] {
            assert!(matches!(
                parse_run(&payload, &big),
                Err(WireError::Malformed { .. })
            ));
        }
        assert!(parse_run(&[0u8; 12], &big).is_err());
        let mut lying = zero_pages_payload(&[]);
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_zero_pages(&lying, &bounds).is_err());
        let zero = zero_pages_payload(&[0x2000]);
        assert_eq!(parse_zero_pages(&zero, &bounds).unwrap(), vec![0x2000]);
    }

    #[test]
    fn page_data_must_follow_its_run_and_fail_cleanly() {
        let key = SessionKey::for_tests(4);
        let mut w = FrameWriter::new(Vec::new(), key.clone());
        w.send_pages(0, SharedBytes::from_slice(&[0x5a; PAGE_SIZE]))
            .unwrap();
        let good = std::mem::take(w.get_mut());
        // A flipped bit of the data: the tag fails, and what was decrypted is zeroed.
        let mut bad = good.clone();
        let at = HEADER_LEN + RUN_LEN + TAG_LEN + HEADER_LEN + 100;
        bad[at] ^= 1;
        let mut r = FrameReader::new(&bad[..], key.clone());
        r.recv().unwrap();
        let mut dst = vec![0xffu8; PAGE_SIZE];
        assert!(matches!(
            r.recv_pages_into(&mut dst),
            Err(WireError::BadTag { seq: 1 })
        ));
        assert!(dst.iter().all(|&b| b == 0));
        // Another length than the run's: refused before reading into it.
        let mut r = FrameReader::new(&good[..], key.clone());
        r.recv().unwrap();
        let mut dst = vec![0xffu8; 2 * PAGE_SIZE];
        assert!(matches!(
            r.recv_pages_into(&mut dst),
            Err(WireError::Malformed { .. })
        ));
        assert!(dst.iter().all(|&b| b == 0xff));
        // Another frame than PageData.
        w.send(FrameKind::Info, &[b"x"]).unwrap();
        let other = std::mem::take(w.get_mut());
        let mut r = FrameReader::new(&other[..], key);
        let mut dst = vec![0u8; 1];
        assert!(matches!(
            r.recv_pages_into(&mut dst),
            Err(WireError::Malformed { .. })
        ));
    }
}
