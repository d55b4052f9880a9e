//! The deny layer's kernel objects: cgroup `bind4`/`bind6` programs that refuse a bind into a
//! reserved port to everyone but its owner, the map of reserved ports they read, pins in bpffs,
//! and the cgroup2 calls behind "a process tree owns a block".
//!
//! Everything goes through the raw `bpf(2)` syscall with hand-assembled instructions: no clang,
//! no libbpf, no BTF, so `cargo build` with only Rust builds it. Each instruction is commented in
//! `bind_program`; the kernel's verifier checks it when it is loaded (a test loads it).
//!
//! # The map
//! `BPF_MAP_TYPE_LPM_TRIE`, key [`PortKey`] (12 bytes of data after the prefix length): the
//! network namespace's cookie (0 when keyed without namespaces), the protocol, a zero byte, and
//! the port in network order. A block is stored as its aligned power-of-two pieces
//! ([`portres_core::PortRange::prefixes`]), at most 30 entries whatever its size, so a block of
//! 60,000 ports costs the kernel a few hundred bytes and its grant a few dozen syscalls. The
//! value is an [`Owner`]. A second map (hash, [`AllowKey`]) holds the users and groups allowed
//! on persistent reservations.
//!
//! # What the program decides
//! A bind of port 0 is allowed at once (autobind: the kernel picks later, unseen by this hook;
//! `ip_local_reserved_ports` keeps it out of reserved ports). Otherwise the program looks the
//! port up; no entry: allowed. An entry: allowed for the daemon's own process (it binds the
//! sockets it hands out), the owner process (`tgid`), a process in the owner cgroup or below it,
//! a uid or primary gid in the allow map; everyone else is refused with the configured errno.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// `bpf(2)` commands.
const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_PROG_LOAD: u32 = 5;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_LINK_GET_FD_BY_ID: u32 = 30;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
/// `BPF_F_NO_PREALLOC`: LPM tries must not preallocate.
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_BIND: u32 = 8;
const BPF_CGROUP_INET6_BIND: u32 = 9;

/// Helper function ids (`enum bpf_func_id`).
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_GET_CURRENT_PID_TGID: i32 = 14;
const FN_GET_CURRENT_UID_GID: i32 = 15;
const FN_GET_NETNS_COOKIE: i32 = 122;
const FN_GET_CURRENT_ANCESTOR_CGROUP_ID: i32 = 123;
const FN_SET_RETVAL: i32 = 187;

/// `SO_NETNS_COOKIE` (asm-generic/socket.h, Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `EADDRINUSE`: a refused bind looks like a taken port (the default).
pub const EADDRINUSE: u32 = libc::EADDRINUSE as u32;
/// `EACCES`: a refused bind looks like Windows' WSAEACCES.
pub const EACCES: u32 = libc::EACCES as u32;
/// `EPERM`: the bind hook's own answer.
pub const EPERM: u32 = libc::EPERM as u32;

/// The IP protocol number of `p`, as a bind program sees it (`ctx->protocol`).
pub fn ip_protocol(p: portres_core::Protocol) -> u8 {
    match p {
        portres_core::Protocol::Tcp => libc::IPPROTO_TCP as u8,
        portres_core::Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

/// Owner flag: a process in the cgroup `cgroup_id` (at `cgroup_level`) or below it owns the block.
pub const OWNER_CGROUP: u32 = 1;
/// Owner flag: the uids and primary gids under `allow_id` in the allow map own the block.
pub const OWNER_USERS: u32 = 2;

/// Allow-map kind of a uid entry.
pub const ALLOW_UID: u32 = 0;
/// Allow-map kind of a gid entry.
pub const ALLOW_GID: u32 = 1;

/// A `union bpf_attr`, zeroed, written field by field at the offsets of `linux/bpf.h`.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(mut self, offset: usize, v: u32) -> Attr {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, offset: usize, v: u64) -> Attr {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(mut self, offset: usize, name: &str) -> Attr {
        let n = name.len().min(15);
        self.0[offset..offset + n].copy_from_slice(&name.as_bytes()[..n]);
        self
    }
}

