//! The C ABI (`libportres`, `include/portres.h`) from C, C++ and Python, against a real daemon.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The directory with `libportres.so` and `libportres.a`. `cargo test` builds only the Rust
/// form of the portres-capi library, so the C forms are built here, once, with the cargo that
/// runs the tests (it does not hold the build lock while tests run).
fn lib_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(BIN).parent().unwrap().to_path_buf();
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "-p", "portres-capi"]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let out = run(&mut build);
            assert!(
                out.status.success(),
                "building libportres: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(dir.join("libportres.so").exists() && dir.join("libportres.a").exists());
            dir
        })
        .clone()
}

/// Compiles C sources against the shared library; returns the executable.
fn cc(d: &TestDaemon, name: &str, src: &str) -> PathBuf {
    let lib = lib_dir();
    let exe = d.dir.path().join(name);
    let out = run(Command::new("cc")
        .args([
            "-std=c99",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
        ])
        .arg(repo("include"))
        .arg("-o")
        .arg(&exe)
        .arg(repo(src))
        .arg("-L")
        .arg(&lib)
        .args(["-lportres", "-lpthread"])
        .arg(format!("-Wl,-rpath,{}", lib.display())));
    assert!(
        out.status.success(),
        "cc {src}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn run_in_netns(d: &TestDaemon, exe: &Path, args: &[&str]) -> std::process::Output {
    run(d
        .nsenter()
        .arg(exe)
        .args(args)
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"))
}

#[test]
fn c_program_checks_every_error_path_and_the_whole_api() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let exe = cc(&d, "capi_test", "tests/it/c/capi_test.c");
    let out = run_in_netns(&d, &exe, &["49010", "50000"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", d.log());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0 failures",
        "{stderr}"
    );
    // Everything the program acquired ended with it.
    let show = d.client().show().unwrap();
    assert!(
        show.reservations.iter().all(|r| r.kind == "persistent"),
        "{show:?}"
    );
}

#[test]
fn example_program_acquires_binds_and_releases() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let exe = cc(&d, "reserve", "examples/reserve.c");
    let out = run_in_netns(&d, &exe, &[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let (a, b) = lines
        .next()
        .unwrap()
        .strip_prefix("reserved ")
        .unwrap()
        .split_once('-')
        .unwrap();
    let (a, b): (u16, u16) = (a.parse().unwrap(), b.parse().unwrap());
    let port: u16 = lines
        .next()
        .unwrap()
        .strip_prefix("bound port ")
        .unwrap()
        .parse()
        .unwrap();
    assert!((a..=b).contains(&port), "{text}");
    assert_eq!(lines.next(), Some("released"));

    // The static library links too.
    let lib = lib_dir();
    let static_exe = d.dir.path().join("reserve-static");
    let out = run(Command::new("cc")
        .args(["-std=c99", "-D_DEFAULT_SOURCE", "-I"])
        .arg(repo("include"))
        .arg("-o")
        .arg(&static_exe)
        .arg(repo("examples/reserve.c"))
        .arg(lib.join("libportres.a"))
        .args(["-lpthread", "-ldl", "-lm"]));
    assert!(
        out.status.success(),
        "static link: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run_in_netns(&d, &static_exe, &[]).status.success());
}

#[test]
fn header_compiles_as_cpp() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let out = run(Command::new("g++")
        .args([
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(repo("include"))
        .arg(repo("tests/it/c/header_cpp.cpp")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_ctypes_calls_the_persistent_functions() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let script = r#"
import ctypes, socket, sys
lib = ctypes.CDLL(sys.argv[1])
for f in ("CreatePersistentTcpPortReservation", "LookupPersistentTcpPortReservation",
          "CreatePersistentUdpPortReservation", "LookupPersistentUdpPortReservation"):
    getattr(lib, f).argtypes = [ctypes.c_uint16, ctypes.c_uint16, ctypes.POINTER(ctypes.c_uint64)]
    getattr(lib, f).restype = ctypes.c_uint32
for f in ("DeletePersistentTcpPortReservation", "DeletePersistentUdpPortReservation"):
    getattr(lib, f).argtypes = [ctypes.c_uint16, ctypes.c_uint16]
    getattr(lib, f).restype = ctypes.c_uint32
token, found = ctypes.c_uint64(), ctypes.c_uint64()
assert lib.CreatePersistentTcpPortReservation(socket.htons(50000), 10, ctypes.byref(token)) == 0
assert token.value != 0
assert lib.LookupPersistentTcpPortReservation(socket.htons(50000), 10, ctypes.byref(found)) == 0
assert found.value == token.value
assert lib.LookupPersistentUdpPortReservation(socket.htons(50000), 10, ctypes.byref(found)) == 1168
assert lib.CreatePersistentUdpPortReservation(socket.htons(50000), 10, ctypes.byref(found)) == 0
assert lib.DeletePersistentUdpPortReservation(socket.htons(50000), 10) == 0
print(token.value)
"#;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(lib_dir().join("libportres.so"))
        .env("PORTRES_SOCKET", &d.socket)
        .env("PORTRES_AUTOSTART", "0"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // StartPort was passed as htons(50000): the reservation is on port 50000.
    let c = d.client();
    assert_eq!(
        c.lookup_persistent(portres_client::Protocol::Tcp, 50000, 10)
            .unwrap()
            .get(),
        token
    );
}

#[test]
fn the_c_library_carries_its_reservation_across_a_daemon_restart() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let exe = cc(&d, "restart_test", "tests/it/c/restart_test.c");
    let mut child = spawn(
        d.nsenter()
            .arg(&exe)
            .env("PORTRES_SOCKET", &d.socket)
            .env("PORTRES_AUTOSTART", "0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let port: u16 = first_line(&mut child).parse().unwrap();
    assert!(d.terminate().success());
    d.launch();
    // Carried over, and still held while the program has not come back yet.
    let show = d.client().show().unwrap();
    assert!(
        show.reservations.iter().any(|r| r.start == port),
        "{show:?}"
    );
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    wait_until(
        "the released block to end",
        std::time::Duration::from_secs(5),
        || d.client().show().unwrap().reservations.is_empty(),
    );
}
