//! Runtime reservations: every row of docs/behaviour.md §2 for acquire and release.

use portres_client::{Error, Protocol};

use crate::util::*;

#[test]
fn acquire_specific_and_wildcard_blocks() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config("dynamic_range = \"41000-41009\"\n");
    let c = d.client();
    let w = c.acquire(Protocol::Tcp, 4).unwrap();
    assert!(
        w.range().start() >= 41000 && w.range().last() <= 41009,
        "{:?}",
        w.range()
    );
    assert_ne!(w.token().get(), 0);
    let s = c.acquire_at(Protocol::Udp, 50000, 10).unwrap();
    assert_eq!((s.range().start(), s.range().count()), (50000, 10));
    // TCP and UDP are independent.
    let t = c.acquire_at(Protocol::Tcp, 50000, 10).unwrap();
    assert_ne!(t.token(), s.token());

    // Six TCP ports are left in the dynamic range: seven is NoBufferSpace, six fits.
    let e = c.acquire(Protocol::Tcp, 7).unwrap_err();
    assert!(matches!(e, Error::NoBufferSpace(_)), "{e:?}");
    assert_eq!(e.windows_code(), 10055);
    assert!(e.to_string().contains("41000-41009"), "{e}");
    let six = c.acquire(Protocol::Tcp, 6).unwrap();
    assert!(!six.range().overlaps(w.range()));
    // UDP's dynamic range is untouched by TCP's.
    c.acquire(Protocol::Udp, 10).unwrap();
}

#[test]
fn invalid_arguments_change_nothing() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    for (start, count) in [(0, 0), (40000, 0), (65530, 7), (70000, 1)] {
        let e = c.acquire_at(Protocol::Tcp, start, count).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(_)),
            "{start}+{count}: {e:?}"
        );
        assert_eq!(e.windows_code(), 10022);
    }
    assert!(c.show().unwrap().reservations.is_empty());
}

#[test]
fn overlapping_block_is_address_in_use_and_names_the_holder() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let held = c.acquire_at(Protocol::Tcp, 45000, 10).unwrap();
    // Another process asks for an overlapping block.
    let out =
        run(raw_client(&d.socket)
            .arg(r#"{"op":"acquire","protocol":"tcp","start":45005,"count":10}"#));
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = &reply["error"];
    assert_eq!(err["code"], "AddressInUse");
    assert_eq!(err["windows_code"], 10048);
    assert_eq!(err["conflict"]["port"], 45005);
    assert_eq!(err["conflict"]["holder_kind"], "reservation");
    assert_eq!(err["conflict"]["owner"]["pid"], std::process::id());
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("45005-45014/tcp") && msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    // The refused request changed nothing.
    let show = c.show().unwrap();
    assert_eq!(show.reservations.len(), 1);
    assert_eq!(
        show.reservations[0].token.as_deref(),
        Some(held.token().to_string().as_str())
    );
}

#[test]
fn port_bound_by_another_socket_is_address_in_use() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config("dynamic_range = \"46000-46005\"\n");
    let _listener = d.bind_tcp(46001);
    let c = d.client();
    let e = c.acquire_at(Protocol::Tcp, 45999, 5).unwrap_err();
    assert!(matches!(e, Error::AddressInUse(_)), "{e:?}");
    let conflict = *e.details().unwrap().conflict.clone().unwrap();
    assert_eq!(
        (conflict.port, conflict.holder_kind.as_str()),
        (46001, "socket")
    );
    // UDP's port 46001 is free.
    c.acquire_at(Protocol::Udp, 45999, 5).unwrap();
    // A wildcard block steps around the bound port.
    let w = c.acquire(Protocol::Tcp, 3).unwrap();
    assert!(!w.range().contains(46001), "{:?}", w.range());
}