/// `bpf(cmd, attr, sizeof attr)`; returns the kernel's non-negative result.
fn bpf(cmd: u32, attr: &Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-filled `union bpf_attr` of 128 bytes (the kernel accepts any size
    // up to its own and checks that the bytes it does not know are zero); every pointer written
    // into it points at memory the caller keeps alive for the call (each caller says which).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *const Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_result(cmd: u32, attr: &Attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: these commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A key of the ports map: one aligned piece of a block in one network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// The network namespace's cookie, or 0 when the layer is keyed without namespaces.
    pub netns: u64,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub protocol: u8,
    /// The piece's first port.
    pub port: u16,
    /// How many high bits of the port are fixed (16: one port).
    pub port_bits: u8,
}

/// Size of [`PortKey`] in the map: `struct bpf_lpm_trie_key` (u32 prefix length) + 12 bytes.
const PORT_KEY_SIZE: usize = 16;
/// Bits of a key before the port: cookie (64), protocol (8), zero byte (8).
const PORT_KEY_FIXED_BITS: u32 = 80;

impl PortKey {
    fn bytes(&self) -> [u8; PORT_KEY_SIZE] {
        let mut b = [0u8; PORT_KEY_SIZE];
        b[0..4].copy_from_slice(&(PORT_KEY_FIXED_BITS + u32::from(self.port_bits)).to_ne_bytes());
        // The program stores the cookie's two halves low first, as the CPU lays out a u64.
        b[4..12].copy_from_slice(&self.netns.to_ne_bytes());
        b[12] = self.protocol;
        b[13] = 0;
        b[14..16].copy_from_slice(&self.port.to_be_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<PortKey> {
        if b.len() != PORT_KEY_SIZE {
            return None;
        }
        let bits = u32::from_ne_bytes(b[0..4].try_into().ok()?);
        Some(PortKey {
            netns: u64::from_ne_bytes(b[4..12].try_into().ok()?),
            protocol: b[12],
            port: u16::from_be_bytes([b[14], b[15]]),
            port_bits: bits.checked_sub(PORT_KEY_FIXED_BITS)? as u8,
        })
    }
}

/// The value of a ports-map entry: who may bind the piece's ports (besides the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    /// [`OWNER_CGROUP`], [`OWNER_USERS`].
    pub flags: u32,
    /// A process (thread group id) that owns the block; 0 for none.
    pub tgid: u32,
    /// Depth of the owner cgroup below the cgroup2 root.
    pub cgroup_level: u32,
    /// Which allow-map entries apply.
    pub allow_id: u32,
    /// The owner cgroup's id (its inode number in cgroup2).
    pub cgroup_id: u64,
}

const OWNER_SIZE: usize = 24;

impl Owner {
    fn bytes(&self) -> [u8; OWNER_SIZE] {
        let mut b = [0u8; OWNER_SIZE];
        b[0..4].copy_from_slice(&self.flags.to_ne_bytes());
        b[4..8].copy_from_slice(&self.tgid.to_ne_bytes());
        b[8..12].copy_from_slice(&self.cgroup_level.to_ne_bytes());
        b[12..16].copy_from_slice(&self.allow_id.to_ne_bytes());
        b[16..24].copy_from_slice(&self.cgroup_id.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; OWNER_SIZE]) -> Owner {
        let u = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Owner {
            flags: u(0),
            tgid: u(4),
            cgroup_level: u(8),
            allow_id: u(12),
            cgroup_id: u64::from_ne_bytes(b[16..24].try_into().expect("8 bytes")),
        }
    }
}

/// A key of the allow map: (allow list, [`ALLOW_UID`] or [`ALLOW_GID`], id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllowKey {
    /// The allow list (an [`Owner::allow_id`]).
    pub allow_id: u32,
    /// [`ALLOW_UID`] or [`ALLOW_GID`].
    pub kind: u32,
    /// The uid or gid.
    pub id: u32,
}

impl AllowKey {
    fn bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&self.allow_id.to_ne_bytes());
        b[4..8].copy_from_slice(&self.kind.to_ne_bytes());
        b[8..12].copy_from_slice(&self.id.to_ne_bytes());
        b
    }
    fn from_bytes(b: &[u8]) -> Option<AllowKey> {
        let u = |i: usize| {
            b.get(i..i + 4)
                .map(|s| u32::from_ne_bytes(s.try_into().unwrap()))
        };
        Some(AllowKey {
            allow_id: u(0)?,
            kind: u(4)?,
            id: u(8)?,
        })
    }
}

/// One map (ports or allow), by descriptor.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

