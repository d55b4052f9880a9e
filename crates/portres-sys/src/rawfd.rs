//! Calls on raw descriptor numbers handed in by C callers (the C ABI of `portres-capi`), which
//! may not be open at all: every function here reports `EBADF` rather than assuming validity.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

fn getsockopt_int(fd: i32, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of an int; a bad `fd` only makes the call fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `setsockopt(2)` with a value of any plain type (an int, a `sock_fprog`, ...).
pub(crate) fn setsockopt<T>(fd: BorrowedFd<'_>, level: i32, name: i32, v: &T) -> io::Result<()> {
    // SAFETY: `v` points at a live `T` of `size_of::<T>()` bytes for the duration of the call
    // (the kernel copies it); `fd` is an open descriptor.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(SO_TYPE)`, `getsockopt(SO_PROTOCOL)` and `getsockopt(SO_DOMAIN)` of `fd`:
/// (type, protocol, family). `ENOTSOCK` or `EBADF` when it is not a socket.
pub fn socket_kind(fd: i32) -> io::Result<(i32, i32, i32)> {
    Ok((
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?,
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?,
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?,
    ))
}

/// `getsockopt(IPV6_V6ONLY)` of `fd`.
pub fn v6only(fd: i32) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0)
}

/// `bind(2)` with the caller's own address bytes.
///
/// # Safety
/// `addr` must point at `len` readable bytes.
pub unsafe fn bind_raw(
    fd: i32,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> io::Result<()> {
    // SAFETY: the caller guarantees `addr`/`len`; a bad `fd` only makes the call fail.
    let rc = unsafe { libc::bind(fd, addr, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `close(2)` of a descriptor number.
pub fn close_raw(fd: i32) -> io::Result<()> {
    // SAFETY: closing a number we do not own is what the C caller asked for (closesocket).
    let rc = unsafe { libc::close(fd) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The options of a socket that [`replace_socket`] carries over to its replacement. Others
/// (e.g. `SO_REUSEADDR`, `SO_BINDTODEVICE`, `SO_MARK`, multicast memberships) are not copied.
pub const COPIED_OPTIONS: &str = "O_NONBLOCK, FD_CLOEXEC, SO_RCVBUF, SO_SNDBUF, SO_KEEPALIVE, \
    SO_LINGER, SO_BROADCAST, SO_RCVTIMEO, SO_SNDTIMEO, SO_PRIORITY, IP_TOS, IPV6_TCLASS, \
    TCP_NODELAY, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT (IPV6_V6ONLY is applied at bind)";

fn copy_raw(from: i32, to: BorrowedFd<'_>, level: i32, name: i32, size: usize) {
    let mut buf = [0u8; 32];
    let mut len = size as libc::socklen_t;
    // SAFETY: `buf` holds at least `size` bytes (at most 32) for the kernel to write.
    let got = unsafe { libc::getsockopt(from, level, name, buf.as_mut_ptr().cast(), &mut len) };
    if got == 0 {
        // SAFETY: `buf[..len]` was just filled by the kernel; `to` is open.
        unsafe { libc::setsockopt(to.as_raw_fd(), level, name, buf.as_ptr().cast(), len) };
    }
}

/// Makes descriptor number `target` refer to `new` (`dup2(2)`/`dup3(2)`), after copying the
/// options of [`COPIED_OPTIONS`] from the socket `target` referred to. The number stays the same
/// for the caller; the old socket is closed.
pub fn replace_socket(target: i32, new: OwnedFd) -> io::Result<()> {
    let to = new.as_fd();
    for (level, name) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        (libc::SOL_SOCKET, libc::SO_BROADCAST),
        (libc::SOL_SOCKET, libc::SO_PRIORITY),
        (libc::IPPROTO_IP, libc::IP_TOS),
        (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    ] {
        copy_raw(target, to, level, name, std::mem::size_of::<libc::c_int>());
    }
    for name in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // The kernel reports twice the size that was set; set half to get the same.
        if let Ok(v) = getsockopt_int(target, libc::SOL_SOCKET, name) {
            let _ = setsockopt(to, libc::SOL_SOCKET, name, &(v / 2));
        }
    }
    copy_raw(
        target,
        to,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        std::mem::size_of::<libc::linger>(),
    );
    for name in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        copy_raw(
            target,
            to,
            libc::SOL_SOCKET,
            name,
            std::mem::size_of::<libc::timeval>(),
        );
    }
    // SAFETY: F_GETFL/F_GETFD/F_SETFL take and return plain integers.
    let (fl, fdfl) = unsafe {
        (
            libc::fcntl(target, libc::F_GETFL),
            libc::fcntl(target, libc::F_GETFD),
        )
    };
    if fl < 0 || fdfl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, on the open descriptor `new`.
    unsafe { libc::fcntl(new.as_raw_fd(), libc::F_SETFL, fl & libc::O_NONBLOCK) };
    let flags = if fdfl & libc::FD_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    // SAFETY: dup3 atomically closes `target` and makes it a copy of `new`, which stays open
    // until the end of this function; both are plain descriptor numbers.
    let rc = unsafe { libc::dup3(new.as_raw_fd(), target, flags) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
