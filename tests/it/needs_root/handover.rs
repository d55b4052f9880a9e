//! Binding from a reservation: sockets handed over with no window, listeners that serve, ports
//! that return to their block, the consumption rules, and `run --listen`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Stdio;

use portres_client::{Error, PersistentSpec, Protocol, SocketKind};

use crate::util::*;

const LOOP4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LOOP6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Starts an adversary binding `port` in a tight loop; returns it after it started.
fn start_adversary(d: &TestDaemon, uid: u32, proto: &str, port: u16) -> std::process::Child {
    let mut a = spawn(
        d.adversary(uid)
            .args(["loop", proto, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "started");
    a.stdout = Some(out.into_inner());
    a
}

/// Stops an adversary; returns (attempts, stolen).
fn stop_adversary(mut a: std::process::Child) -> (u64, u64) {
    drop(a.stdin.take());
    let mut text = String::new();
    a.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    a.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    (
        v["attempts"].as_u64().unwrap(),
        v["stolen"].as_u64().unwrap(),
    )
}

#[test]
fn twenty_thousand_handovers_against_tight_loop_adversaries_lose_nothing() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let cases = [
        (Protocol::Tcp, None, 40100u16),
        (Protocol::Tcp, Some(LOOP4), 40101),
        (Protocol::Udp, None, 40102),
        (Protocol::Udp, Some(LOOP6), 40103),
    ];
    for (protocol, address, port) in cases {
        let r = c.acquire_at(protocol, port.into(), 1).unwrap();
        let proto = protocol.as_str();
        // Same uid as the daemon and the client (root), and another uid.
        let adversaries = [
            start_adversary(&d, 0, proto, port),
            start_adversary(&d, NOBODY, proto, port),
        ];
        // A socket a test closes can live on for microseconds in a child of another test thread
        // (the kernel resumes a vfork parent before it closes the child's close-on-exec
        // descriptors); the daemon then rightly says the port is still handed out. Such a
        // handover is retried, counted, and must stay rare; it is never a theft.
        let mut transient = 0;
        for i in 0..5000 {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                let got = match protocol {
                    Protocol::Tcp => r.listen_on(address, port, 8).map(|l| {
                        assert_eq!(l.local_addr().unwrap().port(), port);
                        close(l);
                    }),
                    Protocol::Udp => r.udp_socket(address, port).map(|u| {
                        assert_eq!(u.local_addr().unwrap().port(), port);
                        close(u);
                    }),
                };
                match got {
                    Ok(()) => break,
                    Err(Error::AddressInUse(_)) if std::time::Instant::now() < deadline => {
                        transient += 1;
                    }
                    Err(e) => {
                        let who = c.who(protocol, port.into());
                        panic!("{proto} handover {i} on {address:?} failed: {e}\nwho: {who:#?}");
                    }
                }
            }
        }
        assert!(
            transient < 50,
            "{transient} handovers found the previous socket still open"
        );
        for a in adversaries {
            let (attempts, stolen) = stop_adversary(a);
            assert_eq!(
                stolen, 0,
                "{proto} {address:?}: the adversary bound the port {stolen} times"
            );
            assert!(
                attempts > 1000,
                "the adversary hardly ran ({attempts} attempts)"
            );
        }
    }
}

