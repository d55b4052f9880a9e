//! Which processes hold which sockets: `/proc/PID/fd/*` links of the form `socket:[INODE]`.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;

/// Processes holding each of `inodes`, found by reading every `/proc/PID/fd` this process may
/// read. Returns the map and how many processes could not be examined (their descriptor
/// directories are unreadable without privilege).
///
/// Reads directories with `getdents64` into one reused buffer and links with `readlinkat`
/// relative to the directory into a stack buffer: nothing is allocated per descriptor, which
/// is most of the cost on a machine with hundreds of thousands of them.
pub fn socket_owners(inodes: &HashSet<u64>) -> (HashMap<u64, Vec<u32>>, usize) {
    use rustix::fs::{Mode, OFlags, RawDir, openat, readlinkat_raw};
    use std::mem::MaybeUninit;

    let mut owners: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut hidden = 0;
    if inodes.is_empty() {
        return (owners, hidden);
    }
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(proc_fd) = openat(rustix::fs::CWD, "/proc", dir_flags, Mode::empty()) else {
        return (owners, hidden);
    };
    let mut proc_buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut fd_buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut pids = Vec::new();
    let mut procs = RawDir::new(&proc_fd, &mut proc_buf);
    while let Some(Ok(entry)) = procs.next() {
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
        {
            pids.push(pid);
        }
    }
    let mut path = String::with_capacity(32);
    for pid in pids {
        use std::fmt::Write;
        path.clear();
        let _ = write!(path, "{pid}/fd");
        let Ok(fd_dir) = openat(&proc_fd, path.as_str(), dir_flags, Mode::empty()) else {
            hidden += 1;
            continue;
        };
        let mut fds = RawDir::new(&fd_dir, &mut fd_buf);
        while let Some(Ok(entry)) = fds.next() {
            let name = entry.file_name();
            if name.to_bytes().first() == Some(&b'.') {
                continue;
            }
            let mut link = [MaybeUninit::<u8>::uninit(); 64];
            let Ok((target, _)) = readlinkat_raw(&fd_dir, name, &mut link) else {
                continue;
            };
            let Some(ino) = target
                .strip_prefix(b"socket:[")
                .and_then(|t| t.strip_suffix(b"]"))
                .and_then(|t| std::str::from_utf8(t).ok())
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if inodes.contains(&ino) {
                let pids = owners.entry(ino).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    (owners, hidden)
}

/// The short name of a process (`/proc/PID/comm`).
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The owner uid of a process (the owner of `/proc/PID`, its effective uid).
pub fn process_uid(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn finds_our_own_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ino = crate::hold::inode(a.as_fd()).unwrap();
        let (owners, _) = socket_owners(&HashSet::from([ino]));
        assert_eq!(owners[&ino], vec![std::process::id()]);
        assert_eq!(
            process_uid(std::process::id()),
            Some(crate::creds::effective_uid())
        );
        assert!(process_name(std::process::id()).is_some());
    }
}
