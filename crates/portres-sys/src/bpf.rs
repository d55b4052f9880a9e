//! The BPF programs of UDP placeholders, loaded once per daemon and attached by descriptor.
//!
//! A UDP placeholder needs two behaviours: drop every datagram that reaches it, and steer the
//! datagrams of its port to the socket handed out beside it (the second member of its
//! `SO_REUSEPORT` group). Classic programs (`SO_ATTACH_FILTER`, `SO_ATTACH_REUSEPORT_CBPF`) are
//! compiled per socket: a block of 28,000 UDP ports made 56,000 JIT images, and freeing them all
//! at once wedged the kernel's BPF allocator (`bpf_prog_pack_free`) until reboot. Here the two
//! programs are loaded once with `bpf(BPF_PROG_LOAD)` as eBPF socket filters and attached with
//! `SO_ATTACH_BPF` and `SO_ATTACH_REUSEPORT_EBPF`: every placeholder takes a reference to the
//! same two programs, and releasing a block frees no program.
//!
//! Loading eBPF needs `CAP_BPF` (or `kernel.unprivileged_bpf_disabled=0`); a per-user daemon
//! usually cannot, and then [`SocketPrograms::load`] fails and the caller holds UDP without them
//! (see `hold.rs`), attaching the classic steering program only to sockets it hands out, a
//! bounded number of them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use crate::rawfd::setsockopt;

/// `SO_ATTACH_BPF` (asm-generic/socket.h).
const SO_ATTACH_BPF: libc::c_int = 50;
/// `SO_ATTACH_REUSEPORT_CBPF`.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `SO_ATTACH_REUSEPORT_EBPF`.
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;
/// `SO_GET_FILTER` (= `SO_ATTACH_FILTER`).
const SO_GET_FILTER: libc::c_int = 26;
/// `BPF_PROG_LOAD` command of `bpf(2)`.
const BPF_PROG_LOAD: libc::c_long = 5;
/// `BPF_PROG_TYPE_SOCKET_FILTER`.
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// One eBPF instruction (`struct bpf_insn`): opcode, registers (dst low nibble, src high),
/// offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to `prog_name` (the kernel zero-fills
/// the rest of the union for a shorter size).
#[repr(C, align(8))]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `r0 = value; exit`: a program that returns a constant.
fn return_constant(value: i32) -> [Insn; 2] {
    [
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0.
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: value,
        },
        // BPF_JMP | BPF_EXIT.
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ]
}

/// `bpf(BPF_PROG_LOAD)` of a socket filter that returns `value`, named `name` (≤ 15 bytes).
fn load_constant_filter(value: i32, name: &str) -> io::Result<OwnedFd> {
    let insns = return_constant(value);
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_PROG_LOAD, its pointers point
    // at `insns` and `license`, which outlive the call; the kernel copies both and returns a new
    // descriptor (or -1), which we own from here on.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The two programs every UDP placeholder shares: `drop` (a socket filter returning 0: the
/// placeholder receives nothing) and `steer` (a reuseport selector returning 1: the group's
/// second member, the socket handed out beside the placeholder; with none, the kernel falls
/// back to its hash, i.e. the placeholder, which drops).
#[derive(Debug)]
pub struct SocketPrograms {
    drop: OwnedFd,
    steer: OwnedFd,
}

impl SocketPrograms {
    /// Loads both programs (`bpf(BPF_PROG_LOAD)`, type `BPF_PROG_TYPE_SOCKET_FILTER`, two
    /// instructions each). Fails with EPERM without `CAP_BPF` when unprivileged BPF is disabled.
    pub fn load() -> io::Result<SocketPrograms> {
        Ok(SocketPrograms {
            drop: load_constant_filter(0, "portres_drop")?,
            steer: load_constant_filter(1, "portres_steer")?,
        })
    }

    /// Attaches both to a bound UDP placeholder: `SO_ATTACH_BPF` (drop) and
    /// `SO_ATTACH_REUSEPORT_EBPF` (steer, for the port's reuseport group). The kernel takes a
    /// reference to each program; nothing is compiled.
    pub fn attach(&self, sock: impl AsFd) -> io::Result<()> {
        let sock = sock.as_fd();
        setsockopt(
            sock,
            libc::SOL_SOCKET,
            SO_ATTACH_BPF,
            &self.drop.as_raw_fd(),
        )?;
        setsockopt(
            sock,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            &self.steer.as_raw_fd(),
        )
    }
}

/// Attaches a classic reuseport program `ret #1` (`SO_ATTACH_REUSEPORT_CBPF`) to the reuseport
/// group of a bound socket: the group's second member gets every datagram. The kernel compiles
/// one program for the group (replacing and freeing any earlier one): callers bound how many
/// they attach (this is the per-user daemon's fallback when [`SocketPrograms::load`] fails).
pub fn attach_classic_steering(sock: impl AsFd) -> io::Result<()> {
    let mut insn = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: insn.as_mut_ptr(),
    };
    // `prog` points at `insn`, alive for the call; the kernel copies the program.
    setsockopt(
        sock.as_fd(),
        libc::SOL_SOCKET,
        SO_ATTACH_REUSEPORT_CBPF,
        &prog,
    )
}

/// What socket filter a socket carries, by `getsockopt(SO_GET_FILTER)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedFilter {
    /// No socket filter.
    None,
    /// A classic program of this many instructions (compiled for this socket alone).
    Classic(u32),
    /// An eBPF program (the kernel refuses to dump it: EACCES).
    Ebpf,
}

/// `getsockopt(SO_GET_FILTER)` with a zero-length buffer: the kernel answers with the classic
/// program's length, 0 for none, or EACCES for an eBPF program (which has no classic form).
pub fn attached_filter(sock: impl AsFd) -> io::Result<AttachedFilter> {
    let mut len: libc::socklen_t = 0;
    // SAFETY: a zero-length query: the kernel writes nothing to the (null) buffer and stores
    // the program's length in `len`, and returns it.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_GET_FILTER,
            std::ptr::null_mut(),
            &mut len,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EACCES) {
            Ok(AttachedFilter::Ebpf)
        } else {
            Err(e)
        };
    }
    Ok(match len {
        0 => AttachedFilter::None,
        n => AttachedFilter::Classic(n),
    })
}

/// Number of live BPF programs on the machine, classic and eBPF alike, counted as the kernel's
/// `bpf_prog_alloc_no_stats` allocations in `/proc/vmallocinfo` (readable by root): one per
/// program. Used by tests and benchmarks to show that holding UDP ports creates none.
pub fn live_program_count() -> io::Result<usize> {
    let text = std::fs::read_to_string("/proc/vmallocinfo")?;
    Ok(text
        .lines()
        .filter(|l| l.contains("bpf_prog_alloc_no_stats"))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_are_eight_bytes() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 64);
    }
}
