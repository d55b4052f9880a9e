//! The C ABI of portres (`libportres.so`, `libportres.a`, header `include/portres.h`): the
//! Windows port-reservation calls under their Windows names, structures and codes, so Winsock
//! code ports to Linux with the fewest changes.
//!
//! - `WSAIoctl` with `SIO_ACQUIRE_PORT_RESERVATION`, `SIO_ASSOCIATE_PORT_RESERVATION` and
//!   `SIO_RELEASE_PORT_RESERVATION` (here `SOCKET` is a file descriptor), `WSAGetLastError`.
//! - `portres_bind`: `bind(2)` that honours an association; `portres_closesocket`.
//! - The six `Create/Lookup/DeletePersistent{Tcp,Udp}PortReservation` functions.
//!
//! Every entry point catches panics (they never cross the FFI boundary) and is safe to call from
//! several threads: per-socket state sits behind one mutex, and the last error is per thread.
//!
//! # Layout
//! - `lib.rs`: the exported functions and the Windows types and constants.
//! - `sockets.rs`: per-socket state (reservations acquired on a socket, associations).
#![allow(unsafe_code)] // the FFI boundary: every pointer from C is checked, and each use says why
#![allow(non_snake_case, non_camel_case_types)] // Windows names

mod sockets;

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::panic::{AssertUnwindSafe, catch_unwind};

use portres_client::{Error, ErrorCode, Protocol, Token};

/// `INET_PORT_RANGE`: `StartPort` in network byte order, `NumberOfPorts` in host order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct INET_PORT_RANGE {
    /// First port, network byte order.
    pub StartPort: u16,
    /// Number of ports, host order.
    pub NumberOfPorts: u16,
}

/// `INET_PORT_RESERVATION_TOKEN`.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct INET_PORT_RESERVATION_TOKEN {
    /// The token.
    pub Token: u64,
}

/// `INET_PORT_RESERVATION_INSTANCE`: 16 bytes, `Token` at offset 8 (Windows alignment on every
/// target, also where `u64` aligns to 4).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct INET_PORT_RESERVATION_INSTANCE {
    /// The granted block.
    pub Reservation: INET_PORT_RANGE,
    /// Its token.
    pub Token: u64,
}

/// `SIO_ACQUIRE_PORT_RESERVATION`.
pub const SIO_ACQUIRE_PORT_RESERVATION: u32 = 0x9800_0064;
/// `SIO_RELEASE_PORT_RESERVATION`.
pub const SIO_RELEASE_PORT_RESERVATION: u32 = 0x9800_0065;
/// `SIO_ASSOCIATE_PORT_RESERVATION`.
pub const SIO_ASSOCIATE_PORT_RESERVATION: u32 = 0x9800_0066;

/// `SOCKET_ERROR`.
pub const SOCKET_ERROR: c_int = -1;
/// Win32 and Winsock codes used here.
pub mod codes {
    #![allow(missing_docs)]
    pub const NO_ERROR: u32 = 0;
    pub const ERROR_ACCESS_DENIED: u32 = 5;
    pub const ERROR_SHARING_VIOLATION: u32 = 32;
    pub const ERROR_INVALID_PARAMETER: u32 = 87;
    pub const ERROR_SERVICE_NOT_ACTIVE: u32 = 1062;
    pub const ERROR_NOT_FOUND: u32 = 1168;
    pub const ERROR_INTERNAL_ERROR: u32 = 1359;
    pub const WSAEINTR: i32 = 10004;
    pub const WSAEACCES: i32 = 10013;
    pub const WSAEFAULT: i32 = 10014;
    pub const WSAEINVAL: i32 = 10022;
    pub const WSAENOTSOCK: i32 = 10038;
    pub const WSAEOPNOTSUPP: i32 = 10045;
    pub const WSAEAFNOSUPPORT: i32 = 10047;
    pub const WSAEADDRINUSE: i32 = 10048;
    pub const WSAEADDRNOTAVAIL: i32 = 10049;
    pub const WSAENETDOWN: i32 = 10050;
    pub const WSAENOBUFS: i32 = 10055;
}
use codes::*;

thread_local! {
    static LAST_ERROR: Cell<c_int> = const { Cell::new(0) };
}

