//! The deny layer: cgroup bind programs refuse a bind into a reservation to everyone but its
//! owner, in the daemon's network namespace, on every address and socket-option path.
//!
//! The programs attach to the machine's cgroup2 root (that is the layer), keyed by the test
//! daemon's network namespace, so nothing outside that namespace is affected; each daemon's pins
//! are removed when its test ends (`TestDaemon`'s drop).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portres_client::{Mode, PersistentSpec, Protocol, SocketKind};

use crate::util::*;

const DENY: &str = "deny = true\n";

/// `bind_matrix.py` (every bind path) on `port` in the daemon's namespace, as `uid`.
fn matrix(d: &TestDaemon, uid: u32, port: u16) -> serde_json::Map<String, serde_json::Value> {
    let out = run(d
        .nsenter_as(uid)
        .arg("/usr/bin/python3")
        .arg(world_readable("bind_matrix.py"))
        .arg(port.to_string()));
    assert!(out.status.success(), "bind_matrix: {out:?}");
    json(&out).as_object().unwrap().clone()
}

/// One bind of `proto` `addr`:`port` in the daemon's namespace as `uid`: 0 or the errno.
fn bind_as(d: &TestDaemon, uid: u32, proto: &str, addr: &str, port: u16) -> i32 {
    let out = run(d
        .nsenter_as(uid)
        .arg("/usr/bin/python3")
        .arg(world_readable("bind_matrix.py"))
        .args(["--one", proto, addr, &port.to_string()]));
    assert!(out.status.success(), "bind_matrix --one: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `binds` of the first reservation `show --json` lists: who may bind its ports.
fn first_binds(d: &TestDaemon) -> String {
    let show = json(&run(d.cli().args(["--json", "show"])));
    show["reservations"][0]["binds"]
        .as_str()
        .unwrap()
        .to_string()
}

fn status_json(d: &TestDaemon) -> serde_json::Value {
    json(&run(d.cli().args(["--json", "status"])))
}

fn layer<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap()
}

/// The daemon's open descriptors.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn strangers_are_refused_on_every_path_and_the_owner_binds() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(DENY);
    let st = status_json(&d);
    assert_eq!(layer(&st, "deny")["active"], true, "{st}");
    let c = d.client();
    let tcp = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Exclude).unwrap();
    let port = tcp.range().start();
    let udp = c
        .acquire_with(Protocol::Udp, u32::from(port), 1, Mode::Exclude)
        .unwrap();
    // Root and nobody, neither the owner: every path refused with EADDRINUSE (the default).
    for uid in [0, NOBODY] {
        let m = matrix(&d, uid, port);
        assert_eq!(m.len(), 30);
        for (case, errno) in &m {
            assert_eq!(errno, 98, "uid {uid}, {case}: {m:?}");
        }
    }
    // The next port is nobody's: every path binds.
    let free = matrix(&d, NOBODY, port + 1);
    for (case, errno) in &free {
        assert_eq!(errno, 0, "{case} on a free port: {free:?}");
    }
    // The owner (this process, which acquired them) binds its ports by number.
    d.in_netns(move || {
        std::net::TcpListener::bind(("::", port)).expect("the owner binds its TCP port");
        std::net::UdpSocket::bind(("0.0.0.0", port)).expect("the owner binds its UDP port");
    });
    // Released: the port is anyone's again.
    tcp.release().unwrap();
    udp.release().unwrap();
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", port), 0);
    assert_eq!(bind_as(&d, NOBODY, "udp", "::", port), 0);
}