#[test]
fn a_handed_out_listener_serves_and_its_port_is_held_again_after_time_wait() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 43000, 2).unwrap();
    for round in 0..2 {
        let listener = r.listen_on(Some(LOOP4), 0, 8).unwrap();
        assert_eq!(
            listener.local_addr().unwrap().port(),
            43000,
            "lowest free port, round {round}"
        );
        let client = d.in_netns(|| TcpStream::connect(("127.0.0.1", 43000)).unwrap());
        let (mut served, _) = listener.accept().unwrap();
        let mut client = client;
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        served.read_exact(&mut buf).unwrap();
        served.write_all(b"echo:hi").unwrap();
        let mut reply = [0u8; 7];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"echo:hi");
        // The server closes first: its side of the connection stays in TIME_WAIT on 43000.
        close(served);
        close(listener);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        drop(client);
        let tw = d.in_netns(|| {
            portres_sys::sockdiag::sockets_on_ports(Protocol::Tcp, 43000, 43000).unwrap()
        });
        assert!(
            tw.iter().any(|s| s.state_name() == "time-wait"),
            "TIME_WAIT left behind: {tw:?}"
        );
        let out = run(d.adversary(NOBODY).args(["matrix", "tcp", "43000"]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "[]",
            "held again after close"
        );
        let out = run(d.adversary(0).args(["matrix", "tcp", "43000"]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "[]",
            "held again, also for root"
        );
    }
    // A connect-ready socket: the connection's source port is the reserved one.
    let server = d.in_netns(|| std::net::TcpListener::bind(("127.0.0.1", 9)).unwrap());
    let s = r.tcp_socket(Some(LOOP4), 43001).unwrap();
    let stream = s.connect(SocketAddr::new(LOOP4, 9)).unwrap();
    let (_peer, from) = server.accept().unwrap();
    assert_eq!(
        (stream.local_addr().unwrap().port(), from.port()),
        (43001, 43001)
    );
}

#[test]
fn udp_datagrams_reach_the_handed_out_socket_not_the_placeholder() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Udp, 43500, 1).unwrap();
    for round in 0..2 {
        let sock = r.udp_socket(None, 0).unwrap();
        assert_eq!(sock.local_addr().unwrap().port(), 43500);
        d.in_netns(move || {
            for i in 0..50u8 {
                let tx = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
                tx.send_to(&[round, i], ("127.0.0.1", 43500)).unwrap();
            }
        });
        let mut buf = [0u8; 2];
        for i in 0..50u8 {
            let (n, _) = sock.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[round, i], "every datagram arrives, in order");
        }
        close(sock);
    }
}

#[test]
fn consumption_rules() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 41000, 2).unwrap();
    let token = r.token();

    // Another process may not use our runtime token.
    let out = run(d.raw_client_as(0).arg(format!(
        r#"{{"op":"associate","token":"{token}","socket":"listener"}}"#
    )));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "AccessDenied", "{reply}");
    assert_eq!(reply["error"]["windows_code"], 10013);

    let e = c
        .associate(
            portres_client::Token::new(99).unwrap(),
            SocketKind::Stream,
            None,
            0,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)),
        "unknown token: {e:?}"
    );
    let e = r.listen_on(None, 41005, 8).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)),
        "outside the block: {e:?}"
    );
    let e = r.udp_socket(None, 0).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)),
        "wrong protocol: {e:?}"
    );
    let e = r
        .listen_on(Some("192.0.2.1".parse().unwrap()), 0, 8)
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)),
        "not a local address: {e:?}"
    );
    let a = r.listen(0).unwrap();
    let e = r.listen(41000).unwrap_err();
    assert!(
        matches!(e, Error::AddressInUse(_)),
        "explicit port taken: {e:?}"
    );
    let b = r.tcp_socket(None, 0).unwrap();
    let e = r.listen(0).unwrap_err();
    assert_eq!(
        (e.code_name(), e.windows_code()),
        ("AddressInUse", 10048),
        "exhausted"
    );
    close(a);
    assert_eq!(
        r.listen(0).unwrap().local_addr().unwrap().port(),
        41000,
        "closed port returns"
    );
    close(b);

    // Persistent tokens: administrators and the access list.
    let mut spec = PersistentSpec::new(Protocol::Udp, 41100, 2);
    spec.allow_users = vec!["nobody".into()];
    let allowed = c.create_persistent(&spec).unwrap();
    let closed = c
        .create_persistent(&PersistentSpec::new(Protocol::Udp, 41200, 1))
        .unwrap();
    let ask = |t: portres_client::Token| {
        let out = run(d.raw_client_as(NOBODY).arg(format!(
            r#"{{"op":"associate","token":"{t}","socket":"datagram"}}"#
        )));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let ok = ask(allowed);
    assert_eq!(ok["ok"]["port"], 41100, "{ok}");
    let denied = ask(closed);
    assert_eq!(denied["error"]["code"], "AccessDenied", "{denied}");
    let sock = c.associate(closed, SocketKind::Datagram, None, 0).unwrap();
    assert_eq!(
        sock.1, 41200,
        "administrators may use any persistent reservation"
    );

    // When the runtime reservation ends, its handed-out socket keeps the port until it closes;
    // the token is dead.
    let kept = r.listen(0).unwrap();
    drop(r);
    let e = c.associate(token, SocketKind::Stream, None, 0).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "ended token: {e:?}");
    let conn = d.in_netns(|| TcpStream::connect(("127.0.0.1", 41000)));
    assert!(conn.is_ok(), "the listener still serves");
    close(kept);
}

