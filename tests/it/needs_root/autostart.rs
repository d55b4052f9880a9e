//! Autostart: with no daemon on the socket, clients start one; racing clients end up with one.

use std::process::{Command, Stdio};

use crate::util::*;

fn daemons_serving(socket: &std::path::Path) -> Vec<u32> {
    let needle = socket.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains(" daemon ") && c.contains(&needle)
            })
        })
        .collect()
}

#[test]
fn racing_clients_start_exactly_one_daemon() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/portres.sock");
    let state = dir.path().join("state");
    let cli = || {
        let mut c = Command::new("unshare");
        c.args(["-n", "--", BIN, "--json", "status"])
            .env("PORTRES_SOCKET", &socket)
            .env("PORTRES_STATE_DIR", &state)
            .env_remove("PORTRES_AUTOSTART")
            .stdout(Stdio::piped());
        c
    };
    // With autostart off, nothing starts.
    let out = run(cli().env("PORTRES_AUTOSTART", "0"));
    assert!(!out.status.success());
    assert!(daemons_serving(&socket).is_empty());

    let racers: Vec<_> = (0..8).map(|_| spawn(&mut cli())).collect();
    let pids: Vec<u64> = racers
        .into_iter()
        .map(|r| {
            let out = r.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            json(&out)["pid"].as_u64().unwrap()
        })
        .collect();
    assert!(
        pids.iter().all(|&p| p == pids[0]),
        "one daemon answered everyone: {pids:?}"
    );
    let serving = daemons_serving(&socket);
    assert_eq!(serving, vec![pids[0] as u32], "exactly one daemon process");
    assert!(
        state.join("daemon.log").exists(),
        "the daemon logs into its state directory"
    );
    signal(pids[0] as u32, rustix::process::Signal::TERM);
}
