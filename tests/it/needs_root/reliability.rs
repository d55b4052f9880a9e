//! The reliability suite: no collisions under an autobind storm, nothing acknowledged lost to
//! `kill -9`, every port back after holders die, a thousand sessions, and garbage on the wire.
//! Bounded in time; the figures they print go to BENCHMARKS.md.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use portres_client::{Error, PersistentSpec, Protocol};

use crate::util::*;

/// A small deterministic random source (xorshift64*), seeded per test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn started(mut child: Child) -> Child {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "started");
    child.stdout = Some(out.into_inner());
    child
}

fn finish(mut child: Child) -> serde_json::Value {
    drop(child.stdin.take());
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    child.wait().unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn thirty_two_workers_never_collide_under_an_autobind_storm() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    // The dynamic range (where wildcard blocks and the kernel's ephemeral ports both come from)
    // is squeezed to 200 ports, so the storm and the workers fight over the same space.
    let d = TestDaemon::with_setup(
        "dynamic_range = \"40000-40199\"\n",
        "echo 40000 40199 > /proc/sys/net/ipv4/ip_local_port_range &&",
    );
    let collide = world_readable("collide.py");
    let mut results = BTreeMap::new();
    for mode in ["portres", "probe"] {
        let intruder = started(spawn(
            d.adversary(NOBODY)
                .args(["intrude", "tcp"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        ));
        let workers: Vec<Child> = (0..32)
            .map(|_| {
                let mut c = d.nsenter();
                c.arg("python3").arg(&collide).arg(mode);
                if mode == "portres" {
                    c.arg(&d.socket);
                }
                spawn(c.arg("60").stdout(Stdio::piped()))
            })
            .collect();
        let (mut rounds, mut collisions) = (0, 0);
        for w in workers {
            let out = w.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            rounds += v["rounds"].as_u64().unwrap();
            collisions += v["collisions"].as_u64().unwrap();
        }
        let storm = finish(intruder);
        assert!(
            storm["sockets"].as_u64().unwrap() > 100,
            "the intruder ran: {storm}"
        );
        results.insert(mode, (rounds, collisions));
    }
    println!("collisions (32 workers x 60 rounds under a TCP autobind storm): {results:?}");
    assert_eq!(
        results["portres"].1, 0,
        "a port from portres was taken: {results:?}"
    );
    assert_eq!(results["portres"].0, 32 * 60);
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Create(u32, u32),
    Delete(u32, u32),
}

#[test]
fn two_hundred_kill9s_during_persistent_changes_lose_nothing_acknowledged() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // start -> (count, token) of every acknowledged create not acknowledged-deleted since.
    let mut model: BTreeMap<u32, (u32, u64)> = BTreeMap::new();
    let mut kills = 0;
    let mut acked = 0;
    while kills < 200 {
        let client = d.client();
        // The kill must surface as an error here (this test restarts the daemon only then),
        // not as a wait for the daemon to come back.
        client.set_reconnect_limit(std::time::Duration::ZERO);
        let pid = d.pid;
        let delay = Duration::from_micros(rng.below(4000));
        // The kill lands at a random point of the stream of changes below.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            signal(pid, rustix::process::Signal::KILL);
        });
        let in_flight = loop {
            let start = 30000 + 10 * rng.below(30) as u32;
            let op = match model.get(&start) {
                Some(&(count, _)) if rng.below(2) == 0 => Op::Delete(start, count),
                _ => Op::Create(start, 1 + rng.below(5) as u32),
            };
            let result = match op {
                Op::Create(s, n) => client
                    .create_persistent(&PersistentSpec::new(Protocol::Tcp, s, n))
                    .map(|t| Some(t.get())),
                Op::Delete(s, n) => client.delete_persistent(Protocol::Tcp, s, n).map(|()| None),
            };
            match (op, result) {
                (Op::Create(s, n), Ok(Some(t))) => {
                    model.insert(s, (n, t));
                    acked += 1;
                }
                (Op::Delete(s, _), Ok(None)) => {
                    model.remove(&s);
                    acked += 1;
                }
                // Refusals agree with the model (an existing start, or an overlap).
                (Op::Create(..), Err(Error::SharingViolation(_))) => {}
                (_, Err(Error::Transport(_) | Error::Connect { .. })) => break op,
                (op, other) => panic!("{op:?}: {other:?}"),
            }
        };
        killer.join().unwrap();
        drop(client);
        d.kill9();
        kills += 1;
        d.launch();
        let c = d.client();
        let stored: BTreeMap<u32, (u32, u64)> = c
            .show()
            .unwrap()
            .reservations
            .iter()
            .map(|r| {
                let t = r.token.as_ref().unwrap().parse().unwrap();
                (u32::from(r.start), (u32::from(r.count), t))
            })
            .collect();
        // The change in flight when the daemon died is either wholly there or wholly not.
        match in_flight {
            Op::Create(s, n) => match stored.get(&s) {
                Some(&(count, token)) if !model.contains_key(&s) => {
                    assert_eq!(count, n, "half-applied create");
                    model.insert(s, (count, token));
                }
                _ => {}
            },
            Op::Delete(s, _) => {
                if !stored.contains_key(&s) {
                    model.remove(&s);
                }
            }
        }
        assert_eq!(
            stored, model,
            "after kill {kills}: the store disagrees with what was acknowledged"
        );
    }
    println!("{kills} kills, {acked} acknowledged persistent changes, none lost");
}