/// `portres run` in the daemon's namespace, its command reporting each bind, then waiting for
/// its standard input to close.
fn run_in_netns(d: &TestDaemon, count: u32, script: &str) -> Child {
    let mut c = d.nsenter();
    c.arg(BIN)
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0")
        .args([
            "run",
            "--count",
            &count.to_string(),
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    spawn(&mut c)
}

#[test]
fn a_run_command_and_its_grandchildren_bind_by_number_and_nobody_else() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(DENY);
    let py = world_readable("bind_matrix.py");
    let py = py.display();
    // The command binds the first port, a grandchild (a shell's child) the second, over IPv6;
    // then it says where it runs and waits.
    let script = format!(
        "/usr/bin/python3 {py} --one tcp 0.0.0.0 $PORTRES_PORT; \
         sh -c '/usr/bin/python3 {py} --one tcp :: $(($PORTRES_PORT + 1))'; \
         echo $PORTRES_PORT; tail -1 /proc/self/cgroup; cat"
    );
    let mut holder = run_in_netns(&d, 2, &script);
    // One reader for every line (a reader per line could swallow the next ones).
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = || {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut out, &mut l).unwrap();
        l.trim_end().to_string()
    };
    let own = line();
    let grandchild = line();
    let port: u16 = line().parse().unwrap();
    let cgroup = line();
    assert_eq!(
        (own.as_str(), grandchild.as_str()),
        ("0", "0"),
        "the owner tree binds"
    );
    assert!(
        cgroup.contains("/portres-run-"),
        "the command runs in a cgroup of its own: {cgroup}"
    );
    // Strangers, same uid (root) or not, are refused.
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", port), 98);
    assert_eq!(bind_as(&d, 0, "tcp", "::", port + 1), 98);
    assert_eq!(bind_as(&d, NOBODY, "tcp", "::ffff:127.0.0.1", port + 1), 98);
    // `show --json` and `who` name the owner.
    let binds = first_binds(&d);
    assert!(
        binds.contains("cgroup") && binds.contains("portres-run-"),
        "{binds}"
    );
    let who = run(d.cli().args(["who", &port.to_string()]));
    let who = String::from_utf8_lossy(&who.stdout);
    assert!(
        who.contains("deny layer: only processes in cgroup"),
        "{who}"
    );
    // The command ends: the block is released, strangers bind, the cgroup goes.
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", port), 0);
    let dir = format!(
        "{}{}",
        portres_sys::deny::mount_of("cgroup2").unwrap().display(),
        cgroup.trim_start_matches("0::")
    );
    wait_until("the run cgroup is removed", Duration::from_secs(10), || {
        // A request lets the daemon retry the removal of a cgroup that was still emptying.
        let _ = d.client().status();
        !std::path::Path::new(&dir).exists()
    });
}

#[test]
fn a_persistent_reservation_lets_its_allowed_users_bind_and_nobody_else() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(DENY);
    let c = d.client();
    let mut spec = PersistentSpec::new(Protocol::Tcp, 8443, 2);
    spec.allow_users = vec![NOBODY.to_string()];
    c.create_persistent(&spec).unwrap();
    // The allowed user binds it; root (not named) and another user are refused.
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", 8443), 0);
    assert_eq!(bind_as(&d, NOBODY, "tcp", "::", 8444), 0);
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", 8443), 98);
    assert_eq!(bind_as(&d, 65533, "tcp", "0.0.0.0", 8443), 98);
    // Nobody named: root alone.
    c.create_persistent(&PersistentSpec::new(Protocol::Udp, 9000, 1))
        .unwrap();
    assert_eq!(bind_as(&d, 0, "udp", "0.0.0.0", 9000), 0);
    assert_eq!(bind_as(&d, NOBODY, "udp", "0.0.0.0", 9000), 98);
    // A group: a process whose primary group it is binds.
    let mut spec = PersistentSpec::new(Protocol::Tcp, 9100, 1);
    spec.allow_groups = vec!["65533".into()];
    c.create_persistent(&spec).unwrap();
    assert_eq!(bind_as(&d, 65533, "tcp", "0.0.0.0", 9100), 0);
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", 9100), 98);
    let who = run(d.cli().args(["who", "8443"]));
    let who = String::from_utf8_lossy(&who.stdout);
    assert!(who.contains("deny layer: only uid 65534"), "{who}");
    // Deleted: anyone binds.
    c.delete_persistent(Protocol::Tcp, 8443, 2).unwrap();
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", 8443), 0);
}