fn set_last_error(code: c_int) {
    LAST_ERROR.with(|e| e.set(code));
}

/// Fails with a Winsock code: sets the thread's last error and `errno`, returns `SOCKET_ERROR`.
fn fail(code: c_int) -> c_int {
    set_last_error(code);
    let errno = match code {
        WSAEACCES => libc::EACCES,
        WSAEFAULT => libc::EFAULT,
        WSAENOTSOCK => libc::ENOTSOCK,
        WSAEOPNOTSUPP => libc::EOPNOTSUPP,
        WSAEAFNOSUPPORT => libc::EAFNOSUPPORT,
        WSAEADDRINUSE => libc::EADDRINUSE,
        WSAEADDRNOTAVAIL => libc::EADDRNOTAVAIL,
        WSAENOBUFS => libc::ENOBUFS,
        WSAENETDOWN => libc::ENETDOWN,
        _ => libc::EINVAL,
    };
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = errno };
    SOCKET_ERROR
}

/// The Winsock code for an error of the daemon or of talking to it.
fn winsock_code(e: &Error) -> c_int {
    match e.code() {
        Some(ErrorCode::AccessDenied) => WSAEACCES,
        Some(ErrorCode::AddressInUse) => WSAEADDRINUSE,
        Some(ErrorCode::NoBufferSpace | ErrorCode::QuotaExceeded) => WSAENOBUFS,
        Some(ErrorCode::Internal) => WSAENOBUFS,
        Some(_) => WSAEINVAL,
        None => WSAENETDOWN,
    }
}

/// The Winsock code for a failed system call.
fn errno_code(e: &std::io::Error) -> c_int {
    match e.raw_os_error() {
        Some(libc::EBADF | libc::ENOTSOCK) => WSAENOTSOCK,
        Some(libc::EADDRINUSE) => WSAEADDRINUSE,
        Some(libc::EADDRNOTAVAIL) => WSAEADDRNOTAVAIL,
        Some(libc::EACCES | libc::EPERM) => WSAEACCES,
        Some(libc::EAFNOSUPPORT) => WSAEAFNOSUPPORT,
        Some(libc::EFAULT) => WSAEFAULT,
        _ => WSAEINVAL,
    }
}

/// Runs `f`, turning a panic into `SOCKET_ERROR` with `WSAENOBUFS`.
fn guard(f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| fail(WSAENOBUFS))
}

/// The protocol of socket `s`, or the Winsock error (`WSAENOTSOCK`, `WSAEOPNOTSUPP`).
fn socket_protocol(s: c_int) -> Result<(Protocol, i32), c_int> {
    let (ty, proto, family) = portres_sys::rawfd::socket_kind(s).map_err(|e| errno_code(&e))?;
    if family != libc::AF_INET && family != libc::AF_INET6 {
        return Err(WSAEOPNOTSUPP);
    }
    match (ty, proto) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => Ok((Protocol::Tcp, family)),
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => Ok((Protocol::Udp, family)),
        _ => Err(WSAEOPNOTSUPP),
    }
}

/// `WSAGetLastError()`: the code of this thread's last failed call.
#[unsafe(no_mangle)]
pub extern "C" fn WSAGetLastError() -> c_int {
    LAST_ERROR.with(|e| e.get())
}

/// `WSASetLastError()`.
#[unsafe(no_mangle)]
pub extern "C" fn WSASetLastError(code: c_int) {
    set_last_error(code);
}

