//! The portres wire protocol: how a client and the daemon talk over a Unix stream socket.
//!
//! The full description, enough to write a client in another language, is `docs/protocol.md`.
//! In short: every message is a frame — a 4-byte little-endian length, then that many bytes of
//! UTF-8 JSON — of at most [`MAX_FRAME`] bytes. The client opens with [`Hello`], the daemon answers
//! [`Welcome`] (or an error, and closes). Then each [`RequestFrame`] carries an `id` that its
//! [`ReplyFrame`] repeats. File descriptors, where an operation carries them, travel as
//! `SCM_RIGHTS` ancillary data on the first byte of their frame, and the frame says how many.
//!
//! This crate is the only one whose types are serialised; the others convert to and from them.
//!
//! # Layout
//! - [`frame`]: framing (length prefix, maximum size) for blocking readers and writers.
//! - [`message`]: the handshake, requests, replies and errors.
//! - [`fields`]: request fields checked as they are decoded (ports, counts, protocol, mode).
#![deny(missing_docs)]

pub mod fields;
pub mod frame;
pub mod message;

pub use frame::{FrameError, MAX_FRAME, decode, encode, read_frame, write_frame};
pub use message::*;

/// The protocol's name, sent in the handshake so a stray peer is recognised at once.
pub const PROTOCOL_NAME: &str = "portres";

/// The protocol version this build speaks. Version 2 added `attach` and `shutdown`.
pub const VERSION: u32 = 2;

/// The oldest protocol version this build's daemon still serves (a client of any version from
/// this one to [`VERSION`] is welcome; it is answered in its own version).
pub const MIN_VERSION: u32 = 1;

/// What the daemon does with bytes from a client, for fuzzing (`fuzz/`) and the corpus replay
/// test: split them into frames, decode each as a handshake and as a request. Never panics.
pub fn fuzz_decode(mut data: &[u8]) {
    loop {
        match frame::read_frame(&mut data) {
            Ok(body) => {
                let _ = frame::decode::<Hello>(&body);
                if let Ok(req) = frame::decode::<RequestFrame>(&body) {
                    let _ = req.request.op_name();
                    let _ = frame::encode(&req);
                }
            }
            Err(_) => return,
        }
    }
}
