//! The Python package (`python/`, installed with pip into a virtual environment): its client
//! against a real daemon, and its pytest plugin under pytest-xdist with an intruder grabbing
//! ephemeral ports — zero failures — beside the usual probe-and-release fixture, whose
//! collisions are counted and printed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::util::*;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python");

fn pytest(d: &TestDaemon, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    // Its own temporary directory (pytest refuses a /tmp/pytest-of-USER of another owner).
    let basetemp = d.dir.path().join("pytest");
    let mut c = d.nsenter();
    c.arg(test_python())
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-q"])
        .arg(format!("--basetemp={}", basetemp.display()))
        .args(args)
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(SRC);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

#[test]
fn the_python_client_speaks_the_protocol() {
    // The virtual environment is made out here (the namespace has no network).
    test_python();
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let out = pytest(&d, &["tests/test_client.py"], &[]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed (and waited for) when dropped, also when a test panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// "N failed" / "N passed" from pytest's summary line.
fn count(summary: &str, what: &str) -> u32 {
    summary
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1].starts_with(what))
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_hundred_servers_under_xdist_never_collide_with_an_intruder() {
    // The virtual environment is made out here (the namespace has no network).
    test_python();
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let mut intruder = d.nsenter();
    intruder
        .arg(test_python())
        .arg(format!("{SRC}/tests/intruder.py"))
        .stdout(Stdio::piped());
    let mut intruder = KillOnDrop(spawn(&mut intruder));
    let mut line = String::new();
    BufReader::new(intruder.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");

    let ours = pytest(&d, &["-n", "4", "tests/suite"], &[]);
    let text = String::from_utf8_lossy(&ours.stdout).to_string();
    assert!(
        ours.status.success() && count(&text, "passed") == 100,
        "with portres's fixture every test passes ({:?}): {text}\n{}",
        ours.status,
        String::from_utf8_lossy(&ours.stderr)
    );
    // The same suite with the probe-and-release fixture: its collisions, as a number.
    let probe = pytest(
        &d,
        &["-n", "4", "tests/suite"],
        &[("PORTRES_SUITE_FIXTURE", "probe")],
    );
    let text = String::from_utf8_lossy(&probe.stdout).to_string();
    let last = text.lines().last().unwrap_or_default().to_string();
    eprintln!(
        "probe-and-release fixture beside the same intruder: {} of 100 tests failed ({last}); \
         portres's fixture: 0",
        count(&last, "failed")
    );
    drop(intruder);
    // Everything the suites reserved is back once their processes are gone.
    wait_until(
        "every reservation of the suites ends",
        std::time::Duration::from_secs(10),
        || {
            let show = json(&run(d.cli().args(["--json", "show"])));
            show["reservations"] == serde_json::json!([])
        },
    );
}

#[test]
fn pip_installs_the_package_with_its_pytest_plugin() {
    // The virtual environment is made out here (the namespace has no network).
    test_python();
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let out = run(Command::new(test_python()).args([
        "-c",
        "import importlib.metadata as m; \
         print([e.value for e in m.entry_points(group='pytest11') if e.name == 'portres'])",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("portres.pytest_plugin"), "{text}");
}
