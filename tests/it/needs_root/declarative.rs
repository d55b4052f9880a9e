//! Declarative reservations: files of `reservations_dir`, applied at start and by `portres
//! apply`; all or nothing; reservations made by requests never touched.

use std::path::Path;
use std::process::Stdio;

use crate::util::*;

/// A daemon whose `reservations_dir` is `files` (made first, so the daemon applies them at
/// start).
fn daemon_with_files(files: &[(&str, &str)]) -> (TestDaemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), files);
    let d = TestDaemon::with_config(&format!(
        "reservations_dir = \"{}\"\n",
        dir.path().display()
    ));
    (d, dir)
}

fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn show(d: &TestDaemon) -> serde_json::Value {
    json(&run(d.cli().args(["--json", "show"])))
}

/// `show --json` without times (for comparing before and after).
fn reservations(d: &TestDaemon) -> Vec<serde_json::Value> {
    let mut all = show(d)["reservations"].as_array().unwrap().clone();
    for r in &mut all {
        r.as_object_mut().unwrap().remove("created");
    }
    all
}

fn find<'a>(rows: &'a [serde_json::Value], proto: &str, start: u64) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["protocol"] == proto && r["start"] == start)
        .unwrap_or_else(|| panic!("no {proto} {start} in {rows:?}"))
}

fn apply(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    run(d.cli().arg("apply").args(args))
}

const WEB: &str = "# the web tier\n\
    [[reservation]]\n\
    ports = 8443\n\
    users = [\"nobody\"]\n\
    description = \"nginx TLS\"\n\
    \n\
    [[reservation]]\n\
    protocol = \"udp\"\n\
    ports = \"9000-9009\"\n\
    mode = \"hold\"\n";

#[test]
fn files_apply_at_start_and_are_marked_beside_api_reservations() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[("web.toml", WEB)]);
    let web = dir.path().join("web.toml").display().to_string();
    // An administrator's reservation made by a request, beside them.
    let out = run(d.cli().args(["persistent", "add", "--start", "7000"]));
    assert!(out.status.success(), "{out:?}");

    let rows = reservations(&d);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let tls = find(&rows, "tcp", 8443);
    assert_eq!(tls["source"], "file");
    assert_eq!(tls["file"], web.as_str());
    assert_eq!(tls["description"], "nginx TLS");
    assert_eq!(tls["mode"], "exclude");
    assert_eq!(tls["allow_users"][0], "nobody");
    let udp = find(&rows, "udp", 9000);
    assert_eq!(
        (udp["count"].as_u64(), &udp["mode"]),
        (Some(10), &"hold".into())
    );
    assert!(udp["description"].is_null());
    let api = find(&rows, "tcp", 7000);
    assert_eq!(api["source"], "api");
    assert!(api["file"].is_null());
    // Enforced by the kernel layers like any persistent reservation.
    let sysctl = d.reserved_ports();
    assert!(
        sysctl.contains("8443") && sysctl.contains("9000-9009"),
        "{sysctl}"
    );

    // `who` and `show` say why and where from.
    let who = String::from_utf8(run(d.cli().args(["who", "8443"])).stdout).unwrap();
    assert!(
        who.contains("why: nginx TLS") && who.contains(&format!("declared in {web}")),
        "{who}"
    );
    let text = String::from_utf8(run(d.cli().arg("show")).stdout).unwrap();
    assert!(text.contains("why: nginx TLS"), "{text}");
    let st = json(&run(d.cli().args(["--json", "status"])));
    assert_eq!(st["declared"]["reservations"], 2, "{st}");
    assert!(st["declared"]["problem"].is_null());
}

