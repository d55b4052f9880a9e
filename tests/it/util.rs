//! Test harness: a daemon in a private network namespace on a temporary socket, and helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use portres_client::Client;

/// The `portres` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_portres");

/// uid/gid of `nobody`.
pub const NOBODY: u32 = 65534;

/// What a test of `needs_root` needs beyond an ordinary user.
#[derive(Debug, Clone, Copy)]
pub enum Needs {
    /// Root of a user + network namespace of its own (`unshare -Urn`) is enough.
    Namespace,
    /// A second uid (`nobody`), which an unprivileged user namespace cannot map.
    SecondUid,
    /// Root on the host, for the reason given.
    HostRoot(&'static str),
}

/// Called first by every test of `needs_root`. As root (on the host, or of the user namespace
/// this runs in): false, the test runs here. As an ordinary user: with `Needs::Namespace`, runs
/// this one test again as root of a user + network + mount namespace of its own (`unshare
/// --user --map-root-user --net --mount`) and fails if it fails there; otherwise says on standard error that
/// the test is skipped and why (CI runs every test as root). True: the test is done.
pub fn run_elsewhere(needs: Needs) -> bool {
    use std::io::Write;
    if rustix::process::geteuid().as_raw() == 0 {
        return false;
    }
    let name = std::thread::current().name().unwrap_or("?").to_string();
    let skip = |why: &str| {
        // Past the test harness's capture: the user sees it.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {name}: {why}; it runs as root (in CI: `sudo cargo test --workspace`)"
        );
        true
    };
    match needs {
        Needs::SecondUid => {
            return skip(
                "it needs a second uid (nobody), which a user namespace made without root \
                 cannot map",
            );
        }
        Needs::HostRoot(why) => return skip(&format!("it needs root on the host: {why}")),
        Needs::Namespace => {}
    }
    let mut again = Command::new("unshare");
    again
        .args(["--user", "--map-root-user", "--net", "--mount", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            name.as_str(),
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env_remove("RUST_TEST_THREADS");
    if PYTHON_READY.load(std::sync::atomic::Ordering::Acquire) {
        again.env("PORTRES_TEST_PYTHON_READY", "1");
    }
    let out = again.output().expect("run unshare(1)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name}, run as root of a user + network namespace of its own (unshare -Urn), \
         failed:\n{text}"
    );
    true
}

pub fn require_root() {
    let euid = rustix::process::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test needs root: it runs the daemon in a private network namespace (unshare -n), \
         enters it with setns(2), and runs clients as uid {NOBODY}; run the suite as root"
    );
}

/// A daemon on a temporary socket, in its own network namespace; stopped (SIGTERM) on drop.
///
/// The namespace is kept by a `sleep` process (`unshare -n`, loopback up), so it outlives the
/// daemon: restarts happen in the same namespace, and what the daemon leaves behind in it (the
/// sysctl) can be read after it stops.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub child: Option<Child>,
    pub pid: u32,
    /// The daemon's open-file limit (soft and hard), when the test sets one.
    pub nofile: Option<u32>,
    /// The uid (and gid) the daemon runs as, when not root: a per-user daemon.
    pub user: Option<u32>,
    /// Extra environment for the daemon (applied at each launch).
    pub env: Vec<(String, String)>,
    /// A command the daemon runs under (e.g. `setpriv ... --`), placed before the binary.
    pub wrapper: Vec<String>,
    netns: Child,
    /// A process in the namespace, for `/proc/PID/ns/net`.
    pub ns_pid: u32,
}