/// `bpf(BPF_MAP_CREATE)`; map name ≤ 15 bytes.
fn map_create(
    map_type: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    flags: u32,
    name: &str,
) -> io::Result<Map> {
    let attr = Attr::new()
        .u32(0, map_type)
        .u32(4, key_size as u32)
        .u32(8, value_size as u32)
        .u32(12, max_entries)
        .u32(16, flags)
        .name(28, name);
    Ok(Map {
        fd: fd_result(BPF_MAP_CREATE, &attr)?,
        key_size,
        value_size,
    })
}

impl Map {
    /// A new ports map (`BPF_MAP_TYPE_LPM_TRIE`, no preallocation: memory grows with entries).
    pub fn new_ports(max_entries: u32) -> io::Result<Map> {
        map_create(
            BPF_MAP_TYPE_LPM_TRIE,
            PORT_KEY_SIZE,
            OWNER_SIZE,
            max_entries,
            BPF_F_NO_PREALLOC,
            "portres_ports",
        )
    }

    /// A new allow map (`BPF_MAP_TYPE_HASH`, value one byte).
    pub fn new_allow(max_entries: u32) -> io::Result<Map> {
        map_create(
            BPF_MAP_TYPE_HASH,
            12,
            1,
            max_entries,
            BPF_F_NO_PREALLOC,
            "portres_allow",
        )
    }

    /// A pinned map (`BPF_OBJ_GET`), checked to have the expected key and value sizes.
    fn open_pinned(path: &Path, key_size: usize, value_size: usize) -> io::Result<Map> {
        let fd = obj_get(path)?;
        let info = info_by_fd(fd.as_fd())?;
        let (k, v) = (u32_at(&info, 8), u32_at(&info, 12));
        if k as usize != key_size || v as usize != value_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "pinned map {} has key size {k} and value size {v}, not {key_size} and \
                     {value_size} (made by another version)",
                    path.display()
                ),
            ));
        }
        Ok(Map {
            fd,
            key_size,
            value_size,
        })
    }

    /// The ports map pinned at `path`.
    pub fn open_pinned_ports(path: &Path) -> io::Result<Map> {
        Map::open_pinned(path, PORT_KEY_SIZE, OWNER_SIZE)
    }

    /// The allow map pinned at `path`.
    pub fn open_pinned_allow(path: &Path) -> io::Result<Map> {
        Map::open_pinned(path, 12, 1)
    }

    /// The map's kernel id (`BPF_OBJ_GET_INFO_BY_FD`).
    pub fn id(&self) -> io::Result<u32> {
        Ok(u32_at(&info_by_fd(self.fd.as_fd())?, 4))
    }

    /// Its descriptor.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        debug_assert_eq!((key.len(), value.len()), (self.key_size, self.value_size));
        let attr = Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value.as_ptr() as u64)
            .u64(24, 0); // BPF_ANY
        // `key` and `value` outlive the call.
        bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
    }

    /// Deletes `key`; a key that is not there is not an error.
    fn delete(&self, key: &[u8]) -> io::Result<()> {
        let attr = Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64);
        match bpf(BPF_MAP_DELETE_ELEM, &attr) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(drop),
        }
    }

    fn lookup(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_size];
        let attr = Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value.as_mut_ptr() as u64);
        match bpf(BPF_MAP_LOOKUP_ELEM, &attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every key (`BPF_MAP_GET_NEXT_KEY` from none).
    fn keys(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut next = vec![0u8; self.key_size];
            let prev = out.last();
            let attr = Attr::new()
                .u32(0, self.fd.as_raw_fd() as u32)
                .u64(8, prev.map_or(0, |p| p.as_ptr() as u64))
                .u64(16, next.as_mut_ptr() as u64);
            // `prev` and `next` outlive the call.
            match bpf(BPF_MAP_GET_NEXT_KEY, &attr) {
                Ok(_) => out.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e),
            }
            if out.len() > 1 << 22 {
                return Err(io::Error::other("map iteration does not end"));
            }
        }
    }

    /// Sets a ports-map entry (`BPF_MAP_UPDATE_ELEM`).
    pub fn set_port(&self, key: PortKey, owner: Owner) -> io::Result<()> {
        self.update(&key.bytes(), &owner.bytes())
    }

    /// Removes a ports-map entry.
    pub fn delete_port(&self, key: PortKey) -> io::Result<()> {
        self.delete(&key.bytes())
    }

    /// The owner of exactly `key` (no prefix matching: an entry of that piece).
    pub fn port_entry(&self, key: PortKey) -> io::Result<Option<Owner>> {
        Ok(self.lookup(&key.bytes())?.map(|v| {
            let mut b = [0u8; OWNER_SIZE];
            b.copy_from_slice(&v);
            Owner::from_bytes(&b)
        }))
    }

    /// Every ports-map entry.
    pub fn port_entries(&self) -> io::Result<Vec<(PortKey, Owner)>> {
        let mut out = Vec::new();
        for k in self.keys()? {
            let Some(key) = PortKey::from_bytes(&k) else {
                continue;
            };
            if let Some(owner) = self.port_entry(key)? {
                out.push((key, owner));
            }
        }
        Ok(out)
    }

    /// Adds an allow-map entry.
    pub fn set_allow(&self, key: AllowKey) -> io::Result<()> {
        self.update(&key.bytes(), &[1])
    }

    /// Removes an allow-map entry.
    pub fn delete_allow(&self, key: AllowKey) -> io::Result<()> {
        self.delete(&key.bytes())
    }

    /// Every allow-map key.
    pub fn allow_entries(&self) -> io::Result<Vec<AllowKey>> {
        Ok(self
            .keys()?
            .iter()
            .filter_map(|k| AllowKey::from_bytes(k))
            .collect())
    }

    /// Pins the map at `path` (`BPF_OBJ_PIN`).
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        pin(self.fd.as_fd(), path)
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// `bpf(BPF_OBJ_GET_INFO_BY_FD)`: the first 64 bytes of the object's info (`bpf_prog_info`,
/// `bpf_map_info` or `bpf_link_info`).
fn info_by_fd(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<[u8; 64]> {
    let mut info = [0u8; 64];
    let attr = Attr::new()
        .u32(0, fd.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    // `info` outlives the call; the kernel writes at most `info.len()` bytes.
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info)
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `bpf(BPF_OBJ_PIN)`: pins a program, map or link at `path` in bpffs.
pub fn pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = path_cstring(path)?;
    let attr = Attr::new()
        .u64(0, c.as_ptr() as u64)
        .u32(8, fd.as_raw_fd() as u32);
    // `c` outlives the call.
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

/// `bpf(BPF_OBJ_GET)`: opens what is pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = path_cstring(path)?;
    let attr = Attr::new().u64(0, c.as_ptr() as u64);
    // `c` outlives the call.
    fd_result(BPF_OBJ_GET, &attr)
}

/// Which bind hook a program is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `BPF_CGROUP_INET4_BIND`: binds of IPv4 sockets.
    Bind4,
    /// `BPF_CGROUP_INET6_BIND`: binds of IPv6 sockets (v4-mapped addresses included).
    Bind6,
}

