//! Passing descriptors over a Unix stream socket (`SCM_RIGHTS`).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::poll::{PollFd, PollFlags, poll};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// `sendmsg(2)` of `bytes` with `fds` attached as `SCM_RIGHTS` to the first byte. Returns how
/// many bytes were sent (the rest go with plain writes; the descriptors went with this call).
pub fn send_with_fds(sock: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    Ok(sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// `recvmsg(2)` into `buf`, collecting `SCM_RIGHTS` descriptors (received close-on-exec).
/// Returns the bytes read (0 at end of stream) and the descriptors.
pub fn recv_with_fds(sock: impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    Ok((msg.bytes, fds))
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`: a connected pair that keeps message
/// boundaries (one `sendmsg` is one `recvmsg`).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A listening Unix stream socket bound to `path` (`socket`, `bind`, `listen`), mode 0600: only
/// its owner (and root) may connect.
pub fn stream_listen(path: &std::path::Path) -> io::Result<OwnedFd> {
    let fd = unix_stream()?;
    // fchmod before bind: the file is created with the socket's mode, never more open.
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600))?;
    rustix::net::bind(&fd, &rustix::net::SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&fd, 16)?;
    Ok(fd)
}

/// Connects a Unix stream socket to `path`.
pub fn stream_connect(path: &std::path::Path) -> io::Result<OwnedFd> {
    let fd = unix_stream()?;
    rustix::net::connect(&fd, &rustix::net::SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

/// `socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`.
fn unix_stream() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// The path a Unix socket is bound to (`getsockname(2)`).
pub fn bound_path(sock: impl AsFd) -> io::Result<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let addr = rustix::net::getsockname(sock)?;
    let unix = rustix::net::SocketAddrUnix::try_from(addr)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let path = unix
        .path_bytes()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(std::ffi::OsStr::from_bytes(path).into())
}

/// `accept4(2)` on a listening socket (close-on-exec).
pub fn accept(listener: impl AsFd) -> io::Result<OwnedFd> {
    Ok(rustix::net::accept_with(
        listener,
        rustix::net::SocketFlags::CLOEXEC,
    )?)
}

/// Waits until `fd` is readable or `timeout` passes (`poll(2)`); returns whether it is.
pub fn wait_readable(fd: impl AsFd, timeout: Option<std::time::Duration>) -> io::Result<bool> {
    Ok(poll(&mut [PollFd::new(&fd, PollFlags::IN)], timeout)? > 0)
}

/// Waits until the peer of a connected stream socket has closed it (`poll(2)` for `POLLRDHUP`:
/// data arriving does not wake it).
pub fn wait_hangup(sock: impl AsFd) -> io::Result<()> {
    poll(&mut [PollFd::new(&sock, PollFlags::RDHUP)], None).map(|_| ())
}

/// Whether the peer of a connected stream socket has closed it, without consuming anything:
/// readable now (`poll(2)`, no wait) and a peek (`recv(MSG_PEEK | MSG_DONTWAIT)`) reads end of
/// file or fails.
pub fn peer_closed(sock: impl AsFd) -> bool {
    if !wait_readable(&sock, Some(std::time::Duration::ZERO)).unwrap_or(true) {
        return false;
    }
    let mut probe = [0u8; 1];
    matches!(
        rustix::net::recv(
            &sock,
            &mut probe,
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT
        ),
        Ok((0, _)) | Err(_)
    )
}

/// Makes `fd` non-blocking (`fcntl(F_SETFL, O_NONBLOCK)`).
pub fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// `SO_SNDBUF`: asks for a send buffer of `bytes` (the kernel caps it at `net.core.wmem_max`).
pub fn set_send_buffer(fd: impl AsFd, bytes: usize) -> io::Result<()> {
    rustix::net::sockopt::set_socket_send_buffer_size(&fd, bytes)?;
    Ok(())
}

/// Waits until `fd` can be written or `timeout` passes (`poll(2)`); returns whether it can.
pub fn wait_writable(fd: impl AsFd, timeout: std::time::Duration) -> io::Result<bool> {
    Ok(poll(&mut [PollFd::new(&fd, PollFlags::OUT)], Some(timeout))? > 0)
}

/// Waits (`poll(2)`) until `wake` is readable, `stream`'s peer hangs up (`POLLRDHUP`: data
/// arriving on `stream` does not wake it), or `timeout` passes. Returns (wake readable, hung up).
pub fn wait_wake_or_hangup(
    wake: impl AsFd,
    stream: impl AsFd,
    timeout: std::time::Duration,
) -> io::Result<(bool, bool)> {
    let mut fds = [
        PollFd::new(&wake, PollFlags::IN),
        PollFd::new(&stream, PollFlags::RDHUP),
    ];
    poll(&mut fds, Some(timeout))?;
    Ok((!fds[0].revents().is_empty(), !fds[1].revents().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_crosses_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(send_with_fds(&a, b"hello", &[file.as_fd()]).unwrap(), 5);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello"[..], 1));
    }
}
