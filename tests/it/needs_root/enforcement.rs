//! The kernel honours reservations (docs/behaviour.md §3): held ports cannot be bound by anyone
//! else, automatic port selection never lands in a block, the sysctl is merged and restored, and a
//! holder's death frees its ports at once.

use std::process::Stdio;
use std::time::{Duration, Instant};

use portres_client::{Mode, PersistentSpec, Protocol};

use crate::util::*;

fn matrix(d: &TestDaemon, uid: u32, proto: &str, ports: &[u16]) -> Vec<String> {
    let out = run(d
        .adversary(uid)
        .args(["matrix", proto])
        .args(ports.iter().map(u16::to_string)));
    assert!(out.status.success(), "adversary failed: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn held_ports_cannot_be_bound_by_any_means() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let tcp = c.acquire_at(Protocol::Tcp, 45000, 3).unwrap();
    let udp = c.acquire_at(Protocol::Udp, 45000, 3).unwrap();
    // A handed-out port is as protected as the others.
    let _listener = tcp
        .listen_on(Some([127, 0, 0, 1].into()), 45001, 8)
        .unwrap();
    let _datagram = udp.udp_socket(None, 45001).unwrap();
    for uid in [0, NOBODY] {
        for proto in ["tcp", "udp"] {
            let won = matrix(&d, uid, proto, &[45000, 45001, 45002]);
            assert!(won.is_empty(), "uid {uid} took held ports: {won:?}");
        }
    }
    // The same adversary does take a port nobody reserved: the test can fail.
    let won = matrix(&d, NOBODY, "tcp", &[45100]);
    assert!(won.len() >= 6, "control: {won:?}");
}

fn storm(d: &TestDaemon, proto: &str, low: u16, high: u16) -> Vec<u16> {
    let out = run(d
        .adversary(0)
        .args(["storm", proto, &low.to_string(), &high.to_string(), "80"]));
    assert!(out.status.success(), "storm failed: {out:?}");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ports = Vec::new();
    for (way, list) in got.as_object().unwrap() {
        let list: Vec<u16> = serde_json::from_value(list.clone()).unwrap();
        assert!(
            !list.is_empty(),
            "{proto} {way} got no port at all: the storm did not run"
        );
        ports.extend(list);
    }
    ports
}

#[test]
fn autobind_storm_never_lands_in_a_hold_or_exclude_block() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let mut blocks = Vec::new();
    for p in [Protocol::Tcp, Protocol::Udp] {
        blocks.push(c.acquire_with(p, 42000, 10, Mode::Hold).unwrap());
        blocks.push(c.acquire_with(p, 42020, 10, Mode::Exclude).unwrap());
    }
    for proto in ["tcp", "udp"] {
        let got = storm(&d, proto, 41995, 42034);
        let inside: Vec<u16> = got
            .iter()
            .copied()
            .filter(|p| (42000..42010).contains(p) || (42020..42030).contains(p))
            .collect();
        assert!(
            inside.is_empty(),
            "{proto} autobind landed in a block: {inside:?}"
        );
    }
}