impl Hook {
    fn attach_type(self) -> u32 {
        match self {
            Hook::Bind4 => BPF_CGROUP_INET4_BIND,
            Hook::Bind6 => BPF_CGROUP_INET6_BIND,
        }
    }
    /// `"bind4"` or `"bind6"`.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Bind4 => "bind4",
            Hook::Bind6 => "bind6",
        }
    }
}

/// What is baked into a program when it is loaded (a change loads new programs and swaps them
/// in with `BPF_LINK_UPDATE`, with no moment unenforced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramSettings {
    /// The daemon's process id: it binds every socket it hands out.
    pub daemon_tgid: u32,
    /// The errno a refused bind fails with (`bpf_set_retval`); `None`: the hook's own EPERM.
    pub errno: Option<u32>,
    /// Key on namespace 0 instead of the caller's network namespace cookie: host reservations
    /// then hold in every namespace on the machine.
    pub all_namespaces: bool,
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

// Registers.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R10: u8 = 10;

/// A little assembler: instructions with forward jumps to named labels, fixed up at the end.
struct Asm {
    insns: Vec<Insn>,
    fixups: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn i(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
    }
    /// A jump whose offset is the distance to `label`.
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.i(code, dst, src, 0, imm);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, name) in &self.fixups {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| n == name)
                .expect("label defined")
                .1;
            self.insns[*at].off = (target as isize - *at as isize - 1) as i16;
        }
        self.insns
    }
}

