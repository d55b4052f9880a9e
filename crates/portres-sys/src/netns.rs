//! Network namespaces: naming one (a `/proc/PID/ns/net` or `/run/netns/NAME` descriptor,
//! compared by device and inode as the kernel's `ns` files are) and moving the calling thread
//! into it (`setns(2)`).
//!
//! A network namespace is per thread: a thread that has entered one creates its sockets, and
//! opens `/proc/sys/net/...`, there; a socket or sysctl descriptor keeps its namespace for life.
//! An open namespace descriptor keeps the namespace alive.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// A network namespace's identity: the device and inode of its `ns` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetNsId {
    /// `st_dev` of the `nsfs` file.
    pub dev: u64,
    /// `st_ino` of the `nsfs` file (what `ls -l /proc/PID/ns/net` shows as `net:[INODE]`).
    pub ino: u64,
}

/// An open network namespace (the descriptor keeps it alive).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    id: NetNsId,
}

impl NetNs {
    /// Opens `path` (an `ns/net` file, or a bind mount of one such as `/run/netns/NAME`) and
    /// reads its identity with `fstat(2)`.
    pub fn open(path: &Path) -> io::Result<NetNs> {
        let fd = OwnedFd::from(File::open(path)?);
        let st = rustix::fs::fstat(&fd)?;
        let id = NetNsId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        Ok(NetNs { fd, id })
    }

    /// `/proc/PID/ns/net`: the network namespace of process `pid` (its main thread).
    pub fn of_pid(pid: u32) -> io::Result<NetNs> {
        Self::open(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    /// `/proc/thread-self/ns/net`: the calling thread's network namespace.
    pub fn current() -> io::Result<NetNs> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Its identity.
    pub fn id(&self) -> NetNsId {
        self.id
    }

    /// `setns(fd, CLONE_NEWNET)`: moves the calling thread (only it) into this namespace. Needs
    /// CAP_SYS_ADMIN in the user namespace that owns it and in the caller's own (`EPERM`
    /// otherwise).
    /// Per-thread caches of sockets (`sockdiag`'s netlink channel) notice the move through
    /// [`entered`].
    pub fn enter(&self) -> io::Result<()> {
        rustix::thread::move_into_link_name_space(
            self.fd.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        ENTERED.set(Some(self.id));
        Ok(())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

thread_local! {
    static ENTERED: std::cell::Cell<Option<NetNsId>> = const { std::cell::Cell::new(None) };
}

/// The namespace the calling thread last entered with [`NetNs::enter`] (`None`: it never
/// did). A socket cached by a thread is valid for as long as this does not change.
pub fn entered() -> Option<NetNsId> {
    ENTERED.get()
}

/// The names `ip netns` gives namespaces: the files of `/run/netns` (bind mounts of `ns/net`
/// files), with their identities; empty when there is no such directory.
pub fn named() -> Vec<(String, NetNsId)> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let st = rustix::fs::stat(e.path()).ok()?;
            Some((
                name,
                NetNsId {
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_names_its_own_namespace_alike_both_ways() {
        let ns = NetNs::current().unwrap();
        assert_eq!(NetNs::of_pid(std::process::id()).unwrap().id(), ns.id());
    }
}
