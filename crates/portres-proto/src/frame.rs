//! Frames: a 4-byte little-endian body length, then the body (UTF-8 JSON), at most [`MAX_FRAME`].

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame body either side accepts, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Why a frame could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("the connection was closed")]
    Closed,
    /// The length prefix announces more than [`MAX_FRAME`].
    #[error("frame of {len} bytes is larger than the maximum of {MAX_FRAME}")]
    TooLarge {
        /// Announced length.
        len: usize,
    },
    /// The body is not the JSON message expected.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Reading or writing failed (includes a connection cut inside a frame).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The body length announced by a 4-byte header, checked against [`MAX_FRAME`].
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        Err(FrameError::TooLarge { len })
    } else {
        Ok(len)
    }
}

/// Serialises `msg` into a whole frame (header and body).
pub fn encode(msg: &impl Serialize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Parses a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Reads one frame body. A clean close before the header is [`FrameError::Closed`].
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut body = vec![0u8; body_len(header)?];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Writes one message as a frame.
pub fn write_frame(w: &mut impl Write, msg: &impl Serialize) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let f = encode(&"hello").unwrap();
        assert_eq!(&f[..4], &7u32.to_le_bytes());
        let body = read_frame(&mut &f[..]).unwrap();
        assert_eq!(decode::<String>(&body).unwrap(), "hello");
        assert!(matches!(read_frame(&mut &[][..]), Err(FrameError::Closed)));
        assert!(matches!(read_frame(&mut &f[..6]), Err(FrameError::Io(_))));
        let big = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(encode(&"x".repeat(MAX_FRAME)).is_err());
    }
}
