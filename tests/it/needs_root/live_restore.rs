//! Live restore: runtime reservations outlive a daemon restart (SIGTERM, `kill -9`), enforced
//! all the way through, and their holders carry on.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::Duration;

use portres_client::{Client, Error, Mode, Protocol};

use crate::util::*;

/// A `portres run` holding a block while its command (a shell) waits for its stdin to close.
struct RunHolder {
    child: Child,
    /// `FIRST-LAST` of the block, as the command was told.
    ports: (u16, u16),
    protocol: &'static str,
    mode: &'static str,
}

impl RunHolder {
    fn start(d: &TestDaemon, protocol: &'static str, listen: bool, count: u32) -> RunHolder {
        Self::from_cli(d.cli(), protocol, listen, count)
    }

    /// The same through `cmd` (the daemon's CLI, e.g. with more environment).
    fn from_cli(
        mut cmd: std::process::Command,
        protocol: &'static str,
        listen: bool,
        count: u32,
    ) -> RunHolder {
        cmd.arg("run").arg(format!("--{protocol}"));
        if listen {
            cmd.arg("--listen");
        }
        cmd.args(["--count", &count.to_string(), "--", "sh", "-c"])
            .arg("echo $PORTRES_PORTS; read x || true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut cmd);
        let line = first_line(&mut child);
        let (a, b) = line
            .split_once('-')
            .unwrap_or_else(|| panic!("portres run printed {line:?}"));
        RunHolder {
            child,
            ports: (a.parse().unwrap(), b.parse().unwrap()),
            protocol,
            mode: if listen { "hold" } else { "exclude" },
        }
    }

    /// Ends the command (its stdin closes); returns `portres run`'s exit status and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    }
}

/// A library session: a client of its own, a block, and maybe a socket handed out from it.
struct LibHolder {
    client: Client,
    block: portres_client::Reservation,
    tcp: Option<TcpListener>,
    udp: Option<UdpSocket>,
}

/// The adversary (`adversary.py loopmany|sysctl`) running in the daemon's namespace until its
/// stdin closes.
fn stranger(d: &TestDaemon, uid: u32, args: &[String]) -> Child {
    let mut c = d.nsenter_as(uid);
    c.arg("python3")
        .arg(world_readable("adversary.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = spawn(&mut c);
    assert_eq!(first_line(&mut child), "started");
    child
}

fn stranger_result(mut child: Child) -> serde_json::Value {
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn tokens(d: &TestDaemon) -> BTreeSet<String> {
    let out = run(d.cli().args(["show", "--json", "--kind", "runtime"]));
    json(&out)["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["token"].as_str().unwrap().to_string())
        .collect()
}

fn restore_info(d: &TestDaemon) -> serde_json::Value {
    json(&run(d.cli().args(["status", "--json"])))["restore"].clone()
}

#[test]
fn a_hundred_holders_survive_a_sigterm_and_a_kill9_restart_never_unprotected() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let mut d = TestDaemon::start();
    // 60 `portres run` holders: exclude blocks, and held blocks whose sockets were handed out
    // (TCP listeners, UDP sockets) to the command.
    let mut runs: Vec<RunHolder> = Vec::new();
    for i in 0..60 {
        runs.push(match i % 3 {
            0 => RunHolder::start(&d, "tcp", false, 2),
            1 => RunHolder::start(&d, "tcp", true, 1),
            _ => RunHolder::start(&d, "udp", true, 1),
        });
    }
    // 40 library sessions of this process, each on its own connection: held blocks, half with
    // a socket handed out.
    let mut libs: Vec<LibHolder> = Vec::new();
    for i in 0..40 {
        let client = d.client();
        let protocol = if i % 2 == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let block = client.acquire_with(protocol, 0, 1, Mode::Hold).unwrap();
        let (mut tcp, mut udp) = (None, None);
        if i % 4 < 2 {
            match protocol {
                Protocol::Tcp => tcp = Some(block.listen(0).unwrap()),
                Protocol::Udp => {
                    udp = Some(
                        block
                            .udp_socket(Some("127.0.0.1".parse().unwrap()), 0)
                            .unwrap(),
                    )
                }
            }
        }
        libs.push(LibHolder {
            client,
            block,
            tcp,
            udp,
        });
    }
    let before = tokens(&d);
    assert_eq!(before.len(), 100);

    // Strangers: one binds every held port by number in a tight loop; one reads the sysctl in
    // a tight loop and counts the reads that miss a reserved port.
    let mut held: Vec<String> = Vec::new();
    let mut all_ports: Vec<String> = Vec::new();
    for r in &runs {
        for p in r.ports.0..=r.ports.1 {
            all_ports.push(p.to_string());
            if r.mode == "hold" {
                held.push(format!("{}:{p}", r.protocol));
            }
        }
    }
    for l in &libs {
        let p = l.block.port();
        all_ports.push(p.to_string());
        held.push(format!("{}:{p}", l.block.protocol()));
    }
    let mut args = vec!["loopmany".to_string()];
    args.extend(held.iter().cloned());
    let binder = stranger(&d, NOBODY, &args);
    let mut args = vec!["sysctl".to_string()];
    args.extend(all_ports.iter().cloned());
    let watcher = stranger(&d, 0, &args);

    // 1. SIGTERM, then a new daemon.
    assert!(d.terminate().success(), "{}", d.log());
    d.launch();
    let info = restore_info(&d);
    assert_eq!(info["restored"], true, "{info}");
    assert_eq!(info["kept"], 100, "{info}");
    assert_eq!(info["placeholders_kept"], 80, "{info}");
    let text = String::from_utf8(run(d.cli().arg("status")).stdout).unwrap();
    assert!(
        text.contains("live restore:   on")
            && text.contains("last start:")
            && text.contains("100 runtime reservations kept (80 held ports never unbound)"),
        "{text}"
    );
    assert_eq!(
        tokens(&d),
        before,
        "the same reservations, with the same tokens"
    );
    // The library sessions carry on by themselves (reconnect and re-attach on the next call).
    for l in &libs {
        l.client.status().unwrap();
        assert_eq!(l.client.reconnects(), 1);
        assert!(l.client.lost().is_empty());
    }

    // 2. kill -9, a holder dies while no daemon runs, then a new daemon.
    d.kill9();
    let dead = runs.remove(0);
    let dead_ports = dead.ports;
    signal(dead.child.id(), rustix::process::Signal::KILL);
    let _ = dead.finish();
    d.launch();
    let info = restore_info(&d);
    assert_eq!(info["kept"], 99, "{info}");
    let dropped = info["dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{info}");
    assert!(
        dropped[0]
            .as_str()
            .unwrap()
            .contains(&format!("{}-{}/tcp", dead_ports.0, dead_ports.1)),
        "{info}"
    );
    let after = tokens(&d);
    assert_eq!(after.len(), 99);
    assert!(after.is_subset(&before));

    let stolen = stranger_result(binder);
    assert!(
        stolen["stolen"].as_array().unwrap().is_empty(),
        "a stranger bound a held port during a restart: {stolen}"
    );
    assert!(stolen["rounds"].as_u64().unwrap() > 1, "{stolen}");
    let watched = stranger_result(watcher);
    // The dead holder's block left the sysctl after the second start, on purpose.
    let missing: Vec<u64> = watched["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .filter(|p| !(u64::from(dead_ports.0)..=u64::from(dead_ports.1)).contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "a reserved port left ip_local_reserved_ports during a restart: {watched}"
    );
    assert!(watched["reads"].as_u64().unwrap() > 1, "{watched}");
    assert!(
        !d.reserved_ports()
            .contains(&format!("{}-{}", dead_ports.0, dead_ports.1)),
        "the dead holder's block left the sysctl"
    );

    // Handed-out sockets still work, and are still known as handed out.
    for l in &libs {
        if let Some(t) = &l.tcp {
            let port = t.local_addr().unwrap().port();
            d.in_netns(move || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
            let (mut s, _) = t.accept().unwrap();
            s.write_all(b"x").unwrap();
        }
        if let Some(u) = &l.udp {
            let port = u.local_addr().unwrap().port();
            d.in_netns(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(b"ping", ("127.0.0.1", port)).unwrap();
            });
            u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 8];
            assert_eq!(
                u.recv(&mut buf).unwrap(),
                4,
                "a datagram reaches the handed-out socket"
            );
        }
    }
    let show = json(&run(d.cli().args(["show", "--json", "--kind", "runtime"])));
    let handed: u64 = show["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["handed_out_count"].as_u64().unwrap())
        .sum();
    // 20 library sockets and 40 `portres run --listen` sockets (the dead holder, an exclude
    // block, had none).
    assert_eq!(handed, 20 + 40);

    // Someone else's process cannot re-attach a reservation it does not own.
    let token = libs[0].block.token().to_string();
    let out = run(d
        .raw_client_as(0)
        .arg(format!(r#"{{"op":"attach","tokens":["{token}"]}}"#)));
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("\"lost\"") && reply.contains("belongs to"),
        "{reply}"
    );

    // Releases after the restarts work, and every `portres run` ends well, having said so.
    for l in libs {
        let LibHolder {
            client,
            block,
            tcp,
            udp,
        } = l;
        close((tcp, udp));
        block.release().unwrap();
        assert_eq!(client.reconnects(), 2);
    }
    for r in runs {
        let (status, err) = r.finish();
        assert!(status.success(), "{status:?}: {err}");
        assert!(err.contains("is kept"), "{err}");
    }
    wait_until(
        "every runtime block to end",
        Duration::from_secs(10),
        || tokens(&d).is_empty(),
    );
    d.stop();
    assert_eq!(d.reserved_ports(), "");
    assert!(d.keeper_pids().is_empty());
}

#[test]
fn a_stop_meant_as_a_stop_releases_everything_and_portres_run_says_so() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let mut cli = d.cli();
    cli.env("PORTRES_RECONNECT_SECS", "1");
    let holder = RunHolder::from_cli(cli, "tcp", true, 2);
    let first = holder.ports.0;
    assert!(!d.reserved_ports().is_empty());
    d.stop();
    assert_eq!(d.reserved_ports(), "", "the sysctl is restored at a stop");
    assert!(d.keeper_pids().is_empty());
    // The held ports are free (the command still has the handed-out listeners).
    let (status, err) = holder.finish();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("did not come back") && err.contains("was not reserved for the whole run"),
        "{err}"
    );
    assert!(
        d.in_netns(move || TcpListener::bind(("::", first)).is_ok()),
        "port {first} is free after a stop"
    );
}

#[test]
fn with_no_successor_the_keeper_releases_everything_after_the_grace() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::with_config("live_restore_secs = 1\n");
    let c = d.client();
    c.set_reconnect_limit(Duration::from_millis(300));
    let held = c.acquire_with(Protocol::Tcp, 0, 3, Mode::Hold).unwrap();
    let excl = c.acquire_with(Protocol::Udp, 0, 2, Mode::Exclude).unwrap();
    let (hp, ep) = (held.port(), excl.port());
    wait_until(
        "the held block in the sysctl",
        Duration::from_secs(2),
        || d.reserved_ports().contains(&hp.to_string()),
    );
    let keepers = d.keeper_pids();
    assert_eq!(keepers.len(), 1);
    assert!(d.terminate().success());
    // Kept during the grace...
    assert!(d.reserved_ports().contains(&ep.to_string()));
    assert!(!d.in_netns(move || TcpListener::bind(("::", hp)).is_ok()));
    // ...then released as a stop would, by the keeper, which exits.
    wait_until("the keeper to give up", Duration::from_secs(10), || {
        d.keeper_pids().is_empty()
    });
    assert_eq!(d.reserved_ports(), "");
    assert!(d.in_netns(move || TcpListener::bind(("::", hp)).is_ok()));
    // The client finds no daemon within its limit, and says so.
    let e = c.status().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Restarted {
                reserved: false,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("did not come back"), "{e}");
}

#[test]
fn a_daemon_of_a_newer_protocol_is_reported_clearly_and_the_block_stays_reserved() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let c = d.client();
    let block = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold).unwrap();
    let port = block.port();
    assert!(d.terminate().success());
    d.env
        .push(("PORTRES_FAILPOINT".into(), "protocol:99".into()));
    d.launch();
    let e = c.status().unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, Error::Restarted { reserved: true, .. }),
        "{text}"
    );
    assert!(
        text.contains("protocol version 2")
            && text.contains("99")
            && text.contains("stay reserved"),
        "{text}"
    );
    // Still held by the daemon that came back (this process, its owner, lives).
    let won = d.in_netns(move || TcpListener::bind(("::", port)).is_ok());
    assert!(!won, "port {port} stays held");
    let log = d.log();
    assert!(log.contains("kept runtime reservation"), "{log}");
    std::mem::forget(block);
}

