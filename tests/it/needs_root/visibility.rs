//! Visibility (docs/behaviour.md §7): `who`, `show`, `show --format netsh`, and conflicts that
//! name holders.

use std::process::{Child, Stdio};

use portres_client::{Error, PersistentSpec, Protocol};

use crate::util::*;

/// Starts `sockets_helper.py` in the daemon's namespace; returns it and its pid.
fn helper(d: &TestDaemon, ports: [u16; 4]) -> (Child, u32) {
    let mut h = spawn(
        d.nsenter()
            .arg("python3")
            .arg(world_readable("sockets_helper.py"))
            .args(ports.map(|p| p.to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let line = first_line(&mut h);
    let pid = line
        .trim()
        .strip_prefix("ready ")
        .expect("helper ready")
        .parse()
        .unwrap();
    (h, pid)
}

#[test]
fn who_finds_every_kind_of_socket_and_names_its_process() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let (_h, pid) = helper(&d, [8080, 5353, 8181, 8282]);
    for (flag, port, state) in [
        ("--tcp", 8080, "listening"),
        ("--udp", 5353, "bound"),
        ("--tcp", 8181, "bound"),
        ("--tcp", 8282, "time-wait"),
    ] {
        let who = json(&run(d.cli().args([
            "--json",
            flag,
            "who",
            &port.to_string(),
        ])));
        assert!(who["reservation"].is_null(), "{who}");
        let sockets = who["sockets"].as_array().unwrap();
        let s = sockets
            .iter()
            .find(|s| s["state"] == state)
            .unwrap_or_else(|| panic!("no {state} socket on {port}: {who}"));
        assert_eq!(s["uid"], 0);
        if state == "time-wait" {
            assert!(s["pid"].is_null());
            assert!(
                s["description"].as_str().unwrap().contains("TIME_WAIT"),
                "{s}"
            );
        } else {
            assert_eq!(s["pid"], pid, "{s}");
            assert!(
                s["command"].as_str().unwrap().contains("sockets_helper.py"),
                "{s}"
            );
        }
    }
    let human = String::from_utf8(run(d.cli().args(["who", "8080"])).stdout).unwrap();
    assert!(
        human.contains(&format!(
            "python3 (pid {pid}, user root), listening on [::]:8080"
        )),
        "{human}"
    );
    let human = String::from_utf8(run(d.cli().args(["who", "9999"])).stdout).unwrap();
    assert!(human.contains("nobody"), "{human}");

    // A reserved port: the reservation with its owner, and portres's own placeholder.
    let c = d.client();
    let _r = c.acquire_at(Protocol::Udp, 8300, 1).unwrap();
    let who = json(&run(d.cli().args(["--json", "--udp", "who", "8300"])));
    assert_eq!(who["reservation"]["owner"]["pid"], std::process::id());
    assert_eq!(who["reservation"]["kind"], "runtime");
    assert_eq!(
        who["sockets"][0]["role"], "portres placeholder (hold layer)",
        "{who}"
    );
    assert_eq!(who["sockets"][0]["pid"], d.pid);
}

#[test]
fn conflicts_name_the_process_that_holds_the_port() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let (_h, pid) = helper(&d, [8080, 5353, 8181, 8282]);
    let c = d.client();
    let e = c.acquire_at(Protocol::Tcp, 8075, 10).unwrap_err();
    assert!(matches!(e, Error::AddressInUse(_)), "{e:?}");
    let expect = format!(
        "port 8080/tcp is in use by python3 (pid {pid}, user root), listening on [::]:8080"
    );
    assert!(e.to_string().contains(&expect), "{e}");
    let conflict = e.details().unwrap().conflict.clone().unwrap();
    assert_eq!(
        (conflict.port, conflict.holder_kind.as_str()),
        (8080, "socket")
    );
    assert!(conflict.holder.contains("python3"), "{conflict:?}");

    let out = run(d.cli().args([
        "--json",
        "--udp",
        "persistent",
        "add",
        "--start",
        "5350",
        "--count",
        "5",
    ]));
    let e = json(&out);
    assert_eq!(e["error"]["code"], "SharingViolation");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "port 5353/udp is in use by python3 (pid {pid}, user root), bound to 127.0.0.1:5353"
        )),
        "{msg}"
    );

    let out = run(d.cli().args(["run", "--start", "8282", "--", "true"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TIME_WAIT"),
        "a TIME_WAIT leftover is named as such: {err}"
    );
}

#[test]
fn show_names_owners_and_holders_and_netsh_matches_windows() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 9000, 2).unwrap();
    let _u = c.acquire_at(Protocol::Udp, 9000, 1).unwrap();
    c.create_persistent(&PersistentSpec::new(Protocol::Tcp, 50000, 60))
        .unwrap();
    c.create_persistent(&PersistentSpec::new(Protocol::Tcp, 5357, 1))
        .unwrap();
    let _l = r.listen(9001).unwrap();

    let show = json(&run(d.cli().args(["show", "--json"])));
    let rows = show["reservations"].as_array().unwrap();
    let starts: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["protocol"].as_str().unwrap().into(),
                r["start"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        starts,
        [
            ("tcp".into(), 5357),
            ("tcp".into(), 9000),
            ("tcp".into(), 50000),
            ("udp".into(), 9000)
        ]
    );
    let rt = &rows[1];
    assert_eq!(rt["owner"]["pid"], std::process::id());
    assert_eq!(rt["owner"]["user"], "root");
    assert!(
        rt["owner"]["command"].as_str().unwrap().contains("it-"),
        "{rt}"
    );
    assert_eq!(rt["handed_out_to"][0]["port"], 9001);
    assert_eq!(rt["handed_out_to"][0]["pid"], std::process::id(), "{rt}");
    assert!(rows[0]["owner"]["pid"].is_null());
    assert!(rows[0]["created"].as_u64().unwrap() > 1_700_000_000);

    let human = String::from_utf8(run(d.cli().arg("show")).stdout).unwrap();
    assert!(human.contains("port 9001 handed out to pid"), "{human}");
    assert!(human.lines().all(|l| l.chars().count() <= 80), "{human}");

    let golden = |name: &str| {
        std::fs::read_to_string(format!(
            "{}/tests/it/golden/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let tcp = String::from_utf8(run(d.cli().args(["show", "--format", "netsh"])).stdout).unwrap();
    assert_eq!(tcp, golden("netsh_tcp.txt"));
    let udp = String::from_utf8(run(d.cli().args(["--udp", "show", "--format", "netsh"])).stdout)
        .unwrap();
    assert_eq!(udp, golden("netsh_udp.txt"));
}

#[test]
fn the_log_tells_who_had_what() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 9100, 2).unwrap();
    let token = r.token();
    let _ = c.acquire_at(Protocol::Tcp, 9101, 1).unwrap_err();
    r.release().unwrap();
    drop(c);
    let me = format!("pid={}", std::process::id());
    wait_until(
        "the session end to be logged",
        std::time::Duration::from_secs(5),
        || d.log().contains("session ended"),
    );
    let log = d.log();
    let has = |needle: &str| {
        log.lines()
            .any(|l| l.contains(needle) && l.contains(&me) && l.contains("INFO"))
    };
    assert!(has("acquire: 9100-9101/tcp"), "{log}");
    assert!(has(&format!("token={token}")), "{log}");
    assert!(has("release: 9100-9101/tcp"), "{log}");
    assert!(has("refused acquire"), "{log}");
    assert!(has("session ended"), "{log}");
}