#[test]
fn a_hold_block_of_60000_ports_has_no_placeholders_and_hands_out_sockets() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(DENY);
    let before = open_files(d.pid);
    let c = d.client();
    // (The daemon keeps a few sockets prepared for handing out, whatever the block's size.)
    let block = c
        .acquire_with(Protocol::Tcp, 2000, 60_000, Mode::Hold)
        .unwrap();
    let st = status_json(&d);
    assert_eq!(st["counts"]["ports_held"], 0, "{st}");
    assert_eq!(st["counts"]["ports_reserved"], 60_000);
    assert!(st["deny"]["map_entries"].as_u64().unwrap() <= 30, "{st}");
    let after = open_files(d.pid);
    assert!(
        after < before + 100,
        "0 open files per port: {before} before, {after} after"
    );
    // Strangers cannot bind any of it, not even the owner by number: a hold block is used
    // through the sockets portres hands out.
    for port in [2000, 31_999, 61_999] {
        assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", port), 98, "port {port}");
    }
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", 62_000), 0);
    let (fd, port) = c
        .associate(
            block.token(),
            SocketKind::Listener { backlog: 8 },
            None,
            2001,
        )
        .unwrap();
    assert_eq!(port, 2001);
    let listener = std::net::TcpListener::from(fd);
    assert_eq!(listener.local_addr().unwrap().port(), 2001);
    close(listener);
    block.release().unwrap();
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", 31_999), 0);
    let st = status_json(&d);
    assert_eq!(st["deny"]["map_entries"], 0, "{st}");
}

#[test]
fn kill_9_leaves_the_denial_in_place_a_restart_reconciles_and_cleanup_removes_it_all() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let mut d = TestDaemon::with_config(DENY);
    let c = d.client();
    c.create_persistent(&PersistentSpec::new(Protocol::Tcp, 7000, 1))
        .unwrap();
    let gone = c
        .acquire_with(Protocol::Tcp, 7100, 1, Mode::Exclude)
        .unwrap();
    let st = status_json(&d);
    let programs: Vec<u32> = serde_json::from_value(st["deny"]["program_ids"].clone()).unwrap();
    let links: Vec<u32> = serde_json::from_value(st["deny"]["link_ids"].clone()).unwrap();
    drop(c);
    std::mem::forget(gone);
    d.kill9();
    for pid in d.keeper_pids() {
        signal(pid, rustix::process::Signal::KILL);
    }
    // No daemon, no keeper: the pinned programs still refuse.
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", 7000), 98);
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", 7100), 98);
    // A new daemon takes the pins over (same links, new programs) and drops the entry of the
    // runtime block nobody carried over.
    d.launch();
    let st = status_json(&d);
    let links_now: Vec<u32> = serde_json::from_value(st["deny"]["link_ids"].clone()).unwrap();
    assert_eq!(links_now, links, "the pinned links were kept");
    assert_eq!(st["deny"]["blocks"], 1, "{st}");
    assert!(
        layer(&st, "deny")["reason"]
            .as_str()
            .unwrap()
            .contains("took over"),
        "{st}"
    );
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", 7100), 0);
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", 7000), 98);
    // Crash again, then clean up: nothing is left attached or pinned.
    d.kill9();
    for pid in d.keeper_pids() {
        signal(pid, rustix::process::Signal::KILL);
    }
    let refused = run(d
        .cli()
        .args(["daemon", "--cleanup"])
        .arg("--state-dir")
        .arg(&d.state_dir));
    assert!(refused.status.success(), "{refused:?}");
    let out = String::from_utf8_lossy(&refused.stdout);
    assert!(out.contains("removed the deny layer's programs"), "{out}");
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", 7000), 0);
    let bpffs = portres_sys::deny::mount_of("bpf").unwrap();
    let pins = portres_daemon::deny::pin_dir(&bpffs, &d.state_dir);
    assert!(!pins.exists(), "{} is gone", pins.display());
    wait_until(
        "the programs and links are freed",
        Duration::from_secs(10),
        || {
            programs
                .iter()
                .all(|&id| !portres_sys::deny::program_exists(id))
                && links.iter().all(|&id| !portres_sys::deny::link_exists(id))
        },
    );
}

