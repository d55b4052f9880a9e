//! Kernel safety: holding UDP ports creates no BPF program per port (a block of them freed at
//! once wedged the kernel's BPF allocator), in the system daemon (shared eBPF programs) and in
//! a per-user daemon that may not load eBPF (no program on placeholders, a bounded number of
//! classic steering programs on handed-out sockets).

use std::net::UdpSocket;
use std::os::fd::{AsRawFd, OwnedFd};

use portres_client::{Error, Protocol};
use portres_sys::bpf::{AttachedFilter, attached_filter, live_program_count};

use crate::util::*;

/// The two tests count the machine's BPF programs, and the user-mode one makes 256 classic
/// ones on purpose: one at a time.
static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Copies of the daemon's UDP sockets bound to ports of `lo..=hi` (`pidfd_getfd(2)`), with the
/// filter each carries.
fn daemon_udp_filters(pid: u32, lo: u16, hi: u16) -> Vec<(u16, AttachedFilter)> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let n: i32 = entry.file_name().to_string_lossy().parse().unwrap();
        let Ok(fd): Result<OwnedFd, _> =
            rustix::process::pidfd_getfd(&pidfd, n, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        let is_udp = rustix::net::sockopt::socket_type(&fd)
            .is_ok_and(|t| t == rustix::net::SocketType::DGRAM);
        let port = portres_sys::hold::local_addr(&fd).map(|a| a.port());
        if let (true, Ok(port)) = (is_udp, port)
            && (lo..=hi).contains(&port)
        {
            assert!(fd.as_raw_fd() >= 0);
            out.push((port, attached_filter(&fd).unwrap()));
        }
    }
    out.sort_by_key(|(p, _)| *p);
    out
}

/// 20 datagrams sent to `port` in the daemon's namespace all reach `sock`, in order.
fn every_datagram_arrives(d: &TestDaemon, sock: &UdpSocket, port: u16) {
    d.in_netns(move || {
        let tx = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
        for i in 0..20u8 {
            tx.send_to(&[i], ("127.0.0.1", port)).unwrap();
        }
    });
    let mut buf = [0u8; 1];
    for i in 0..20u8 {
        sock.recv_from(&mut buf).unwrap();
        assert_eq!(buf[0], i);
    }
}

/// The most BPF programs alive at once beyond `baseline` while holding and releasing UDP
/// blocks of `count` ports `rounds` times.
fn peak_programs_while_cycling(d: &TestDaemon, start: u32, count: u32, rounds: usize) -> usize {
    let c = d.client();
    let baseline = live_program_count().unwrap();
    let mut peak = 0;
    for _ in 0..rounds {
        let r = c.acquire_at(Protocol::Udp, start, count).unwrap();
        peak = peak.max(live_program_count().unwrap().saturating_sub(baseline));
        r.release().unwrap();
    }
    peak.max(live_program_count().unwrap().saturating_sub(baseline))
}

#[test]
fn system_daemon_udp_placeholders_share_two_ebpf_programs() {
    if run_elsewhere(Needs::HostRoot(
        "loading eBPF programs, which kernel.unprivileged_bpf_disabled keeps from a user namespace",
    )) {
        return;
    }
    let _one = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let d = TestDaemon::start();
    let c = d.client();
    let layers = c.status().unwrap().layers;
    let hold = layers.iter().find(|l| l.name == "hold").unwrap();
    assert!(
        hold.reason.contains("share two eBPF programs"),
        "{}",
        hold.reason
    );

    let r = c.acquire_at(Protocol::Udp, 44000, 1000).unwrap();
    let filters = daemon_udp_filters(d.pid, 44000, 44999);
    assert_eq!(filters.len(), 1000, "one placeholder per port");
    for (port, f) in &filters {
        assert_eq!(
            *f,
            AttachedFilter::Ebpf,
            "placeholder of {port} carries a program of its own"
        );
    }
    // The handed-out socket still gets every datagram (steered by the shared program).
    let sock = r.udp_socket(None, 44500).unwrap();
    every_datagram_arrives(&d, &sock, 44500);
    close(sock);
    r.release().unwrap();

    // 50 rounds of 1,000 UDP ports: the old design compiled 2,000 programs a round. Other
    // tests running meanwhile start daemons (two programs each), hence the slack.
    let peak = peak_programs_while_cycling(&d, 44000, 1000, 50);
    assert!(
        peak < 100,
        "{peak} BPF programs appeared while holding UDP blocks of 1,000 ports"
    );
}

#[test]
fn user_daemon_holds_udp_without_a_program_per_port() {
    if run_elsewhere(Needs::SecondUid) {
        return;
    }
    let _one = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let d = TestDaemon::as_user(NOBODY);
    let c = d.client();
    let layers = c.status().unwrap().layers;
    let hold = layers.iter().find(|l| l.name == "hold").unwrap();
    assert!(
        hold.reason.contains("carry no BPF program") && hold.reason.contains("at most 256"),
        "{}",
        hold.reason
    );

    let r = c.acquire_at(Protocol::Udp, 45000, 300).unwrap();
    let filters = daemon_udp_filters(d.pid, 45000, 45299);
    assert_eq!(filters.len(), 300);
    assert!(
        filters.iter().all(|(_, f)| *f == AttachedFilter::None),
        "{filters:?}"
    );
    // Datagrams reach a socket handed out on the wildcard (classic steering, one program).
    let sock = r.udp_socket(None, 45000).unwrap();
    every_datagram_arrives(&d, &sock, 45000);
    // At most 256 classic programs at once: the 257th wildcard socket is refused clearly.
    let mut socks = vec![sock];
    for port in 45001..45256 {
        socks.push(r.udp_socket(None, port).unwrap());
    }
    let e = r.udp_socket(None, 45256).unwrap_err();
    assert!(
        matches!(&e, Error::NoBufferSpace(d) if d.message.contains("eBPF")),
        "{e:?}"
    );
    // A specific address does not join the placeholder's group and needs no program.
    let lo = r
        .udp_socket(Some("127.0.0.1".parse().unwrap()), 45257)
        .unwrap();
    close(lo);
    close(socks);
    r.release().unwrap();
    // Another block may steer again (the released block's programs are gone with it).
    let r = c.acquire_at(Protocol::Udp, 46000, 1).unwrap();
    close(r.udp_socket(None, 0).unwrap());
    r.release().unwrap();

    let peak = peak_programs_while_cycling(&d, 46000, 1000, 50);
    assert!(
        peak < 100,
        "{peak} BPF programs appeared while holding UDP blocks of 1,000 ports"
    );
}
