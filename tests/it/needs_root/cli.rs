//! The command line: `run`, `show`, `status`, JSON shapes and human errors (docs/behaviour.md §7).

use crate::util::*;

#[test]
fn run_passes_the_ports_and_returns_the_exit_status() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let out = run(d
        .cli()
        .args(["run", "--count", "3", "--", "sh", "-c"])
        .arg("echo \"$PORTRES_TOKEN $PORTRES_PROTOCOL $PORTRES_PORTS $PORTRES_PORT\"; exit 7"));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_ne!(f[0].parse::<u64>().unwrap(), 0);
    assert_eq!(f[1], "tcp");
    let (first, last) = f[2].split_once('-').unwrap();
    let (first, last): (u16, u16) = (first.parse().unwrap(), last.parse().unwrap());
    assert_eq!(last - first, 2);
    assert_eq!(f[3], first.to_string());

    let out = run(d
        .cli()
        .args([
            "--udp", "run", "--start", "49000", "--count", "2", "--", "sh", "-c",
        ])
        .arg("echo \"$PORTRES_PROTOCOL $PORTRES_PORTS $PORTRES_PORT\""));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "udp 49000-49001 49000"
    );

    // While CMD runs, the reservation is visible, as a runtime block in exclude mode.
    let out = run(d
        .cli()
        .args(["run", "--start", "49100", "--", BIN, "--json", "show"]));
    let show = json(&out);
    let row = &show["reservations"][0];
    assert_eq!(
        (row["kind"].as_str(), row["mode"].as_str()),
        (Some("runtime"), Some("exclude"))
    );
    assert_eq!(row["start"], 49100);
    assert!(
        row["owner"]["command"]
            .as_str()
            .unwrap()
            .contains("run --start 49100")
    );
    // And gone after.
    let after = json(&run(d.cli().args(["show", "--json"])));
    assert_eq!(after, serde_json::json!({"reservations": []}));

    // A command killed by a signal: 128 + the signal.
    let out = run(d.cli().args(["run", "--", "sh", "-c", "kill -TERM $$"]));
    assert_eq!(out.status.code(), Some(143));

    // A conflict: non-zero, with a message that names the holder, and CMD never runs.
    let c = d.client();
    let _held = c
        .acquire_at(portres_client::Protocol::Tcp, 49200, 1)
        .unwrap();
    let out = run(d
        .cli()
        .args(["run", "--start", "49200", "--", "touch"])
        .arg(d.dir.path().join("ran")));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(
            "portres: cannot reserve 49200/tcp: port 49200/tcp is in runtime reservation"
        ),
        "{err}"
    );
    assert!(!d.dir.path().join("ran").exists());
}

#[test]
fn json_documents_have_the_fields_of_the_spec() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    let status = json(&run(d.cli().args(["status", "--json"])));
    for field in [
        "daemon_version",
        "uptime_secs",
        "layers",
        "counts",
        "dynamic_range",
    ] {
        assert!(
            status.get(field).is_some(),
            "status lacks {field}: {status}"
        );
    }
    let layers: Vec<(&str, bool)> = status["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["name"].as_str().unwrap(), l["active"].as_bool().unwrap()))
        .collect();
    assert_eq!(layers, [("hold", true), ("exclude", true), ("deny", false)]);
    assert!(
        status["layers"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("deny = false")
    );

    run(d.cli().args([
        "persistent",
        "add",
        "--start",
        "6000",
        "--count",
        "2",
        "--allow-user",
        "nobody",
    ]));
    let c = d.client();
    let _rt = c
        .acquire_at(portres_client::Protocol::Udp, 6000, 1)
        .unwrap();
    let show = json(&run(d.cli().args(["--json", "show"])));
    let rows = show["reservations"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // Sorted by protocol, then port.
    assert_eq!(
        (rows[0]["protocol"].as_str(), rows[1]["protocol"].as_str()),
        (Some("tcp"), Some("udp"))
    );
    for row in rows {
        for field in ["protocol", "start", "count", "kind", "mode", "owner"] {
            assert!(row.get(field).is_some(), "row lacks {field}: {row}");
        }
        for field in ["pid", "uid", "command"] {
            assert!(
                row["owner"].get(field).is_some(),
                "owner lacks {field}: {row}"
            );
        }
    }
    assert_eq!(rows[0]["kind"], "persistent");
    assert_eq!(rows[0]["owner"]["pid"], serde_json::Value::Null);
    assert_eq!(rows[0]["allow_users"], serde_json::json!(["nobody"]));
    assert_eq!(rows[1]["owner"]["pid"], std::process::id());
    // Tokens are shown to administrators and owners only.
    assert!(rows[0]["token"].is_string());
    let as_nobody = json(&run(d.cli_as_nobody().args(["show", "--json"])));
    assert!(as_nobody["reservations"][0]["token"].is_null());

    let human = String::from_utf8(run(d.cli().arg("show")).stdout).unwrap();
    assert!(human.starts_with("PROTO"), "{human}");
    assert!(human.lines().all(|l| l.chars().count() <= 80), "{human}");
    assert!(human.contains("6000-6001"), "{human}");
}

#[test]
fn errors_say_what_why_and_what_to_do() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let out = run(d
        .cli()
        .args(["persistent", "lookup", "--start", "7000", "--count", "2"]));
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("portres: no persistent reservation has exactly start 7000 and count 2"),
        "{err}"
    );
    assert!(err.contains("portres show"), "{err}");

    // Without a daemon, and with autostart off.
    let out = run(d
        .cli()
        .env("PORTRES_SOCKET", d.dir.path().join("nothing.sock"))
        .args(["--json", "status"]));
    assert!(!out.status.success());
    let e = json(&out);
    assert_eq!(e["error"]["code"], "DaemonUnavailable");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing.sock")
    );
}