/// Starts `sleep` in a new network namespace with loopback up, after running `setup` (shell)
/// there.
fn new_netns(setup: &str) -> Child {
    let mut child = Command::new("unshare");
    child
        .args(["-n", "--", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && {setup} echo ready && exec sleep 1000000"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = spawn(&mut child);
    let line = first_line(&mut child);
    assert_eq!(line.trim(), "ready", "network namespace setup failed");
    child
}

/// A network namespace of its own (loopback up), kept by a `sleep` process; gone when dropped
/// (the process killed), once nothing else holds it.
pub struct Netns {
    child: Child,
    /// The process that keeps it, for `/proc/PID/ns/net`.
    pub pid: u32,
}

impl Netns {
    pub fn new() -> Netns {
        let child = new_netns("");
        Netns {
            pid: child.id(),
            child,
        }
    }

    /// The namespace's inode (`net:[INODE]`).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{}/ns/net", self.pid))
            .unwrap()
            .ino()
    }

    /// A command prefix that runs in this namespace as `uid` (and gid `uid`).
    pub fn nsenter_as(&self, uid: u32) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.pid))
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={uid}"))
            .arg("--");
        c
    }

    /// The namespace's `net.ipv4.ip_local_reserved_ports`.
    pub fn reserved_ports(&self) -> String {
        let out = run(self
            .nsenter_as(0)
            .args(["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Kills the process that keeps it.
    pub fn remove(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestDaemon {
    pub fn start() -> TestDaemon {
        Self::with_config("")
    }

    /// Starts a daemon whose configuration file holds `config` (TOML).
    pub fn with_config(config: &str) -> TestDaemon {
        Self::with_setup(config, "")
    }

    /// Starts a daemon whose open-file limit is `nofile`.
    pub fn with_nofile(nofile: u32) -> TestDaemon {
        Self::build("", "", Some(nofile))
    }

    /// Starts a daemon with extra environment variables.
    pub fn with_env(env: &[(&str, &str)]) -> TestDaemon {
        Self::build_as("", "", None, None, env)
    }

    /// Starts a per-user daemon running as `uid` (no capabilities: no holder uid, no sysctl, no
    /// eBPF), with its socket and state in a directory that `uid` owns. eBPF is turned off for it
    /// explicitly (`PORTRES_FAILPOINT=no-ebpf`), as where unprivileged BPF is disabled, so the
    /// result does not depend on this machine's `kernel.unprivileged_bpf_disabled`.
    pub fn as_user(uid: u32) -> TestDaemon {
        Self::as_user_with_config(uid, "")
    }

    /// [`TestDaemon::as_user`] with a configuration file holding `config`.
    pub fn as_user_with_config(uid: u32, config: &str) -> TestDaemon {
        Self::build_as(
            config,
            "",
            None,
            Some(uid),
            &[("PORTRES_FAILPOINT", "no-ebpf")],
        )
    }

    /// Starts a daemon with a configuration file holding `config`, run under `wrapper` (a
    /// command prefix such as `setpriv ... --`).
    pub fn with_wrapper(config: &str, wrapper: &[&str]) -> TestDaemon {
        Self::build_full(config, "", None, None, &[], wrapper)
    }

    /// Starts a daemon after running `setup` (shell, ending in `&&` or `;`) in its namespace.
    pub fn with_setup(config: &str, setup: &str) -> TestDaemon {
        Self::build(config, setup, None)
    }

    fn build(config: &str, setup: &str, nofile: Option<u32>) -> TestDaemon {
        Self::build_as(config, setup, nofile, None, &[])
    }

    fn build_as(
        config: &str,
        setup: &str,
        nofile: Option<u32>,
        user: Option<u32>,
        env: &[(&str, &str)],
    ) -> TestDaemon {
        Self::build_full(config, setup, nofile, user, env, &[])
    }

    fn build_full(
        config: &str,
        setup: &str,
        nofile: Option<u32>,
        user: Option<u32>,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> TestDaemon {
        require_root();
        let netns = new_netns(setup);
        let dir = tempfile::tempdir().unwrap();
        // Traversable by `nobody`, like /run/portres.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config_path = dir.path().join("config.toml");
        // The deny layer attaches programs to the machine's cgroup2 root: only the tests of
        // `needs_root::deny` (which say `deny = true`) turn it on.
        let mut config = if config.contains("deny") {
            config.to_string()
        } else {
            format!("deny = false\n{config}")
        };
        // Test clients run in the host's namespace and their daemons in private ones: served
        // in the daemon's namespace, so that no test touches the host's port tables. Only the
        // tests of `needs_root::namespaces` (which say `namespaces = "client"`) serve each
        // client in its own.
        if !config
            .lines()
            .any(|l| l.trim_start().starts_with("namespaces"))
        {
            config = format!("namespaces = \"daemon\"\n{config}");
        }
        std::fs::write(&config_path, config).unwrap();
        if let Some(uid) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let mut d = TestDaemon {
            socket: dir.path().join("portres.sock"),
            state_dir: dir.path().join("state"),
            config: Some(config_path),
            dir,
            child: None,
            pid: 0,
            nofile,
            user,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            ns_pid: netns.id(),
            netns,
        };
        d.launch();
        d
    }

    /// A command prefix that runs in the daemon's network namespace as `uid` (and gid `uid`).
    pub fn nsenter_as(&self, uid: u32) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.ns_pid))
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={uid}"))
            .arg("--");
        c
    }

    /// The adversary (`tests/it/adversary.py`) in the daemon's namespace, as `uid`.
    pub fn adversary(&self, uid: u32) -> Command {
        let mut c = self.nsenter_as(uid);
        c.arg("python3").arg(world_readable("adversary.py"));
        c
    }

    /// The raw-protocol client as `uid` (in the host namespace; only the Unix socket matters).
    pub fn raw_client_as(&self, uid: u32) -> Command {
        let mut c = Command::new("python3");
        c.arg(world_readable("raw_client.py"))
            .arg(&self.socket)
            .uid(uid)
            .gid(uid);
        c
    }

    /// A command prefix that runs in the daemon's network namespace (as root).
    pub fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.ns_pid))
            .arg("--");
        c
    }

    /// The namespace's `net.ipv4.ip_local_reserved_ports`.
    pub fn reserved_ports(&self) -> String {
        let out = run(self
            .nsenter()
            .args(["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Starts (again) on the same socket and state directory, in the same network namespace.
    pub fn launch(&mut self) {
        if let Err(why) = self.try_launch() {
            panic!("daemon did not start; log:\n{why}");
        }
    }

    /// [`TestDaemon::launch`], returning the daemon's log when it does not get ready (it
    /// exited: e.g. it refused a damaged store).
    pub fn try_launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = match self.user {
            Some(uid) => self.nsenter_as(uid),
            None => self.nsenter(),
        };
        if let Some(n) = self.nofile {
            cmd.arg("prlimit")
                .arg(format!("--nofile={n}:{n}"))
                .arg("--");
        }
        // Another user cannot reach the build directory (it may be under a private directory):
        // a per-user daemon runs the world-readable copy.
        let bin: &Path = match self.user {
            Some(_) => nobody_binary(),
            None => Path::new(BIN),
        };
        cmd.args(&self.wrapper);
        cmd.arg(bin)
            .arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--print-ready");
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("PORTRES_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = spawn(&mut cmd);
        let line = first_line(&mut child);
        if line.trim() != "READY" {
            let _ = child.wait();
            return Err(self.log());
        }
        self.pid = child.id(); // nsenter (and prlimit) exec the daemon in place
        self.child = Some(child);
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        match self.user {
            // Root reaching another user's daemon on purpose: trust that user explicitly.
            Some(uid) => Client::connect_trusting(&self.socket, &[0, uid]),
            None => Client::connect_to(&self.socket),
        }
        .expect("connect to test daemon")
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The keeper processes of this daemon (live restore), found by their state directory.
    pub fn keeper_pids(&self) -> Vec<u32> {
        let want = self.state_dir.display().to_string();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().any(|a| a == "keeper") && args.iter().any(|a| a == &want) {
                pids.push(pid);
            }
        }
        pids
    }

    /// `portres daemon --stop`: a stop meant as a stop (everything released, the sysctl
    /// restored, the keeper gone); waits until the daemon has exited.
    pub fn stop(&mut self) {
        let out = run(self.cli().args(["daemon", "--stop"]));
        assert!(out.status.success(), "daemon --stop: {out:?}");
        let mut child = self.child.take().expect("running");
        assert!(child.wait().unwrap().success(), "log:\n{}", self.log());
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), rustix::process::Signal::TERM);
        child.wait().unwrap()
    }

    /// A `portres` command aimed at this daemon, never autostarting.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("PORTRES_SOCKET", &self.socket)
            .env("PORTRES_AUTOSTART", "0")
            .env_remove("PORTRES_STATE_DIR");
        c
    }

    /// The same as `nobody`, using a copy of the binary that `nobody` can execute.
    pub fn cli_as_nobody(&self) -> Command {
        let bin = nobody_binary();
        let mut c = Command::new(bin);
        c.env("PORTRES_SOCKET", &self.socket)
            .env("PORTRES_AUTOSTART", "0")
            .env("HOME", "/nonexistent")
            .current_dir("/")
            .uid(NOBODY)
            .gid(NOBODY); // std drops the supplementary groups when root sets a uid
        c
    }

    /// Runs `f` on a thread inside the daemon's network namespace (e.g. to bind a port there).
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let pid = self.ns_pid;
        std::thread::spawn(move || {
            portres_sys::process::enter_net_namespace_of(pid).expect("setns into daemon netns");
            f()
        })
        .join()
        .unwrap()
    }

    /// Binds `[::]:port` (dual-stack) in the daemon's namespace and keeps it bound.
    pub fn bind_tcp(&self, port: u16) -> OwnedFd {
        self.in_netns(move || {
            OwnedFd::from(std::net::TcpListener::bind(("::", port)).expect("bind in netns"))
        })
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- daemon log (last 40 lines) ---\n{}\n---",
                tail.join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            signal(child.id(), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
        // SIGTERM leaves the runtime reservations with the keeper for a successor: none comes.
        for pid in self.keeper_pids() {
            signal(pid, rustix::process::Signal::KILL);
        }
        // Nor does the deny layer's pinned programs' next daemon.
        let _ = portres_daemon::deny::cleanup(&self.state_dir);
        let _ = self.netns.kill();
        let _ = self.netns.wait();
    }
}

use std::os::unix::process::CommandExt;

/// A copy of a file of `tests/it/` that every user can read (see [`nobody_binary`]).
pub fn world_readable(name: &str) -> PathBuf {
    // One test at a time: two installing the same file race (`install` fails on EEXIST).
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    let dest = nobody_binary().parent().unwrap().join(name);
    if !dest.exists() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/it")
            .join(name);
        let out = run(Command::new("install")
            .args(["-m", "644"])
            .arg(src)
            .arg(&dest));
        assert!(out.status.success(), "install {name}: {out:?}");
    }
    dest
}