#[test]
fn cleanup_is_refused_while_a_daemon_serves() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(DENY);
    let out = run(d
        .cli()
        .args(["daemon", "--cleanup"])
        .arg("--state-dir")
        .arg(&d.state_dir));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop it first"), "{err}");
    assert_eq!(layer(&status_json(&d), "deny")["active"], true);
}

#[test]
fn the_errno_is_configurable() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    for (name, errno) in [("EACCES", 13), ("EPERM", 1), ("EADDRINUSE", 98)] {
        let d = TestDaemon::with_config(&format!("{DENY}deny_errno = \"{name}\"\n"));
        let c = d.client();
        let r = c.acquire_with(Protocol::Udp, 0, 1, Mode::Exclude).unwrap();
        let port = r.range().start();
        assert_eq!(bind_as(&d, NOBODY, "udp", "0.0.0.0", port), errno, "{name}");
        assert_eq!(status_json(&d)["deny"]["errno"], name);
    }
}

#[test]
fn keyed_by_namespace_unless_told_otherwise() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    // Default: the same port in another namespace is free.
    let d = TestDaemon::with_config(DENY);
    let r = d
        .client()
        .acquire_with(Protocol::Tcp, 0, 1, Mode::Exclude)
        .unwrap();
    let other_ns = |port: u16| {
        let out = run(Command::new("unshare")
            .args(["-n", "/usr/bin/python3"])
            .arg(world_readable("bind_matrix.py"))
            .args(["--one", "tcp", "0.0.0.0", &port.to_string()]));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    assert_eq!(other_ns(r.range().start()), 0);
    drop(r);
    drop(d);
    // deny_all_namespaces: the reservation holds in every namespace (on the whole machine, so
    // a port no other test uses: the others run at the same time).
    let d = TestDaemon::with_config(&format!("{DENY}deny_all_namespaces = true\n"));
    let r = d
        .client()
        .acquire_with(Protocol::Tcp, 65_123, 1, Mode::Exclude)
        .unwrap();
    assert_eq!(other_ns(r.range().start()), 98);
    assert_eq!(status_json(&d)["deny"]["all_namespaces"], true);
}

#[test]
fn where_the_layer_cannot_run_status_says_why_and_everything_works_as_before() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    // Turned off in the configuration.
    let d = TestDaemon::with_config("deny = false\n");
    let st = status_json(&d);
    let deny = layer(&st, "deny");
    assert_eq!(deny["active"], false);
    assert!(
        deny["reason"].as_str().unwrap().contains("deny = false"),
        "{st}"
    );
    assert!(st.get("deny").is_none_or(|v| v.is_null()));
    // A run works; its command is not moved anywhere.
    let mut holder = run_in_netns(&d, 1, "tail -1 /proc/self/cgroup; cat");
    let cgroup = first_line(&mut holder);
    assert!(!cgroup.contains("portres-run-"), "{cgroup}");
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    // A per-user daemon cannot load it.
    let d = TestDaemon::as_user_with_config(NOBODY, DENY);
    let out = run(d.cli_as_nobody().args(["--json", "status"]));
    let st = json(&out);
    let deny = layer(&st, "deny");
    assert_eq!(deny["active"], false);
    assert!(
        deny["reason"].as_str().unwrap().contains("needs root"),
        "{st}"
    );
    let _ = std::io::stdout().flush();
}

#[test]
fn own_tree_takes_only_the_callers_own_blocks() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(DENY);
    let owner = d.client();
    let r = owner
        .acquire_with(Protocol::Tcp, 0, 1, Mode::Exclude)
        .unwrap();
    // Another connection (another session) cannot make itself the owner: refused, no cgroup.
    let other = d.client();
    let e = other.own_tree(r.token()).unwrap_err();
    assert!(
        matches!(e, portres_client::Error::NotFound(_)),
        "a foreign token is refused: {e}"
    );
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert!(!cgroup.contains("portres-run-"), "{cgroup}");
    // And the block stays its acquirer's: a stranger is still refused.
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", r.range().start()), 98);
}

