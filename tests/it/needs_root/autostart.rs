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
    if run_elsewhere(Needs::Namespace) {
        return;
    }
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
    // A stop meant as a stop: no keeper left holding the deny layer's pins for a successor.
    let out = run(Command::new(BIN)
        .args(["daemon", "--stop"])
        .env("PORTRES_SOCKET", &socket));
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_renamed_cli_starts_itself_and_says_what_a_per_user_daemon_cannot_enforce() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    require_root();
    // A directory `nobody` owns, holding the CLI under another name and nothing called
    // `portres`, and no `portres` on PATH: only its own executable can be started.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let renamed = dir.path().join("prt-cli-renamed");
    let out = run(Command::new("install")
        .args(["-m", "755"])
        .arg(nobody_binary())
        .arg(&renamed));
    assert!(out.status.success(), "{out:?}");
    let socket = home.join("run/portres.sock");
    let cli = || {
        let mut c = Command::new("unshare");
        c.args(["-n", "--"])
            .arg(&renamed)
            .args(["--json", "status"])
            .env("PATH", "/usr/bin:/bin")
            .env("PORTRES_SOCKET", &socket)
            .env("PORTRES_STATE_DIR", home.join("state"))
            .env("HOME", &home)
            .env_remove("PORTRES_AUTOSTART")
            .env_remove("PORTRES_DAEMON_BIN")
            .env_remove("PORTRES_QUIET")
            .current_dir("/");
        c
    };
    // unshare needs root: it drops to nobody after entering a private namespace.
    let as_nobody = |c: &mut Command| {
        let args: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_owned()).collect();
        let mut n = Command::new("unshare");
        n.args(["-n", "--", "setpriv"])
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg("--")
            .args(&args[2..]);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => n.env(k, v),
                None => n.env_remove(k),
            };
        }
        n.current_dir("/");
        n
    };
    let first = run(&mut as_nobody(&mut cli()));
    assert!(first.status.success(), "{first:?}");
    let status = json(&first);
    let pid = status["pid"].as_u64().unwrap() as u32;
    // The daemon and its keeper go when the test ends, whatever happens.
    struct Stop(u32, Option<u64>);
    impl Drop for Stop {
        fn drop(&mut self) {
            signal(self.0, rustix::process::Signal::TERM);
            if let Some(k) = self.1 {
                signal(k as u32, rustix::process::Signal::KILL);
            }
        }
    }
    let _stop = Stop(pid, status["restore"]["keeper_pid"].as_u64());
    assert_eq!(status["scope"], "user");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).starts_with(&renamed.to_string_lossy().to_string()),
        "the daemon is the renamed binary itself"
    );
    // Told once, in one line, what is not enforced and how to get it.
    let err = String::from_utf8_lossy(&first.stderr);
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("started a per-user daemon"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].contains("layers off") && said[0].contains("system daemon"),
        "{err}"
    );
    // Not again once the daemon runs (a client in the daemon's namespace).
    let mut again = as_nobody(&mut cli());
    let args: Vec<std::ffi::OsString> = again.get_args().skip(2).map(|a| a.to_owned()).collect();
    let mut second = Command::new("nsenter");
    second
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .args(&args);
    for (k, v) in again.get_envs() {
        match v {
            Some(v) => second.env(k, v),
            None => second.env_remove(k),
        };
    }
    let second = run(second.current_dir("/"));
    assert!(second.status.success(), "{second:?}");
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("per-user daemon"),
        "{second:?}"
    );
    // A client in another namespace is refused by a per-user daemon, which cannot enter it.
    let third = run(&mut again);
    assert!(!third.status.success());
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("may not enter it"),
        "{third:?}"
    );
}
