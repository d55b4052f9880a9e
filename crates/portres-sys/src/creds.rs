//! Who is on the other end of a Unix socket, and names for user and group ids.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The peer's pid, uid and gid as the kernel recorded them at `connect()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// `getsockopt(SO_PEERCRED)`: the peer's credentials.
pub fn peer_cred(sock: impl AsFd) -> io::Result<PeerCred> {
    let c = rustix::net::sockopt::socket_peercred(sock)?;
    Ok(PeerCred {
        pid: c.pid.as_raw_nonzero().get() as u32,
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}

/// `getsockopt(SO_PEERPIDFD)` (Linux 6.5): a pidfd of the process that connected. Unlike the
/// pid of `SO_PEERCRED`, it cannot come to name another process: while it has not exited
/// (`process::pidfd_exited`), its pid is still its own.
pub fn peer_pidfd(sock: impl AsFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    /// Not in every libc release yet: `include/uapi/asm-generic/socket.h`.
    const SO_PEERPIDFD: libc::c_int = 77;
    let fd = sock.as_fd().as_raw_fd();
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a valid descriptor borrowed for the call; the pointer and `len` describe
    // `pidfd` exactly, and the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if pidfd < 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel just installed `pidfd` in our table for us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) })
}

/// `getsockopt(SO_PEERGROUPS)` (Linux 4.13): the peer's supplementary groups at `connect()`.
pub fn peer_groups(sock: impl AsFd) -> io::Result<Vec<u32>> {
    let fd = sock.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `fd` is a valid descriptor borrowed for the call; the buffer pointer and `len`
        // describe `groups`' allocation exactly, and the kernel writes at most `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // ERANGE: the buffer was too small; `len` now holds the size needed.
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
        } else {
            return Err(err);
        }
    }
}

/// `getpwuid_r(3)`: the user name of `uid`, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// `getgrgid_r(3)`: the group name of `gid`, if it has one.
pub fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// `getgrgid_r(3)`: the uids of the users listed as members of group `gid` (its supplementary
/// members; users whose primary group it is are not listed there).
pub fn group_members(gid: u32) -> Vec<u32> {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map(|g| g.mem.iter().filter_map(|n| resolve_user(n)).collect())
        .unwrap_or_default()
}

/// `getpwnam_r(3)`, or a plain number: the uid a user name or numeric string stands for.
pub fn resolve_user(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Some(n);
    }
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// `getgrnam_r(3)`, or a plain number: the gid a group name or numeric string stands for.
pub fn resolve_group(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Some(n);
    }
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// `geteuid(2)`.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Who, if anyone, uses `uid`: its passwd entry (`getpwuid(3)`), or a process running as it
/// (the real, effective, saved or filesystem uid in `/proc/PID/status`). For the holder uid,
/// which must belong to nobody.
pub fn uid_in_use(uid: u32) -> Option<String> {
    if let Some(name) = user_name(uid) {
        return Some(format!("it has a passwd entry ({name})"));
    }
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let uses = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|ids| ids.split_whitespace().any(|i| i.parse() == Ok(uid)));
        if uses {
            return Some(format!("process {pid} runs as it"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn peer_of_a_socketpair_is_us() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_cred(&a).unwrap();
        assert_eq!(c.pid, std::process::id());
        assert_eq!(c.uid, effective_uid());
        peer_groups(&a).unwrap();
        assert_eq!(resolve_user("0"), Some(0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(resolve_group("root"), Some(0));
    }
}