// Opcodes (class | op | source).
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const AND64_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const OR64_X: u8 = 0x4f; // BPF_ALU64 | BPF_OR | BPF_X
const LSH64_K: u8 = 0x67; // BPF_ALU64 | BPF_LSH | BPF_K
const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JEQ_X: u8 = 0x1d; // BPF_JMP | BPF_JEQ | BPF_X
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
/// `BPF_PSEUDO_MAP_FD` in the source register of `LD_IMM64`: the immediate is a map descriptor.
const PSEUDO_MAP_FD: u8 = 1;

// `struct bpf_sock_addr` offsets.
const CTX_USER_PORT: i16 = 24;
const CTX_PROTOCOL: i16 = 36;

/// The bind program (the same for bind4 and bind6): see the module documentation.
fn bind_program(ports: &Map, allow: &Map, s: ProgramSettings) -> Vec<Insn> {
    let mut a = Asm {
        insns: Vec::new(),
        fixups: Vec::new(),
        labels: Vec::new(),
    };
    // r0 = bpf_map_lookup_elem(map, r10 + key): r1 = the map (LD_IMM64 of a map descriptor,
    // two instructions, resolved by the kernel), r2 = the key on the stack.
    let lookup = |a: &mut Asm, m: &Map, key: i32| {
        a.i(LD_IMM64, R1, PSEUDO_MAP_FD, 0, m.fd.as_raw_fd());
        a.i(0, 0, 0, 0, 0);
        a.i(MOV64_X, R2, R10, 0, 0);
        a.i(ADD64_K, R2, 0, 0, key);
        a.i(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    };
    // r6 = ctx (struct bpf_sock_addr *), kept across helper calls.
    a.i(MOV64_X, R6, R1, 0, 0);
    // r7 = ctx->user_port: the requested port, network order in the low two bytes in memory.
    a.i(LDX_W, R7, R6, CTX_USER_PORT, 0);
    // if port == 0 (autobind, unseen here; ip_local_reserved_ports covers it): allow.
    a.jump(JEQ_K, R7, 0, 0, "allow");
    // The key at r10-16: [u32 prefix length][u64 netns cookie][proto][0][port hi][port lo].
    // *(u32 *)(r10 - 16) = 96: look up with every bit of the key.
    a.i(ST_W, R10, 0, -16, 96);
    if s.all_namespaces {
        // r0 = 0: keyed without namespaces.
        a.i(MOV64_K, R0, 0, 0, 0);
    } else {
        // r1 = ctx; r0 = bpf_get_netns_cookie(ctx): the socket's network namespace.
        a.i(MOV64_X, R1, R6, 0, 0);
        a.i(CALL, 0, 0, 0, FN_GET_NETNS_COOKIE);
    }
    // *(u32 *)(r10 - 12) = low half of the cookie (stack stores must be aligned: two halves).
    a.i(STX_W, R10, R0, -12, 0);
    // r0 >>= 32; *(u32 *)(r10 - 8) = high half.
    a.i(RSH64_K, R0, 0, 0, 32);
    a.i(STX_W, R10, R0, -8, 0);
    // r7 <<= 16: the port's two bytes move to bytes 2 and 3 of the word.
    a.i(LSH64_K, R7, 0, 0, 16);
    // r8 = ctx->protocol (IPPROTO_TCP, IPPROTO_UDP): byte 0 of the word.
    a.i(LDX_W, R8, R6, CTX_PROTOCOL, 0);
    // r7 |= r8; *(u32 *)(r10 - 4) = r7: [proto][0][port hi][port lo].
    a.i(OR64_X, R7, R8, 0, 0);
    a.i(STX_W, R10, R7, -4, 0);
    // r0 = bpf_map_lookup_elem(ports map, r10 - 16).
    lookup(&mut a, ports, -16);
    // if no entry (r0 == NULL): the port is not reserved: allow.
    a.jump(JEQ_K, R0, 0, 0, "allow");
    // r7 = the entry (struct Owner *), kept across helper calls.
    a.i(MOV64_X, R7, R0, 0, 0);
    // r0 = bpf_get_current_pid_tgid() >> 32: the binding process.
    a.i(CALL, 0, 0, 0, FN_GET_CURRENT_PID_TGID);
    a.i(RSH64_K, R0, 0, 0, 32);
    // if it is the daemon (it binds the sockets it hands out): allow.
    a.jump(JEQ_K, R0, 0, s.daemon_tgid as i32, "allow");
    // r1 = owner->tgid; if it is the binding process: allow (0 never matches a process).
    a.i(LDX_W, R1, R7, 4, 0);
    a.jump(JEQ_X, R0, R1, 0, "allow");
    // r1 = owner->flags & OWNER_CGROUP; if unset, skip the cgroup check.
    a.i(LDX_W, R1, R7, 0, 0);
    a.i(AND64_K, R1, 0, 0, OWNER_CGROUP as i32);
    a.jump(JEQ_K, R1, 0, 0, "users");
    // r1 = owner->cgroup_level; r0 = bpf_get_current_ancestor_cgroup_id(r1): the binding
    // process's cgroup at the owner's depth (0 if it is not that deep).
    a.i(LDX_W, R1, R7, 8, 0);
    a.i(CALL, 0, 0, 0, FN_GET_CURRENT_ANCESTOR_CGROUP_ID);
    // r1 = owner->cgroup_id; if the process is in the owner cgroup or below it: allow.
    a.i(LDX_DW, R1, R7, 16, 0);
    a.jump(JEQ_X, R0, R1, 0, "allow");
    a.label("users");
    // r1 = owner->flags & OWNER_USERS; if unset: deny.
    a.i(LDX_W, R1, R7, 0, 0);
    a.i(AND64_K, R1, 0, 0, OWNER_USERS as i32);
    a.jump(JEQ_K, R1, 0, 0, "deny");
    // r8 = bpf_get_current_uid_gid(): gid << 32 | uid.
    a.i(CALL, 0, 0, 0, FN_GET_CURRENT_UID_GID);
    a.i(MOV64_X, R8, R0, 0, 0);
    // The allow key at r10-32: [allow_id][kind][id]. *(u32 *)(r10 - 32) = owner->allow_id.
    a.i(LDX_W, R1, R7, 12, 0);
    a.i(STX_W, R10, R1, -32, 0);
    // *(u32 *)(r10 - 28) = ALLOW_UID; *(u32 *)(r10 - 24) = uid (the low half of r8).
    a.i(ST_W, R10, 0, -28, ALLOW_UID as i32);
    a.i(STX_W, R10, R8, -24, 0);
    // r0 = bpf_map_lookup_elem(allow map, r10 - 32); if found: allow.
    lookup(&mut a, allow, -32);
    a.jump(JNE_K, R0, 0, 0, "allow");
    // *(u32 *)(r10 - 28) = ALLOW_GID; r8 >>= 32; *(u32 *)(r10 - 24) = gid.
    a.i(ST_W, R10, 0, -28, ALLOW_GID as i32);
    a.i(RSH64_K, R8, 0, 0, 32);
    a.i(STX_W, R10, R8, -24, 0);
    // r0 = bpf_map_lookup_elem(allow map, r10 - 32); if found: allow.
    lookup(&mut a, allow, -32);
    a.jump(JNE_K, R0, 0, 0, "allow");
    a.label("deny");
    if let Some(errno) = s.errno {
        // r1 = -errno; bpf_set_retval(r1): the bind fails with this errno instead of EPERM.
        a.i(MOV64_K, R1, 0, 0, -(errno as i32));
        a.i(CALL, 0, 0, 0, FN_SET_RETVAL);
    }
    // return 0: refuse the bind.
    a.i(MOV64_K, R0, 0, 0, 0);
    a.i(EXIT, 0, 0, 0, 0);
    a.label("allow");
    // return 1: let the bind go on.
    a.i(MOV64_K, R0, 0, 0, 1);
    a.i(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// Why a program did not load: the errno and the verifier's log.
#[derive(Debug)]
pub struct LoadError {
    /// What `bpf(BPF_PROG_LOAD)` returned.
    pub error: io::Error,
    /// The verifier's log (empty if it had nothing to say).
    pub log: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bpf(BPF_PROG_LOAD) failed: {}", self.error)?;
        if !self.log.trim().is_empty() {
            write!(f, "; verifier: {}", self.log.trim())?;
        }
        Ok(())
    }
}

/// A loaded bind program.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
    hook: Hook,
    /// How many instructions it has.
    pub instructions: usize,
}

impl Program {
    /// Loads the bind program for `hook` (`bpf(BPF_PROG_LOAD)`, type
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`): the kernel's verifier checks it here, and a refusal
    /// carries the verifier's log. Needs CAP_BPF (root).
    pub fn load(
        hook: Hook,
        ports: &Map,
        allow: &Map,
        settings: ProgramSettings,
    ) -> Result<Program, LoadError> {
        let insns = bind_program(ports, allow, settings);
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let attempt = |log_level: u32, log: &mut [u8]| {
            let attr = Attr::new()
                .u32(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
                .u32(4, insns.len() as u32)
                .u64(8, insns.as_ptr() as u64)
                .u64(16, license.as_ptr() as u64)
                .u32(24, log_level)
                .u32(28, if log_level == 0 { 0 } else { log.len() as u32 })
                .u64(
                    32,
                    if log_level == 0 {
                        0
                    } else {
                        log.as_mut_ptr() as u64
                    },
                )
                .name(48, &format!("portres_{}", hook.name()))
                .u32(68, hook.attach_type());
            // `insns`, `license` and `log` outlive the call.
            fd_result(BPF_PROG_LOAD, &attr)
        };
        match attempt(0, &mut log) {
            Ok(fd) => Ok(Program {
                fd,
                hook,
                instructions: insns.len(),
            }),
            Err(error) => {
                // Again with the verifier's log, to say why.
                let _ = attempt(1, &mut log);
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                let tail: Vec<&str> = text.lines().rev().take(6).collect();
                Err(LoadError {
                    error,
                    log: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
                })
            }
        }
    }

    /// The program's kernel id.
    pub fn id(&self) -> io::Result<u32> {
        Ok(u32_at(&info_by_fd(self.fd.as_fd())?, 4))
    }

    /// Attaches it to the cgroup `cgroup_dir` (an open directory of cgroup2) with a BPF link
    /// (`BPF_LINK_CREATE`): other programs on the same hook keep running (links are
    /// multi-attach), and the attachment lives as long as the link descriptor or its pin.
    pub fn attach(&self, cgroup_dir: std::os::fd::BorrowedFd<'_>) -> io::Result<Link> {
        let attr = Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u32(4, cgroup_dir.as_raw_fd() as u32)
            .u32(8, self.hook.attach_type());
        Ok(Link {
            fd: fd_result(BPF_LINK_CREATE, &attr)?,
        })
    }
}

/// A program attached to a cgroup (a BPF link).
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

impl Link {
    /// The link pinned at `path`.
    pub fn open_pinned(path: &Path) -> io::Result<Link> {
        Ok(Link { fd: obj_get(path)? })
    }

    /// Swaps in another program with no moment detached (`BPF_LINK_UPDATE`).
    pub fn update(&self, program: &Program) -> io::Result<()> {
        let attr = Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u32(4, program.fd.as_raw_fd() as u32);
        bpf(BPF_LINK_UPDATE, &attr).map(drop)
    }

    /// The link's id and its program's id (`bpf_link_info`).
    pub fn ids(&self) -> io::Result<(u32, u32)> {
        let info = info_by_fd(self.fd.as_fd())?;
        Ok((u32_at(&info, 4), u32_at(&info, 8)))
    }

    /// Pins it at `path`: the program stays attached when every descriptor is closed (a
    /// crashed daemon leaves enforcement in place).
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        pin(self.fd.as_fd(), path)
    }
}

/// Whether a BPF program with kernel id `id` exists (`BPF_PROG_GET_FD_BY_ID`; root).
pub fn program_exists(id: u32) -> bool {
    fd_result(BPF_PROG_GET_FD_BY_ID, &Attr::new().u32(0, id)).is_ok()
}

/// Whether a BPF link with kernel id `id` exists (`BPF_LINK_GET_FD_BY_ID`; root).
pub fn link_exists(id: u32) -> bool {
    fd_result(BPF_LINK_GET_FD_BY_ID, &Attr::new().u32(0, id)).is_ok()
}

/// The network namespace cookie of the calling thread's namespace (`getsockopt(SO_NETNS_COOKIE)`
/// on a fresh UDP socket; Linux 5.14): the value `bpf_get_netns_cookie` gives a program there.
pub fn netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is 8 writable bytes and `len` says so; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Mount points by filesystem type, from `/proc/self/mountinfo`: the first mount of `fstype`
/// that shows the whole filesystem (its root is `/`: a bind mount of a cgroup2 subtree would
/// attach programs to that subtree only).
pub fn mount_of(fstype: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (left, right) = l.split_once(" - ")?;
        let fs = right.split(' ').next()?;
        let mut fields = left.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fs == fstype && root == "/").then(|| PathBuf::from(unescape_mount(point)))
    })
}

/// Why bind programs could not recognise this process: `bpf_get_current_pid_tgid` gives
/// process ids of the initial pid namespace, so a daemon in another one (its `NSpid` line in
/// `/proc/self/status` has more than one id) would refuse its own binds.
pub fn pid_namespace_problem() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let ids = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    (ids.split_whitespace().count() > 1).then(|| {
        "the daemon runs in a pid namespace of its own, and bind programs see process ids of \
         the initial one; run it in the host's pid namespace"
            .to_string()
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `mount(2)` of a filesystem `fstype` (no device) at `target`, creating the directory.
pub fn mount_fs(fstype: &str, target: &Path) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    rustix::mount::mount(
        fstype,
        target,
        fstype,
        rustix::mount::MountFlags::empty(),
        None,
    )
    .map_err(io::Error::from)
}

/// The cgroup2 path of process `pid` (the `0::` line of `/proc/PID/cgroup`), e.g. `/user.slice`.
pub fn cgroup_of(pid: u32) -> io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "process {pid} is in no cgroup2 cgroup (/proc/{pid}/cgroup has no 0:: line)"
                ),
            )
        })
}

/// A cgroup2 directory's id: its inode number (what `bpf_get_current_cgroup_id` returns).
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// Moves process `pid` (all its threads) into the cgroup `dir` (writes `dir/cgroup.procs`).
pub fn move_to_cgroup(dir: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// Opens a directory (`O_RDONLY | O_DIRECTORY | O_CLOEXEC`), e.g. a cgroup to attach to.
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = PortKey {
            netns: 0x0102_0304_0506_0708,
            protocol: 17,
            port: 40100,
            port_bits: 12,
        };
        assert_eq!(PortKey::from_bytes(&k.bytes()), Some(k));
        let b = k.bytes();
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 92);
        assert_eq!(&b[14..16], &40100u16.to_be_bytes());
        let o = Owner {
            flags: 3,
            tgid: 7,
            cgroup_level: 2,
            allow_id: 9,
            cgroup_id: 1 << 40,
        };
        assert_eq!(Owner::from_bytes(&o.bytes()), o);
    }

    #[test]
    fn jumps_land_on_their_labels() {
        // Assembled without maps (descriptor -1): every jump's target is inside the program
        // and the program ends with an exit.
        let fake = || Map {
            // SAFETY: never used as a descriptor: only its number goes into an instruction; the
            // value is forgotten below without closing.
            fd: unsafe { OwnedFd::from_raw_fd(i32::MAX) },
            key_size: 0,
            value_size: 0,
        };
        let (p, a) = (fake(), fake());
        let insns = bind_program(
            &p,
            &a,
            ProgramSettings {
                daemon_tgid: 1,
                errno: Some(98),
                all_namespaces: false,
            },
        );
        std::mem::forget(p);
        std::mem::forget(a);
        for (i, ins) in insns.iter().enumerate() {
            if ins.code & 0x07 == 0x05 && ins.code != CALL && ins.code != EXIT {
                let target = i as isize + 1 + isize::from(ins.off);
                assert!(target > i as isize && (target as usize) < insns.len());
            }
        }
        assert_eq!(insns.last().unwrap().code, EXIT);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    /// The kernel's verifier accepts both programs in every configuration (loading needs
    /// CAP_BPF: run as root, as CI does; without it this test fails and says so).
    #[test]
    fn needs_root_programs_pass_the_verifier() {
        if crate::testutil::skip_unless_root(
            "loading BPF programs (CAP_BPF), which kernel.unprivileged_bpf_disabled keeps from \
             a user namespace",
        ) {
            return;
        }
        let ports = Map::new_ports(1024).expect("BPF_MAP_CREATE needs root (CAP_BPF)");
        let allow = Map::new_allow(1024).expect("BPF_MAP_CREATE");
        for errno in [None, Some(98), Some(13)] {
            for all_namespaces in [false, true] {
                for hook in [Hook::Bind4, Hook::Bind6] {
                    let s = ProgramSettings {
                        daemon_tgid: std::process::id(),
                        errno,
                        all_namespaces,
                    };
                    let p = Program::load(hook, &ports, &allow, s)
                        .unwrap_or_else(|e| panic!("{hook:?} {s:?}: {e}"));
                    assert!(p.id().unwrap() > 0);
                }
            }
        }
    }
}
