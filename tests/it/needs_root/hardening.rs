//! Hardening: a damaged store, a full disk, running out of descriptors, signals to
//! `portres run`, and clients that stall half-way through a frame.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use portres_client::{PersistentSpec, Protocol};
use portres_proto::{Hello, HelloReply};

use crate::util::*;

fn starts(d: &TestDaemon) -> BTreeSet<u16> {
    d.client()
        .show()
        .unwrap()
        .reservations
        .iter()
        .map(|r| r.start)
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_damaged_store_never_panics_and_restore_brings_back_every_reservation() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let c = d.client();
    let expected: BTreeSet<u16> = (0..50).map(|i| 20_000 + 2 * i).collect();
    for &s in &expected {
        c.create_persistent(&PersistentSpec::new(Protocol::Tcp, u32::from(s), 1))
            .unwrap();
    }
    drop(c);
    assert!(d.terminate().success());
    let good = d.dir.path().join("good-state");
    copy_dir(&d.state_dir, &good);
    let db = d.state_dir.join("portres.redb");
    let len = std::fs::metadata(&db).unwrap().len();

    // Damage: 512 bytes overwritten at each 4 KiB page and in the middle of some, single bytes
    // flipped, and truncations.
    enum Damage {
        Overwrite(u64),
        Flip(u64),
        Truncate(u64),
    }
    let mut cases: Vec<Damage> = (0..len.div_ceil(4096))
        .flat_map(|p| {
            [
                Damage::Overwrite(p * 4096),
                Damage::Overwrite(p * 4096 + 1536),
            ]
        })
        .collect();
    cases.extend([0, 1, 17, 300, 4097, len / 2].map(Damage::Flip));
    cases.extend([0, 1, 100, 512, 4096, len / 2, len - 1].map(Damage::Truncate));

    let (mut started, mut refused) = (0, 0);
    for case in &cases {
        copy_dir(&good, &d.state_dir);
        let mut bytes = std::fs::read(&db).unwrap();
        let what = match *case {
            Damage::Overwrite(at) => {
                let at = at as usize;
                let end = (at + 512).min(bytes.len());
                for (i, b) in bytes[at..end].iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(37) ^ 0xA5;
                }
                format!("512 bytes overwritten at {at}")
            }
            Damage::Flip(at) => {
                bytes[at as usize] ^= 0xFF;
                format!("byte {at} flipped")
            }
            Damage::Truncate(to) => {
                bytes.truncate(to as usize);
                format!("truncated to {to} bytes")
            }
        };
        std::fs::write(&db, &bytes).unwrap();
        let log_before = d.log().len();
        match d.try_launch() {
            Ok(()) => {
                // It started: then it has every reservation.
                assert_eq!(
                    starts(&d),
                    expected,
                    "{what}: started with a different table"
                );
                assert!(d.terminate().success());
                started += 1;
            }
            Err(log) => {
                let log = &log[log_before..];
                assert!(
                    log.contains("is damaged") && log.contains("portres store restore"),
                    "{what}: {log}"
                );
                assert!(log.contains("holds 50 reservations"), "{what}: {log}");
                let out = run(d
                    .cli()
                    .args(["store", "restore", "--state-dir"])
                    .arg(&d.state_dir));
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success()
                        && text.contains("restored 50")
                        && text.contains("nothing was lost"),
                    "{what}: {out:?}"
                );
                d.launch();
                assert_eq!(starts(&d), expected, "{what}: after restore");
                assert!(d.terminate().success());
                refused += 1;
            }
        }
        assert!(!d.log().contains("panicked"), "{what}: {}", d.log());
    }
    eprintln!(
        "{} damaged stores: {started} started with every reservation, {refused} refused and \
         restored",
        cases.len()
    );
    assert!(refused > 0, "no damage was detected at all");

    // A damaged journal line is reported by name when the store must be restored from it.
    copy_dir(&good, &d.state_dir);
    let journal = d.state_dir.join("persistent.journal");
    let text = std::fs::read_to_string(&journal).unwrap();
    std::fs::write(
        &journal,
        text.replacen("\"start\":20010", "\"start\":20011", 1),
    )
    .unwrap();
    std::fs::write(&db, b"").unwrap();
    let out = run(d
        .cli()
        .args(["store", "restore", "--state-dir"])
        .arg(&d.state_dir));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        text.contains("restored 49") && text.contains("20011/tcp"),
        "{text}"
    );
}