#[test]
fn drop_releases_and_release_rows() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 47000, 2).unwrap();
    let token = r.token();
    drop(r);
    let again = c.acquire_at(Protocol::Tcp, 47000, 2).unwrap();
    assert_ne!(again.token(), token, "tokens are fresh");

    let e = c.release(token.get()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "ended token: {e:?}");
    let e = c.release(12345).unwrap_err();
    assert_eq!(
        (e.code_name(), e.windows_code()),
        ("InvalidArgument", 10022)
    );

    let p = c
        .create_persistent(&portres_client::PersistentSpec::new(Protocol::Tcp, 5000, 1))
        .unwrap();
    let e = c.release(p.get()).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)),
        "persistent token: {e:?}"
    );

    // Another process may not release our token, but may release its own.
    let out = run(raw_client(&d.socket)
        .arg(format!(r#"{{"op":"release","token":"{}"}}"#, again.token()))
        .arg(r#"{"op":"acquire","protocol":"udp","start":47000,"count":1}"#));
    let lines: Vec<serde_json::Value> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines[0]["error"]["code"], "AccessDenied", "{lines:?}");
    assert_eq!(lines[0]["error"]["windows_code"], 10013);
    let theirs = lines[1]["ok"]["token"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    again.release().unwrap();
    // Theirs ended when their connection closed.
    wait_until(
        "the helper's session to end",
        std::time::Duration::from_secs(5),
        || {
            c.show()
                .unwrap()
                .reservations
                .iter()
                .all(|r| r.kind == "persistent")
        },
    );
    let e = c.release(theirs).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
}

#[test]
fn quota_limits_non_admins_only() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::with_config("runtime_quota_ports = 5\n");
    let out = run(d
        .cli_as_nobody()
        .args(["--json", "run", "--count", "6", "--", "true"]));
    assert!(!out.status.success());
    let e = json(&out);
    assert_eq!(e["error"]["code"], "QuotaExceeded", "{e}");
    assert_eq!(e["error"]["windows_code"], 10055);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota is 5"),
        "{e}"
    );

    // Holding 3, nobody cannot get 3 more (a nested run inside the first one), but can get 2.
    let bin = nobody_binary();
    let out = run(d
        .cli_as_nobody()
        .args(["run", "--count", "3", "--"])
        .arg(bin)
        .args(["--json", "run", "--count", "3", "--", "true"]));
    assert!(!out.status.success());
    assert_eq!(json(&out)["error"]["code"], "QuotaExceeded");
    let out = run(d
        .cli_as_nobody()
        .args(["run", "--count", "3", "--"])
        .arg(bin)
        .args(["run", "--count", "2", "--", "true"]));
    assert!(out.status.success(), "{out:?}");

    // Root is an administrator and exempt.
    let c = d.client();
    c.acquire(Protocol::Tcp, 50).unwrap();
}

#[test]
fn release_later_takes_effect_before_the_clients_next_request() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    // The same client sees it released at once: the daemon answers in order.
    let r = c.acquire_at(Protocol::Tcp, 47500, 2).unwrap();
    r.release_later().unwrap();
    let again = c.acquire_at(Protocol::Tcp, 47500, 2).unwrap();
    // More unanswered releases in a row than the client keeps in flight (64), and a failing
    // one among them (an unknown token): none disturbs the replies that follow.
    let blocks: Vec<_> = (0..200)
        .map(|_| c.acquire(Protocol::Udp, 1).unwrap())
        .collect();
    c.release_later(12345).unwrap();
    for b in blocks {
        b.release_later().unwrap();
    }
    // A socket handed over right after an unanswered release arrives with its reply, even when
    // one read brings both replies.
    let mut prev = c.acquire(Protocol::Tcp, 1).unwrap();
    for _ in 0..300 {
        let next = c.acquire(Protocol::Tcp, 1).unwrap();
        prev.release_later().unwrap();
        close(next.listen(0).unwrap());
        prev = next;
    }
    prev.release().unwrap();
    let counts = c.status().unwrap().counts;
    assert_eq!(
        (counts.runtime, counts.runtime_hold),
        (1, 1),
        "only the block at 47500 is left"
    );
    // Once the client's next request is answered, every process sees the release, and the
    // kernel too: the held port is unbound.
    again.release_later().unwrap();
    c.status().unwrap();
    drop(d.bind_tcp(47500));
    let other = d.client();
    other
        .acquire_at(Protocol::Tcp, 47500, 2)
        .unwrap()
        .release()
        .unwrap();
}
