//! `portres_client::testing`: its documented example (`crates/portres-client/examples/
//! testing.rs`) run against a real daemon; what it reserves is held while it lives and
//! released when it exits or is killed; no daemon means a clear error, never a probe.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

/// The example binary (cargo builds examples with the tests).
fn example() -> PathBuf {
    std::path::Path::new(BIN)
        .parent()
        .unwrap()
        .join("examples/testing")
}

fn rows_of(d: &TestDaemon, pid: u32) -> usize {
    let show = json(&run(d.cli().args(["--json", "show"])));
    show["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["owner"]["pid"] == pid)
        .count()
}

#[test]
fn the_documented_example_holds_its_ports_while_it_lives() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    for ending in ["exits", "is killed"] {
        let mut c = d.nsenter();
        c.arg(example())
            .arg("--wait")
            .env("PORTRES_SOCKET", &d.socket)
            .env("PORTRES_AUTOSTART", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut c);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.first(), Some(&"ok"), "{line:?}; log:\n{}", d.log());
        let first: u16 = fields[2].parse().unwrap();
        let udp: u16 = fields[3].parse().unwrap();
        let pid = child.id();
        // The listener went with the server thread that owned it (and its reservation with it);
        // the exclude block and the UDP socket's block live on.
        let show = String::from_utf8_lossy(&run(d.cli().args(["show"])).stdout).to_string();
        assert_eq!(rows_of(&d, pid), 2, "{show}");
        // The exclude block is kept from the kernel's ephemeral choices.
        let reserved: portres_core::PortSet = d.reserved_ports().parse().unwrap();
        assert!(reserved.contains(first) && reserved.contains(first + 2));
        // Nobody else can bind the UDP socket's port.
        let won = run(d
            .adversary(NOBODY)
            .args(["matrix", "udp", &udp.to_string()]));
        let won: Vec<String> = serde_json::from_slice(&won.stdout).unwrap();
        assert!(won.is_empty(), "{won:?}");
        if ending == "exits" {
            drop(child.stdin.take());
            assert!(child.wait().unwrap().success());
        } else {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        wait_until(
            &format!("its reservations end when it {ending}"),
            Duration::from_secs(10),
            || rows_of(&d, pid) == 0,
        );
    }
}

#[test]
fn without_a_daemon_the_helpers_say_why_and_what_to_do() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(example())
        .env("PORTRES_SOCKET", dir.path().join("none.sock"))
        .env("PORTRES_AUTOSTART", "0"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none.sock") && err.contains("PORTRES_AUTOSTART"),
        "the error names the socket and how to get a daemon: {err}"
    );
}
