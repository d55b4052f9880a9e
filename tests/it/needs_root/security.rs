//! Trust (SECURITY.md): the client talks only to a real daemon, the daemon keeps its
//! directories private and refuses a configuration others could write, untrusted text stays
//! text, and the holder uid must belong to nobody.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::util::*;

/// A victim uid with no passwd entry and no daemon of its own anywhere.
const VICTIM: u32 = 65_533;
/// The other local user.
const MALLORY: u32 = 65_532;

/// A listening Unix socket at `path` run by `python3` as `uid`, after `bind` as root when
/// `bind_as_root` (then `listen` as `uid`: `SO_PEERCRED` reports the listener's credentials).
/// Prints "ready", then how many connections it accepted when its stdin closes.
fn impostor(path: &std::path::Path, uid: u32, bind_as_root: bool) -> std::process::Child {
    let script = r#"
import os, socket, sys, select
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
if sys.argv[3] == "1":
    os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
s.listen(8)
s.setblocking(False)
print("ready", flush=True)
sys.stdin.read()
n = 0
while select.select([s], [], [], 0)[0]:
    s.accept(); n += 1
print(n, flush=True)
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(path)
        .arg(uid.to_string())
        .arg(if bind_as_root { "1" } else { "0" })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if !bind_as_root {
        cmd.uid(uid).gid(uid);
    }
    let mut child = spawn(&mut cmd);
    let line = first_line(&mut child);
    assert_eq!(line.trim(), "ready");
    child
}