/// A copy of the binary under test in a directory every user can reach (the build directory
/// may be under a private home). Copied once, by `install(1)`: if this process held the file
/// open for writing, a concurrent fork in another test thread could inherit that descriptor and
/// make exec fail with ETXTBSY.
pub fn nobody_binary() -> &'static Path {
    static BIN_COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN_COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portres-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dest = dir.join("portres");
        let out = run(Command::new("install").args(["-m", "755", BIN]).arg(&dest));
        assert!(out.status.success(), "install the test binary: {out:?}");
        dest
    })
}

pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    let _ = rustix::process::kill_process(pid, sig);
}

/// Forks of this (multi-threaded) test process, against closes that must really close.
///
/// Between fork and exec a child holds copies of every descriptor of the process, close-on-exec
/// or not; a socket handed out by the daemon and dropped by a test at that moment stays open in
/// the child for a few microseconds, and the daemon rightly sees its port as still in use.
/// Spawning takes this lock shared (std's spawn returns after the child's exec); [`close`] takes
/// it exclusively.
static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Spawns a command (see [`FORKS`]).
pub fn spawn(cmd: &mut Command) -> Child {
    let _g = FORKS.read().unwrap_or_else(|p| p.into_inner());
    cmd.spawn().expect("spawn command")
}