#[test]
fn reserved_ports_sysctl_is_merged_with_others_and_restored() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let mut d = TestDaemon::with_setup(
        "",
        "echo 1000,2000-2010 > /proc/sys/net/ipv4/ip_local_reserved_ports &&",
    );
    assert_eq!(d.reserved_ports(), "1000,2000-2010");
    let c = d.client();
    let _held = c.acquire_at(Protocol::Tcp, 45000, 10).unwrap();
    let excl = c
        .acquire_with(Protocol::Udp, 46000, 1, Mode::Exclude)
        .unwrap();
    assert_eq!(d.reserved_ports(), "1000,2000-2010,45000-45009,46000");
    // Someone else adds an entry while the daemon runs: it is kept.
    let out = run(d.nsenter().args(["sh", "-c"]).arg(
        "echo 1000,2000-2010,3000,45000-45009,46000 > /proc/sys/net/ipv4/ip_local_reserved_ports",
    ));
    assert!(out.status.success());
    excl.release().unwrap();
    // Released blocks leave the sysctl within milliseconds (with the next write).
    wait_until(
        "the released block to leave the sysctl",
        Duration::from_secs(2),
        || d.reserved_ports() == "1000,2000-2010,3000,45000-45009",
    );
    // A TCP and a UDP block on the same ports: the entry stays until both end.
    let t = c.acquire_at(Protocol::Tcp, 47000, 2).unwrap();
    let u = c.acquire_at(Protocol::Udp, 47000, 2).unwrap();
    drop(t);
    assert!(d.reserved_ports().contains("47000-47001"));
    drop(u);
    wait_until(
        "both blocks to leave the sysctl",
        Duration::from_secs(2),
        || !d.reserved_ports().contains("47000"),
    );
    drop(c);
    d.stop();
    assert_eq!(
        d.reserved_ports(),
        "1000,2000-2010,3000",
        "restored at a stop"
    );
    assert!(
        d.keeper_pids().is_empty(),
        "the keeper is gone after a stop"
    );

    // After a crash, the next daemon removes what its predecessor left behind, and holds the
    // persistent blocks again.
    d.launch();
    let c = d.client();
    let mut spec = PersistentSpec::new(Protocol::Tcp, 48000, 2);
    spec.mode = Mode::Hold;
    c.create_persistent(&spec).unwrap();
    let _rt = c.acquire_at(Protocol::Udp, 49000, 1).unwrap();
    // A held block is kept by its placeholders from the reply on; its sysctl entry follows
    // right after the reply.
    wait_until(
        "the held blocks to enter the sysctl",
        Duration::from_secs(2),
        || d.reserved_ports() == "1000,2000-2010,3000,48000-48001,49000",
    );
    drop(c);
    d.kill9();
    assert_eq!(
        d.reserved_ports(),
        "1000,2000-2010,3000,48000-48001,49000",
        "left behind"
    );
    d.launch();
    // The runtime block's owner (this process) lives: live restore carries it on.
    assert_eq!(d.reserved_ports(), "1000,2000-2010,3000,48000-48001,49000");
    let won = matrix(&d, NOBODY, "tcp", &[48000, 48001]);
    assert!(
        won.is_empty(),
        "persistent hold block is held again: {won:?}"
    );
    drop(_rt);
    wait_until(
        "the released runtime block to leave the sysctl",
        Duration::from_secs(5),
        || d.reserved_ports() == "1000,2000-2010,3000,48000-48001",
    );
    // After a crash with live restore off, the next daemon removes what its predecessor left.
    let rt = d.client().acquire_at(Protocol::Udp, 49000, 1).unwrap();
    wait_until(
        "the held block to enter the sysctl",
        Duration::from_secs(2),
        || d.reserved_ports() == "1000,2000-2010,3000,48000-48001,49000",
    );
    d.kill9();
    for pid in d.keeper_pids() {
        signal(pid, rustix::process::Signal::KILL);
    }
    std::fs::write(
        d.config.as_ref().unwrap(),
        "deny = false\nnamespaces = \"daemon\"\nlive_restore_secs = 0\n",
    )
    .unwrap();
    d.launch();
    assert_eq!(d.reserved_ports(), "1000,2000-2010,3000,48000-48001");
    drop(rt);
}

#[test]
fn a_holders_death_frees_its_ports_within_100_ms() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    let mut holder = spawn(
        d.raw_client_as(0)
            .arg(r#"{"op":"acquire","protocol":"tcp","start":44000,"count":4}"#)
            .arg("--wait")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let line = first_line(&mut holder);
    assert!(line.contains("\"ok\""), "{line}");
    assert!(matrix(&d, NOBODY, "tcp", &[44000, 44003]).is_empty());

    holder.kill().unwrap(); // SIGKILL: the kernel closes its connection
    holder.wait().unwrap();
    let t0 = Instant::now();
    let took = d.in_netns(move || {
        let deadline = t0 + Duration::from_millis(100);
        loop {
            if std::net::TcpListener::bind(("::", 44000)).is_ok() {
                return Some(t0.elapsed());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::yield_now();
        }
    });
    assert!(
        took.is_some(),
        "port 44000 was not free 100 ms after its holder died"
    );
    let won = matrix(&d, NOBODY, "tcp", &[44001, 44002, 44003]);
    for port in [44001, 44002, 44003] {
        assert!(
            won.iter().any(|w| w.contains(&format!(":{port} "))),
            "{port} is free: {won:?}"
        );
    }
}

#[test]
fn blocks_beyond_the_open_file_limit_are_held_by_helper_processes() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    // 12,000 placeholders for a daemon allowed 5,000 open files: helpers hold them.
    let d = TestDaemon::with_nofile(5000);
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 30000, 12000).unwrap();
    let status = c.status().unwrap();
    assert_eq!(status.counts.ports_held, 12000);
    let hold = status.layers.iter().find(|l| l.name == "hold").unwrap();
    assert!(hold.reason.contains("helper processes"), "{}", hold.reason);
    let won = matrix(&d, NOBODY, "tcp", &[30000, 35000, 41999]);
    assert!(won.is_empty(), "ports held by helpers are held: {won:?}");
    let who = c.who(Protocol::Tcp, 41999).unwrap();
    assert_eq!(
        who.sockets[0].role.as_deref(),
        Some("portres placeholder (hold layer)"),
        "{who:?}"
    );
    // Handover works from a block held by helpers.
    let l = r.listen(41999).unwrap();
    assert_eq!(l.local_addr().unwrap().port(), 41999);
    close(l);
    r.release().unwrap();
    let won = matrix(&d, NOBODY, "tcp", &[30000, 35000, 41999]);
    for port in [30000, 35000, 41999] {
        assert!(
            won.iter().any(|w| w.contains(&format!(":{port} "))),
            "{port} free after release"
        );
    }
    // The helpers are reused.
    let again = c.acquire_at(Protocol::Udp, 30000, 8000).unwrap();
    assert_eq!(c.status().unwrap().counts.ports_held, 8000);
    drop(again);
}
