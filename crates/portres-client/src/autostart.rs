//! Starting a user-mode daemon when none answers (docs/behaviour.md §7, issue "portres v0").
//!
//! The daemon is started detached (through `sh -c '... &'`, so it is reparented and never
//! becomes our zombie; in its own process group, so a terminal's Ctrl-C does not reach it),
//! with its log appended to `STATE_DIR/daemon.log`. It is told `--print-ready` and writes `READY`
//! on its standard output (our pipe) once its socket accepts, or exits without writing it. So the
//! wait is on an event, never a poll.
//!
//! Two clients racing end up with one daemon: daemons take an exclusive lock on
//! `SOCKET.lock` while they check for a live daemon and bind; the loser finds the winner
//! answering and exits without `READY`, and its starter then connects to the winner.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;

/// The executable set by [`set_daemon_binary`].
static DAEMON_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes autostart run `path` as the daemon (`path daemon --socket ...`) unless
/// `PORTRES_DAEMON_BIN` names another: the `portres` CLI sets its own executable, so a renamed
/// or relocated binary starts itself. Only the first call counts.
pub fn set_daemon_binary(path: PathBuf) {
    let _ = DAEMON_BINARY.set(path);
}

/// The `portres` executable to start: `PORTRES_DAEMON_BIN`; the one set with
/// [`set_daemon_binary`]; this program if it is `portres`; a `portres` beside this program or
/// one directory up (cargo's `target/*/deps` layout); `PATH`.
fn daemon_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PORTRES_DAEMON_BIN").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    if let Some(p) = DAEMON_BINARY.get() {
        return Some(p.clone());
    }
    let exe = std::env::current_exe().ok();
    if let Some(exe) = &exe {
        if exe.file_name().is_some_and(|n| n == "portres") {
            return Some(exe.clone());
        }
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("portres");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("portres"))
            .find(|p| p.is_file())
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts a daemon on `socket` with state in `state_dir` and waits until it is ready.
pub(crate) fn start_daemon(socket: &Path, state_dir: &Path) -> Result<(), Error> {
    let fail = |why: String| Error::Autostart {
        socket: socket.into(),
        why,
    };
    let bin = daemon_binary().ok_or_else(|| {
        fail(
            "no `portres` executable was found (looked at PORTRES_DAEMON_BIN, beside this \
             program, and on PATH); install portres or set PORTRES_DAEMON_BIN"
                .into(),
        )
    })?;
    // Private directories, never reached through a symbolic link; the log is not followed
    // through one either (O_NOFOLLOW).
    crate::trust::make_private_dir(state_dir).map_err(fail)?;
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::trust::make_private_dir(dir).map_err(fail)?;
    }
    let log_path = state_dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(portres_sys::process::O_NOFOLLOW)
        .open(&log_path)
        .map_err(|e| fail(format!("cannot open log {}: {e}", log_path.display())))?;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg("\"$0\" \"$@\" &")
        .arg(&bin)
        .arg("daemon")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--print-ready")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", bin.display())))?;
    let stdout = child.stdout.take().expect("piped");
    // The shell exits at once; the daemon keeps the pipe until it is ready (or fails).
    let _ = child.wait();
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    reader
        .read_line(&mut line)
        .map_err(|e| fail(format!("reading the daemon's readiness: {e}")))?;
    // READY: ours is serving. EOF without it: either another daemon won the start-up race (and
    // ours exited), or ours failed; connecting tells which.
    if line.trim() == "READY" || std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Ok(());
    }
    Err(fail(format!(
        "the daemon exited before it was ready; its log {} ends with:\n{}",
        log_path.display(),
        tail(&log_path, 15)
    )))
}

/// After starting a daemon: when it is a per-user daemon that cannot enforce every layer, says
/// once, in one line on standard error, what is and is not enforced and how to get the rest
/// (`PORTRES_QUIET=1` silences it).
pub(crate) fn say_what_is_enforced(client: &crate::Client) {
    if std::env::var_os("PORTRES_QUIET").is_some_and(|v| v == "1") {
        return;
    }
    let Ok(status) = client.status() else { return };
    let off: Vec<&str> = status
        .layers
        .iter()
        .filter(|l| !l.active)
        .map(|l| l.name.as_str())
        .collect();
    if status.scope != "user" || off.is_empty() {
        return;
    }
    let mut not = Vec::new();
    if off.contains(&"deny") {
        not.push("a program that binds an exclude-mode port by number is not stopped");
    }
    if off.contains(&"exclude") {
        not.push("the kernel may hand an exclude-mode port out as an ephemeral port");
    }
    if off.contains(&"hold") {
        not.push("held ports are not bound");
    }
    eprintln!(
        "portres: started a per-user daemon (pid {}, {}): other portres clients never get your \
         ports, but {} (layers off: {}); for full enforcement run the system daemon as root \
         (`sudo portres daemon`, or the unit in contrib/); `portres status` says why",
        status.pid,
        status.socket,
        not.join(", and "),
        off.join(", ")
    );
}
