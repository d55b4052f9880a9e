//! The portserver protocol: Google's `portpicker.pick_unused_port()` (installed from PyPI into
//! a virtual environment, as `.ci/run` does) against the daemon's portserver endpoint.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::util::*;

/// Picks a port with portpicker through the portserver, binds it, prints it, and keeps it
/// until stdin closes.
const WORKER: &str = "\
import socket, sys, portpicker
port = portpicker.pick_unused_port()
s = socket.socket()
s.bind(('127.0.0.1', port))
s.listen()
print(port, flush=True)
sys.stdin.read()
";

const CONFIG: &str = "portserver = \"@unittest-portserver\"\n";

fn grants(d: &TestDaemon) -> Vec<serde_json::Value> {
    let show = json(&run(d.cli().args(["--json", "show"])));
    show["reservations"].as_array().unwrap().clone()
}

#[test]
fn many_portpicker_processes_at_once_get_distinct_ports_until_they_exit() {
    // The virtual environment is made out here (the namespace has no network).
    test_python();
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config(CONFIG);
    let py = test_python();
    let workers: Vec<_> = (0..24)
        .map(|_| {
            let mut c = d.nsenter();
            c.arg(py)
                .args(["-c", WORKER])
                .env("PORTSERVER_ADDRESS", "@unittest-portserver")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            spawn(&mut c)
        })
        .collect();
    let mut workers: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            let mut line = String::new();
            BufReader::new(w.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            (w, line.trim().to_string())
        })
        .collect();
    let mut ports: Vec<u16> = workers
        .iter()
        .map(|(w, l)| {
            l.parse().unwrap_or_else(|_| {
                panic!("worker {} got no port or failed to bind: {l:?}", w.id())
            })
        })
        .collect();
    ports.sort_unstable();
    let n = ports.len();
    ports.dedup();
    assert_eq!(ports.len(), n, "no port was granted twice");
    // Each grant is an exclude reservation owned by its process, in the kernel's sysctl.
    let rows = grants(&d);
    assert_eq!(rows.len(), 24);
    let pids: Vec<u64> = workers.iter().map(|(w, _)| u64::from(w.id())).collect();
    for r in &rows {
        assert_eq!(r["mode"], "exclude");
        assert!(pids.contains(&r["owner"]["pid"].as_u64().unwrap()), "{r}");
        assert!(
            r["owner"]["command"]
                .as_str()
                .unwrap()
                .contains("portpicker")
        );
    }
    let reserved: portres_core::PortSet = d.reserved_ports().parse().unwrap();
    assert!(ports.iter().all(|&p| reserved.contains(p)));
    // They exit: every port comes back.
    for (w, _) in &mut workers {
        drop(w.stdin.take());
    }
    for (mut w, _) in workers {
        assert!(w.wait().unwrap().success());
    }
    wait_until(
        "every grant ends with its process",
        Duration::from_secs(10),
        || grants(&d).is_empty(),
    );
    wait_until("and leaves the sysctl", Duration::from_secs(10), || {
        let reserved: portres_core::PortSet = d.reserved_ports().parse().unwrap();
        ports.iter().all(|&p| !reserved.contains(p))
    });
}

/// Asks the portserver for a port for `pid`, as `uid`; the reply ("" when none).
fn ask(d: &TestDaemon, uid: u32, pid: &str) -> String {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0unittest-portserver')\n\
         s.sendall(b'{pid}\\n')\nprint(repr(s.recv(100).decode()))\n"
    );
    let out = run(d.nsenter_as(uid).args(["python3", "-c", &script]));
    assert!(out.status.success(), "{out:?}");
    let got = String::from_utf8(out.stdout).unwrap();
    got.trim()
        .trim_matches('\'')
        .trim_end_matches("\\n")
        .to_string()
}

