//! Answers that do not fit one frame: `who` on a busy port (10,000 connections), `show` of a
//! big table, a client that stops reading a streamed reply half-way, and an older client that
//! does not ask for streaming.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use portres_client::{Mode, PersistentSpec, Protocol};
use portres_proto::{Hello, HelloReply, ReplyBody, ReplyFrame};
use serde_json::json;

use crate::util::*;

/// `busy_port.py` in the daemon's namespace: a listener on 127.0.0.1:`port` with `n`
/// connections; they last until the returned child's stdin closes.
fn busy_port(d: &TestDaemon, port: u16, n: usize) -> Child {
    let mut cmd = d.nsenter();
    cmd.arg("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 20000; exec python3 {} {port} {n}",
            world_readable("busy_port.py").display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = spawn(&mut cmd);
    let line = first_line(&mut child);
    assert_eq!(line.trim(), "ready", "busy_port.py did not start");
    child
}

fn raw(d: &TestDaemon) -> UnixStream {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    portres_proto::write_frame(&mut s, &Hello::new("scale-test")).unwrap();
    let r: HelloReply = portres_proto::decode(&portres_proto::read_frame(&mut s).unwrap()).unwrap();
    assert!(matches!(r, HelloReply::Welcome(_)));
    s
}

fn reply(s: &mut UnixStream) -> ReplyFrame {
    portres_proto::decode(&portres_proto::read_frame(s).unwrap()).unwrap()
}

#[test]
fn who_on_a_port_with_10000_connections() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::with_config("reply_timeout_ms = 500\n");
    let mut busy = busy_port(&d, 9000, 10_000);

    // The summary: a few lines, every socket counted.
    let out = run(d.cli().args(["who", "9000"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("10001 sockets on the port in all")
            && text.contains("10000 connected")
            && text.contains("1 listening")
            && text.contains("by process: ")
            && text.contains("top remote addresses: 10000 127.0.0.2")
            && text.contains("listening on 127.0.0.1:9000"),
        "{text}"
    );
    assert!(text.lines().count() < 20, "{text}");

    // --all: every socket, one line each.
    let out = run(d.cli().args(["who", "9000", "--all"]));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let described = text.lines().filter(|l| l.contains(":9000")).count();
    assert!(described >= 10_001, "{described} lines");

    // --json: one document with every socket and its process.
    let out = run(d.cli().args(["--json", "who", "9000"]));
    let doc = json(&out);
    let sockets = doc["sockets"].as_array().unwrap();
    assert_eq!(sockets.len(), 10_001);
    assert_eq!(doc["summary"]["sockets"], 10_001);
    assert!(
        sockets.iter().all(|s| s["pid"].is_u64()),
        "every process is seen"
    );
    assert!(doc["reservation"].is_null());

    // A client that asks for every socket and stops reading half-way is dropped; nobody else
    // notices.
    let mut stalled = raw(&d);
    portres_proto::write_frame(
        &mut stalled,
        &json!({"id": 1, "op": "who", "protocol": "tcp", "port": 9000, "all": true, "stream": true}),
    )
    .unwrap();
    let head = reply(&mut stalled);
    assert!(matches!(head.body, ReplyBody::Ok(_)), "{head:?}");
    let others = Instant::now();
    let c = d.client();
    c.status().unwrap();
    assert_eq!(
        c.who(Protocol::Tcp, 9000).unwrap().summary.unwrap().sockets,
        10_001
    );
    let served_meanwhile = others.elapsed();
    wait_until(
        "the daemon drops the client that stopped reading",
        Duration::from_secs(20),
        || d.log().contains("read none of its reply"),
    );
    // What reached the stalled client ends before the end frame.
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest).unwrap();
    assert!(
        !String::from_utf8_lossy(&rest).contains("\"end\""),
        "the stream was cut"
    );
    assert!(
        served_meanwhile < Duration::from_secs(10),
        "{served_meanwhile:?}"
    );
    c.status().unwrap();
    busy.stdin.take().unwrap().write_all(b"").unwrap();
    let _ = busy.wait();
}

#[test]
fn show_of_a_big_table_streams_and_filters() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    for i in 0..300u32 {
        c.create_persistent(&PersistentSpec::new(Protocol::Tcp, 20_000 + 2 * i, 1))
            .unwrap();
    }
    let mut runtime = Vec::new();
    for i in 0..1_000u32 {
        runtime.push(
            c.acquire_with(Protocol::Udp, 40_000 + i, 1, Mode::Exclude)
                .unwrap(),
        );
    }
    let shown = c.show().unwrap();
    assert_eq!(shown.reservations.len(), 1_300);

    // The CLI, human and JSON.
    let out = run(d.cli().arg("show"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1_301);
    let out = run(d.cli().args(["--json", "show"]));
    assert_eq!(json(&out)["reservations"].as_array().unwrap().len(), 1_300);

    // Filters.
    let count = |args: &[&str]| {
        let out = run(d.cli().args(["--json", "show"]).args(args));
        assert!(out.status.success(), "{args:?}: {out:?}");
        json(&out)["reservations"].as_array().unwrap().len()
    };
    assert_eq!(count(&["--kind", "persistent"]), 300);
    assert_eq!(count(&["--kind", "runtime"]), 1_000);
    assert_eq!(count(&["--udp"]), 1_000);
    assert_eq!(count(&["--tcp", "--ports", "20000-20009"]), 5);
    assert_eq!(count(&["--ports", "40500"]), 1);
    assert_eq!(count(&["--user", "root"]), 1_300);
    assert_eq!(count(&["--user", "nobody"]), 0);
    let out = run(d.cli().args(["show", "--user", "no-such-user-here"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no user named"),
        "{out:?}"
    );
    let out = run(d.cli().args(["show", "--ports", "9-1"]));
    assert!(!out.status.success());

    // A client that does not ask for a stream gets an error that says so, and keeps its
    // connection.
    let mut old = raw(&d);
    portres_proto::write_frame(&mut old, &json!({"id": 5, "op": "show"})).unwrap();
    let r = reply(&mut old);
    match r.body {
        ReplyBody::Error(e) => {
            assert_eq!(e.code, "NoBufferSpace");
            assert!(e.message.contains("stream"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    portres_proto::write_frame(&mut old, &json!({"id": 6, "op": "status"})).unwrap();
    assert!(matches!(reply(&mut old).body, ReplyBody::Ok(_)));
    drop(runtime);
}