#[test]
fn a_full_disk_refuses_clearly_changes_nothing_and_recovers() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    assert!(d.terminate().success());
    // The state directory on a small filesystem of its own.
    std::fs::create_dir_all(&d.state_dir).unwrap();
    let out = run(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "portres-test"])
        .arg(&d.state_dir));
    assert!(out.status.success(), "mount tmpfs: {out:?}");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(d.state_dir.clone());
    d.launch();
    let add = |d: &TestDaemon, start: u32| {
        run(d
            .cli()
            .args(["--json", "persistent", "add", "--start"])
            .arg(start.to_string()))
    };
    let mut acknowledged = BTreeSet::new();
    for s in [30_000, 30_010, 30_020] {
        assert!(add(&d, s).status.success());
        acknowledged.insert(s as u16);
    }
    // Fill the filesystem.
    let filler = d.state_dir.join("filler");
    let _ = run(std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display())));
    // A change may still fit in space its files already have (the journal's last page, the
    // store's free pages): go on until one needs more.
    let (refused_at, out) = (0..256u32)
        .map(|i| 31_000 + 2 * i)
        .find_map(|s| {
            let out = add(&d, s);
            if out.status.success() {
                acknowledged.insert(s as u16);
                None
            } else {
                Some((s, out))
            }
        })
        .expect("some change needs space the full filesystem does not have");
    let e = json(&out);
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("full") && msg.contains("free space") && msg.contains(&refused_at.to_string()),
        "{e}"
    );
    assert_eq!(e["error"]["code"], "Internal", "{e}");
    assert_eq!(
        starts(&d),
        acknowledged,
        "nothing changed but what was acknowledged"
    );
    d.client().status().unwrap();
    // Space again: it works, and a restart shows exactly what was acknowledged.
    std::fs::remove_file(&filler).unwrap();
    assert!(add(&d, refused_at).status.success());
    acknowledged.insert(refused_at as u16);
    assert!(d.terminate().success());
    d.launch();
    assert_eq!(starts(&d), acknowledged);
    assert!(d.terminate().success());
}

fn hello(d: &TestDaemon) -> UnixStream {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    portres_proto::write_frame(&mut s, &Hello::new("hardening")).unwrap();
    s
}