#[test]
fn the_keeper_serves_its_own_user_only() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = TestDaemon::start();
    let path = d.dir.path().join("portres.sock.keeper");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the keeper's socket is its user's alone");
    // Another user cannot even connect: the keeper holds every placeholder.
    let out = run(std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import socket,sys\ns=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n\
             try:\n  s.connect(sys.argv[1]); print('connected')\nexcept PermissionError: print('refused')",
        )
        .arg(&path)
        .uid(NOBODY)
        .gid(NOBODY));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "refused",
        "{out:?}"
    );
    // status names it.
    let info = restore_info(&d);
    assert_eq!(
        info["keeper_pid"].as_u64().map(|p| p as u32),
        d.keeper_pids().first().copied()
    );
}

#[test]
fn a_block_granted_just_before_a_kill9_is_bound_again_or_named_lost() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    // Blocks younger than the keeper's copy delay (made long here, so the test does not depend
    // on timing): their placeholders die with the daemon.
    let mut d = TestDaemon::with_env(&[("PORTRES_FAILPOINT", "keeper-copy-after:600000")]);
    let c = d.client();
    let a = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold).unwrap();
    let b = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold).unwrap();
    d.kill9();
    let pb = b.port();
    // A stranger takes b's port while no daemon runs.
    let squatter = d.in_netns(move || TcpListener::bind(("::", pb)).unwrap());
    d.launch();
    let info = restore_info(&d);
    assert_eq!(info["kept"], 1, "{info}");
    let lost = info["lost"].as_array().unwrap();
    assert_eq!(lost.len(), 1, "{info}");
    let text = lost[0].as_str().unwrap();
    assert!(
        text.contains(&format!("{pb}-{pb}/tcp")) && text.contains("taken meanwhile"),
        "{text}"
    );
    // a is held again; the client learns at its next call that b is lost.
    let pa = a.port();
    assert!(!d.in_netns(move || TcpListener::bind(("::", pa)).is_ok()));
    c.status().unwrap();
    let lost = c.lost();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].token, b.token().to_string());
    drop(squatter);
    // Releasing the lost one is not an error: it is not reserved any more.
    b.release().unwrap();
    a.release().unwrap();
}