#[test]
fn a_restart_keeps_a_run_commands_ownership_and_the_denial() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let mut d = TestDaemon::with_config(DENY);
    let py = world_readable("bind_matrix.py");
    let py = py.display();
    // Each line on its stdin makes the command bind its port by number and say how it went.
    let script = format!(
        "echo $PORTRES_PORT; while read x; do /usr/bin/python3 {py} --one tcp 0.0.0.0 $PORTRES_PORT; done"
    );
    let mut holder = run_in_netns(&d, 1, &script);
    let mut input = holder.stdin.take().unwrap();
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = || {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut out, &mut l).unwrap();
        l.trim_end().to_string()
    };
    let port: u16 = line().parse().unwrap();
    let mut bind_now = |line: &mut dyn FnMut() -> String| {
        writeln!(input, "bind").unwrap();
        line()
    };
    assert_eq!(bind_now(&mut line), "0");
    // SIGTERM (live restore keeps the block), then a new daemon takes over the pins.
    assert!(d.terminate().success());
    assert_eq!(
        bind_as(&d, 0, "tcp", "0.0.0.0", port),
        98,
        "refused while no daemon runs"
    );
    d.launch();
    let st = status_json(&d);
    assert_eq!(st["deny"]["blocks"], 1, "{st}");
    // The command still binds by number, a stranger still cannot.
    assert_eq!(bind_now(&mut line), "0");
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", port), 98);
    let binds = first_binds(&d);
    assert!(
        binds.contains("portres-run-"),
        "the run cgroup is still the owner: {binds}"
    );
    drop(input);
    assert!(holder.wait().unwrap().success());
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", port), 0);
}

#[test]
fn a_daemon_started_without_the_layer_removes_what_a_crashed_one_left() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let mut d = TestDaemon::with_config(DENY);
    let mut spec = PersistentSpec::new(Protocol::Tcp, 7200, 1);
    spec.mode = Mode::Hold;
    d.client().create_persistent(&spec).unwrap();
    d.kill9();
    for pid in d.keeper_pids() {
        signal(pid, rustix::process::Signal::KILL);
    }
    // Its pins still refuse, with the dead daemon's pid in them.
    assert_eq!(bind_as(&d, 0, "tcp", "0.0.0.0", 7200), 98);
    std::fs::write(
        d.config.as_ref().unwrap(),
        "deny = false\nnamespaces = \"daemon\"\n",
    )
    .unwrap();
    d.launch();
    let bpffs = portres_sys::deny::mount_of("bpf").unwrap();
    assert!(!portres_daemon::deny::pin_dir(&bpffs, &d.state_dir).exists());
    // The hold block is held by placeholders again: still refused, now by the hold layer.
    let st = status_json(&d);
    assert_eq!(st["counts"]["ports_held"], 1, "{st}");
    assert_eq!(bind_as(&d, NOBODY, "tcp", "0.0.0.0", 7200), 98);
    assert!(
        d.log()
            .contains("removed the deny layer an earlier daemon left pinned")
    );
}

#[test]
fn a_held_udp_block_hands_out_a_socket_that_receives_and_strangers_cannot_bind() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches BPF programs to the host's cgroup2 root",
    )) {
        return;
    }
    let d = TestDaemon::with_config(DENY);
    let c = d.client();
    let block = c.acquire_with(Protocol::Udp, 0, 3, Mode::Hold).unwrap();
    let port = block.range().start() + 1;
    assert_eq!(status_json(&d)["counts"]["ports_held"], 0);
    let (fd, got) = c
        .associate(block.token(), SocketKind::Datagram, None, port)
        .unwrap();
    assert_eq!(got, port);
    let sock = std::net::UdpSocket::from(fd);
    // Another socket of the namespace sends to it; it arrives.
    d.in_netns(move || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"hello", ("127.0.0.1", port)).unwrap();
    });
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // Nobody else binds any port of the block, the handed-out one included.
    for p in block.range().ports() {
        assert_eq!(bind_as(&d, NOBODY, "udp", "0.0.0.0", p), 98, "port {p}");
    }
    close(sock);
}
