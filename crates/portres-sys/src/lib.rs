//! Every Linux call portres makes, in one place, each wrapper naming the syscall or `/proc` file
//! it uses. Nothing else in the workspace contains `unsafe`; here each unsafe block says why it
//! is sound in a `// SAFETY:` comment.
//!
//! # Layout
//! - [`activation`]: sockets inherited from systemd (socket activation), and the journal.
//! - [`bpf`]: the eBPF programs UDP placeholders share (loaded once, attached by descriptor).
//! - [`creds`]: peer credentials and supplementary groups of a Unix socket, user and group names.
//! - [`deny`]: the deny layer: cgroup bind programs, their map of reserved ports, bpffs pins,
//!   cgroup2.
//! - [`fdpass`]: Unix sockets: descriptors over them (`SCM_RIGHTS`), listening and connecting,
//!   and waiting on them (readable, writable, hung up).
//! - [`netns`]: network namespaces: naming one, entering it (`setns(2)`).
//! - `poll`: `poll(2)`, the one way this crate waits on descriptors.
//! - [`hold`]: placeholder sockets and the sockets handed out from reservations.
//! - [`ports`]: the dynamic port range, and probing whether a port is bound.
//! - [`process`]: command lines of processes, pidfds and start times, the OS random source,
//!   file locks, stdio, sessions.
//! - [`procfs`]: which processes hold which sockets.
//! - [`rawfd`]: calls on raw descriptor numbers from C callers (socket kind, bind, dup3).
//! - [`reserved_ports`]: the `net.ipv4.ip_local_reserved_ports` sysctl.
//! - [`sockdiag`]: the kernel's socket table (netlink `sock_diag`).
#![allow(unsafe_code)]
#![deny(missing_docs)]

pub mod activation;
pub mod bpf;
pub mod creds;
pub mod deny;
pub mod fdpass;
pub mod hold;
pub mod netns;
mod poll;
pub mod ports;
pub mod process;
pub mod procfs;
pub mod rawfd;
pub mod reserved_ports;
pub mod sockdiag;

/// For the tests of this crate that need root.
#[cfg(test)]
pub(crate) mod testutil {
    use std::io::Write;

    /// As root: false (the test runs here). As an ordinary user: runs this one test again as
    /// root of a user + network namespace of its own (`unshare -Urn`), fails if it fails there,
    /// and returns true (the test is done).
    pub(crate) fn run_as_namespace_root() -> bool {
        if rustix::process::geteuid().is_root() {
            return false;
        }
        let name = std::thread::current().name().unwrap_or("?").to_string();
        let out = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "--"])
            .arg(std::env::current_exe().unwrap())
            .args([
                name.as_str(),
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .output()
            .expect("run unshare(1)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{name}, run as root of a user + network namespace (unshare -Urn), failed:\n{text}"
        );
        true
    }

    /// As an ordinary user: says on standard error (past the harness's capture) that the test
    /// is skipped, and why; returns true. As root: false.
    pub(crate) fn skip_unless_root(why: &str) -> bool {
        if rustix::process::geteuid().is_root() {
            return false;
        }
        let name = std::thread::current().name().unwrap_or("?").to_string();
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {name}: it needs root on the host: {why}; it runs as root (in CI)"
        );
        true
    }
}