#[test]
fn blocks_held_by_helper_processes_survive_a_restart_and_a_kill9() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    // 9,000 placeholders for a daemon allowed 5,000 open files: helpers hold them, and the
    // keeper keeps the helpers alive between daemons.
    let mut d = TestDaemon::with_nofile(5000);
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 30000, 9000).unwrap();
    let mut args = vec!["loopmany".to_string()];
    args.extend(["tcp:30000", "tcp:34500", "tcp:38999"].map(String::from));
    let binder = stranger(&d, NOBODY, &args);
    assert!(d.terminate().success());
    d.launch();
    let info = restore_info(&d);
    assert_eq!(info["kept"], 1, "{info}");
    assert_eq!(info["placeholders_kept"], 9000, "{info}");
    d.kill9();
    d.launch();
    let info = restore_info(&d);
    assert_eq!(info["placeholders_kept"], 9000, "{info}");
    let result = stranger_result(binder);
    assert!(
        result["stolen"].as_array().unwrap().is_empty(),
        "a stranger bound a port held by a helper during a restart: {result}"
    );
    assert_eq!(d.client().status().unwrap().counts.ports_held, 9000);
    // Released through the helpers the new daemon took over: the ports are free.
    r.release().unwrap();
    assert_eq!(d.client().status().unwrap().counts.ports_held, 0);
    assert!(d.in_netns(|| TcpListener::bind(("::", 34500)).is_ok()));
}

