//! Unit and property tests of the table: every docs/behaviour.md §2 row the core decides, and the
//! invariants.

use std::collections::BTreeSet;

use proptest::prelude::*;

use crate::*;

struct Seq(u64);
impl TokenSource for Seq {
    fn random_u64(&mut self) -> u64 {
        // xorshift64*: deterministic in tests, never a counter in production.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Default)]
struct Busy(BTreeSet<(Protocol, u16)>);
impl Busy {
    fn first_in_use(&mut self, p: Protocol, r: PortRange) -> Option<SocketInUse> {
        r.ports()
            .find(|&x| self.0.contains(&(p, x)))
            .map(|port| SocketInUse {
                port,
                description: Some("test socket".into()),
            })
    }
}

/// The kernel of the tests: ports in the set are in use.
impl PortClaim for Busy {
    fn claim(&mut self, _: Token, p: Protocol, r: PortRange, _: Mode) -> Result<(), ClaimError> {
        match self.first_in_use(p, r) {
            Some(s) => Err(ClaimError::InUse(s)),
            None => Ok(()),
        }
    }
}

fn table(lo: u16, hi: u16, quota: u32) -> Table {
    Table::new(TableConfig {
        dynamic_range: PortRange::inclusive(lo, hi).unwrap(),
        runtime_quota: quota,
    })
}

fn caller(t: &mut Table, session: SessionId, pid: u32, uid: u32, admin: bool) -> Caller {
    t.open_session(
        session,
        Owner {
            pid: Some(pid),
            uid,
            command: Some(format!("proc{pid}")),
        },
    );
    Caller {
        session,
        pid,
        uid,
        gids: vec![uid],
        admin,
    }
}

fn acq(
    t: &mut Table,
    c: &Caller,
    p: Protocol,
    start: u32,
    count: u32,
) -> Result<Reservation, Refusal> {
    t.acquire(
        c,
        p,
        start,
        count,
        Mode::Hold,
        1,
        &mut Seq(7),
        &mut Busy::default(),
    )
}

#[test]
fn acquire_rows_of_the_spec_table() {
    let mut t = table(40000, 40099, 1000);
    let a = caller(&mut t, 1, 100, 1000, false);
    let r = acq(&mut t, &a, Protocol::Tcp, 50000, 10).unwrap();
    assert_eq!(r.range, PortRange::new(50000, 10).unwrap());
    assert_ne!(r.token.get(), 0);

    let e = acq(&mut t, &a, Protocol::Tcp, 0, 0).unwrap_err();
    assert_eq!(
        (e.code, e.windows_code),
        (ErrorCode::InvalidArgument, 10022)
    );
    let e = acq(&mut t, &a, Protocol::Tcp, 65530, 7).unwrap_err();
    assert_eq!(
        (e.code, e.windows_code),
        (ErrorCode::InvalidArgument, 10022)
    );
    assert!(e.message.contains("65536"), "{}", e.message);

    let e = acq(&mut t, &a, Protocol::Tcp, 50005, 10).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::AddressInUse, 10048));
    assert_eq!(e.conflict.as_ref().unwrap().port, 50005);
    assert!(e.message.contains("pid 100"), "{}", e.message);
    // UDP is independent.
    acq(&mut t, &a, Protocol::Udp, 50005, 10).unwrap();

    let mut busy = Busy::default();
    busy.0.insert((Protocol::Tcp, 51003));
    let e = t
        .acquire(
            &a,
            Protocol::Tcp,
            51000,
            5,
            Mode::Hold,
            1,
            &mut Seq(1),
            &mut busy,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AddressInUse);
    assert_eq!(e.conflict.unwrap().port, 51003);

    let w = acq(&mut t, &a, Protocol::Tcp, 0, 60).unwrap();
    assert!(t.config().dynamic_range.contains(w.range.start()));
    let e = acq(&mut t, &a, Protocol::Tcp, 0, 60).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::NoBufferSpace, 10055));
    t.check_invariants();
}