#[test]
fn apply_adds_changes_and_removes_then_changes_nothing() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[("web.toml", WEB)]);
    let out = run(d.cli().args(["persistent", "add", "--start", "7000"]));
    assert!(out.status.success());
    let api_before = find(&reservations(&d), "tcp", 7000).clone();
    let tls_token = find(&reservations(&d), "tcp", 8443)["token"].clone();

    // Nothing to do yet.
    let out = apply(&d, &["--check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // The service the reservation is for has its port: a change of the entry still applies.
    let _service = d.bind_tcp(8443);
    // Change one entry (description and users), add a file, drop the UDP entry.
    write_files(
        dir.path(),
        &[
            (
                "web.toml",
                "[[reservation]]\nports = 8443\ndescription = \"nginx, TLS only\"\n",
            ),
            (
                "metrics.toml",
                "[[reservation]]\nports = \"9100-9101\"\nmode = \"hold\"\n",
            ),
        ],
    );
    let out = run(d.cli().args(["--json", "apply", "--check"]));
    assert_eq!(out.status.code(), Some(3), "a difference: exit 3; {out:?}");
    let diff = json(&out);
    let actions: Vec<(String, u64)> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_string(),
                c["start"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("change".to_string(), 8443),
            ("add".to_string(), 9100),
            ("remove".to_string(), 9000)
        ],
        "{diff}"
    );
    let change = &diff["changes"][0];
    assert!(change["file"].as_str().unwrap().ends_with("web.toml"));
    assert_eq!(change["line"], 1);
    assert!(change["before"].as_str().unwrap().contains("nginx TLS"));
    assert!(
        change["after"]
            .as_str()
            .unwrap()
            .contains("nginx, TLS only")
    );
    // --check changed nothing.
    assert!(d.reserved_ports().contains("9000-9009"));

    // Without --yes and no terminal: refused, nothing changed.
    let out = apply(&d, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --yes"),
        "{out:?}"
    );
    assert!(d.reserved_ports().contains("9000-9009"));

    let out = apply(&d, &["--yes"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("applied 3 changes"), "{text}");
    let rows = reservations(&d);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let tls = find(&rows, "tcp", 8443);
    assert_eq!(tls["description"], "nginx, TLS only");
    assert_eq!(tls["allow_users"].as_array().unwrap().len(), 0);
    assert_eq!(
        tls["token"], tls_token,
        "a changed reservation keeps its token"
    );
    assert_eq!(find(&rows, "tcp", 9100)["mode"], "hold");
    assert!(rows.iter().all(|r| r["start"] != 9000));
    let sysctl = d.reserved_ports();
    assert!(
        !sysctl.contains("9000") && sysctl.contains("9100-9101"),
        "{sysctl}"
    );

    // Idempotent: a second apply finds nothing, changes nothing.
    let before = reservations(&d);
    let out = apply(&d, &["--yes"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to apply"),
        "{out:?}"
    );
    assert_eq!(reservations(&d), before);

    // Every file gone: every reservation from files goes; the API's stays as it was.
    std::fs::remove_file(dir.path().join("web.toml")).unwrap();
    std::fs::remove_file(dir.path().join("metrics.toml")).unwrap();
    let out = apply(&d, &["--yes"]);
    assert!(out.status.success(), "{out:?}");
    let rows = reservations(&d);
    assert_eq!(rows, vec![api_before]);
}

#[test]
fn a_bad_file_changes_nothing_and_says_where() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[("web.toml", WEB)]);
    let out = run(d.cli().args(["persistent", "add", "--start", "7000"]));
    assert!(out.status.success());
    // Someone else's socket on 6000.
    let _busy = d.bind_tcp(6000);
    let before = reservations(&d);
    let sysctl = d.reserved_ports();
    let bad = dir.path().join("zz-bad.toml").display().to_string();
    let cases: &[(&str, &str, &str)] = &[
        ("[[reservation]\nports = 1\n", ":1:", ""),
        (
            "[[reservation]]\nports = 5000\ncolour = \"red\"\n",
            ":3:",
            "unknown field",
        ),
        ("[[reservation]]\nports = 0\n", ":1:", "not a port number"),
        ("[[reservation]]\nports = \"65535-65536\"\n", ":1:", "65536"),
        (
            "[[reservation]]\n\nports = 9005\nprotocol = \"udp\"\n",
            ":1:",
            "overlap",
        ),
        ("[[reservation]]\nports = 7000\n", ":1:", "7000"),
        ("[[reservation]]\nports = \"5999-6000\"\n", ":1:", "6000"),
        (
            "[[reservation]]\nports = 5000\nusers = [\"no-such-user-here\"]\n",
            ":1:",
            "no user",
        ),
    ];
    for (text, line, what) in cases {
        // A good change beside it must not be applied either.
        write_files(
            dir.path(),
            &[
                ("zz-bad.toml", text),
                ("good.toml", "[[reservation]]\nports = 5555\n"),
            ],
        );
        for args in [&["--yes"][..], &["--check"][..]] {
            let out = apply(&d, args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{text:?} {args:?}: {out:?}");
            let at = format!("{bad}{line}");
            assert!(err.contains(&at) && err.contains(what), "{text:?}: {err}");
            assert!(err.contains("nothing was changed"), "{err}");
        }
        assert_eq!(reservations(&d), before, "{text:?} changed something");
        assert_eq!(d.reserved_ports(), sysctl);
        let st = json(&run(d.cli().args(["--json", "status"])));
        assert!(st["declared"]["problem"].as_str().is_some(), "{st}");
    }
    std::fs::remove_file(dir.path().join("zz-bad.toml")).unwrap();
    let out = apply(&d, &["--yes"]);
    assert!(out.status.success(), "{out:?}");
    assert!(find(&reservations(&d), "tcp", 5555)["source"] == "file");
    let st = json(&run(d.cli().args(["--json", "status"])));
    assert!(st["declared"]["problem"].is_null(), "{st}");
}

/// Only administrators apply the files, or see their difference; metrics are for anyone.
#[test]
fn apply_is_for_administrators() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let (d, _dir) = daemon_with_files(&[("a.toml", "[[reservation]]\nports = 5000\n")]);
    for args in [&["apply", "--check"][..], &["apply", "--yes"][..]] {
        let out = run(d.cli_as_nobody().args(args));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not an administrator"),
            "{out:?}"
        );
    }
    let out = run(d.cli_as_nobody().arg("metrics"));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("portres_reservations"));
}