/// How many connections the impostor got (ends it).
fn connections(mut child: std::process::Child) -> u32 {
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `portres` as `uid`, with no XDG_RUNTIME_DIR: the socket falls back to /tmp/portres-UID.
fn cli_as(uid: u32) -> Command {
    let mut c = Command::new(nobody_binary());
    c.env_remove("XDG_RUNTIME_DIR")
        .env_remove("PORTRES_SOCKET")
        .env("PORTRES_AUTOSTART", "0")
        .env("HOME", "/nonexistent")
        .current_dir("/")
        .uid(uid)
        .gid(uid);
    c
}

#[test]
fn a_squatted_socket_directory_is_refused_and_the_squatter_gets_nothing() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    require_root();
    let dir = std::path::PathBuf::from(format!("/tmp/portres-{VICTIM}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(MALLORY), Some(MALLORY)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let squatter = impostor(&dir.join("portres.sock"), MALLORY, false);

    let out = run(cli_as(VICTIM).args(["--json", "run", "--count", "1", "--", "true"]));
    assert!(!out.status.success());
    let e = json(&out);
    let msg = e["error"]["message"].as_str().unwrap();
    assert_eq!(e["error"]["code"], "UntrustedDaemon", "{e}");
    assert!(
        msg.contains(&dir.display().to_string())
            && msg.contains(&format!("uid {MALLORY}"))
            && msg.contains("0777"),
        "{msg}"
    );
    assert_eq!(connections(squatter), 0, "the impostor was never contacted");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_daemon_running_as_another_user_is_refused() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // The victim's own private directory; the listener in it runs as another uid.
    std::os::unix::fs::chown(dir.path(), Some(VICTIM), Some(VICTIM)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = dir.path().join("portres.sock");
    let fake = impostor(&socket, MALLORY, true);
    let out = run(cli_as(VICTIM)
        .env("PORTRES_SOCKET", &socket)
        .args(["--json", "status"]));
    assert!(!out.status.success());
    let e = json(&out);
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("runs as uid {MALLORY}")) && msg.contains("PORTRES_DAEMON_USER"),
        "{msg}"
    );
    // It was connected to (that is how its uid was learnt) and sent nothing: the connection
    // was closed before the handshake.
    assert_eq!(connections(fake), 1);

    // Told to trust a user, the client does: root reaching a user's daemon on purpose.
    let d = TestDaemon::as_user(NOBODY);
    let out = run(d.cli().args(["--json", "status"]));
    assert_eq!(json(&out)["error"]["code"], "UntrustedDaemon", "{out:?}");
    let out = run(d
        .cli()
        .env("PORTRES_DAEMON_USER", "nobody")
        .args(["--json", "status"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["scope"], "user");
}

#[test]
fn a_symlinked_runtime_directory_is_refused_by_client_and_daemon() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    require_root();
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let runtime = base.path().join("run");
    let elsewhere = base.path().join("elsewhere");
    for d in [&runtime, &elsewhere] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(VICTIM), Some(VICTIM)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::os::unix::fs::symlink(&elsewhere, runtime.join("portres")).unwrap();
    let out = run(cli_as(VICTIM)
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["--json", "status"]));
    let e = json(&out);
    assert_eq!(e["error"]["code"], "UntrustedDaemon", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("symbolic link"),
        "{e}"
    );
    // The daemon refuses to start there too.
    let out = run(cli_as(VICTIM)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("XDG_STATE_HOME", &elsewhere)
        .args(["daemon"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symbolic link"), "{err}");
}

#[test]
fn a_configuration_others_could_write_is_refused() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    assert!(d.terminate().success());
    let config = d.config.clone().unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666)).unwrap();
    let log = d.try_launch().unwrap_err();
    assert!(
        log.contains(&config.display().to_string()) && log.contains("0666"),
        "{log}"
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.launch();
}

#[test]
fn untrusted_text_stays_text() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let evil = "\u{1b}[2J\u{1b}[31mEVIL\nINFO forged log line";
    let script = d.dir.path().join("evil.py");
    // Names itself with an escape sequence, listens on its reserved port, and waits.
    std::fs::write(
        &script,
        "import socket, sys\n\
         open('/proc/self/comm', 'w').write('\\x1b[31mRED\\n')\n\
         s = socket.socket(socket.AF_INET6); s.bind(('::', 47000)); s.listen(1)\n\
         print('ready', flush=True)\nsys.stdin.read()\n",
    )
    .unwrap();
    // In the daemon's network namespace, so that its socket is the daemon's to see.
    let mut holder = spawn(
        d.nsenter()
            .arg(BIN)
            .env("PORTRES_SOCKET", &d.socket)
            .env("PORTRES_AUTOSTART", "0")
            .args(["run", "--start", "47000", "--", "python3"])
            .arg(&script)
            .arg(evil)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let line = first_line(&mut holder);
    assert_eq!(line.trim(), "ready");

    let clean = |what: &str, text: &str| {
        assert!(
            !text.contains('\u{1b}'),
            "{what}: an escape sequence got through:\n{text}"
        );
        assert!(
            !text.contains("\nINFO forged"),
            "{what}: a forged line:\n{text}"
        );
    };
    let out = run(d.cli().arg("show"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    clean("show", &text);
    let out = run(d.cli().args(["who", "47000"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    clean("who", &text);
    assert!(text.contains("\\u{1b}[31mRED"), "{text}");
    // A conflict names the holder in one clean line.
    let out = run(d.cli().args(["run", "--start", "47000", "--", "true"]));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    clean("conflict", &err);
    assert!(err.contains("\\u{1b}"), "{err}");
    // JSON stays exact.
    let out = run(d.cli().args(["--json", "show"]));
    let doc = json(&out);
    let cmd = doc["reservations"][0]["owner"]["command"].as_str().unwrap();
    assert!(cmd.contains(evil), "{cmd:?}");
    // The log has neither.
    clean("log", &d.log());
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

#[test]
fn a_holder_uid_that_belongs_to_somebody_is_warned_about() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::with_config(&format!("holder_uid = {NOBODY}\n"));
    let status = d.client().status().unwrap();
    let hold = status.layers.iter().find(|l| l.name == "hold").unwrap();
    assert!(
        hold.reason.contains("WARNING") && hold.reason.contains("passwd entry"),
        "{}",
        hold.reason
    );
    assert!(d.log().contains("must belong to nobody"), "{}", d.log());
}
