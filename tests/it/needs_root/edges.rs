//! Requests at the edges of their fields, and what a panic does: every field is range-checked
//! where it is decoded, a request is answered with a result or a clear error, the table's
//! invariants hold after each one, and a panic ends the daemon so that a restart serves again.

use std::io::Read;
use std::os::unix::net::UnixStream;

use portres_client::{PersistentSpec, Protocol};
use portres_proto::{Hello, HelloReply, ReplyBody, ReplyFrame};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::util::*;

/// A raw protocol connection (JSON frames written by hand, so numbers no type allows can be
/// sent).
struct Raw {
    s: UnixStream,
    next: u64,
}

impl Raw {
    fn open(d: &TestDaemon) -> Raw {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        portres_proto::write_frame(&mut s, &Hello::new("edges")).unwrap();
        let r: HelloReply =
            portres_proto::decode(&portres_proto::read_frame(&mut s).unwrap()).unwrap();
        assert!(matches!(r, HelloReply::Welcome(_)));
        Raw { s, next: 1 }
    }

    /// Sends `request` (an object without `id`) and reads the reply.
    fn call(&mut self, mut request: Value) -> ReplyFrame {
        self.next += 1;
        request["id"] = json!(self.next);
        portres_proto::write_frame(&mut self.s, &request).unwrap();
        let body = portres_proto::read_frame(&mut self.s)
            .unwrap_or_else(|e| panic!("no reply to {request}: {e}"));
        let reply: ReplyFrame = portres_proto::decode(&body).unwrap();
        assert_eq!(reply.id, self.next, "{request}");
        reply
    }
}

/// The numbers at the edges: of ports, counts, the dynamic range (32768-60999 in a fresh
/// namespace), u16, u32 and i64.
const EDGES: [u64; 14] = [
    0,
    1,
    1023,
    1024,
    32767,
    32768,
    28232,
    60999,
    61000,
    65535,
    65536,
    (1 << 32) - 1,
    1 << 32,
    1 << 63,
];

