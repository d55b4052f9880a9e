//! Persistent reservations: every row of docs/behaviour.md §2, durability across `kill -9`, the
//! Windows names.

use std::collections::BTreeMap;

use portres_client::{Error, PersistentSpec, Protocol};

use crate::util::*;

#[test]
fn create_lookup_delete_rows() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    for (start, count) in [("0", "1"), ("5000", "0"), ("65535", "2"), ("70000", "1")] {
        let out = run(d.cli().args([
            "--json",
            "persistent",
            "add",
            "--start",
            start,
            "--count",
            count,
        ]));
        assert!(!out.status.success());
        let e = json(&out);
        assert_eq!(
            e["error"]["code"], "InvalidParameter",
            "{start}+{count}: {e}"
        );
        assert_eq!(e["error"]["windows_code"], 87);
    }
    let out = run(d.cli().args([
        "--json",
        "persistent",
        "add",
        "--start",
        "50000",
        "--count",
        "10",
    ]));
    assert!(out.status.success(), "{out:?}");
    let created = json(&out);
    let token = created["token"].as_str().unwrap().to_string();
    assert_eq!(created["protocol"], "tcp");
    assert_eq!(
        (created["start"].as_u64(), created["count"].as_u64()),
        (Some(50000), Some(10))
    );
    assert_ne!(token.parse::<u64>().unwrap(), 0);

    // Not an administrator.
    let out = run(d
        .cli_as_nobody()
        .args(["--json", "persistent", "add", "--start", "51000"]));
    let e = json(&out);
    assert_eq!(
        (
            e["error"]["code"].as_str(),
            e["error"]["windows_code"].as_u64()
        ),
        (Some("AccessDenied"), Some(5)),
        "{e}"
    );

    // Overlaps: a persistent block, a runtime block, a port in use.
    let c = d.client();
    let _runtime = c.acquire_at(Protocol::Tcp, 52000, 5).unwrap();
    let _bound = d.bind_tcp(53002);
    for (start, port) in [("50009", 50009), ("51998", 52000), ("53000", 53002)] {
        let out = run(d.cli().args([
            "--json",
            "persistent",
            "add",
            "--start",
            start,
            "--count",
            "5",
        ]));
        let e = json(&out);
        assert_eq!(e["error"]["code"], "SharingViolation", "{start}: {e}");
        assert_eq!(e["error"]["windows_code"], 32);
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("port {port}/tcp")), "{msg}");
    }
    // UDP is independent.
    let out = run(d.cli().args([
        "--udp",
        "persistent",
        "add",
        "--start",
        "50000",
        "--count",
        "10",
    ]));
    assert!(out.status.success());

    // Anyone may look up; only the exact start and count match.
    let out =
        run(d
            .cli_as_nobody()
            .args(["persistent", "lookup", "--start", "50000", "--count", "10"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token);
    let out = run(d.cli().args([
        "--json",
        "persistent",
        "lookup",
        "--start",
        "50000",
        "--count",
        "9",
    ]));
    let e = json(&out);
    assert_eq!(
        (
            e["error"]["code"].as_str(),
            e["error"]["windows_code"].as_u64()
        ),
        (Some("NotFound"), Some(1168))
    );
    let out = run(d
        .cli()
        .args(["--json", "persistent", "lookup", "--start", "0"]));
    assert_eq!(json(&out)["error"]["code"], "InvalidParameter");

    // Delete: administrators only, exact match.
    let out = run(d.cli_as_nobody().args([
        "--json",
        "persistent",
        "delete",
        "--start",
        "50000",
        "--count",
        "10",
    ]));
    assert_eq!(json(&out)["error"]["code"], "AccessDenied");
    assert_eq!(json(&out)["error"]["windows_code"], 5);
    let out = run(d.cli().args([
        "--json",
        "persistent",
        "delete",
        "--start",
        "50000",
        "--count",
        "3",
    ]));
    assert_eq!(json(&out)["error"]["code"], "NotFound");
    let out = run(d.cli().args([
        "--json",
        "persistent",
        "delete",
        "--start",
        "0",
        "--count",
        "3",
    ]));
    assert_eq!(json(&out)["error"]["code"], "InvalidParameter");
    let out = run(d
        .cli()
        .args(["persistent", "delete", "--start", "50000", "--count", "10"]));
    assert!(out.status.success(), "{out:?}");
    let out = run(d
        .cli()
        .args(["persistent", "lookup", "--start", "50000", "--count", "10"]));
    assert!(!out.status.success());
    // The UDP one is still there.
    let out = run(d.cli().args([
        "--udp",
        "persistent",
        "lookup",
        "--start",
        "50000",
        "--count",
        "10",
    ]));
    assert!(out.status.success());
}

#[test]
fn survive_kill9_and_restart_with_identical_tokens() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::start();
    let c = d.client();
    let mut expect = BTreeMap::new();
    for i in 0..20u32 {
        let protocol = if i % 2 == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let mut spec = PersistentSpec::new(protocol, 20000 + i * 10, 1 + i % 4);
        if i % 3 == 0 {
            spec.allow_users = vec!["nobody".into()];
            spec.allow_groups = vec!["0".into()];
            spec.mode = portres_client::Mode::Hold;
        }
        let token = c.create_persistent(&spec).unwrap();
        expect.insert((protocol, spec.start, spec.count), (token, spec));
    }
    let gone: Vec<_> = expect.keys().copied().step_by(4).collect();
    for k in &gone {
        c.delete_persistent(k.0, k.1, k.2).unwrap();
        expect.remove(k);
    }
    let before = c.show().unwrap();
    drop(c);
    d.kill9();
    d.launch();
    let c = d.client();
    for ((protocol, start, count), (token, _)) in &expect {
        assert_eq!(
            c.lookup_persistent(*protocol, *start, *count).unwrap(),
            *token
        );
    }
    for (protocol, start, count) in &gone {
        let e = c.lookup_persistent(*protocol, *start, *count).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    }
    let after = c.show().unwrap();
    assert_eq!(
        after, before,
        "mode, access lists, owners and times are kept"
    );
    assert!(
        after
            .reservations
            .iter()
            .any(|r| r.allow_users == ["nobody"] && r.mode == "hold")
    );
}