#[test]
fn wildcard_skips_ports_in_use() {
    let mut t = table(40000, 40009, 1000);
    let a = caller(&mut t, 1, 100, 1000, false);
    let mut busy = Busy::default();
    busy.0.insert((Protocol::Udp, 40002));
    let r = t
        .acquire(
            &a,
            Protocol::Udp,
            0,
            3,
            Mode::Hold,
            1,
            &mut Seq(1),
            &mut busy,
        )
        .unwrap();
    assert_eq!(r.range, PortRange::new(40003, 3).unwrap());
}

#[test]
fn quota_is_per_user_and_admins_are_exempt() {
    let mut t = table(40000, 40999, 10);
    let a = caller(&mut t, 1, 100, 1000, false);
    let b = caller(&mut t, 2, 101, 1000, false);
    let root = caller(&mut t, 3, 1, 0, true);
    acq(&mut t, &a, Protocol::Tcp, 0, 6).unwrap();
    let e = acq(&mut t, &b, Protocol::Udp, 0, 5).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::QuotaExceeded, 10055));
    acq(&mut t, &b, Protocol::Udp, 0, 4).unwrap();
    acq(&mut t, &root, Protocol::Tcp, 0, 100).unwrap();
    t.end_session(1);
    acq(&mut t, &b, Protocol::Udp, 0, 6).unwrap();
    t.check_invariants();
}

#[test]
fn release_rows() {
    let mut t = table(40000, 40999, 1000);
    let a = caller(&mut t, 1, 100, 1000, false);
    let a2 = caller(&mut t, 2, 100, 1000, false); // same process, second connection
    let b = caller(&mut t, 3, 200, 1000, false);
    let admin = caller(&mut t, 4, 300, 0, true);
    let r = acq(&mut t, &a, Protocol::Tcp, 0, 2).unwrap();
    let e = t.release(&b, r.token.get()).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::AccessDenied, 10013));
    let e = t.release(&a, 12345).unwrap_err();
    assert_eq!(
        (e.code, e.windows_code),
        (ErrorCode::InvalidArgument, 10022)
    );
    let e = t.release(&a, 0).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let p = t
        .create_persistent(
            &admin,
            Protocol::Tcp,
            5000,
            1,
            Mode::Exclude,
            Acl::default(),
            None,
            1,
            &mut Seq(3),
            &mut Busy::default(),
        )
        .unwrap();
    let e = t.release(&admin, p.token.get()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    t.release(&a2, r.token.get()).unwrap();
    let e = t.release(&a, r.token.get()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    t.check_invariants();
}

#[test]
fn associate_rows() {
    let mut t = table(40000, 40999, 1000);
    let a = caller(&mut t, 1, 100, 1000, false);
    let b = caller(&mut t, 2, 200, 1001, false);
    let admin = caller(&mut t, 3, 300, 0, true);
    let r = acq(&mut t, &a, Protocol::Tcp, 45000, 2).unwrap();
    let tok = r.token.get();
    assert_eq!(t.associate(&a, tok, Protocol::Tcp, 0).unwrap(), 45000);
    assert_eq!(t.associate(&a, tok, Protocol::Tcp, 0).unwrap(), 45001);
    let e = t.associate(&a, tok, Protocol::Tcp, 0).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::AddressInUse, 10048));
    assert!(t.return_port(r.token, 45000));
    let e = t.associate(&a, tok, Protocol::Tcp, 45001).unwrap_err();
    assert_eq!(e.code, ErrorCode::AddressInUse);
    let e = t.associate(&a, tok, Protocol::Tcp, 45002).unwrap_err();
    assert_eq!(
        (e.code, e.windows_code),
        (ErrorCode::InvalidArgument, 10022)
    );
    let e = t.associate(&a, tok, Protocol::Udp, 0).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    let e = t.associate(&b, tok, Protocol::Tcp, 0).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::AccessDenied, 10013));
    assert_eq!(t.associate(&a, tok, Protocol::Tcp, 45000).unwrap(), 45000);

    let acl = Acl {
        users: vec![],
        groups: vec![1001],
    };
    let p = t
        .create_persistent(
            &admin,
            Protocol::Udp,
            6000,
            3,
            Mode::Exclude,
            acl,
            None,
            1,
            &mut Seq(3),
            &mut Busy::default(),
        )
        .unwrap();
    assert_eq!(
        t.associate(&b, p.token.get(), Protocol::Udp, 0).unwrap(),
        6000
    );
    let e = t
        .associate(&a, p.token.get(), Protocol::Udp, 0)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    assert_eq!(
        t.associate(&admin, p.token.get(), Protocol::Udp, 6002)
            .unwrap(),
        6002
    );
    t.end_session(1);
    let e = t.associate(&a, tok, Protocol::Tcp, 0).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
}