#[test]
fn only_an_administrator_may_stop_the_daemon() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let mut d = TestDaemon::start();
    let out = run(d.cli_as_nobody().args(["--json", "daemon", "--stop"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("AccessDenied") && err.contains("not an administrator"),
        "{err}"
    );
    // Still serving.
    d.client().status().unwrap();
    d.stop();
    assert!(d.keeper_pids().is_empty());
}

#[test]
fn a_request_in_flight_when_the_daemon_dies_is_repeated_only_if_harmless() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    // The daemon aborts on a request it has read and not answered, and a new one comes up: a
    // status is simply asked again; an acquire is not repeated (it may have been granted), and
    // the error says so.
    for (failpoint, repeatable) in [("panic-on:status", true), ("panic-on:acquire", false)] {
        let mut d = TestDaemon::with_env(&[("PORTRES_FAILPOINT", failpoint)]);
        let c = d.client();
        c.set_reconnect_limit(Duration::from_secs(20));
        let asker = {
            let c = c.clone();
            std::thread::spawn(move || {
                if repeatable {
                    c.status().map(|_| ())
                } else {
                    c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold).map(|_| ())
                }
            })
        };
        let mut child = d.child.take().unwrap();
        let _ = child.wait();
        d.env.clear();
        d.launch();
        let result = asker.join().unwrap();
        if repeatable {
            result.unwrap();
        } else {
            let e = result.unwrap_err();
            assert!(matches!(e, Error::Restarted { reserved: true, .. }), "{e}");
            assert!(
                e.to_string()
                    .contains("may or may not have been carried out"),
                "{e}"
            );
        }
        // The session carries on.
        c.status().unwrap();
        assert_eq!(c.reconnects(), 1);
    }
}

