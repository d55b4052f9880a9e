//! Which processes hold which sockets: `/proc/PID/fd/*` links of the form `socket:[INODE]`.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;

/// Processes holding each of `inodes`, found by reading every `/proc/PID/fd` this process may
/// read. Returns the map and how many processes could not be examined (their descriptor
/// directories are unreadable without privilege).
pub fn socket_owners(inodes: &HashSet<u64>) -> (HashMap<u64, Vec<u32>>, usize) {
    let mut owners: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut hidden = 0;
    if inodes.is_empty() {
        return (owners, hidden);
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (owners, hidden);
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            hidden += 1;
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
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
