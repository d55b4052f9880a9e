//! Socket activation and the journal: a listening socket inherited from systemd
//! (`sd_listen_fds(3)`: `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from 3 on),
//! and whether standard error is the journal (`JOURNAL_STREAM`, `systemd.exec(5)`).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Why an inherited socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The environment is malformed.
    #[error("socket activation: {0}")]
    Environment(String),
    /// The descriptor passed is not a listening Unix stream socket.
    #[error(
        "socket activation: descriptor {fd} ({name}) is not a listening Unix stream socket \
         ({why}); the socket unit must have ListenStream=/a/path"
    )]
    NotAListener {
        /// The descriptor number.
        fd: i32,
        /// Its `LISTEN_FDNAMES` name.
        name: String,
        /// What it is instead.
        why: String,
    },
}

/// The listening sockets passed by the service manager, by name (`FileDescriptorName=`, the
/// socket unit's name without `.socket` by default), or an empty list if none were passed to
/// this process. Takes ownership of descriptors 3.. (marking them close-on-exec, so helper
/// processes do not inherit them) and removes the `LISTEN_*` variables from the environment, so
/// children do not take them as theirs. Call it once, before any other thread starts.
pub fn take_listeners() -> Result<Vec<(String, UnixListener)>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .parse()
        .map_err(|_| ActivationError::Environment(format!("LISTEN_PID={pid:?} is not a pid")))?;
    if pid != std::process::id() {
        // Meant for another process (a parent that did not clear it).
        return Ok(Vec::new());
    }
    let n: i32 = fds
        .parse()
        .ok()
        .filter(|n| (0..=64).contains(n))
        .ok_or_else(|| {
            ActivationError::Environment(format!(
                "LISTEN_FDS={fds:?} is not a count of descriptors"
            ))
        })?;
    // SAFETY: called before other threads exist (documented), so nothing reads the
    // environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let names: Vec<String> = names
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for i in 0..n {
        let fd = LISTEN_FDS_START + i;
        let name = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        // SAFETY: fcntl(F_GETFD) on any number is sound: it reads the descriptor's flags, or
        // fails with EBADF when no descriptor has that number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ActivationError::Environment(format!(
                "LISTEN_FDS={n} says descriptor {fd} ({name}) was passed, but it is not open"
            )));
        }
        // SAFETY: sd_listen_fds(3): descriptors LISTEN_FDS_START..+LISTEN_FDS are open and
        // passed to this process (LISTEN_PID checked above) for it to own; nothing else in this
        // process has taken them (this runs once, at start).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| {
            ActivationError::NotAListener {
                fd,
                name: name.clone(),
                why: format!("fcntl: {e}"),
            }
        })?;
        check_listener(&owned).map_err(|why| ActivationError::NotAListener {
            fd,
            name: name.clone(),
            why,
        })?;
        out.push((name, UnixListener::from(owned)));
    }
    Ok(out)
}

/// `getsockopt(SO_DOMAIN, SO_TYPE, SO_ACCEPTCONN)`: a listening `AF_UNIX` stream socket.
fn check_listener(fd: &OwnedFd) -> Result<(), String> {
    use rustix::net::sockopt;
    let domain = sockopt::socket_domain(fd.as_fd()).map_err(|e| format!("not a socket: {e}"))?;
    if domain != rustix::net::AddressFamily::UNIX {
        return Err(format!("address family {domain:?}"));
    }
    let kind = sockopt::socket_type(fd.as_fd()).map_err(|e| e.to_string())?;
    if kind != rustix::net::SocketType::STREAM {
        return Err(format!("socket type {kind:?}"));
    }
    if !sockopt::socket_acceptconn(fd.as_fd()).map_err(|e| e.to_string())? {
        return Err("not listening".into());
    }
    Ok(())
}

/// Whether standard error is connected to the journal: `JOURNAL_STREAM` names its device and
/// inode (`fstat(2)` on descriptor 2), as systemd sets it for `StandardError=journal`.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    match rustix::fs::fstat(rustix::stdio::stderr()) {
        Ok(st) => matches(&v, &st),
        Err(_) => false,
    }
}

/// Whether `JOURNAL_STREAM`'s value `v` ("DEVICE:INODE") names the file `st` describes.
fn matches(v: &str, st: &rustix::fs::Stat) -> bool {
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    match (dev.parse::<u64>(), ino.parse::<u64>()) {
        (Ok(dev), Ok(ino)) => st.st_dev == dev && st.st_ino == ino,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stderr_is_not_the_journal_without_the_variable_naming_it() {
        // The test harness's stderr is a pipe or a terminal: a JOURNAL_STREAM naming another
        // inode must not count.
        let st = rustix::fs::fstat(rustix::stdio::stderr()).unwrap();
        let other = format!("{}:{}", st.st_dev, st.st_ino.wrapping_add(1));
        let same = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(!super::matches(&other, &st));
        assert!(!super::matches("garbage", &st));
        assert!(super::matches(&same, &st));
    }
}