/// `WSAIoctl` for the three port-reservation codes; returns 0 or `SOCKET_ERROR` (see
/// `WSAGetLastError`). Overlapped arguments are accepted and the call completes synchronously.
///
/// # Safety
/// Non-null pointers must be valid for the given lengths, as in Winsock.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn WSAIoctl(
    s: c_int,
    code: u32,
    in_buf: *mut c_void,
    in_len: u32,
    out_buf: *mut c_void,
    out_len: u32,
    bytes_returned: *mut u32,
    _overlapped: *mut c_void,
    _completion: *mut c_void,
) -> c_int {
    guard(|| {
        if bytes_returned.is_null() {
            return fail(WSAEFAULT);
        }
        // SAFETY: non-null, and the caller passes a valid DWORD pointer.
        unsafe { *bytes_returned = 0 };
        let needs_token_in = matches!(
            code,
            SIO_ASSOCIATE_PORT_RESERVATION | SIO_RELEASE_PORT_RESERVATION
        );
        let (need_in, need_out) = match code {
            SIO_ACQUIRE_PORT_RESERVATION => (
                size_of::<INET_PORT_RANGE>(),
                size_of::<INET_PORT_RESERVATION_INSTANCE>(),
            ),
            _ if needs_token_in => (size_of::<INET_PORT_RESERVATION_TOKEN>(), 0),
            _ => return fail(WSAEINVAL),
        };
        if (in_len as usize) < need_in || (out_len as usize) < need_out {
            return fail(WSAEINVAL);
        }
        if in_buf.is_null() || (need_out > 0 && out_buf.is_null()) {
            return fail(WSAEFAULT);
        }
        let (protocol, _) = match socket_protocol(s) {
            Ok(p) => p,
            Err(code) => return fail(code),
        };
        match code {
            SIO_ACQUIRE_PORT_RESERVATION => {
                // SAFETY: `in_buf` is non-null and holds at least 4 bytes; read unaligned.
                let range = unsafe { (in_buf as *const INET_PORT_RANGE).read_unaligned() };
                let start = u16::from_be(range.StartPort);
                match sockets::acquire(s, protocol, start, range.NumberOfPorts) {
                    Ok((token, first, count)) => {
                        let out = INET_PORT_RESERVATION_INSTANCE {
                            Reservation: INET_PORT_RANGE {
                                StartPort: first.to_be(),
                                NumberOfPorts: count,
                            },
                            Token: token.get(),
                        };
                        // SAFETY: `out_buf` is non-null and holds at least 16 bytes.
                        unsafe {
                            (out_buf as *mut INET_PORT_RESERVATION_INSTANCE).write_unaligned(out);
                            *bytes_returned = size_of::<INET_PORT_RESERVATION_INSTANCE>() as u32;
                        }
                        set_last_error(0);
                        0
                    }
                    Err(e) => fail(winsock_code(&e)),
                }
            }
            _ => {
                // SAFETY: `in_buf` is non-null and holds at least 8 bytes; read unaligned.
                let raw = unsafe { (in_buf as *const u64).read_unaligned() };
                let Some(token) = Token::new(raw) else {
                    return fail(WSAEINVAL);
                };
                let result = if code == SIO_ASSOCIATE_PORT_RESERVATION {
                    sockets::associate(s, token);
                    Ok(())
                } else {
                    sockets::release(token)
                };
                match result {
                    Ok(()) => {
                        set_last_error(0);
                        0
                    }
                    Err(e) => fail(winsock_code(&e)),
                }
            }
        }
    })
}

/// `bind(2)` that honours `SIO_ASSOCIATE_PORT_RESERVATION` on `s`: port 0 gives a free port of
/// the reservation, an explicit port inside it gives that port. The descriptor number stays the
/// same; the options listed in the header are carried over. Unassociated sockets bind as with
/// `bind(2)`. Returns 0 or `SOCKET_ERROR` (`errno` and `WSAGetLastError` both set).
///
/// # Safety
/// `addr` must point at `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portres_bind(
    s: c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> c_int {
    guard(|| {
        if addr.is_null() {
            return fail(WSAEFAULT);
        }
        let Some(token) = sockets::association(s) else {
            // SAFETY: the caller guarantees `addr`/`len`.
            return match unsafe { portres_sys::rawfd::bind_raw(s, addr, len) } {
                Ok(()) => 0,
                Err(e) => fail(errno_code(&e)),
            };
        };
        let (protocol, family) = match socket_protocol(s) {
            Ok(p) => p,
            Err(code) => return fail(code),
        };
        // SAFETY: the caller guarantees `len` readable bytes; the family field is first.
        let (ip, port) = match unsafe { parse_sockaddr(addr, len) } {
            Some(a) => a,
            None => return fail(WSAEFAULT),
        };
        if (family == libc::AF_INET) != ip.is_ipv4() {
            return fail(WSAEAFNOSUPPORT);
        }
        let v6only = if family == libc::AF_INET6 {
            portres_sys::rawfd::v6only(s).ok()
        } else {
            None
        };
        match sockets::bind_associated(s, token, protocol, ip, port, v6only) {
            Ok(()) => {
                set_last_error(0);
                0
            }
            Err(code) => fail(code),
        }
    })
}