#[test]
fn a_confirmed_difference_is_applied_only_if_still_the_same() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[]);
    write_files(dir.path(), &[("a.toml", "[[reservation]]\nports = 5000\n")]);
    let c = d.client();
    let shown = c.apply(true, None).unwrap();
    assert_eq!(shown.changes.len(), 1);
    // The files change between showing and applying.
    write_files(dir.path(), &[("a.toml", "[[reservation]]\nports = 5001\n")]);
    let e = c.apply(false, Some(&shown.digest)).unwrap_err();
    assert!(
        e.to_string()
            .contains("changed since the difference was shown"),
        "{e}"
    );
    assert!(reservations(&d).is_empty());
    let again = c.apply(true, None).unwrap();
    assert_ne!(again.digest, shown.digest);
    let done = c.apply(false, Some(&again.digest)).unwrap();
    assert!(done.applied);
    assert_eq!(reservations(&d)[0]["start"], 5001);
}

#[test]
fn files_are_applied_again_at_restart_and_a_bad_one_keeps_the_last_good_set() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (mut d, dir) = daemon_with_files(&[("web.toml", WEB)]);
    d.stop();
    // Changed while no daemon runs: applied at the next start.
    write_files(
        dir.path(),
        &[("web.toml", "[[reservation]]\nports = 8444\n")],
    );
    d.launch();
    let rows = reservations(&d);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["start"], 8444);
    assert_eq!(rows[0]["source"], "file");
    assert!(d.reserved_ports().contains("8444"));

    // A bad file at start: the daemon starts, keeps what it had, and says why in status.
    d.stop();
    write_files(
        dir.path(),
        &[("web.toml", "[[reservation]]\nports = 8445\nfoo = 1\n")],
    );
    d.launch();
    let rows = reservations(&d);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["start"], 8444);
    let st = json(&run(d.cli().args(["--json", "status"])));
    let problem = st["declared"]["problem"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        problem.contains("web.toml:3") && problem.contains("foo"),
        "{st}"
    );
    let text = String::from_utf8(run(d.cli().arg("status")).stdout).unwrap();
    assert!(text.contains("NOT APPLIED"), "{text}");
    assert!(d.log().contains("reservation files NOT APPLIED"));
}

/// `portres apply` at a terminal asks first; "n" changes nothing.
#[test]
fn apply_asks_at_a_terminal() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[]);
    write_files(dir.path(), &[("a.toml", "[[reservation]]\nports = 5000\n")]);
    // script(1) gives the command a terminal; its input is ours.
    let cmd = format!(
        "PORTRES_SOCKET={} PORTRES_AUTOSTART=0 {BIN} apply",
        d.socket.display()
    );
    for (answer, applied) in [("n\n", false), ("y\n", true)] {
        let mut child = spawn(
            std::process::Command::new("script")
                .args(["-qec", &cmd, "/dev/null"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("apply these 1 changes? [y/N]"), "{text}");
        assert_eq!(!reservations(&d).is_empty(), applied, "{answer:?}: {text}");
    }
}

/// Thousands of entries: applied whole, and the difference shown within one reply (the first
/// changes listed, the rest counted).
#[test]
fn thousands_of_entries_apply_and_the_difference_is_bounded() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[]);
    let mut text = String::new();
    for i in 0..3000u32 {
        text += &format!(
            "[[reservation]]\nports = {}\ndescription = \"entry {i}\"\n",
            10_000 + 2 * i
        );
    }
    write_files(dir.path(), &[("many.toml", &text)]);
    let out = run(d.cli().args(["--json", "apply", "--check"]));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let diff = json(&out);
    assert_eq!(diff["added"], 3000);
    let listed = diff["changes"].as_array().unwrap().len() as u64;
    assert!(listed > 0 && listed < 3000, "{listed}");
    assert_eq!(diff["not_listed"].as_u64().unwrap() + listed, 3000);
    let out = apply(&d, &["--yes"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("more changes (not listed") && text.contains("3000 added"),
        "{text}"
    );
    assert_eq!(reservations(&d).len(), 3000);
    assert!(d.reserved_ports().contains("15998"));
}