#[test]
fn persistent_rows() {
    let mut t = table(40000, 40999, 1000);
    let a = caller(&mut t, 1, 100, 1000, false);
    let admin = caller(&mut t, 2, 1, 0, true);
    let mk = |t: &mut Table, c: &Caller, s, n| {
        t.create_persistent(
            c,
            Protocol::Tcp,
            s,
            n,
            Mode::Exclude,
            Acl::default(),
            None,
            1,
            &mut Seq(9),
            &mut Busy::default(),
        )
    };
    for (s, n) in [(0, 1), (1, 0), (65535, 2), (70000, 1)] {
        let e = mk(&mut t, &admin, s, n).unwrap_err();
        assert_eq!(
            (e.code, e.windows_code),
            (ErrorCode::InvalidParameter, 87),
            "{s} {n}"
        );
    }
    let e = mk(&mut t, &a, 7000, 1).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::AccessDenied, 5));
    let p = mk(&mut t, &admin, 7000, 10).unwrap();
    let e = mk(&mut t, &admin, 7009, 2).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::SharingViolation, 32));
    let rt = acq(&mut t, &a, Protocol::Tcp, 8000, 5).unwrap();
    let e = mk(&mut t, &admin, 7990, 11).unwrap_err();
    assert_eq!(e.code, ErrorCode::SharingViolation);
    assert_eq!(e.conflict.unwrap().port, 8000);
    let mut busy = Busy::default();
    busy.0.insert((Protocol::Tcp, 9001));
    let e = t
        .create_persistent(
            &admin,
            Protocol::Tcp,
            9000,
            2,
            Mode::Exclude,
            Acl::default(),
            None,
            1,
            &mut Seq(9),
            &mut busy,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::SharingViolation);

    assert_eq!(
        t.lookup_persistent(Protocol::Tcp, 7000, 10).unwrap().token,
        p.token
    );
    let e = t.lookup_persistent(Protocol::Tcp, 7000, 9).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::NotFound, 1168));
    let e = t.lookup_persistent(Protocol::Udp, 7000, 10).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = t.lookup_persistent(Protocol::Tcp, 8000, 5).unwrap_err();
    assert_eq!(
        e.code,
        ErrorCode::NotFound,
        "runtime blocks are not persistent"
    );
    let e = t.lookup_persistent(Protocol::Tcp, 0, 5).unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::InvalidParameter, 87));

    let e = t
        .check_delete_persistent(&a, Protocol::Tcp, 7000, 10)
        .unwrap_err();
    assert_eq!((e.code, e.windows_code), (ErrorCode::AccessDenied, 5));
    let e = t
        .check_delete_persistent(&admin, Protocol::Tcp, 7000, 1)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = t
        .check_delete_persistent(&admin, Protocol::Tcp, 0, 1)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidParameter);
    let tok = t
        .check_delete_persistent(&admin, Protocol::Tcp, 7000, 10)
        .unwrap()
        .token;
    assert!(t.remove_persistent(tok).is_some());
    assert!(
        t.remove_persistent(rt.token).is_none(),
        "runtime blocks are not deleted this way"
    );
    t.end_session(1);
    assert!(t.is_empty());
    t.check_invariants();
}

