//! Processes and files: command lines, the OS random source, locks, stdio.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

/// Reads `/proc/PID/cmdline` and joins its arguments with spaces (at most 256 characters).
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut s: String = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if s.is_empty() {
        // Kernel threads and zombies have no command line; fall back to the name.
        s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        s = format!("[{}]", s.trim());
    }
    if s.chars().count() > 256 {
        s = s.chars().take(255).collect::<String>() + "…";
    }
    Some(s)
}

/// `getrandom(2)`: 64 bits from the OS random source (blocks only before the pool is ready).
pub fn random_u64() -> io::Result<u64> {
    let mut buf = [0u8; 8];
    rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty())?;
    Ok(u64::from_ne_bytes(buf))
}

/// `getrandom(2)`: `n` numbers of 64 bits from the OS random source in one call.
pub fn random_u64s(n: usize) -> io::Result<Vec<u64>> {
    let mut buf = vec![0u8; n * 8];
    let mut filled = 0;
    while filled < buf.len() {
        filled +=
            rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// `sched_setaffinity(2)`: runs the calling process's threads on `cpu` only (benchmarks).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)?;
    Ok(())
}

/// `flock(LOCK_EX)`: waits for an exclusive lock on `file`; it is released when the file (its
/// open file description) is closed.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::LockExclusive)?;
    Ok(())
}

/// `flock(LOCK_UN)`.
pub fn unlock(file: &File) -> io::Result<()> {
    rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::Unlock)?;
    Ok(())
}

/// `dup2(/dev/null, 1)`: detaches standard output (after a readiness line was written to it).
pub fn stdout_to_dev_null() -> io::Result<()> {
    let null = File::options().write(true).open("/dev/null")?;
    rustix::stdio::dup2_stdout(&null)?;
    Ok(())
}

/// `setns(2)` on `/proc/PID/ns/net` for the calling thread only: later sockets of this thread
/// live in `pid`'s network namespace. Needs CAP_SYS_ADMIN. Used by tests to place sockets beside
/// a daemon started in a private namespace.
pub fn enter_net_namespace_of(pid: u32) -> io::Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// `unshare(CLONE_NEWNET)` for the calling thread: it moves to a new, empty network namespace
/// (loopback down). Needs CAP_SYS_ADMIN. Used by tests that bind ports, so they never touch the
/// host's port tables.
pub fn enter_private_net_namespace() -> io::Result<()> {
    // SAFETY: only CLONE_NEWNET is passed; it changes this thread's network namespace and nothing
    // that other threads or Rust's descriptor ownership depend on (the danger the rustix docs
    // name is CLONE_FILES).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET)? };
    Ok(())
}

/// Arranges for `fds` to be descriptors 3, 4, ... of the program `cmd` runs (systemd's
/// `LISTEN_FDS` convention). The descriptors are first duplicated above the targets
/// (`fcntl(F_DUPFD_CLOEXEC)`), then `dup2(2)`'d into place in the child between fork and exec
/// (which also clears close-on-exec on the targets).
pub fn pass_fds(cmd: &mut std::process::Command, fds: &[std::os::fd::OwnedFd]) -> io::Result<()> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let above = 3 + fds.len() as i32;
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, above).map_err(io::Error::from))
        .collect::<io::Result<_>>()?;
    let raw: Vec<i32> = high.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: the closure runs in the child between fork and exec and calls only dup2, which is
    // async-signal-safe; `raw` was allocated before the fork and is only read. `high` moves into
    // the closure so the descriptors stay open until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &high;
            for (i, &fd) in raw.iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// `malloc_trim(0)`: gives freed heap memory back to the system (glibc keeps it otherwise).
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `signal(SIGINT, SIG_IGN)` and the same for `SIGQUIT`: used by `portres run` after it started
/// its command, so a terminal's Ctrl-C stops the command, and `portres run` outlives it to report
/// its exit status and release the reservation after it.
pub fn ignore_terminal_interrupts() {
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: installing SIG_IGN runs no code in signal context and touches no memory.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_command_line() {
        let me = command_line(std::process::id()).unwrap();
        assert!(me.contains("portres_sys"), "{me}");
        assert_ne!(random_u64().unwrap(), random_u64().unwrap());
    }
}