#[test]
fn a_keeper_left_behind_lets_go_when_a_daemon_runs_without_it() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let c = d.client();
    c.set_reconnect_limit(Duration::ZERO);
    let b = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold).unwrap();
    let port = b.port();
    assert!(d.terminate().success());
    let old = d.keeper_pids();
    assert_eq!(old.len(), 1);
    // What `systemctl stop` does to the runtime directory: the keeper cannot be found.
    std::fs::remove_file(d.dir.path().join("portres.sock.keeper")).unwrap();
    d.launch();
    wait_until("the old keeper to let go", Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{}", old[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", old[0]))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(
        d.in_netns(move || TcpListener::bind(("::", port)).is_ok()),
        "its copies are closed"
    );
    std::mem::forget(b);
}

#[test]
fn a_keeper_that_stops_answering_is_ended_and_releases_still_free_their_ports() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::with_env(&[("PORTRES_FAILPOINT", "keeper-copy-after:0")]);
    let keeper = d.keeper_pids()[0];
    let c = d.client();
    let b = c.acquire_with(Protocol::Tcp, 0, 2, Mode::Hold).unwrap();
    let port = b.port();
    // The keeper files a copy of the placeholder; then it is frozen.
    let who = c.who(Protocol::Tcp, u32::from(port)).unwrap();
    let inode = who
        .sockets
        .iter()
        .find(|s| s.role.as_deref() == Some("portres placeholder (hold layer)"))
        .map(|s| s.inode)
        .expect("the placeholder");
    let link = format!("socket:[{inode}]");
    wait_until(
        "the keeper to file the copy",
        Duration::from_secs(5),
        || {
            std::fs::read_dir(format!("/proc/{keeper}/fd"))
                .unwrap()
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == link))
        },
    );
    signal(keeper, rustix::process::Signal::STOP);
    b.release().unwrap();
    assert!(
        d.in_netns(move || TcpListener::bind(("::", port)).is_ok()),
        "released means free, even with a frozen keeper"
    );
    let info = restore_info(&d);
    let problem = info["problem"].as_str().unwrap_or_default().to_string();
    assert!(problem.contains("keeper"), "{info}");
    assert!(
        d.keeper_pids().is_empty() || {
            let s = std::fs::read_to_string(format!("/proc/{keeper}/stat")).unwrap_or_default();
            s.is_empty() || s.contains(") Z ")
        }
    );
    d.stop();
    let _ = &mut d;
}
