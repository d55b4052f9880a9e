//! Sessions, shutdown and the socket: reservations die with their holder; one daemon per socket.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use portres_client::Protocol;

use crate::util::*;

#[test]
fn sigkill_of_the_client_ends_its_reservations() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let mut holder = spawn(
        d.cli()
            .args(["run", "--start", "48000", "--count", "4", "--", "sh", "-c"])
            .arg("echo \"$$ $PORTRES_PORTS\"; exec sleep 600")
            .stdout(Stdio::piped()),
    );
    let line = first_line(&mut holder);
    let (sleeper, ports) = line.trim().split_once(' ').unwrap();
    assert_eq!(ports, "48000-48003");
    let c = d.client();
    let show = c.show().unwrap();
    assert_eq!(show.reservations.len(), 1);
    assert_eq!(show.reservations[0].owner.pid, Some(holder.id()));
    assert!(
        show.reservations[0]
            .owner
            .command
            .as_deref()
            .unwrap()
            .contains("run --start 48000")
    );

    holder.kill().unwrap(); // SIGKILL
    holder.wait().unwrap();
    wait_until(
        "the killed holder's reservation to end",
        Duration::from_secs(5),
        || c.show().unwrap().reservations.is_empty(),
    );
    c.acquire_at(Protocol::Tcp, 48000, 4).unwrap();
    signal(sleeper.parse().unwrap(), rustix::process::Signal::KILL);
}

#[test]
fn clean_close_ends_reservations_and_other_sessions_keep_theirs() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let mine = c.acquire_at(Protocol::Udp, 49500, 2).unwrap();
    let out =
        run(raw_client(&d.socket)
            .arg(r#"{"op":"acquire","protocol":"udp","start":49600,"count":3}"#));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"ok\""),
        "{out:?}"
    );
    wait_until(
        "the helper's session to end",
        Duration::from_secs(5),
        || c.show().unwrap().reservations.len() == 1,
    );
    assert_eq!(
        c.show().unwrap().reservations[0].start,
        mine.range().start()
    );
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let status = d.terminate();
    assert!(status.success(), "{status:?}; log:\n{}", d.log());
    assert!(!d.socket.exists());
    d.launch();
    d.client().status().unwrap();
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let out = run(Command::new(BIN)
        .args(["daemon", "--socket"])
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(d.dir.path().join("other-state")));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serves"), "{err}");
    d.client().status().unwrap();
}

#[test]
fn system_socket_is_open_to_all_and_user_socket_is_private() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let out = run(d.cli_as_nobody().args(["--json", "status"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["scope"], "system");

    // A daemon run by an ordinary user is in user mode: its socket is private.
    let home = d.dir.path().join("nobody");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let socket = home.join("run/portres.sock");
    // Root, whose namespace a per-user daemon may not look at (/proc/PID/ns/net), is served
    // in the daemon's namespace (by default such a client is refused: namespaces.rs).
    let config = home.join("config.toml");
    std::fs::write(&config, "namespaces = \"daemon\"\n").unwrap();
    std::os::unix::fs::chown(&config, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut user_daemon = spawn(
        d.cli_as_nobody()
            .args(["daemon", "--print-ready", "--config"])
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(home.join("state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let line = first_line(&mut user_daemon);
    assert_eq!(line.trim(), "READY");
    let sock_mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    let dir_mode = std::fs::metadata(home.join("run"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    // Root does not trust another user's daemon unless told to (SECURITY.md).
    let refused = portres_client::Client::connect_to(&socket).unwrap_err();
    assert!(
        matches!(refused, portres_client::Error::Untrusted { .. }),
        "{refused:?}"
    );
    let status = portres_client::Client::connect_trusting(&socket, &[0, NOBODY])
        .unwrap()
        .status()
        .unwrap();
    signal(user_daemon.id(), rustix::process::Signal::TERM);
    user_daemon.wait().unwrap();
    assert_eq!((sock_mode, dir_mode), (0o600, 0o700));
    assert_eq!(status.scope, "user");
    // Without privilege the exclude layer is off, and says why; the hold layer names its limit.
    let layer = |name: &str| {
        status
            .layers
            .iter()
            .find(|l| l.name == name)
            .unwrap()
            .clone()
    };
    let exclude = layer("exclude");
    assert!(!exclude.active);
    assert!(
        exclude.reason.contains("CAP_NET_ADMIN"),
        "{}",
        exclude.reason
    );
    let hold = layer("hold");
    assert!(
        hold.active && hold.reason.contains("SO_REUSEPORT"),
        "{}",
        hold.reason
    );
}
