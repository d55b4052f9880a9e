//! Bad input on the wire: an error reply where possible, the connection closed, the daemon and
//! everyone else's sessions unaffected.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use portres_client::Protocol;
use portres_proto::{Hello, HelloReply, ReplyBody, ReplyFrame};

use crate::util::*;

fn connect(d: &TestDaemon, hello: bool) -> UnixStream {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    if hello {
        portres_proto::write_frame(&mut s, &Hello::new("test")).unwrap();
        let r: HelloReply =
            portres_proto::decode(&portres_proto::read_frame(&mut s).unwrap()).unwrap();
        assert!(matches!(r, HelloReply::Welcome(_)));
    }
    s
}

fn expect_error_then_close(s: &mut UnixStream, id: u64, what: &str) {
    let reply: ReplyFrame = portres_proto::decode(&portres_proto::read_frame(s).unwrap()).unwrap();
    assert_eq!(reply.id, id, "{what}");
    match reply.body {
        ReplyBody::Error(e) => {
            assert_eq!(e.code, "MalformedRequest", "{what}: {e:?}");
            assert!(
                e.message.contains("connection is closed"),
                "{what}: {}",
                e.message
            );
        }
        other => panic!("{what}: expected an error, got {other:?}"),
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{what}: the daemon closes the connection");
}

#[test]
fn malformed_frames_get_an_error_and_everyone_else_is_unaffected() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let d = TestDaemon::start();
    let c = d.client();
    let held = c.acquire_at(Protocol::Tcp, 44000, 3).unwrap();

    // Oversize length.
    let mut s = connect(&d, true);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    expect_error_then_close(&mut s, 0, "oversize frame");

    // A frame that is not JSON.
    let mut s = connect(&d, true);
    s.write_all(&8u32.to_le_bytes()).unwrap();
    s.write_all(b"not json").unwrap();
    expect_error_then_close(&mut s, 0, "not JSON");

    // JSON with an unknown operation: the id is echoed.
    let mut s = connect(&d, true);
    portres_proto::write_frame(&mut s, &serde_json::json!({"id": 7, "op": "fly"})).unwrap();
    expect_error_then_close(&mut s, 7, "unknown op");

    // A field of the wrong type.
    let mut s = connect(&d, true);
    portres_proto::write_frame(
        &mut s,
        &serde_json::json!({"id": 8, "op": "acquire", "protocol": "tcp", "start": -1, "count": 1}),
    )
    .unwrap();
    expect_error_then_close(&mut s, 8, "negative start");

    // Wrong protocol version in the handshake.
    let mut s = connect(&d, false);
    portres_proto::write_frame(
        &mut s,
        &serde_json::json!({"protocol": "portres", "version": 99}),
    )
    .unwrap();
    let r: HelloReply = portres_proto::decode(&portres_proto::read_frame(&mut s).unwrap()).unwrap();
    match r {
        HelloReply::Error(e) => assert!(e.message.contains("version 99"), "{}", e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Not our protocol at all (an HTTP request): "GET " is a length far over the maximum.
    let mut s = connect(&d, false);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r: HelloReply = portres_proto::decode(&portres_proto::read_frame(&mut s).unwrap()).unwrap();
    assert!(matches!(r, HelloReply::Error(_)));

    // Truncated frames and random bytes, then hang up.
    for junk in [
        &[10u8, 0, 0, 0, b'{'][..],
        &[0xde, 0xad],
        &[3, 0, 0, 0, 0xff, 0xfe, 0xfd],
    ] {
        let mut s = connect(&d, true);
        s.write_all(junk).unwrap();
        drop(s);
    }

    // The daemon still serves, and the other session kept its reservation.
    let show = c.show().unwrap();
    assert_eq!(show.reservations.len(), 1);
    assert_eq!(show.reservations[0].start, held.range().start());
    d.client().acquire(Protocol::Udp, 1).unwrap();
    assert!(!d.log().contains("panicked"), "{}", d.log());
}