/// Reads an `AF_INET`/`AF_INET6` address.
///
/// # Safety
/// `addr` must point at `len` readable bytes.
unsafe fn parse_sockaddr(
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> Option<(IpAddr, u16)> {
    let len = len as usize;
    if len < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above).
    let family = i32::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: `len` covers a sockaddr_in; read unaligned.
            let a = unsafe { (addr as *const libc::sockaddr_in).read_unaligned() };
            Some((
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: `len` covers a sockaddr_in6; read unaligned.
            let a = unsafe { (addr as *const libc::sockaddr_in6).read_unaligned() };
            Some((
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}

/// Closes `s`; runtime reservations acquired on it end, and its association is forgotten.
#[unsafe(no_mangle)]
pub extern "C" fn portres_closesocket(s: c_int) -> c_int {
    guard(|| {
        sockets::forget(s);
        match portres_sys::rawfd::close_raw(s) {
            Ok(()) => 0,
            Err(e) => fail(errno_code(&e)),
        }
    })
}

fn persistent(f: impl FnOnce() -> Result<u64, u32>, token: *mut u64) -> u32 {
    if token.is_null() {
        return ERROR_INVALID_PARAMETER;
    }
    catch_unwind(AssertUnwindSafe(|| match f() {
        Ok(t) => {
            // SAFETY: non-null, and the caller passes a valid ULONG64 pointer.
            unsafe { *token = t };
            NO_ERROR
        }
        Err(code) => code,
    }))
    .unwrap_or(ERROR_INTERNAL_ERROR)
}

fn persistent_unit(f: impl FnOnce() -> Result<(), u32>) -> u32 {
    catch_unwind(AssertUnwindSafe(|| f().err().unwrap_or(NO_ERROR))).unwrap_or(ERROR_INTERNAL_ERROR)
}

use portres_client::windows as w;

/// `CreatePersistentTcpPortReservation`. `StartPort` in network byte order.
///
/// # Safety
/// `Token` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn CreatePersistentTcpPortReservation(
    StartPort: u16,
    NumberOfPorts: u16,
    Token: *mut u64,
) -> u32 {
    persistent(
        || w::create_persistent_tcp_port_reservation(StartPort, NumberOfPorts),
        Token,
    )
}

/// `CreatePersistentUdpPortReservation`. `StartPort` in network byte order.
///
/// # Safety
/// `Token` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn CreatePersistentUdpPortReservation(
    StartPort: u16,
    NumberOfPorts: u16,
    Token: *mut u64,
) -> u32 {
    persistent(
        || w::create_persistent_udp_port_reservation(StartPort, NumberOfPorts),
        Token,
    )
}

/// `LookupPersistentTcpPortReservation`. `StartPort` in network byte order.
///
/// # Safety
/// `Token` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn LookupPersistentTcpPortReservation(
    StartPort: u16,
    NumberOfPorts: u16,
    Token: *mut u64,
) -> u32 {
    persistent(
        || w::lookup_persistent_tcp_port_reservation(StartPort, NumberOfPorts),
        Token,
    )
}

/// `LookupPersistentUdpPortReservation`. `StartPort` in network byte order.
///
/// # Safety
/// `Token` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn LookupPersistentUdpPortReservation(
    StartPort: u16,
    NumberOfPorts: u16,
    Token: *mut u64,
) -> u32 {
    persistent(
        || w::lookup_persistent_udp_port_reservation(StartPort, NumberOfPorts),
        Token,
    )
}

/// `DeletePersistentTcpPortReservation`. `StartPort` in network byte order.
#[unsafe(no_mangle)]
pub extern "C" fn DeletePersistentTcpPortReservation(StartPort: u16, NumberOfPorts: u16) -> u32 {
    persistent_unit(|| w::delete_persistent_tcp_port_reservation(StartPort, NumberOfPorts))
}