/// Drops `x` (e.g. a handed-out socket) while no fork is in progress, so it is really closed.
pub fn close<T>(x: T) {
    let _g = FORKS.write().unwrap_or_else(|p| p.into_inner());
    drop(x);
}

/// The first line a child writes on its piped standard output, without the newline: the
/// "ready" handshake of helper processes (an event to wait on, never a sleep).
pub fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("read the child's first line");
    line.trim_end().to_string()
}

/// Runs a command, returning its output; panics if it could not run.
pub fn run(cmd: &mut Command) -> Output {
    let child = spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    child.wait_with_output().expect("run command")
}

/// Parses stdout as one JSON document.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits for `cond` to hold, checking until `limit` passes; panics with `what` otherwise.
/// For effects of another process that no reply orders (e.g. a killed client's session end).
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The raw-protocol client written in Python (`tests/it/raw_client.py`): proves the protocol
/// documentation suffices for another language, and lets a separate process send requests.
pub fn raw_client(socket: &Path) -> Command {
    let mut c = Command::new("python3");
    c.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/raw_client.py"
    ))
    .arg(socket);
    c
}

/// Python with `portpicker`, `pytest`, `pytest-xdist` (from PyPI) and this repository's
/// `python/` package, in a virtual environment under the target directory, made once per run
/// of the suite. Fails — never skips — when they cannot be installed (the tests that use it
/// need them; `.ci/run` has the registries).
pub fn test_python() -> &'static Path {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
        let py = dir.join("bin/python");
        // Made ready by the process that re-ran this test in a namespace (which has no network).
        if std::env::var_os("PORTRES_TEST_PYTHON_READY").is_some() {
            return py;
        }
        // One process at a time (test processes of `cargo nextest` run side by side).
        let lock = std::fs::File::create(dir.with_extension("lock")).unwrap();
        portres_sys::process::lock_exclusive(&lock).unwrap();
        let has = |py: &Path| {
            Command::new(py)
                .args([
                    "-c",
                    "import portpicker, pytest, xdist, setuptools, wheel, prometheus_client",
                ])
                .status()
                .is_ok_and(|s| s.success())
        };
        let pip = |args: &[&str]| {
            let out = run(Command::new(dir.join("bin/pip"))
                .args(["--disable-pip-version-check", "-q"])
                .args(args));
            assert!(
                out.status.success(),
                "these tests need Python packages and could not install them (pip {args:?} \
                 into {}): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if !has(&py) {
            // Made anew (--clear): one left by another Python, or half made, is not reused.
            let out = run(Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&dir));
            assert!(out.status.success(), "python3 -m venv failed: {out:?}");
            pip(&[
                "install",
                "portpicker==1.6.0",
                "pytest>=7",
                "pytest-xdist>=3",
                "setuptools>=61",
                "wheel",
                // The Prometheus project's own parser, for the metrics tests.
                "prometheus-client>=0.17",
            ]);
        }
        // This repository's package, as a user installs it (`pip install ./python`), from a
        // copy (a build leaves files in the directory it builds).
        let copy = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("python-src-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&copy);
        let out = run(Command::new("cp")
            .arg("-r")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
            .arg(&copy));
        assert!(out.status.success(), "copying python/: {out:?}");
        let _ = std::fs::remove_dir_all(copy.join("build"));
        pip(&[
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--force-reinstall",
            copy.to_str().unwrap(),
        ]);
        let _ = std::fs::remove_dir_all(&copy);
        // Readable by `nobody` too.
        let _ = run(Command::new("chmod").args(["-R", "a+rX"]).arg(&dir));
        drop(lock);
        PYTHON_READY.store(true, std::sync::atomic::Ordering::Release);
        py
    })
}

/// The virtual environment of [`test_python`] is ready in this process.
static PYTHON_READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