fn edge() -> impl Strategy<Value = u64> {
    prop::sample::select(EDGES.to_vec())
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(&'static str, u64, u64, Option<&'static str>),
    Release(usize, u64),
    Create(&'static str, u64, u64, Option<&'static str>),
    Lookup(&'static str, u64, u64),
    Delete(&'static str, u64, u64),
    Associate(usize, &'static str, u64, Option<u64>),
    Who(&'static str, u64),
    Status,
    Show,
}

fn op() -> impl Strategy<Value = Op> {
    let protocol = prop::sample::select(vec!["tcp", "udp"]);
    let mode = prop::option::of(prop::sample::select(vec!["hold", "exclude"]));
    prop_oneof![
        3 => (protocol.clone(), edge(), edge(), mode.clone())
            .prop_map(|(p, s, c, m)| Op::Acquire(p, s, c, m)),
        1 => (any::<usize>(), edge()).prop_map(|(i, t)| Op::Release(i, t)),
        2 => (protocol.clone(), edge(), edge(), mode).prop_map(|(p, s, c, m)| Op::Create(p, s, c, m)),
        1 => (protocol.clone(), edge(), edge()).prop_map(|(p, s, c)| Op::Lookup(p, s, c)),
        1 => (protocol.clone(), edge(), edge()).prop_map(|(p, s, c)| Op::Delete(p, s, c)),
        2 => (
            any::<usize>(),
            prop::sample::select(vec!["listener", "stream", "datagram"]),
            edge(),
            prop::option::of(edge())
        )
            .prop_map(|(i, k, p, b)| Op::Associate(i, k, p, b)),
        1 => (protocol, edge()).prop_map(|(p, port)| Op::Who(p, port)),
        1 => Just(Op::Status),
        1 => Just(Op::Show),
    ]
}

/// UDP hold blocks stay small (each port is a placeholder socket; see kernel_safety.rs).
fn small_udp_hold(p: &str, count: u64, mode: Option<&str>) -> u64 {
    if p == "udp" && mode != Some("exclude") {
        count.min(1024)
    } else {
        count
    }
}

fn request(op: &Op, tokens: &[String]) -> Value {
    let token = |i: usize, fallback: u64| {
        if tokens.is_empty() || i.is_multiple_of(4) {
            fallback.to_string()
        } else {
            tokens[i % tokens.len()].clone()
        }
    };
    match op {
        Op::Acquire(p, s, c, m) => {
            json!({"op": "acquire", "protocol": p, "start": s, "count": c, "mode": m})
        }
        Op::Release(i, t) => json!({"op": "release", "token": token(*i, *t)}),
        Op::Create(p, s, c, m) => {
            json!({"op": "create_persistent", "protocol": p, "start": s, "count": c, "mode": m})
        }
        Op::Lookup(p, s, c) => {
            json!({"op": "lookup_persistent", "protocol": p, "start": s, "count": c})
        }
        Op::Delete(p, s, c) => {
            json!({"op": "delete_persistent", "protocol": p, "start": s, "count": c})
        }
        Op::Associate(i, k, port, backlog) => {
            json!({"op": "associate", "token": token(*i, 1), "socket": k, "port": port, "backlog": backlog})
        }
        Op::Who(p, port) => json!({"op": "who", "protocol": p, "port": port}),
        Op::Status => json!({"op": "status"}),
        Op::Show => json!({"op": "show"}),
    }
}

/// Whether a number of the request is outside what its field allows: such a request must be
/// refused.
fn out_of_range(op: &Op) -> bool {
    match op {
        Op::Acquire(_, s, c, _) | Op::Create(_, s, c, _) => *s > 65535 || *c == 0 || *c > 65535,
        Op::Lookup(_, s, c) | Op::Delete(_, s, c) => *s > 65535 || *c == 0 || *c > 65535,
        Op::Associate(_, _, p, b) => *p > 65535 || b.is_some_and(|b| b == 0 || b > 65535),
        Op::Who(_, p) => *p == 0 || *p > 65535,
        _ => false,
    }
}

const CODES: [&str; 10] = [
    "InvalidArgument",
    "AddressInUse",
    "NoBufferSpace",
    "QuotaExceeded",
    "AccessDenied",
    "InvalidParameter",
    "SharingViolation",
    "NotFound",
    "MalformedRequest",
    "Internal",
];

fn run_sequence(ops: &[Op]) -> Result<(), TestCaseError> {
    let d = TestDaemon::with_env(&[("PORTRES_CHECK_INVARIANTS", "1")]);
    let mut conn = Raw::open(&d);
    let mut monitor = Raw::open(&d);
    let mut tokens: Vec<String> = Vec::new();
    for op in ops {
        let op = &match *op {
            Op::Acquire(p, s, c, m) => Op::Acquire(p, s, small_udp_hold(p, c, m), m),
            Op::Create(p, s, c, m) => {
                Op::Create(p, s, small_udp_hold(p, c, m.or(Some("exclude"))), m)
            }
            ref other => other.clone(),
        };
        let req = request(op, &tokens);
        let reply = conn.call(req.clone());
        match &reply.body {
            ReplyBody::Ok(ok) => {
                prop_assert!(!out_of_range(op), "{req} was granted: {ok:?}");
                if let portres_proto::Reply::Reservation(r) = ok {
                    tokens.push(r.token.clone());
                }
            }
            ReplyBody::Error(e) => {
                prop_assert!(CODES.contains(&e.code.as_str()), "{req}: {e:?}");
                prop_assert!(e.message.len() > 30, "{req}: unclear message {e:?}");
                prop_assert!(e.windows_code != 0, "{req}: {e:?}");
                if e.code == "MalformedRequest" {
                    // The daemon closes the connection after a request it cannot read.
                    let mut rest = Vec::new();
                    let _ = conn.s.read_to_end(&mut rest);
                    prop_assert!(rest.is_empty());
                    conn = Raw::open(&d);
                    tokens.clear();
                }
            }
            other => prop_assert!(false, "{req}: a stream part without a stream: {other:?}"),
        }
        // The daemon still answers (and checked its table's invariants after the request: a
        // violation would have ended it).
        let status = monitor.call(json!({"op": "status"}));
        prop_assert!(
            matches!(status.body, ReplyBody::Ok(_)),
            "after {req}: {status:?}"
        );
    }
    // No two blocks of one protocol overlap in what the daemon reports.
    let shown = d.client().show().unwrap();
    for p in ["tcp", "udp"] {
        let mut blocks: Vec<(u32, u32)> = shown
            .reservations
            .iter()
            .filter(|r| r.protocol == p)
            .map(|r| (u32::from(r.start), u32::from(r.start) + u32::from(r.count)))
            .collect();
        blocks.sort();
        for w in blocks.windows(2) {
            prop_assert!(w[0].1 <= w[1].0, "{p} blocks overlap: {w:?}");
        }
    }
    prop_assert!(!d.log().contains("panicked"), "{}", d.log());
    Ok(())
}

#[test]
fn requests_at_the_edges_get_a_result_or_a_clear_error() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    proptest!(
        ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() },
        |(ops in prop::collection::vec(op(), 1..24))| {
            run_sequence(&ops)?;
        }
    );
}

#[test]
fn a_count_of_65536_is_refused_clearly() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let out = run(d.cli().args(["run", "--count", "65536", "--", "true"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("65536") && err.contains("1 to 65535"), "{err}");
    // The same over the wire, with start 0: a clear refusal naming the field.
    let mut raw = Raw::open(&d);
    let reply = raw.call(json!({"op": "acquire", "protocol": "tcp", "start": 0, "count": 65536}));
    match reply.body {
        ReplyBody::Error(e) => {
            assert_eq!(e.code, "MalformedRequest");
            assert!(
                e.message.contains("65536") && e.message.contains("1 to 65535"),
                "{e:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The daemon serves on.
    d.client().acquire(Protocol::Tcp, 1).unwrap();
    assert!(!d.log().contains("panicked"));
}

#[test]
fn a_panic_ends_the_daemon_and_a_restart_serves_with_persistent_reservations_intact() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut d = TestDaemon::with_env(&[("PORTRES_FAILPOINT", "panic-on:show")]);
    let c = d.client();
    // The panic must surface as an error here, not as a wait for the daemon to come back.
    c.set_reconnect_limit(std::time::Duration::ZERO);
    for start in [50000, 50010, 50020] {
        c.create_persistent(&PersistentSpec::new(Protocol::Tcp, start, 5))
            .unwrap();
    }
    let runtime = c.acquire_at(Protocol::Tcp, 51000, 2).unwrap();
    let e = c.show().unwrap_err();
    assert!(matches!(e, portres_client::Error::Transport(_)), "{e:?}");
    // The process is gone (SIGABRT), not alive and mute.
    let status = d.child.take().unwrap().wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "{status:?}; log:\n{}", d.log());
    assert!(d.log().contains("panic on show"), "{}", d.log());
    std::mem::forget(runtime); // the client cannot release it: the reconnect is off

    d.env.clear();
    d.launch();
    let shown = d.client().show().unwrap();
    let starts: Vec<u16> = shown.reservations.iter().map(|r| r.start).collect();
    // The runtime block is carried over too (live restore): its owner, this process, lives.
    assert_eq!(starts, vec![50000, 50010, 50020, 51000], "{shown:?}");
    // The exclude layer was put back: the persistent blocks are in the sysctl.
    assert!(
        d.reserved_ports().contains("50000-50004"),
        "{}",
        d.reserved_ports()
    );
}