/// `DeletePersistentUdpPortReservation`. `StartPort` in network byte order.
#[unsafe(no_mangle)]
pub extern "C" fn DeletePersistentUdpPortReservation(StartPort: u16, NumberOfPorts: u16) -> u32 {
    persistent_unit(|| w::delete_persistent_udp_port_reservation(StartPort, NumberOfPorts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};

    #[test]
    fn layouts_match_windows() {
        assert_eq!(
            (size_of::<INET_PORT_RANGE>(), align_of::<INET_PORT_RANGE>()),
            (4, 2)
        );
        assert_eq!(offset_of!(INET_PORT_RANGE, NumberOfPorts), 2);
        assert_eq!(size_of::<INET_PORT_RESERVATION_TOKEN>(), 8);
        assert_eq!(size_of::<INET_PORT_RESERVATION_INSTANCE>(), 16);
        assert_eq!(offset_of!(INET_PORT_RESERVATION_INSTANCE, Token), 8);
        assert_eq!(SIO_ACQUIRE_PORT_RESERVATION, 2_550_136_932);
    }

    #[test]
    fn error_paths_without_a_daemon() {
        let mut n = 7u32;
        let mut range = INET_PORT_RANGE::default();
        let mut out = INET_PORT_RESERVATION_INSTANCE::default();
        let p = |r: &mut INET_PORT_RANGE| r as *mut _ as *mut c_void;
        let o = |r: &mut INET_PORT_RESERVATION_INSTANCE| r as *mut _ as *mut c_void;
        let nul = std::ptr::null_mut();
        // SAFETY: every pointer is valid for its stated length or null.
        unsafe {
            assert_eq!(
                WSAIoctl(
                    0,
                    0x1234,
                    p(&mut range),
                    4,
                    o(&mut out),
                    16,
                    &mut n,
                    nul,
                    nul
                ),
                SOCKET_ERROR
            );
            assert_eq!((WSAGetLastError(), n), (WSAEINVAL, 0));
            assert_eq!(
                WSAIoctl(
                    0,
                    SIO_ACQUIRE_PORT_RESERVATION,
                    p(&mut range),
                    3,
                    o(&mut out),
                    16,
                    &mut n,
                    nul,
                    nul
                ),
                SOCKET_ERROR
            );
            assert_eq!(WSAGetLastError(), WSAEINVAL);
            assert_eq!(
                WSAIoctl(
                    0,
                    SIO_ACQUIRE_PORT_RESERVATION,
                    p(&mut range),
                    4,
                    o(&mut out),
                    15,
                    &mut n,
                    nul,
                    nul
                ),
                SOCKET_ERROR
            );
            assert_eq!(WSAGetLastError(), WSAEINVAL);
            assert_eq!(
                WSAIoctl(
                    0,
                    SIO_ACQUIRE_PORT_RESERVATION,
                    nul,
                    4,
                    o(&mut out),
                    16,
                    &mut n,
                    nul,
                    nul
                ),
                SOCKET_ERROR
            );
            assert_eq!(WSAGetLastError(), WSAEFAULT);
            assert_eq!(
                WSAIoctl(
                    0,
                    SIO_ACQUIRE_PORT_RESERVATION,
                    p(&mut range),
                    4,
                    o(&mut out),
                    16,
                    std::ptr::null_mut(),
                    nul,
                    nul
                ),
                SOCKET_ERROR
            );
            assert_eq!(WSAGetLastError(), WSAEFAULT);
            // fd 0 is not a socket here (stdin of the test harness).
            let not_a_socket = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            assert_eq!(
                WSAIoctl(
                    not_a_socket,
                    SIO_ACQUIRE_PORT_RESERVATION,
                    p(&mut range),
                    4,
                    o(&mut out),
                    16,
                    &mut n,
                    nul,
                    nul
                ),
                SOCKET_ERROR
            );
            assert_eq!(WSAGetLastError(), WSAENOTSOCK);
            libc::close(not_a_socket);
            let unix = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            assert_eq!(
                WSAIoctl(
                    unix,
                    SIO_ACQUIRE_PORT_RESERVATION,
                    p(&mut range),
                    4,
                    o(&mut out),
                    16,
                    &mut n,
                    nul,
                    nul
                ),
                SOCKET_ERROR
            );
            assert_eq!(WSAGetLastError(), WSAEOPNOTSUPP);
            libc::close(unix);
        }
        assert_eq!(
            unsafe { CreatePersistentTcpPortReservation(1, 1, std::ptr::null_mut()) },
            ERROR_INVALID_PARAMETER
        );
    }
}