#[test]
fn ranges_parse_and_print() {
    assert_eq!(
        "32768 60999".parse::<PortRange>().unwrap(),
        PortRange::inclusive(32768, 60999).unwrap()
    );
    assert_eq!("80".parse::<PortRange>().unwrap().to_string(), "80");
    assert_eq!(PortRange::new(80, 3).unwrap().to_string(), "80-82");
    assert!("0-5".parse::<PortRange>().is_err());
    assert!("9-5".parse::<PortRange>().is_err());
    assert!(PortRange::new(u32::MAX, 2).is_err());
}

#[test]
fn windows_codes_depend_on_the_operation() {
    assert_eq!(
        ErrorCode::AccessDenied.windows_code(Operation::AcquireRuntime),
        10013
    );
    assert_eq!(
        ErrorCode::AccessDenied.windows_code(Operation::DeletePersistent),
        5
    );
    for c in ErrorCode::ALL {
        assert_eq!(c.as_str().parse::<ErrorCode>(), Ok(c));
    }
}

/// One step of a random workload.
#[derive(Debug, Clone)]
enum Step {
    Acquire {
        who: usize,
        udp: bool,
        start: u32,
        count: u32,
    },
    Release {
        who: usize,
        pick: usize,
        raw: u64,
    },
    Associate {
        who: usize,
        pick: usize,
        port: u16,
    },
    Create {
        who: usize,
        udp: bool,
        start: u32,
        count: u32,
    },
    Delete {
        who: usize,
        pick: usize,
    },
    EndSession {
        who: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let who = 0usize..4;
    let start = prop_oneof![Just(0u32), 39990u32..40070, 0u32..70000];
    let count = prop_oneof![1u32..8, 0u32..3, 1u32..40];
    prop_oneof![
        4 => (who.clone(), any::<bool>(), start.clone(), count.clone())
            .prop_map(|(who, udp, start, count)| Step::Acquire { who, udp, start, count }),
        2 => (who.clone(), any::<usize>(), any::<u64>())
            .prop_map(|(who, pick, raw)| Step::Release { who, pick, raw }),
        2 => (who.clone(), any::<usize>(), prop_oneof![Just(0u16), 39990u16..40070])
            .prop_map(|(who, pick, port)| Step::Associate { who, pick, port }),
        2 => (who.clone(), any::<bool>(), start, count)
            .prop_map(|(who, udp, start, count)| Step::Create { who, udp, start, count }),
        1 => (who.clone(), any::<usize>()).prop_map(|(who, pick)| Step::Delete { who, pick }),
        1 => who.prop_map(|who| Step::EndSession { who }),
    ]
}

/// Everything observable about a table, in a canonical order.
type Snapshot = (Vec<Reservation>, Vec<u32>, usize, Vec<(u32, u32)>);

fn snapshot(t: &Table) -> Snapshot {
    (
        t.reservations().cloned().collect(),
        (0..4).map(|u| t.runtime_ports_of(1000 + u)).collect(),
        t.session_count(),
        Protocol::ALL.iter().map(|&p| t.dynamic_free(p)).collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_and_failures_change_nothing(steps in prop::collection::vec(step(), 1..120)) {
        let mut t = table(40000, 40060, 60);
        let mut busy = Busy::default();
        busy.0.insert((Protocol::Tcp, 40010));
        busy.0.insert((Protocol::Udp, 40033));
        let mut tokens = Seq(0x9e37_79b9_7f4a_7c15);
        let mut session_of = [1u64, 2, 3, 4];
        let mut next_session = 5;
        let callers = |session_of: &[u64; 4], who: usize| Caller {
            session: session_of[who],
            pid: 100 + who as u32,
            uid: 1000 + who as u32,
            gids: vec![1000 + who as u32],
            admin: who == 3,
        };
        for (who, &session) in session_of.iter().enumerate() {
            t.open_session(session, Owner { pid: Some(100 + who as u32), uid: 1000 + who as u32, command: None });
        }
        for s in steps {
            let before = snapshot(&t);
            let live: Vec<Token> = t.reservations().map(|r| r.token).collect();
            let pick = |i: usize| live.get(i % live.len().max(1)).map(|t| t.get());
            let result: Result<(), Refusal> = match s.clone() {
                Step::Acquire { who, udp, start, count } => {
                    let p = if udp { Protocol::Udp } else { Protocol::Tcp };
                    let c = callers(&session_of, who);
                    t.acquire(&c, p, start, count, Mode::Hold, 0, &mut tokens, &mut busy).map(|r| {
                        assert!(busy.first_in_use(p, r.range).is_none(), "never over a busy port");
                        assert_eq!(r.owner.pid, Some(c.pid));
                    })
                }
                Step::Release { who, pick: i, raw } => {
                    let c = callers(&session_of, who);
                    let tok = if raw % 5 == 0 { raw } else { pick(i).unwrap_or(raw) };
                    t.release(&c, tok).map(|gone| {
                        let after = snapshot(&t);
                        assert_eq!(after.0.len() + 1, before.0.len(), "release frees exactly one");
                        assert!(!after.0.iter().any(|r| r.token == gone.token));
                    })
                }
                Step::Associate { who, pick: i, port } => {
                    let c = callers(&session_of, who);
                    match pick(i) {
                        Some(tok) => {
                            let p = t.get(Token::new(tok).unwrap()).unwrap().protocol;
                            t.associate(&c, tok, p, port).map(|got| {
                                assert!(t.get(Token::new(tok).unwrap()).unwrap().range.contains(got));
                            })
                        }
                        None => Ok(()),
                    }
                }
                Step::Create { who, udp, start, count } => {
                    let p = if udp { Protocol::Udp } else { Protocol::Tcp };
                    let c = callers(&session_of, who);
                    t.create_persistent(&c, p, start, count, Mode::Exclude, Acl::default(), None, 0, &mut tokens, &mut busy).map(|_| ())
                }
                Step::Delete { who, pick: i } => {
                    let c = callers(&session_of, who);
                    match pick(i).and_then(|tok| t.get(Token::new(tok).unwrap()).cloned()) {
                        Some(r) => t
                            .check_delete_persistent(&c, r.protocol, r.range.start().into(), r.range.count().into())
                            .map(|r| r.token)
                            .map(|tok| { t.remove_persistent(tok).unwrap(); }),
                        None => Ok(()),
                    }
                }
                Step::EndSession { who } => {
                    let mine: BTreeSet<Token> = t
                        .reservations()
                        .filter(|r| matches!(r.kind, Kind::Runtime { session } if session == session_of[who]))
                        .map(|r| r.token)
                        .collect();
                    let ended: BTreeSet<Token> = t.end_session(session_of[who]).iter().map(|r| r.token).collect();
                    assert_eq!(&mine, &ended, "a session's end frees exactly what it held");
                    let after: Vec<Token> = t.reservations().map(|r| r.token).collect();
                    let expect: Vec<Token> = before.0.iter().map(|r| r.token).filter(|t| !mine.contains(t)).collect();
                    assert_eq!(after, expect, "and nothing else");
                    session_of[who] = next_session;
                    next_session += 1;
                    t.open_session(session_of[who], Owner { pid: Some(100 + who as u32), uid: 1000 + who as u32, command: None });
                    Ok(())
                }
            };
            if result.is_err() {
                prop_assert_eq!(&snapshot(&t), &before, "a refused {:?} changed the table", s);
            }
            t.check_invariants();
        }
    }
}

#[test]
fn counts_past_a_u16_are_refused_never_truncated() {
    // A wildcard of 65,536 ports once became a count of 0 (`as u16`) and panicked.
    let mut t = table(1, 65535, 1 << 20);
    let c = caller(&mut t, 1, 10, 0, true);
    for (start, count) in [(0, 65536), (0, u32::MAX), (1, 65536), (65535, 2), (0, 0)] {
        let e = acq(&mut t, &c, Protocol::Tcp, start, count).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{start}+{count}: {e:?}");
    }
    let r = acq(&mut t, &c, Protocol::Tcp, 0, 65535).unwrap();
    assert_eq!((r.range.start(), r.range.count()), (1, 65535));
    t.check_invariants();
}

#[test]
fn carried_over_runtime_blocks_are_restored_and_move_to_a_new_session() {
    let mut t = table(40000, 40100, 1000);
    let a = caller(&mut t, 7, 100, 1000, false);
    let r = acq(&mut t, &a, Protocol::Tcp, 40010, 3).unwrap();
    // A new daemon's table, as live restore fills it.
    let mut fresh = table(40000, 40100, 1000);
    let owner = r.owner.clone();
    let carried = Reservation::runtime(
        r.token,
        r.protocol,
        r.range,
        r.mode,
        7,
        owner.clone(),
        r.created,
        [40011, 50000],
    );
    // Its session must be open first; then it is refused changing nothing.
    assert!(fresh.restore_runtime(carried.clone()).is_err());
    assert!(fresh.is_empty());
    fresh.open_session(7, owner.clone());
    fresh.restore_runtime(carried.clone()).unwrap();
    // Handed-out ports outside the block are not kept.
    assert_eq!(
        fresh.get(r.token).unwrap().handed_out(),
        &BTreeSet::from([40011])
    );
    assert_eq!(fresh.runtime_ports_of(1000), 3);
    // The same token or an overlapping block is refused.
    assert!(fresh.restore_runtime(carried).is_err());
    fresh.check_invariants();
    // The owner reconnects: the block moves to its new session and ends with it.
    fresh.open_session(9, owner);
    assert_eq!(fresh.move_to_session(r.token, 9), Some(7));
    assert_eq!(fresh.session_len(7), 0);
    assert_eq!(fresh.session_len(9), 1);
    assert_eq!(fresh.move_to_session(r.token, 42), None, "no such session");
    fresh.check_invariants();
    assert!(fresh.end_session(7).is_empty());
    assert_eq!(fresh.end_session(9).len(), 1);
    assert!(fresh.is_empty());
    assert_eq!(fresh.runtime_ports_of(1000), 0);
    fresh.check_invariants();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The deny layer's map keys: the prefixes of a block cover exactly its ports, each aligned,
    /// without overlap, at most 30 of them.
    #[test]
    fn prefixes_cover_exactly_the_block(start in 1u32..=65535, count in 1u32..=65535) {
        let Ok(r) = PortRange::new(start, count) else { return Ok(()) };
        let pieces = r.prefixes();
        prop_assert!(pieces.len() <= 30, "{} pieces for {r}", pieces.len());
        let mut next = u32::from(r.start());
        for (first, bits) in pieces {
            prop_assert!(bits <= 16);
            let size = 1u32 << (16 - bits);
            prop_assert_eq!(u32::from(first), next, "contiguous, in order");
            prop_assert_eq!(u32::from(first) % size, 0, "aligned");
            next += size;
        }
        prop_assert_eq!(next, r.end());
    }
}

#[test]
fn prefixes_at_the_extremes() {
    let one = PortRange::new(1, 1).unwrap();
    assert_eq!(one.prefixes(), vec![(1, 16)]);
    let top = PortRange::new(65535, 1).unwrap();
    assert_eq!(top.prefixes(), vec![(65535, 16)]);
    let all = PortRange::new(1, 65535).unwrap();
    assert_eq!(all.prefixes().len(), 16);
    let aligned = PortRange::new(32768, 32768).unwrap();
    assert_eq!(aligned.prefixes(), vec![(32768, 1)]);
}