#[test]
fn a_listener_keeps_its_port_until_it_closes_whatever_its_address() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    // Listeners are checked by a lookup in the kernel's listening table on the address they
    // were bound to; other sockets by a dump.
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 41300, 1).unwrap();
    for addr in [Some("127.0.0.1"), Some("::1"), None] {
        let l = r
            .listen_on(addr.map(|a| a.parse().unwrap()), 41300, 8)
            .unwrap();
        let e = r.listen(0).unwrap_err();
        assert!(
            matches!(e, Error::AddressInUse(_)),
            "{addr:?}: still listening: {e:?}"
        );
        let e = r.tcp_socket(None, 41300).unwrap_err();
        assert!(matches!(e, Error::AddressInUse(_)), "{addr:?}: {e:?}");
        close(l);
    }
    // A stream socket (not a listener) is checked by the dump.
    let s = r.tcp_socket(None, 0).unwrap();
    let e = r.listen(0).unwrap_err();
    assert!(matches!(e, Error::AddressInUse(_)), "{e:?}");
    close(s);
    let l = r.listen(0).unwrap();
    assert_eq!(l.local_addr().unwrap().port(), 41300);
    close(l);
}

#[test]
fn a_listener_bound_to_a_device_after_the_handover_keeps_its_port() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    // The kernel's lookup by address skips listeners bound to a device, and any program may bind
    // its listener to one: such a listener must still count as open.
    let d = TestDaemon::start();
    let c = d.client();
    let r = c.acquire_at(Protocol::Tcp, 41400, 1).unwrap();
    let l = r.listen(41400).unwrap();
    let mut cmd = std::process::Command::new("python3");
    cmd.args([
        "-c",
        "import socket; s = socket.socket(fileno=3); \
         s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'lo'); s.detach()",
    ]);
    let copy = std::os::fd::OwnedFd::from(l.try_clone().unwrap());
    portres_sys::process::pass_fds(&mut cmd, &[copy]).unwrap();
    let out = run(&mut cmd);
    assert!(out.status.success(), "{out:?}");
    close(cmd);
    let e = r.listen(41400).unwrap_err();
    assert!(
        matches!(e, Error::AddressInUse(_)),
        "listening on lo only: {e:?}"
    );
    close(l);
    let again = r.listen(0).unwrap();
    assert_eq!(
        again.local_addr().unwrap().port(),
        41400,
        "closed: it returns"
    );
    close(again);
}

#[test]
fn run_listen_passes_bound_sockets_by_the_systemd_protocol() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let check = r#"
import os, socket
n = int(os.environ["LISTEN_FDS"])
assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID"
first, last = map(int, os.environ["PORTRES_PORTS"].split("-"))
ports = []
for fd in range(3, 3 + n):
    s = socket.socket(fileno=fd)
    ports.append(s.getsockname()[1])
    if s.type == socket.SOCK_STREAM:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1, "listening"
    s.detach()
assert ports == list(range(first, last + 1)), ports
assert os.environ["LISTEN_FDNAMES"] == ":".join(map(str, ports))
print(n, os.environ["PORTRES_PROTOCOL"], "ok")
"#;
    for (flag, expect) in [("--tcp", "3 tcp ok"), ("--udp", "3 udp ok")] {
        let out = run(d.cli().args([
            flag, "run", "--listen", "--count", "3", "--", "python3", "-c", check,
        ]));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expect);
    }
}