#[test]
fn the_portserver_grants_only_to_live_processes_of_the_callers_own_user() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::with_config(CONFIG);
    // A process of nobody's that lives while we ask.
    let mut sleeper = spawn(
        d.nsenter_as(NOBODY)
            .args(["sleep", "1000"])
            .stdout(Stdio::null()),
    );
    let nobody_pid = sleeper.id().to_string();
    // nobody may name its own process...
    let port = ask(&d, NOBODY, &nobody_pid);
    assert!(port.parse::<u16>().is_ok(), "{port:?}");
    // ...not root's (pid 1), nor a pid that does not exist, nor garbage: empty replies.
    assert_eq!(ask(&d, NOBODY, "1"), "");
    assert_eq!(ask(&d, NOBODY, "4194304"), "");
    assert_eq!(ask(&d, NOBODY, "banana"), "");
    // An administrator may pin a port to another user's process; it counts as theirs.
    let second = ask(&d, 0, &nobody_pid);
    assert!(second.parse::<u16>().is_ok(), "{second:?}");
    let rows = grants(&d);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r["owner"]["uid"], NOBODY);
        assert_eq!(r["owner"]["pid"].as_u64().unwrap().to_string(), nobody_pid);
    }
    let status = json(&run(d.cli().args(["--json", "status"])));
    assert!(
        status["portserver"]
            .as_str()
            .unwrap()
            .contains("@unittest-portserver"),
        "{status}"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    wait_until(
        "the grants end with the process",
        Duration::from_secs(10),
        || grants(&d).is_empty(),
    );
}

#[test]
fn portserver_grants_count_in_the_users_quota() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::with_config(&format!("{CONFIG}runtime_quota_ports = 2\n"));
    let mut sleeper = spawn(
        d.nsenter_as(NOBODY)
            .args(["sleep", "1000"])
            .stdout(Stdio::null()),
    );
    let pid = sleeper.id().to_string();
    assert!(ask(&d, NOBODY, &pid).parse::<u16>().is_ok());
    assert!(ask(&d, NOBODY, &pid).parse::<u16>().is_ok());
    // The third port would exceed nobody's quota of 2: the empty reply, and the log says why.
    assert_eq!(ask(&d, NOBODY, &pid), "");
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains("portserver: no port") && l.contains("quota")),
        "{}",
        d.log()
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn a_squatted_portserver_address_does_not_keep_the_daemon_from_starting() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("squatter.pid");
    // Another process takes the abstract name first (anyone may).
    let setup = format!(
        "python3 -c \"import socket, time; s = socket.socket(socket.AF_UNIX); \
         s.bind('\\0unittest-portserver'); s.listen(); time.sleep(600)\" & echo $! > {} ; \
         while ! grep -q unittest-portserver /proc/net/unix; do sleep 0.01; done;",
        pidfile.display()
    );
    let d = TestDaemon::with_setup(CONFIG, &setup);
    let status = json(&run(d.cli().args(["--json", "status"])));
    let said = status["portserver"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let squatter: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    signal(squatter, rustix::process::Signal::KILL);
    assert!(
        said.contains("NOT SERVED") && said.contains("unittest-portserver"),
        "{status}"
    );
}

#[test]
fn a_caller_in_another_pid_namespace_may_name_only_itself() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config(CONFIG);
    // Python as pid 1 of a pid namespace of its own asks for itself (1), then for pid 2.
    let script = "import socket, os\n\
        def ask(pid):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect('\\0unittest-portserver')\n    \
        s.sendall(b'%d\\n' % pid)\n    return s.recv(100).decode().strip()\n\
        print(os.getpid(), repr(ask(os.getpid())), repr(ask(2)), flush=True)\n\
        input()\n";
    let mut c = d.nsenter();
    c.args(["unshare", "--pid", "--fork", "python3", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = spawn(&mut c);
    let line = first_line(&mut child);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], "1", "{line}");
    assert!(
        fields[1].trim_matches('\'').parse::<u16>().is_ok(),
        "its own pid: {line}"
    );
    assert_eq!(fields[2], "''", "another pid of its namespace: {line}");
    // The grant belongs to the process as the daemon sees it (its pid out here).
    let rows = grants(&d);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_ne!(rows[0]["owner"]["pid"], 1);
    assert!(
        rows[0]["owner"]["command"]
            .as_str()
            .unwrap()
            .contains("python3")
    );
    drop(child.stdin.take());
    child.wait().unwrap();
    wait_until("it ends with the process", Duration::from_secs(10), || {
        grants(&d).is_empty()
    });
}
