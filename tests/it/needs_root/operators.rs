//! Running it as an operator would: systemd socket activation and readiness, journal logging,
//! the unit's capability set.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::util::*;

/// The service unit as shipped.
fn service_unit() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/portres.service"),
    )
    .unwrap()
}

/// The daemon started by `systemd-socket-activate` (which listens, then execs the daemon with
/// `LISTEN_FDS` on the first connection, as systemd does): READY on `NOTIFY_SOCKET`, requests
/// answered on the inherited socket, and the socket left to its owner at exit.
#[test]
fn socket_activation_serves_the_inherited_socket_and_says_ready() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("portres.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "namespaces = \"daemon\"\ndeny = false\n").unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut child = spawn(
        ns.nsenter_as(0)
            .arg("systemd-socket-activate")
            .arg("--listen")
            .arg(&socket)
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
            .arg("--setenv=PORTRES_LOG=debug")
            .arg("--")
            .arg(BIN)
            .args(["daemon", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    );
    wait_until("the activation socket", Duration::from_secs(30), || {
        socket.exists()
    });
    // The first connection starts the daemon; the client waits in the socket's backlog.
    let client = portres_client::Client::connect_to(&socket).expect("connect to the socket");
    let status = client.status().unwrap();
    assert_eq!(status.socket, socket.display().to_string());
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert_eq!(
        status.pid,
        child.id(),
        "systemd-socket-activate execs the daemon in place"
    );
    drop(client);

    signal(child.id(), rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("serving the socket passed by the service manager"),
        "{log}"
    );
    // The service manager's socket: not the daemon's to remove.
    assert!(socket.exists(), "the daemon removed the inherited socket");
}

/// Several inherited sockets and none named `portres`: the daemon refuses to guess and says
/// what to do.
#[test]
fn socket_activation_with_unnamed_sockets_says_which_to_name() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let child = spawn(
        ns.nsenter_as(0)
            .arg("systemd-socket-activate")
            .arg("--listen")
            .arg(dir.path().join("c.sock"))
            .arg("--listen")
            .arg(dir.path().join("d.sock"))
            .arg("--fdname=one:two")
            .arg("--")
            .arg(BIN)
            .args(["daemon", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(["--config", "/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let c = dir.path().join("c.sock");
    wait_until("the activation sockets", Duration::from_secs(30), || {
        c.exists()
    });
    let _conn = std::os::unix::net::UnixStream::connect(&c).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("2 sockets were passed (one, two)")
            && err.contains("FileDescriptorName=portres"),
        "{err}"
    );
}

/// With standard error on the journal (`JOURNAL_STREAM` naming it), lines carry the journal
/// priority and no timestamp of our own; otherwise they have timestamps.
#[test]
fn journal_stream_gets_priorities_and_no_timestamps() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("journal.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let socket = dir.path().join("portres.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "namespaces = \"daemon\"\ndeny = false\n").unwrap();
    let mut child = spawn(
        ns.nsenter_as(0)
            .arg(BIN)
            .args(["daemon", "--print-ready", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--config")
            .arg(&config)
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .env("PORTRES_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log),
    );
    assert_eq!(first_line(&mut child).trim(), "READY");
    signal(child.id(), rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log_path).unwrap();
    // Every line, continuation lines of a multi-line event too, carries a priority.
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            l.starts_with("<3>")
                || l.starts_with("<4>")
                || l.starts_with("<6>")
                || l.starts_with("<7>"),
            "no journal priority: {l:?}\n{text}"
        );
        assert!(!l[3..].starts_with("20"), "a timestamp of our own: {l:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("ready")),
        "{text}"
    );
    assert!(lines.iter().any(|l| l.starts_with("<7>")), "{text}");

    // The same daemon without JOURNAL_STREAM (the harness's log): timestamps, no priorities.
    let d = TestDaemon::start();
    let log = d.log();
    let first = log.lines().next().unwrap();
    assert!(
        first.starts_with("20") && !first.starts_with('<'),
        "{first}"
    );
}

/// The unit's `CapabilityBoundingSet` (and `NoNewPrivileges`) is enough for every layer:
/// a daemon run with exactly those capabilities holds a port below 1024 for the holder uid,
/// excludes, loads the deny layer, names another user's process in `who`, and serves a client
/// in another network namespace.
#[test]
fn the_units_capabilities_are_enough_for_every_layer() {
    if run_elsewhere(Needs::HostRoot(
        "the deny layer attaches to the machine's cgroup2 root, and `who` reads another uid's \
         processes",
    )) {
        return;
    }
    let unit = service_unit();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(unit.lines().any(|l| l == "NoNewPrivileges=yes"));
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let wrapper = [
        "setpriv",
        &bounding,
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
    ];
    let in_ns = |d: &TestDaemon, args: &[&str]| {
        let out = run(d
            .nsenter()
            .arg(BIN)
            .env("PORTRES_SOCKET", &d.socket)
            .env("PORTRES_AUTOSTART", "0")
            .args(args));
        assert!(out.status.success(), "{args:?}: {out:?}\n{}", d.log());
        out
    };

    // The deny layer loads and attaches (CAP_BPF, CAP_NET_ADMIN); every layer is on.
    {
        let d = TestDaemon::with_wrapper("deny = true\n", &wrapper);
        let st = json(&in_ns(&d, &["--json", "status"]));
        for layer in st["layers"].as_array().unwrap() {
            assert_eq!(layer["active"], true, "{layer}\n{st}");
        }
        assert!(
            st["layers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["name"] == "deny")
        );
    }

    // Without it, holds are placeholder sockets: the rest is checked there.
    let d = TestDaemon::with_wrapper("deny = false\nnamespaces = \"client\"\n", &wrapper);
    // Only those capabilities, really.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid)).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    let eff = u64::from_str_radix(&eff, 16).unwrap();
    assert_eq!(
        eff.count_ones() as usize,
        caps.len(),
        "CapEff {eff:x} for {caps:?}"
    );
    let in_daemon_ns = |args: &[&str]| in_ns(&d, args);
    let st = json(&in_daemon_ns(&["--json", "status"]));
    for layer in st["layers"].as_array().unwrap() {
        assert_eq!(layer["active"], layer["name"] != "deny", "{layer}\n{st}");
    }
    // Hold below 1024 (CAP_NET_BIND_SERVICE, CAP_SETUID for the holder uid), TCP and UDP
    // (the socket filters: CAP_BPF); exclude (CAP_NET_ADMIN over the sysctl).
    in_daemon_ns(&["persistent", "add", "--start", "80", "--mode", "hold"]);
    in_daemon_ns(&[
        "--udp",
        "persistent",
        "add",
        "--start",
        "81",
        "--mode",
        "hold",
    ]);
    in_daemon_ns(&["persistent", "add", "--start", "9000", "--count", "10"]);
    assert!(
        d.reserved_ports().contains("9000-9009"),
        "{}",
        d.reserved_ports()
    );
    let who = json(&in_daemon_ns(&["--json", "--udp", "who", "81"]));
    assert_eq!(
        who["sockets"][0]["role"], "portres placeholder (hold layer)",
        "{who}"
    );

    // Another user's socket, named with its process (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH).
    let mut listener = spawn(
        d.nsenter_as(NOBODY)
            .args([
                "python3",
                "-c",
                "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', 7070)); s.listen(); \
                 print('ready', flush=True); sys.stdin.read()",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    assert_eq!(first_line(&mut listener).trim(), "ready");
    let who = json(&in_daemon_ns(&["--json", "who", "7070"]));
    assert_eq!(who["sockets"][0]["uid"], NOBODY, "{who}");
    assert!(
        who["sockets"][0]["pid"].as_u64().is_some(),
        "the process behind another user's socket is not named: {who}"
    );
    let _ = listener.kill();
    let _ = listener.wait();

    // A client in another network namespace is served there (setns: CAP_SYS_ADMIN).
    let other = Netns::new();
    let out = run(other
        .nsenter_as(0)
        .arg(BIN)
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0")
        .args(["run", "--start", "7000", "--", "true"]));
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let log = d.log();
    assert!(!log.contains("Operation not permitted"), "{log}");
}

/// The shipped units pass `systemd-analyze verify`, and the service's exposure stays what the
/// README records (`systemd-analyze security --offline`, at most 5.5 of 10).
#[test]
fn the_units_verify_and_their_exposure_is_bounded() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    // The unit names the installed binary; verify checks it exists: point it at the one built.
    let service = service_unit().replace("/usr/bin/portres", BIN);
    std::fs::write(dir.path().join("portres.service"), service).unwrap();
    std::fs::copy(
        contrib.join("portres.socket"),
        dir.path().join("portres.socket"),
    )
    .unwrap();
    let out = run(std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("portres.service"))
        .arg(dir.path().join("portres.socket")));
    assert!(out.status.success(), "systemd-analyze verify: {out:?}");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        !complaints.contains("portres.service") && !complaints.contains("portres.socket"),
        "systemd-analyze verify complains about the units: {complaints}"
    );
    let out = run(std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=55", "--no-pager"])
        .arg(dir.path().join("portres.service")));
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(out.status.success(), "exposure above 5.5: {overall}");
    assert!(
        overall.contains("portres.service: 5.") || overall.contains(": 4."),
        "{overall}"
    );
}

/// Completions and man pages come from the same definition as `--help`: every long flag of
/// `persistent add --help` is in its man page and in each shell's completions. Needs nothing
/// (no daemon).
#[test]
fn completions_and_man_pages_follow_the_help() {
    let help = run(std::process::Command::new(BIN).args(["persistent", "add", "--help"]));
    let help = String::from_utf8(help.stdout).unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .collect();
    assert!(
        flags.contains(&"--allow-user") && flags.contains(&"--netns"),
        "{help}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = run(std::process::Command::new(BIN)
        .args(["--json", "man", "--dir"])
        .arg(dir.path()));
    assert!(out.status.success(), "{out:?}");
    let pages = json(&out)["pages"].clone();
    for page in [
        "portres.1",
        "portres-persistent-add.1",
        "portres-who.1",
        "portres-completions.1",
    ] {
        assert!(
            pages.as_array().unwrap().iter().any(|p| p == page),
            "{pages}"
        );
    }
    // Internal commands have none.
    assert!(!dir.path().join("portres-keeper.1").exists());
    let man = std::fs::read_to_string(dir.path().join("portres-persistent-add.1")).unwrap();
    // roff escapes '-' as '\-'.
    let man = man.replace("\\-", "-");
    for f in &flags {
        assert!(man.contains(f), "{f} missing from the man page");
    }

    for shell in ["bash", "zsh", "fish"] {
        let out = run(std::process::Command::new(BIN).args(["completions", shell]));
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("persistent"), "{shell}");
        for f in &flags {
            let bare = f.trim_start_matches("--");
            assert!(
                text.contains(bare),
                "{f} missing from the {shell} completions"
            );
        }
    }
    let out = run(std::process::Command::new(BIN).args(["completions", "tcsh"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values"),
        "{out:?}"
    );
}

/// `portres metrics` and `metrics_listen`'s `/metrics` give the same families, which the
/// Prometheus project's own parsers accept (OpenMetrics, and the classic text format that
/// node_exporter's textfile collector reads), and they count what happened.
#[test]
fn metrics_are_served_and_parse() {
    // Before re-running in a namespace (which has no network for pip).
    let py = test_python();
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config("metrics_listen = \"127.0.0.1:9642\"\n");
    let c = d.client();
    let writes_count = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("portres_store_write_duration_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let writes_before = writes_count(&c.metrics().unwrap());
    let r = c.acquire(portres_client::Protocol::Tcp, 4).unwrap();
    let refused = c.acquire_at(
        portres_client::Protocol::Tcp,
        u32::from(r.range().start()),
        1,
    );
    assert!(refused.is_err());
    let out = run(d
        .cli()
        .args(["persistent", "add", "--start", "7000", "--mode", "hold"]));
    assert!(out.status.success(), "{out:?}");

    let parse = |mut cmd: std::process::Command| {
        let out = run(&mut cmd);
        assert!(out.status.success(), "{out:?}");
        json(&out)
    };
    let mut scrape = d.nsenter();
    scrape
        .arg(py)
        .arg(world_readable("scrape_metrics.py"))
        .arg("http://127.0.0.1:9642/metrics");
    let http = parse(scrape);
    assert_eq!(http["status"], 200);
    assert!(
        http["content_type"]
            .as_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{http}"
    );
    let text = run(d.cli().arg("metrics"));
    assert!(text.status.success());
    let mut from_stdin = std::process::Command::new(py);
    from_stdin.arg(world_readable("scrape_metrics.py")).arg("-");
    let cli = {
        let mut child = spawn(
            from_stdin
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&text.stdout).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        json(&out)
    };
    let names = |v: &serde_json::Value| {
        let mut n: Vec<String> = v["families"].as_object().unwrap().keys().cloned().collect();
        n.sort();
        n
    };
    assert_eq!(names(&http), names(&cli));
    assert!(!http["classic"].as_array().unwrap().is_empty());

    let f = &http["families"];
    let value = |family: &str, labels: &[(&str, &str)]| -> f64 {
        f[family]["samples"]
            .as_array()
            .unwrap_or_else(|| panic!("no family {family}: {f}"))
            .iter()
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s[1].get(*k).and_then(|x| x.as_str()) == Some(*v))
            })
            .map(|s| s[2].as_f64().unwrap())
            .sum()
    };
    assert_eq!(f["portres_requests"]["type"], "counter");
    assert!(
        value(
            "portres_requests",
            &[("operation", "acquire"), ("outcome", "ok")]
        ) >= 1.0
    );
    assert!(
        value(
            "portres_requests",
            &[("operation", "acquire"), ("outcome", "AddressInUse")]
        ) >= 1.0,
        "{f}"
    );
    assert_eq!(
        value(
            "portres_reservations",
            &[("kind", "runtime"), ("mode", "hold")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "portres_reserved_ports",
            &[("kind", "runtime"), ("protocol", "tcp")]
        ),
        4.0
    );
    assert_eq!(
        value(
            "portres_reservations",
            &[("kind", "persistent"), ("mode", "hold")]
        ),
        1.0
    );
    assert_eq!(value("portres_held_ports", &[]), 5.0);
    assert!(value("portres_sessions", &[]) >= 1.0);
    assert_eq!(value("portres_layer_up", &[("layer", "hold")]), 1.0);
    assert_eq!(value("portres_layer_up", &[("layer", "deny")]), 0.0);
    assert_eq!(
        f["portres_store_write_duration_seconds"]["type"],
        "histogram"
    );
    let writes_after = writes_count(&String::from_utf8_lossy(&text.stdout));
    assert_eq!(
        writes_after,
        writes_before + 1.0,
        "the persistent add's store write is counted"
    );
    assert_eq!(f["portres_request_duration_seconds"]["type"], "histogram");

    // Only /metrics.
    let out = run(d.nsenter().args([
        "python3",
        "-c",
        "import urllib.request, urllib.error\n\
         try:\n    urllib.request.urlopen('http://127.0.0.1:9642/other')\n\
         except urllib.error.HTTPError as e:\n    print(e.code)",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "404");
    let st = json(&run(d.cli().args(["--json", "status"])));
    assert_eq!(st["metrics"], "http://127.0.0.1:9642/metrics");
}

/// A metrics address the daemon cannot listen on (not an address of this host): the daemon
/// still starts, and `status` says why the metrics are not served.
#[test]
fn an_unusable_metrics_address_does_not_stop_the_daemon() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    // 192.0.2.1 (TEST-NET-1) is on no interface of the daemon's namespace.
    let d = TestDaemon::with_config("metrics_listen = \"192.0.2.1:9642\"\n");
    let st = json(&run(d.cli().args(["--json", "status"])));
    let m = st["metrics"].as_str().unwrap();
    assert!(
        m.starts_with("NOT SERVED") && m.contains("192.0.2.1:9642"),
        "{st}"
    );
    assert!(d.client().status().is_ok());
}

/// A daemon on a listening socket the test holds and passes to each daemon it starts
/// (`LISTEN_FDS`), as systemd's `portres.socket` does across restarts.
struct Activated {
    ns: Netns,
    dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    state: std::path::PathBuf,
    config: std::path::PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl Activated {
    fn new(config: &str) -> Activated {
        let ns = Netns::new();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("portres.sock");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        Activated {
            listener: std::os::unix::net::UnixListener::bind(&socket).unwrap(),
            state: dir.path().join("state"),
            config: config_path,
            socket,
            ns,
            dir,
        }
    }

    /// Starts a daemon on the socket; returns once it said READY.
    fn start(&self) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut child = spawn(
            self.ns
                .nsenter_as(0)
                .args([
                    "sh",
                    "-c",
                    "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=portres exec \"$0\" daemon \
                     --print-ready --state-dir \"$1\" --config \"$2\" 3<&0 0</dev/null",
                ])
                .arg(BIN)
                .arg(&self.state)
                .arg(&self.config)
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(
                    self.listener.try_clone().unwrap(),
                )))
                .stdout(Stdio::piped())
                .stderr(log),
        );
        assert_eq!(first_line(&mut child).trim(), "READY", "{}", self.log());
        child
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Pids of keepers started for a socket-activated daemon of this state directory.
    fn keepers(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.iter().any(|a| a == "keeper")
                    && args.iter().any(|a| a == "--activated")
                    && args.iter().any(|a| Path::new(a) == self.state)
            }) {
                out.push(pid);
            }
        }
        out
    }

    /// `portres daemon --stop` on the socket.
    fn stop(&self, mut child: std::process::Child) {
        let out = run(std::process::Command::new(BIN)
            .env("PORTRES_SOCKET", &self.socket)
            .env("PORTRES_AUTOSTART", "0")
            .args(["daemon", "--stop"]));
        assert!(out.status.success(), "{out:?}");
        assert!(child.wait().unwrap().success());
    }
}

/// Live restore with the socket held by the service manager across the restart (as
/// `portres.socket` does): the socket accepts while no daemon runs, and the keeper must not
/// take that for a daemon that did not find it (it would give every runtime reservation up).
#[test]
fn live_restore_survives_a_restart_under_socket_activation() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let a = Activated::new("namespaces = \"daemon\"\ndeny = false\n");
    let mut first = a.start();
    let c = portres_client::Client::connect_to(&a.socket).unwrap();
    let r = c.acquire(portres_client::Protocol::Tcp, 3).unwrap();
    let token = r.token().to_string();
    signal(first.id(), rustix::process::Signal::TERM);
    assert!(first.wait().unwrap().success());
    // The keeper checks for a successor every second: a keeper that took the socket's answer
    // for a daemon would be gone by now.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(a.keepers().len(), 1, "the keeper gave up:\n{}", a.log());
    let second = a.start();
    let status = c.status().unwrap();
    let restore = status.restore.unwrap();
    assert!(
        restore.restored && restore.kept >= 1,
        "{restore:?}\n{}",
        a.log()
    );
    assert!(
        c.show()
            .unwrap()
            .reservations
            .iter()
            .any(|x| x.token.as_deref() == Some(token.as_str())),
        "the reservation did not survive"
    );
    drop(r);
    drop(c);
    a.stop(second);
}

/// A keeper whose grace runs out while a daemon runs that never reached it (here: its socket
/// file was removed) leaves that daemon's sysctl entries alone: under socket activation the
/// socket cannot say whether a daemon runs, the store's lock does.
#[test]
fn an_expiring_keeper_leaves_a_running_daemon_alone() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let a = Activated::new("namespaces = \"daemon\"\ndeny = false\nlive_restore_secs = 1\n");
    let mut first = a.start();
    let c = portres_client::Client::connect_to(&a.socket).unwrap();
    c.create_persistent(&portres_client::PersistentSpec::new(
        portres_client::Protocol::Tcp,
        7100,
        1,
    ))
    .unwrap();
    drop(c);
    signal(first.id(), rustix::process::Signal::TERM);
    assert!(first.wait().unwrap().success());
    let old = a.keepers();
    assert_eq!(old.len(), 1, "{}", a.log());
    std::fs::remove_file(a.dir.path().join("portres.sock.keeper")).unwrap();
    let second = a.start();
    wait_until(
        "the old keeper's grace to run out",
        Duration::from_secs(30),
        || !std::path::Path::new(&format!("/proc/{}", old[0])).exists(),
    );
    assert!(
        a.log()
            .contains("a daemon runs with this state directory without this keeper"),
        "{}",
        a.log()
    );
    assert!(
        a.ns.reserved_ports().contains("7100"),
        "{}",
        a.ns.reserved_ports()
    );
    a.stop(second);
}