fn welcomed(s: &mut UnixStream) -> bool {
    match portres_proto::read_frame(s) {
        Ok(body) => matches!(
            portres_proto::decode::<HelloReply>(&body),
            Ok(HelloReply::Welcome(_))
        ),
        Err(_) => false,
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_connections_wait_without_a_busy_loop_and_resume() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_nofile(64);
    // Fill the daemon's descriptors with sessions.
    let mut held = Vec::new();
    let mut waiting = loop {
        let mut s = hello(&d);
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if welcomed(&mut s) {
            held.push(s);
        } else {
            break s;
        }
        assert!(held.len() < 64, "the limit was never reached");
    };
    // Meanwhile the daemon does not spin: a busy loop would use the whole second.
    let before = cpu_ticks(d.pid);
    let t = Instant::now();
    waiting
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert!(!welcomed(&mut waiting), "no descriptor was free");
    let ticks = cpu_ticks(d.pid) - before;
    let ticks_per_sec = 100.0; // USER_HZ
    assert!(
        (ticks as f64) < 0.3 * t.elapsed().as_secs_f64() * ticks_per_sec,
        "{ticks} ticks of CPU in {:?}: a busy loop",
        t.elapsed()
    );
    // A session ends: the waiting client is served (a new connection, since the old one's
    // hello was consumed by the timeout above).
    drop(waiting);
    close(held.split_off(held.len() - 4));
    let mut next = hello(&d);
    next.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(welcomed(&mut next), "service resumed");
    drop(next);
    close(held.split_off(held.len() - 4));
    let status = d.client().status().unwrap();
    assert!(status.counts.accept_paused >= 1, "{:?}", status.counts);
    assert_eq!(status.counts.open_files_limit, 64);
    assert!(d.log().contains("out of descriptors"), "{}", d.log());
    drop(held);
}

#[test]
fn portres_run_passes_signals_on_and_waits_for_its_command() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let script = d.dir.path().join("child.py");
    std::fs::write(
        &script,
        "import signal, sys\n\
         def h(sig, frame):\n    open(sys.argv[1], 'w').write(str(sig))\n    sys.exit(7)\n\
         for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n    signal.signal(s, h)\n\
         print('ready', flush=True)\nsignal.pause()\n",
    )
    .unwrap();
    let start = |marker: &Path| {
        let mut child = spawn(
            d.cli()
                .args(["run", "--count", "1", "--", "python3"])
                .arg(&script)
                .arg(marker)
                .stdout(Stdio::piped()),
        );
        let line = first_line(&mut child);
        assert_eq!(line.trim(), "ready");
        child
    };
    for (sig, n) in [
        (rustix::process::Signal::TERM, 15),
        (rustix::process::Signal::HUP, 1),
        (rustix::process::Signal::INT, 2),
    ] {
        let marker = d.dir.path().join(format!("marker-{n}"));
        let mut child = start(&marker);
        assert_eq!(d.client().show().unwrap().reservations.len(), 1);
        signal(child.id(), sig);
        let status = child.wait().unwrap();
        // The command got the signal, and `portres run` waited for it and passed on its status.
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), n.to_string());
        assert_eq!(status.code(), Some(7), "{sig:?}");
    }
    // SIGKILL of `portres run`: the command is told (SIGTERM) and its reservation ends.
    let marker = d.dir.path().join("marker-kill");
    let mut child = start(&marker);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the command hears of it", Duration::from_secs(10), || {
        std::fs::read_to_string(&marker).is_ok_and(|m| m == "15")
    });
    wait_until("the reservation ends", Duration::from_secs(10), || {
        d.client().show().unwrap().reservations.is_empty()
    });
}

#[test]
fn a_thousand_stalled_clients_do_not_slow_anyone_or_grow_the_daemon() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let before = rss(d.pid);
    let mut stalled = Vec::new();
    for i in 0..1000 {
        let mut s = hello(&d);
        assert!(welcomed(&mut s));
        // Half a frame: a header announcing 60,000 bytes and a few of them; or an unread
        // reply: requests whose answers are never read.
        if i % 2 == 0 {
            s.write_all(&60_000u32.to_le_bytes()).unwrap();
            s.write_all(b"{\"id\":1,").unwrap();
        } else {
            for id in 0..20 {
                portres_proto::write_frame(&mut s, &serde_json::json!({"id": id, "op": "status"}))
                    .unwrap();
            }
        }
        stalled.push(s);
    }
    // Everyone else is served as usual.
    let c = d.client();
    for _ in 0..100 {
        let r = c.acquire(Protocol::Tcp, 1).unwrap();
        r.release().unwrap();
    }
    let grown = rss(d.pid).saturating_sub(before);
    eprintln!("daemon RSS grew by {grown} KiB for 1,000 stalled clients");
    assert!(
        grown < 64 * 1024,
        "the daemon grew by {grown} KiB for 1,000 stalled clients"
    );
    // The stalled ones still get their answers when they read.
    let mut s = stalled.pop().unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    drop(stalled);
}