#[test]
fn windows_named_functions_use_network_byte_order() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    use portres_client::windows::*;
    let d = TestDaemon::start();
    // SAFETY: no other test of this binary reads PORTRES_SOCKET (they use explicit sockets).
    unsafe { std::env::set_var("PORTRES_SOCKET", &d.socket) };
    let token = create_persistent_tcp_port_reservation(50000u16.to_be(), 10).unwrap();
    let c = d.client();
    assert_eq!(
        c.lookup_persistent(Protocol::Tcp, 50000, 10).unwrap().get(),
        token
    );
    assert_eq!(
        lookup_persistent_tcp_port_reservation(50000u16.to_be(), 10),
        Ok(token)
    );
    assert_eq!(
        lookup_persistent_udp_port_reservation(50000u16.to_be(), 10),
        Err(1168)
    );
    let udp = create_persistent_udp_port_reservation(50000u16.to_be(), 10).unwrap();
    assert_ne!(udp, token);
    assert_eq!(
        create_persistent_tcp_port_reservation(50005u16.to_be(), 1),
        Err(32)
    );
    assert_eq!(create_persistent_tcp_port_reservation(0, 1), Err(87));
    assert_eq!(
        create_persistent_tcp_port_reservation(1u16.to_be(), 0),
        Err(87)
    );
    assert_eq!(
        delete_persistent_tcp_port_reservation(50000u16.to_be(), 10),
        Ok(())
    );
    assert_eq!(
        delete_persistent_tcp_port_reservation(50000u16.to_be(), 10),
        Err(1168)
    );
    assert_eq!(
        delete_persistent_udp_port_reservation(50000u16.to_be(), 10),
        Ok(())
    );
    // A port number is not mistaken for its byte-swapped twin: 50000 = 0xC350, 0x50C3 = 20675.
    assert!(c.lookup_persistent(Protocol::Tcp, 20675, 10).is_err());
}