/// The placeholders of a held block from a file, as `who` lists them (inodes).
fn placeholder_inodes(d: &TestDaemon, port: u16) -> Vec<u64> {
    let who = json(&run(d.cli().args(["--json", "who", &port.to_string()])));
    who["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["role"] == "portres placeholder (hold layer)")
        .map(|s| s["inode"].as_u64().unwrap())
        .collect()
}

/// A change of description or access list is made in place: a held block's placeholders stay
/// bound (the same sockets), nothing is unheld for a moment.
#[test]
fn a_change_of_metadata_keeps_the_block_held() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[(
        "a.toml",
        "[[reservation]]\nports = 6100\nmode = \"hold\"\ndescription = \"before\"\n",
    )]);
    let before = placeholder_inodes(&d, 6100);
    assert_eq!(before.len(), 1, "{before:?}");
    write_files(
        dir.path(),
        &[(
            "a.toml",
            "[[reservation]]\nports = 6100\nmode = \"hold\"\ndescription = \"after\"\nusers = [\"nobody\"]\n",
        )],
    );
    let out = apply(&d, &["--yes"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        placeholder_inodes(&d, 6100),
        before,
        "the placeholder was replaced"
    );
    let rows = reservations(&d);
    assert_eq!(rows[0]["description"], "after");
    assert_eq!(rows[0]["allow_users"][0], "nobody");
}

/// `--check` finds a socket in the part of a grown block that no reservation covered, before
/// anything changes.
#[test]
fn check_finds_a_socket_in_the_new_part_of_a_grown_block() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (d, dir) = daemon_with_files(&[("a.toml", "[[reservation]]\nports = \"9000-9009\"\n")]);
    let _busy = d.bind_tcp(9012);
    write_files(
        dir.path(),
        &[("a.toml", "[[reservation]]\nports = \"9005-9015\"\n")],
    );
    let before = reservations(&d);
    for args in [&["--check"][..], &["--yes"][..]] {
        let out = apply(&d, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("a.toml:1") && err.contains("9012"), "{err}");
    }
    assert_eq!(reservations(&d), before);
    assert!(d.reserved_ports().contains("9000-9009"));
}

/// An apply whose store write fails is undone whole: removed, remade (mode), relabeled and
/// added reservations all back as they were, in the table and the kernel.
#[test]
fn an_apply_whose_store_write_fails_is_undone() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let (mut d, dir) = daemon_with_files(&[(
        "a.toml",
        "[[reservation]]\nports = 6200\nmode = \"hold\"\ndescription = \"one\"\n\n\
         [[reservation]]\nports = 6300\n\n\
         [[reservation]]\nports = 6400\nmode = \"hold\"\n",
    )]);
    d.stop();
    d.env
        .push(("PORTRES_FAILPOINT".into(), "apply-store-fails".into()));
    d.launch();
    let before = reservations(&d);
    let held = placeholder_inodes(&d, 6200);
    let sysctl = d.reserved_ports();
    // Relabel 6200, remake 6300 (exclude → hold), remove 6400, add 6500.
    write_files(
        dir.path(),
        &[(
            "a.toml",
            "[[reservation]]\nports = 6200\nmode = \"hold\"\ndescription = \"two\"\n\n\
             [[reservation]]\nports = 6300\nmode = \"hold\"\n\n\
             [[reservation]]\nports = 6500\n",
        )],
    );
    let out = apply(&d, &["--yes"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("apply-store-fails") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(reservations(&d), before);
    assert_eq!(d.reserved_ports(), sysctl);
    assert_eq!(placeholder_inodes(&d, 6200), held);
    assert_eq!(placeholder_inodes(&d, 6400).len(), 1, "6400 held again");
    // And after a restart (the store was never written), the same.
    d.env.clear();
    d.stop();
    std::fs::remove_file(dir.path().join("a.toml")).unwrap();
    std::fs::create_dir_all(dir.path().join("none")).unwrap();
    d.launch();
    // No files at all now: the start removes them (the directory exists, and is empty).
    assert!(reservations(&d).is_empty());
}

/// A reservation file anyone may write would let anyone declare reservations: refused, with
/// the `chmod` that fixes it; nothing changes.
#[test]
fn a_file_others_may_write_is_refused() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let (d, dir) = daemon_with_files(&[("a.toml", "[[reservation]]\nports = 5000\n")]);
    let before = reservations(&d);
    write_files(dir.path(), &[("b.toml", "[[reservation]]\nports = 5001\n")]);
    let b = dir.path().join("b.toml");
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = apply(&d, &["--yes"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("chmod go-w {}", b.display())) && err.contains("mode 0666"),
        "{err}"
    );
    assert_eq!(reservations(&d), before);
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(apply(&d, &["--yes"]).status.success());
    assert_eq!(reservations(&d).len(), 2);
}
