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

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file description holds a lock on
/// it (`EWOULDBLOCK`).
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(
        file.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
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

/// Points standard input at `/dev/null` (`dup2(2)`).
pub fn stdin_to_dev_null() -> io::Result<()> {
    let null = File::open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
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

/// `O_NOFOLLOW` for `OpenOptionsExt::custom_flags`: opening a path whose last component is a
/// symbolic link fails (`ELOOP`).
pub const O_NOFOLLOW: i32 = libc::O_NOFOLLOW;

/// The signals a wrapper passes on to its command: `SIGTERM`, `SIGHUP`, `SIGINT`, `SIGQUIT`.
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];

fn forwarded_set(with_child: bool) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        if with_child {
            libc::sigaddset(&mut set, libc::SIGCHLD);
        }
        set
    }
}

/// Prepares `cmd` to run under a wrapper that forwards signals ([`wait_forwarding_signals`]):
/// blocks `SIGTERM`, `SIGHUP`, `SIGINT`, `SIGQUIT` and `SIGCHLD` in this (single-threaded)
/// process with `pthread_sigmask(2)` so they wait for `sigwaitinfo`, and in the child, between
/// fork and exec, unblocks them again and asks for `SIGTERM` when this process dies
/// (`prctl(PR_SET_PDEATHSIG)`; if it already died, the child exits at once).
pub fn prepare_signal_forwarding(cmd: &mut std::process::Command) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let set = forwarded_set(true);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: `set` is a valid, initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // pthread_sigmask, prctl, getppid and _exit, all async-signal-safe; `set` is a copy.
    unsafe {
        cmd.pre_exec(move || {
            let rc = libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The wrapper died before prctl: nobody would tell us.
            if libc::getppid() != parent {
                libc::_exit(128 + libc::SIGTERM);
            }
            Ok(())
        });
    }
    Ok(())
}

/// Waits for `child` to exit, passing on every `SIGTERM`, `SIGHUP`, `SIGINT` and `SIGQUIT` this
/// process receives (`sigwaitinfo(2)`, after [`prepare_signal_forwarding`]) to it with
/// `kill(2)`. A signal a terminal sent to the whole foreground process group (`si_code`
/// `SI_KERNEL`: Ctrl-C) already reached the child and is not sent twice.
pub fn wait_forwarding_signals(
    child: &mut std::process::Child,
) -> io::Result<std::process::ExitStatus> {
    let set = forwarded_set(true);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: `info` is a zeroed siginfo_t the kernel fills; `set` is initialised.
        let (sig, code, sender) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(&set, &mut info);
            (sig, info.si_code, info.si_pid())
        };
        if sig < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if sig == libc::SIGCHLD || code == libc::SI_KERNEL {
            continue;
        }
        // The child itself asking its parent (rare) is not echoed back.
        if sender == child.id() as libc::pid_t {
            continue;
        }
        // SAFETY: kill takes plain integers; the child is ours and not yet reaped (so its pid
        // cannot have been reused).
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
    }
}

/// `pidfd_open(2)`: a descriptor that refers to process `pid` for as long as it is open (it never
/// comes to mean another process, even when the pid is reused) and becomes readable when the
/// process exits.
pub fn pidfd_open(pid: u32) -> io::Result<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// `pidfd_send_signal(2)` of SIGKILL: ends exactly the process the pidfd refers to.
pub fn pidfd_kill(pidfd: impl AsFd) -> io::Result<()> {
    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL)?;
    Ok(())
}

/// Whether the process behind a pidfd has exited (`poll(2)` with no wait: a pidfd is readable
/// once its process has exited).
pub fn pidfd_exited(pidfd: impl AsFd) -> bool {
    crate::fdpass::wait_readable(pidfd, Some(std::time::Duration::ZERO)).unwrap_or(false)
}

/// Waits (`poll(2)`, no timeout) until at least one of `pidfds` is readable, i.e. its process
/// has exited; returns the indexes of those that are.
pub fn wait_pidfds(pidfds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<Vec<usize>> {
    use crate::poll::{PollFd, PollFlags};
    let mut fds: Vec<PollFd<'_>> = pidfds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    crate::poll::poll(&mut fds, None)?;
    Ok(fds
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.revents().is_empty())
        .map(|(i, _)| i)
        .collect())
}

/// The start time of process `pid` in clock ticks since boot (`/proc/PID/stat`, field 22):
/// with the pid, it names one process for the whole uptime (pids are reused, start times with
/// them are not).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted after
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Makes `cmd` start in a session of its own (`setsid(2)` between fork and exec): a signal to
/// the starter's process group or terminal does not reach it, and it outlives the starter.
pub fn new_session(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// This machine's host name (`uname(2)`'s nodename), if it has one.
pub fn host_name() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    (!name.is_empty() && name != "(none)").then_some(name)
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

    #[test]
    fn a_pidfd_tells_when_its_process_exits() {
        let me = pidfd_open(std::process::id()).unwrap();
        assert!(!pidfd_exited(&me));
        assert!(start_time(std::process::id()).is_some());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        child.wait().unwrap();
        assert!(pidfd_exited(&fd));
    }
}
