//! Network namespaces: one daemon serves each client in the client's own port space (its
//! table, its `ip_local_reserved_ports`, placeholders made inside it), forgets a namespace when
//! its last session ends, and refuses a client whose namespace it cannot enter.
//!
//! Every client here runs in a namespace of its own (`nsenter`), never in the host's: with
//! `namespaces = "client"` the daemon would otherwise serve the test process in the host's
//! port space.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

const CLIENT_NAMESPACES: &str = "namespaces = \"client\"\n";

/// A session in namespace `ns` (the raw Python client, as `uid`) that sends `request` and keeps
/// the session open until dropped; the reply.
struct Session {
    child: Child,
    reply: Value,
}

impl Session {
    fn open(d: &TestDaemon, ns: &Netns, uid: u32, request: &str) -> Session {
        let mut c = ns.nsenter_as(uid);
        c.arg("python3")
            .arg(world_readable("raw_client.py"))
            .arg(&d.socket)
            .arg(request)
            .arg("--wait")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut c);
        let line = first_line(&mut child);
        match serde_json::from_str(&line) {
            Ok(reply) => Session { child, reply },
            Err(e) => {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "no reply ({e}): {line:?}; stderr: {}\nlog:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    d.log()
                )
            }
        }
    }

    /// Ends the session (the client exits).
    fn close(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a bind of `127.0.0.1:port` (TCP, `SO_REUSEADDR`) gets when run by `prefix` (a
/// namespace and a user: `nsenter_as`): "bound" or an errno.
fn bind_in(mut prefix: std::process::Command, port: u16) -> String {
    let script = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         try:\n    s.bind(('127.0.0.1', {port}))\n    print('bound')\n\
         except OSError as e:\n    print(e.errno)\n"
    );
    let out = run(prefix.args(["python3", "-c", &script]));
    assert!(out.status.success(), "bind probe failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `portres ARGS --json` as root in `ns`, parsed.
fn cli_json_in(d: &TestDaemon, ns: &Netns, args: &[&str]) -> Value {
    let out = run(ns
        .nsenter_as(0)
        .arg(BIN)
        .arg("--json")
        .args(args)
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(out.status.success(), "portres {args:?}: {out:?}");
    json(&out)
}

/// `status --json` from the daemon's own namespace.
fn daemon_status(d: &TestDaemon) -> Value {
    let out = run(d
        .nsenter()
        .arg(BIN)
        .args(["--json", "status"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(out.status.success(), "status: {out:?}");
    json(&out)
}

fn contains_port(reserved: &str, port: u16) -> bool {
    reserved
        .parse::<portres_core::PortSet>()
        .unwrap()
        .contains(port)
}

#[test]
fn each_client_is_served_in_its_own_namespace() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::with_config(CLIENT_NAMESPACES);
    let nets: Vec<Netns> = (0..3).map(|_| Netns::new()).collect();
    // The same port, held in three namespaces at once.
    let req = r#"{"op":"acquire","protocol":"tcp","start":41000,"count":2,"mode":"hold"}"#;
    let sessions: Vec<Session> = nets.iter().map(|n| Session::open(&d, n, 0, req)).collect();
    for s in &sessions {
        assert_eq!(s.reply["ok"]["start"], 41000, "{}", s.reply);
    }
    for n in &nets {
        // In the namespace's own sysctl, and held there: a stranger cannot bind it.
        assert!(
            contains_port(&n.reserved_ports(), 41000),
            "{}",
            n.reserved_ports()
        );
        assert_eq!(
            bind_in(n.nsenter_as(NOBODY), 41000),
            "98",
            "held in its namespace"
        );
    }
    // Nothing in the daemon's own namespace: the same port is free there.
    assert!(!contains_port(&d.reserved_ports(), 41000));
    assert_eq!(bind_in(d.nsenter_as(NOBODY), 41000), "bound");

    // show: each client sees its own namespace, named by inode.
    for n in &nets {
        let show = cli_json_in(&d, n, &["show"]);
        let rows = show["reservations"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{show}");
        assert_eq!(rows[0]["netns"]["inode"], n.inode(), "{show}");
        assert_eq!(rows[0]["netns"]["daemon"], false);
        // who answers from the namespace's socket table: the placeholder is there.
        let who = cli_json_in(&d, n, &["who", "41000"]);
        assert_eq!(who["reservation"]["netns"]["inode"], n.inode(), "{who}");
        assert!(
            who["sockets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["description"].as_str().unwrap().contains("placeholder")),
            "{who}"
        );
    }
    // An administrator sees every namespace; the daemon's own has none of them.
    let all = run(d
        .nsenter()
        .arg(BIN)
        .args(["--json", "show", "--all-namespaces"])
        .env("PORTRES_SOCKET", &d.socket));
    let all = json(&all);
    let mut inodes: Vec<u64> = all["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["netns"]["inode"].as_u64().unwrap())
        .collect();
    inodes.sort_unstable();
    let mut want: Vec<u64> = nets.iter().map(Netns::inode).collect();
    want.sort_unstable();
    assert_eq!(inodes, want, "{all}");
    let status = daemon_status(&d);
    assert_eq!(status["namespace_mode"], "client");
    assert_eq!(
        status["namespaces"].as_array().unwrap().len(),
        4,
        "{status}"
    );
    assert_eq!(
        status["counts"]["runtime"], 0,
        "the daemon's own namespace has none"
    );
    // A non-administrator may not list other namespaces.
    let out = run(nets[0]
        .nsenter_as(NOBODY)
        .arg(nobody_binary())
        .args(["show", "--all-namespaces"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("administrators"),
        "{out:?}"
    );

    // A session's end frees its namespace's block there, and only there.
    let mut sessions = sessions;
    sessions.remove(0).close();
    wait_until(
        "the first namespace's block leaves its sysctl",
        Duration::from_secs(10),
        || !contains_port(&nets[0].reserved_ports(), 41000),
    );
    assert_eq!(bind_in(nets[0].nsenter_as(NOBODY), 41000), "bound");
    assert_eq!(bind_in(nets[1].nsenter_as(NOBODY), 41000), "98");

    // Persistent reservations live in the daemon's namespace: a change from another is refused.
    let out = run(nets[1]
        .nsenter_as(0)
        .arg(BIN)
        .args(["persistent", "add", "--start", "41900"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daemon's own network namespace"), "{err}");
    assert_eq!(daemon_status(&d)["counts"]["persistent"], 0);
}

#[test]
fn a_namespace_that_goes_away_is_released_and_not_kept_alive() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config(CLIENT_NAMESPACES);
    let n = Netns::new();
    let inode = n.inode();
    let s = Session::open(
        &d,
        &n,
        0,
        r#"{"op":"acquire","protocol":"udp","start":0,"count":5,"mode":"hold"}"#,
    );
    assert!(s.reply["ok"]["token"].is_string(), "{}", s.reply);
    let status = daemon_status(&d);
    assert_eq!(
        status["namespaces"].as_array().unwrap().len(),
        2,
        "{status}"
    );
    // The daemon keeps a descriptor of the namespace while it serves it.
    let holds_ns = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid))
            .unwrap()
            .flatten()
            .any(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy() == format!("net:[{inode}]"))
            })
    };
    assert!(holds_ns());
    // Every process of the namespace goes: the client, then the one that kept it.
    drop(s);
    n.remove();
    wait_until(
        "the daemon forgets the namespace",
        Duration::from_secs(10),
        || daemon_status(&d)["namespaces"].as_array().unwrap().len() == 1,
    );
    assert!(!holds_ns(), "the daemon still holds net:[{inode}]");
    assert!(
        d.log()
            .contains(&format!("net:[{inode}] has no session left"))
    );
}

#[test]
fn a_daemon_that_cannot_enter_the_namespace_refuses_with_the_reason() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    // A per-user daemon has no CAP_SYS_ADMIN: it cannot serve another namespace.
    let d = TestDaemon::as_user_with_config(NOBODY, CLIENT_NAMESPACES);
    let n = Netns::new();
    let out = run(n
        .nsenter_as(NOBODY)
        .arg(nobody_binary())
        .args(["run", "--count", "1", "--", "true"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("may not enter") && err.contains("CAP_SYS_ADMIN"),
        "{err}"
    );
    assert!(err.contains(&format!("net:[{}]", n.inode())), "{err}");
    // Nothing was reserved, and the daemon still serves its own namespace.
    let out = run(d
        .nsenter_as(NOBODY)
        .arg(nobody_binary())
        .args(["--json", "run", "--count", "1", "--", "true"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(out.status.success(), "{out:?}");
    let status = run(d
        .nsenter_as(NOBODY)
        .arg(nobody_binary())
        .args(["--json", "status"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    let status = json(&status);
    assert_eq!(status["counts"]["runtime"], 0, "{status}");
    assert_eq!(
        status["namespaces"].as_array().unwrap().len(),
        1,
        "{status}"
    );
}

#[test]
fn the_deny_layer_keys_each_namespace_apart() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(&format!("deny = true\n{CLIENT_NAMESPACES}"));
    let (a, b) = (Netns::new(), Netns::new());
    // An exclude block in A: the deny layer refuses strangers' binds there (no placeholder).
    let s = Session::open(
        &d,
        &a,
        0,
        r#"{"op":"acquire","protocol":"tcp","start":41500,"count":3,"mode":"exclude"}"#,
    );
    assert_eq!(s.reply["ok"]["start"], 41500, "{}", s.reply);
    assert_eq!(bind_in(a.nsenter_as(NOBODY), 41501), "98");
    // B's port space is untouched, and so is the daemon's.
    assert_eq!(bind_in(b.nsenter_as(NOBODY), 41501), "bound");
    assert_eq!(bind_in(d.nsenter_as(NOBODY), 41501), "bound");
    // The same port in B at the same time.
    let s2 = Session::open(
        &d,
        &b,
        0,
        r#"{"op":"acquire","protocol":"tcp","start":41500,"count":3,"mode":"exclude"}"#,
    );
    assert_eq!(s2.reply["ok"]["start"], 41500, "{}", s2.reply);
    assert_eq!(bind_in(b.nsenter_as(NOBODY), 41501), "98");
    s.close();
    wait_until("A's entries leave the map", Duration::from_secs(10), || {
        bind_in(a.nsenter_as(NOBODY), 41501) == "bound"
    });
    assert_eq!(
        bind_in(b.nsenter_as(NOBODY), 41501),
        "98",
        "B's block is still denied"
    );
}

/// A namespace made with `ip netns add` (a file of /run/netns), deleted when dropped.
struct NamedNetns {
    name: String,
}

impl NamedNetns {
    fn new(tag: &str) -> NamedNetns {
        let name = format!("prt-{tag}-{}", std::process::id());
        let out = run(std::process::Command::new("ip").args(["netns", "add", &name]));
        assert!(out.status.success(), "ip netns add: {out:?}");
        run(std::process::Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        NamedNetns { name }
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command prefix that runs in it as `uid` (and gid `uid`).
    fn nsenter_as(&self, uid: u32) -> std::process::Command {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net={}", self.path()))
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={uid}"))
            .arg("--");
        c
    }

    fn reserved_ports(&self) -> String {
        let out = run(self
            .nsenter_as(0)
            .args(["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = run(std::process::Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// `portres ARGS` as root in the daemon's namespace.
fn cli_in_daemon_ns(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    run(d
        .nsenter()
        .arg(BIN)
        .args(args)
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"))
}

#[test]
fn persistent_reservations_for_a_named_namespace_hold_there_across_restarts() {
    if run_elsewhere(Needs::HostRoot(
        "`ip netns add` mounts the namespace in /run/netns",
    )) {
        return;
    }
    let mut d = TestDaemon::with_config(CLIENT_NAMESPACES);
    let n = NamedNetns::new("named");
    let add = cli_in_daemon_ns(
        &d,
        &[
            "persistent",
            "add",
            "--netns",
            &n.name,
            "--start",
            "42000",
            "--count",
            "2",
            "--mode",
            "hold",
        ],
    );
    assert!(add.status.success(), "{add:?}");
    // In the named namespace's sysctl and held there; not in the daemon's.
    assert!(
        contains_port(&n.reserved_ports(), 42001),
        "{}",
        n.reserved_ports()
    );
    assert_eq!(bind_in(n.nsenter_as(NOBODY), 42001), "98");
    assert!(!contains_port(&d.reserved_ports(), 42001));
    // Looked up by namespace; the daemon's own namespace has no such reservation.
    let found = cli_in_daemon_ns(
        &d,
        &[
            "persistent",
            "lookup",
            "--netns",
            &n.name,
            "--start",
            "42000",
            "--count",
            "2",
        ],
    );
    assert!(found.status.success(), "{found:?}");
    let home = cli_in_daemon_ns(
        &d,
        &["persistent", "lookup", "--start", "42000", "--count", "2"],
    );
    assert!(!home.status.success());

    // A restart (a stop that releases everything, then a start): loaded from its store.
    d.stop();
    assert!(
        !contains_port(&n.reserved_ports(), 42001),
        "released at the stop"
    );
    d.launch();
    assert!(
        contains_port(&n.reserved_ports(), 42001),
        "{}",
        n.reserved_ports()
    );
    assert_eq!(bind_in(n.nsenter_as(NOBODY), 42001), "98");
    let all = json(&cli_in_daemon_ns(
        &d,
        &["--json", "show", "--all-namespaces"],
    ));
    let rows = all["reservations"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{all}");
    assert_eq!(rows[0]["netns"]["name"], n.name.as_str(), "{all}");
    assert_eq!(rows[0]["kind"], "persistent");

    // A client inside the namespace is served against it: the block is taken there.
    let out = run(std::process::Command::new("nsenter")
        .arg(format!("--net={}", n.path()))
        .arg(BIN)
        .args(["run", "--start", "42001", "--", "true"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(!out.status.success(), "{out:?}");

    // Deleted: out of its sysctl, bindable again, and the namespace no longer served.
    let del = cli_in_daemon_ns(
        &d,
        &[
            "persistent",
            "delete",
            "--netns",
            &n.name,
            "--start",
            "42000",
            "--count",
            "2",
        ],
    );
    assert!(del.status.success(), "{del:?}");
    wait_until(
        "the block leaves the sysctl",
        Duration::from_secs(10),
        || !contains_port(&n.reserved_ports(), 42001),
    );
    assert_eq!(bind_in(n.nsenter_as(NOBODY), 42001), "bound");
    assert_eq!(daemon_status(&d)["namespaces"].as_array().unwrap().len(), 1);
}

#[test]
fn a_named_namespace_that_does_not_exist_or_a_bad_name_is_refused() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config(CLIENT_NAMESPACES);
    let out = cli_in_daemon_ns(
        &d,
        &[
            "persistent",
            "add",
            "--netns",
            "prt-no-such-ns",
            "--start",
            "42100",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ip netns add prt-no-such-ns"), "{err}");
    for bad in ["../etc", ".hidden", "a/b", ""] {
        let out = cli_in_daemon_ns(
            &d,
            &["persistent", "add", "--netns", bad, "--start", "42100"],
        );
        assert!(!out.status.success(), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not a network namespace name"),
            "{bad:?}: {err}"
        );
    }
    // Nothing was created on disk for them.
    assert!(!d.state_dir.join("netns").join("prt-no-such-ns").exists());
    assert!(!d.state_dir.join("etc").exists());
    assert_eq!(daemon_status(&d)["counts"]["persistent"], 0);
}

#[test]
fn stored_reservations_of_a_named_namespace_apply_when_it_exists_again() {
    if run_elsewhere(Needs::HostRoot(
        "`ip netns add` mounts the namespace in /run/netns",
    )) {
        return;
    }
    let mut d = TestDaemon::with_config(CLIENT_NAMESPACES);
    let n = NamedNetns::new("again");
    let add = cli_in_daemon_ns(
        &d,
        &[
            "persistent",
            "add",
            "--netns",
            &n.name,
            "--start",
            "42200",
            "--mode",
            "hold",
        ],
    );
    assert!(add.status.success(), "{add:?}");
    // Stopped, the namespace gone, started again: not enforced, and `status` says so.
    d.stop();
    let name = n.name.clone();
    drop(n);
    d.launch();
    let status = daemon_status(&d);
    let problems = status["namespace_problems"].to_string();
    assert!(
        problems.contains(&name) && problems.contains("ip netns add"),
        "{status}"
    );
    // It comes back; a client inside it is the first to use it: the reservation applies.
    let out = run(std::process::Command::new("ip").args(["netns", "add", &name]));
    assert!(out.status.success());
    let n = NamedNetns { name };
    let out = run(std::process::Command::new("nsenter")
        .arg(format!("--net={}", n.path()))
        .arg(BIN)
        .args(["status"])
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(out.status.success(), "{out:?}");
    assert!(
        contains_port(&n.reserved_ports(), 42200),
        "{}",
        n.reserved_ports()
    );
    assert_eq!(bind_in(n.nsenter_as(NOBODY), 42200), "98");
    assert!(daemon_status(&d)["namespace_problems"].is_null());
    let del = cli_in_daemon_ns(
        &d,
        &[
            "persistent",
            "delete",
            "--netns",
            &n.name,
            "--start",
            "42200",
        ],
    );
    assert!(del.status.success(), "{del:?}");
}

#[test]
fn a_users_quota_covers_all_namespaces_together() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::with_config(&format!("{CLIENT_NAMESPACES}runtime_quota_ports = 4\n"));
    let (a, b) = (Netns::new(), Netns::new());
    let first = Session::open(
        &d,
        &a,
        NOBODY,
        r#"{"op":"acquire","protocol":"tcp","start":0,"count":3,"mode":"exclude"}"#,
    );
    assert!(first.reply["ok"]["token"].is_string(), "{}", first.reply);
    let second = Session::open(
        &d,
        &b,
        NOBODY,
        r#"{"op":"acquire","protocol":"tcp","start":0,"count":2,"mode":"exclude"}"#,
    );
    assert_eq!(
        second.reply["error"]["code"], "QuotaExceeded",
        "{}",
        second.reply
    );
    let msg = second.reply["error"]["message"].as_str().unwrap();
    assert!(msg.contains("across the network namespaces"), "{msg}");
    // Within the quota it is granted there.
    let third = Session::open(
        &d,
        &b,
        NOBODY,
        r#"{"op":"acquire","protocol":"tcp","start":0,"count":1,"mode":"exclude"}"#,
    );
    assert!(third.reply["ok"]["token"].is_string(), "{}", third.reply);
}