#[test]
fn killed_holders_give_back_every_port_and_no_port_is_ever_held_twice() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::with_config("dynamic_range = \"41000-41099\"\n");
    let c = d.client();
    let mut holders = Vec::new();
    for _ in 0..16 {
        // `portres run --listen` holds the block and hands its sockets to `sleep`.
        let mut h = spawn(
            d.cli()
                .args(["run", "--listen", "--count", "3", "--", "sh", "-c"])
                .arg("echo \"$PORTRES_PORTS\"; exec sleep 600")
                .process_group(0)
                .stdout(Stdio::piped()),
        );
        let line = first_line(&mut h);
        holders.push((h, line.trim().to_string()));
    }
    let check_disjoint = || {
        let show = c.show().unwrap();
        let mut taken = std::collections::BTreeSet::new();
        for r in &show.reservations {
            for p in r.start..r.start + r.count {
                assert!(taken.insert(p), "port {p} is in two reservations: {show:?}");
            }
        }
        show.reservations.len()
    };
    assert_eq!(check_disjoint(), 16);
    let mut rng = Rng(42);
    while !holders.is_empty() {
        let (mut h, _) = holders.remove(rng.below(holders.len() as u64) as usize);
        // SIGKILL to the whole group: `portres run` and the `sleep` holding the sockets.
        let pgid = rustix::process::Pid::from_raw(h.id() as i32).unwrap();
        rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL).unwrap();
        h.wait().unwrap();
        check_disjoint();
    }
    wait_until(
        "every killed holder's block to end",
        Duration::from_secs(5),
        || check_disjoint() == 0,
    );
    // Every port is back: nobody can be refused any of them.
    let ports: Vec<String> = (41000..41100).map(|p: u16| p.to_string()).collect();
    let out = run(d
        .adversary(NOBODY)
        .args(["matrix", "tcp"])
        .args(&ports[..48]));
    let won: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    for p in &ports[..48] {
        assert!(
            won.iter().any(|w| w.contains(&format!(":{p} "))),
            "port {p} came back"
        );
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_thousand_sessions_keep_the_daemon_responsive_and_leave_nothing_behind() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let probe = d.client();
    let rss_before = rss_kib(d.pid);
    let mut sessions = Vec::new();
    for _ in 0..1000 {
        let c = d.client();
        let r = c.acquire(Protocol::Tcp, 1).unwrap();
        sessions.push((c, r));
    }
    let rss_during = rss_kib(d.pid);
    let mut lat: Vec<Duration> = (0..300)
        .map(|_| {
            let t = Instant::now();
            probe.status().unwrap();
            t.elapsed()
        })
        .collect();
    lat.sort();
    let status = probe.status().unwrap();
    assert_eq!(status.counts.sessions, 1001);
    assert_eq!(status.counts.ports_held, 1000);
    drop(sessions);
    wait_until("the sessions to end", Duration::from_secs(10), || {
        let s = probe.status().unwrap();
        s.counts.sessions == 1 && s.counts.ports_held == 0
    });
    let rss_after = rss_kib(d.pid);
    println!(
        "1000 sessions: status p50 {:?} p99 {:?}; daemon RSS {rss_before} KiB idle, {rss_during} KiB \
         with 1000 sessions, {rss_after} KiB after they left",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    assert!(
        rss_after < rss_during,
        "memory returns when sessions leave: {rss_after} KiB after, {rss_during} KiB during"
    );
    // A fresh round of the same load fits in what was freed.
    let again: Vec<_> = (0..1000).map(|_| d.client()).collect();
    let rss_again = rss_kib(d.pid);
    drop(again);
    assert!(
        rss_again <= rss_during + rss_during / 10,
        "{rss_again} vs {rss_during}"
    );
}

#[test]
fn random_garbage_on_the_wire_never_takes_the_daemon_down() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let healthy = d.client();
    let held = healthy.acquire_at(Protocol::Tcp, 42500, 2).unwrap();
    let mut rng = Rng(0xdead_beef);
    let hello = portres_proto::encode(&portres_proto::Hello::new("fuzz")).unwrap();
    for i in 0..2000 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut bytes = Vec::new();
        let kind = rng.below(6);
        if kind >= 2 {
            bytes.extend_from_slice(&hello);
        }
        match kind {
            // Random bytes (as a handshake, or after one).
            0 | 2 => (0..rng.below(300)).for_each(|_| bytes.push(rng.next() as u8)),
            // A wrong version.
            1 => {
                bytes = portres_proto::encode(
                    &serde_json::json!({"protocol": "portres", "version": rng.below(1000) + 2}),
                )
                .unwrap()
            }
            // An oversize or huge length.
            3 => bytes.extend_from_slice(
                &((portres_proto::MAX_FRAME as u32) + 1 + rng.below(1 << 30) as u32).to_le_bytes(),
            ),
            // A truncated frame.
            4 => {
                bytes.extend_from_slice(&(100 + rng.below(1000) as u32).to_le_bytes());
                bytes.extend_from_slice(b"{\"id\":1,\"op\":\"acq");
            }
            // JSON of the right shape with random values.
            _ => {
                let ops = [
                    "acquire",
                    "release",
                    "associate",
                    "who",
                    "create_persistent",
                    "show",
                    "nope",
                ];
                let msg = serde_json::json!({
                    "id": rng.next(),
                    "op": ops[rng.below(ops.len() as u64) as usize],
                    "protocol": if rng.below(2) == 0 { "tcp" } else { "sctp" },
                    "start": rng.below(70000),
                    "count": rng.below(70000),
                    "token": rng.next().to_string(),
                    "socket": "listener",
                    "port": rng.below(70000),
                    "address": "not-an-address",
                });
                bytes.extend_from_slice(&portres_proto::encode(&msg).unwrap());
            }
        }
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        // The daemon answers and closes; a close with our bytes unread arrives as a reset.
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "case {i} (kind {kind}): the daemon neither answered nor closed: {r:?}"
        );
    }
    // Still serving, and the healthy session kept its reservation.
    let show = healthy.show().unwrap();
    assert!(
        show.reservations
            .iter()
            .any(|r| r.start == held.range().start())
    );
    healthy.status().unwrap();
    assert!(!d.log().contains("panicked"));
    assert!(std::path::Path::new(&format!("/proc/{}", d.pid)).exists());
}
