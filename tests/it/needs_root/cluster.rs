//! Cluster mode on etcd (feature `cluster`): several daemons, each in a network namespace of
//! its own (its own port space: a "host"), sharing one real etcd cluster that runs in a fabric
//! namespace reached over a bridge and one veth pair per host.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// The fabric: a network namespace with a bridge (10.77.0.1/24) and the etcd members on it.
struct Fabric {
    ns: Netns,
    dir: tempfile::TempDir,
    etcd: Vec<Option<Child>>,
    members: usize,
    /// Hosts attached so far (each takes 10.77.0.(10 + index)).
    hosts: usize,
    /// The members' `request_timeout_ms` (and `verdict_timeout_ms`).
    timeout_ms: u64,
    /// TLS: the directory of `ca.pem`, `server.pem`/`.key` and `client.pem`/`.key`.
    tls: Option<std::path::PathBuf>,
}

const ETCD: &str = "/usr/bin/etcd";

fn client_port(i: usize) -> u16 {
    2379 + 2 * i as u16
}

impl Fabric {
    /// A fabric with an etcd cluster of `members` members, healthy.
    fn new(members: usize) -> Fabric {
        Self::build(members, None)
    }

    /// One etcd member that serves clients over TLS and asks for client certificates.
    fn with_tls() -> Fabric {
        Self::build(1, Some(make_certs()))
    }

    fn build(members: usize, tls: Option<std::path::PathBuf>) -> Fabric {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "the cluster tests run a real etcd: install Debian's etcd-server (.ci/run does)"
        );
        let ns = Netns::new();
        let out = run(Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", ns.pid))
            .args(["sh", "-c"])
            .arg(
                "ip link add br0 type bridge && ip addr add 10.77.0.1/24 dev br0 && \
                 ip link set br0 up",
            ));
        assert!(out.status.success(), "bridge: {out:?}");
        let mut f = Fabric {
            ns,
            dir: tempfile::tempdir().unwrap(),
            etcd: Vec::new(),
            members,
            hosts: 0,
            timeout_ms: 3000,
            tls,
        };
        for i in 0..members {
            let child = f.spawn_etcd(i, true);
            f.etcd.push(Some(child));
        }
        f.wait_healthy((0..members).collect());
        f
    }

    fn initial_cluster(&self) -> String {
        (0..self.members)
            .map(|i| format!("e{i}=http://10.77.0.1:{}", client_port(i) + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_etcd(&self, i: usize, new: bool) -> Child {
        let data = self.dir.path().join(format!("e{i}"));
        let (c, p) = (client_port(i), client_port(i) + 1);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let log = std::fs::File::create(self.dir.path().join(format!("e{i}.log"))).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", self.ns.pid))
            .arg(ETCD)
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-peer-urls", &format!("http://10.77.0.1:{p}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://10.77.0.1:{p}"),
            ])
            .args(["--listen-client-urls", &format!("{scheme}://10.77.0.1:{c}")])
            .args([
                "--advertise-client-urls",
                &format!("{scheme}://10.77.0.1:{c}"),
            ])
            .args(["--initial-cluster", &self.initial_cluster()])
            .args([
                "--initial-cluster-state",
                if new { "new" } else { "existing" },
            ])
            .args(["--initial-cluster-token", "portres-test"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"]);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(t.join("server.pem"))
                .arg("--key-file")
                .arg(t.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(t.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        spawn(&mut cmd)
    }

    /// The client URLs of the members.
    fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        (0..self.members)
            .map(|i| format!("{scheme}://10.77.0.1:{}", client_port(i)))
            .collect()
    }

    /// `GET /health` on member `i`'s client port, from the fabric (with TLS: `etcdctl endpoint
    /// health`).
    fn healthy(&self, i: usize) -> bool {
        if self.tls.is_some() {
            return self.etcdctl(&["endpoint", "health"]).status.success();
        }
        let port = client_port(i);
        let pid = self.ns.pid;
        std::thread::spawn(move || {
            portres_sys::process::enter_net_namespace_of(pid).unwrap();
            let Ok(mut s) = std::net::TcpStream::connect(("10.77.0.1", port)) else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.contains("\"health\":\"true\"")
        })
        .join()
        .unwrap()
    }

    fn wait_healthy(&self, which: Vec<usize>) {
        let t = Instant::now();
        while !which.iter().all(|&i| self.healthy(i)) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "etcd did not become healthy; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills etcd member `i` (SIGKILL).
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.etcd[i].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts etcd member `i` again on its data.
    fn restart(&mut self, i: usize) {
        let c = self.spawn_etcd(i, false);
        self.etcd[i] = Some(c);
        self.wait_healthy(vec![i]);
    }

    /// A daemon on a new host: its own namespace, linked to the bridge, in cluster mode as
    /// `node`.
    fn host(&mut self, node: &str) -> TestDaemon {
        self.host_with(node, "")
    }

    fn host_with(&mut self, node: &str, extra: &str) -> TestDaemon {
        let i = self.hosts;
        self.hosts += 1;
        let fabric = self.ns.pid;
        let setup = format!(
            "ip link add h0 type veth peer name v{i} netns {fabric} && \
             ip addr add 10.77.0.{}/24 dev h0 && ip link set h0 up && \
             nsenter --net=/proc/{fabric}/ns/net sh -c 'ip link set v{i} master br0 && \
             ip link set v{i} up' &&",
            10 + i
        );
        let endpoints = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut config = format!(
            "{extra}\n[cluster]\nendpoints = [{endpoints}]\nnode = \"{node}\"\n\
             lease_ttl_secs = 3\nverdict_timeout_ms = {t}\nrequest_timeout_ms = {t}\n",
            t = self.timeout_ms
        );
        if let Some(t) = &self.tls {
            config += &format!(
                "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                t.join("ca.pem").display(),
                t.join("client.pem").display(),
                t.join("client.key").display()
            );
        }
        let d = TestDaemon::with_setup(&config, &setup);
        wait_connected(&d);
        d
    }

    /// Cuts host `i` off the fabric (its link down), or links it again.
    fn link(&self, i: usize, up: bool) {
        let out = run(Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.ns.pid))
            .args(["ip", "link", "set", &format!("v{i}")])
            .arg(if up { "up" } else { "down" }));
        assert!(out.status.success(), "{out:?}");
    }

    /// `etcdctl` against the cluster, from the fabric.
    fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", self.ns.pid))
            .arg("etcdctl")
            .arg(format!("--endpoints={}", self.endpoints().join(",")));
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.join("ca.pem").display()))
                .arg(format!("--cert={}", t.join("client.pem").display()))
                .arg(format!("--key={}", t.join("client.key").display()));
        }
        run(cmd.args(args).env("ETCDCTL_API", "3"))
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for c in self.etcd.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn status(d: &TestDaemon) -> serde_json::Value {
    json(&run(d.cli().args(["--json", "cluster", "status"])))
}

fn wait_connected(d: &TestDaemon) {
    wait_until(
        "the member connects to etcd",
        Duration::from_secs(20),
        || status(d)["connected"] == true,
    );
}

fn wait_members(d: &TestDaemon, n: usize) {
    wait_until(
        &format!("{n} live members"),
        Duration::from_secs(20),
        || status(d)["members"].as_array().map(Vec::len) == Some(n),
    );
}

fn show(d: &TestDaemon) -> Vec<serde_json::Value> {
    json(&run(d.cli().args(["--json", "show"])))["reservations"]
        .as_array()
        .unwrap()
        .clone()
}

/// The cluster-scoped rows of `show --json` as (protocol, start, count).
fn cluster_rows(d: &TestDaemon) -> Vec<(String, u64, u64)> {
    show(d)
        .iter()
        .filter(|r| r["scope"] == "cluster")
        .map(|r| {
            (
                r["protocol"].as_str().unwrap().to_string(),
                r["start"].as_u64().unwrap(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn add(d: &TestDaemon, start: u16, count: u16) -> std::process::Output {
    run(d.cli().args([
        "persistent",
        "add",
        "--cluster",
        "--start",
        &start.to_string(),
        "--count",
        &count.to_string(),
        "--description",
        "the fleet's agents",
    ]))
}

fn enforces(d: &TestDaemon, port: u16) -> bool {
    d.reserved_ports()
        .split(',')
        .any(|part| match part.split_once('-') {
            Some((a, b)) => {
                a.parse::<u16>().is_ok_and(|a| a <= port)
                    && b.parse::<u16>().is_ok_and(|b| port <= b)
            }
            None => part.trim().parse::<u16>() == Ok(port),
        })
}

#[test]
fn a_cluster_reservation_holds_on_every_member_and_goes_everywhere() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let hosts: Vec<TestDaemon> = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|n| f.host(n))
        .collect();
    wait_members(&hosts[0], 3);
    let out = add(&hosts[0], 9400, 10);
    assert!(out.status.success(), "{out:?}");
    // The creator enforces it when it replies; the others soon after.
    assert_eq!(cluster_rows(&hosts[0]), vec![("tcp".into(), 9400, 10)]);
    assert!(enforces(&hosts[0], 9400) && enforces(&hosts[0], 9409));
    for h in &hosts[1..] {
        wait_until("a member enforces it", Duration::from_secs(10), || {
            enforces(h, 9405)
        });
        assert_eq!(cluster_rows(h), vec![("tcp".into(), 9400, 10)]);
    }
    // show: scope, where it lives, and every member's state.
    let row = show(&hosts[1])
        .into_iter()
        .find(|r| r["scope"] == "cluster")
        .unwrap();
    assert_eq!(row["source"], "cluster");
    assert_eq!(row["description"], "the fleet's agents");
    assert_eq!(row["cluster"]["node"], "host-a");
    assert_eq!(row["cluster"]["key"], "/portres/reservations/tcp/09400");
    wait_until(
        "every member says enforced",
        Duration::from_secs(10),
        || {
            let row = show(&hosts[2])
                .into_iter()
                .find(|r| r["scope"] == "cluster")
                .unwrap();
            let states = row["cluster"]["members"].as_array().unwrap().clone();
            states.len() == 3 && states.iter().all(|m| m["state"] == "enforced")
        },
    );
    // A host reservation says so too.
    let out = run(hosts[1]
        .cli()
        .args(["persistent", "add", "--start", "9500"]));
    assert!(out.status.success(), "{out:?}");
    let local = show(&hosts[1])
        .into_iter()
        .find(|r| r["start"] == 9500)
        .unwrap();
    assert_eq!(local["scope"], "host");
    // The table says which is which.
    let human = String::from_utf8(run(hosts[1].cli().arg("show")).stdout).unwrap();
    assert!(
        human.contains("SCOPE") && human.contains("cluster reservation made on host-a"),
        "{human}"
    );
    // An overlapping cluster create is refused, naming the one in the way.
    let out = add(&hosts[2], 9405, 1);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("overlaps cluster reservation 9400-9409/tcp"),
        "{err}"
    );
    // Deleted from any member: gone from every member.
    let out =
        run(hosts[2]
            .cli()
            .args(["persistent", "delete", "--start", "9400", "--count", "10"]));
    assert!(out.status.success(), "{out:?}");
    assert!(cluster_rows(&hosts[2]).is_empty());
    for h in &hosts {
        wait_until("every member lets it go", Duration::from_secs(10), || {
            !enforces(h, 9405) && cluster_rows(h).is_empty()
        });
    }
    // cluster status lists the members, none behind by much, no failures.
    let s = status(&hosts[0]);
    assert_eq!(s["node"], "host-a");
    let members = s["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(
        members
            .iter()
            .all(|m| m["failures"].as_array().unwrap().is_empty())
    );
    // The metrics say so too.
    let metrics = String::from_utf8(run(hosts[0].cli().arg("metrics")).stdout).unwrap();
    for line in [
        "portres_cluster_connected 1",
        "portres_cluster_members 3",
        "portres_cluster_enforce_failures 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    let human = String::from_utf8(run(hosts[0].cli().args(["cluster", "status"])).stdout).unwrap();
    assert!(
        human.contains("host-c") && human.contains("connected"),
        "{human}"
    );
}

#[test]
fn a_port_taken_on_one_member_refuses_the_create_naming_member_and_holder() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let a = f.host("host-a");
    let b = f.host("host-b");
    let c = f.host("host-c");
    wait_members(&a, 3);
    // A socket on host-c.
    let listener = c.bind_tcp(9601);
    let out = add(&a, 9600, 4);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("member host-c refuses")
            && err.contains("9601")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    for h in [&a, &b, &c] {
        assert!(cluster_rows(h).is_empty());
        assert!(!enforces(h, 9600));
    }
    drop(listener);
    // A reservation of host-b's own.
    let out = run(b.cli().args(["persistent", "add", "--start", "9602"]));
    assert!(out.status.success(), "{out:?}");
    let out = add(&a, 9600, 4);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("member host-b refuses") && err.contains("9602"),
        "{err}"
    );
    // Out of the way: granted.
    let out = run(b.cli().args(["persistent", "delete", "--start", "9602"]));
    assert!(out.status.success(), "{out:?}");
    let out = add(&a, 9600, 4);
    assert!(out.status.success(), "{out:?}");
    wait_until("host-c enforces it", Duration::from_secs(10), || {
        enforces(&c, 9603)
    });
}

#[test]
fn with_etcd_down_local_work_goes_on_cluster_work_fails_fast_and_reservations_stay() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let mut a = f.host("host-a");
    let b = f.host("host-b");
    wait_members(&a, 2);
    assert!(add(&a, 9700, 2).status.success());
    wait_until("host-b enforces it", Duration::from_secs(10), || {
        enforces(&b, 9701)
    });
    f.kill(0);
    // Host-local operations keep working.
    let out = run(b.cli().args(["persistent", "add", "--start", "9710"]));
    assert!(out.status.success(), "{out:?}");
    // A cluster create fails within the bound, naming the endpoints.
    let t = Instant::now();
    let out = add(&b, 9720, 1);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("etcd is unreachable at http://10.77.0.1:2379"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // What was made stays enforced, also across a restart while etcd is down.
    assert!(enforces(&b, 9700));
    a.kill9();
    a.launch();
    assert!(enforces(&a, 9700) && enforces(&a, 9701));
    assert_eq!(cluster_rows(&a), vec![("tcp".into(), 9700, 2)]);
    assert_eq!(status(&a)["connected"], false);
    // etcd back: both reconnect, and cluster work goes on.
    f.restart(0);
    wait_connected(&a);
    wait_connected(&b);
    wait_members(&a, 2);
    let out = add(&b, 9720, 1);
    assert!(out.status.success(), "{out:?}");
    wait_until("host-a enforces it", Duration::from_secs(10), || {
        enforces(&a, 9720)
    });
}

#[test]
fn a_member_killed_and_restarted_catches_up_from_its_revision_or_a_full_list() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let a = f.host("host-a");
    let mut b = f.host("host-b");
    wait_members(&a, 2);
    assert!(add(&a, 9800, 1).status.success());
    assert!(add(&a, 9801, 1).status.success());
    wait_until("host-b enforces both", Duration::from_secs(10), || {
        enforces(&b, 9800) && enforces(&b, 9801)
    });
    // It keeps what it applied on disk (at most a heartbeat later).
    let made = status(&a)["applied_revision"].as_i64().unwrap();
    wait_until("host-b saves its revision", Duration::from_secs(10), || {
        status(&b)["saved_revision"].as_i64().unwrap() >= made
    });
    b.kill9();
    // Its lease runs out (3 s); then the cluster goes on without it.
    wait_members(&a, 1);
    assert!(add(&a, 9802, 1).status.success());
    let out = run(a.cli().args(["persistent", "delete", "--start", "9800"]));
    assert!(out.status.success(), "{out:?}");
    b.launch();
    wait_connected(&b);
    wait_until("host-b catches up", Duration::from_secs(10), || {
        enforces(&b, 9802) && !enforces(&b, 9800) && enforces(&b, 9801)
    });
    assert!(b.log().contains("resum"), "{}", b.log());
    // Again, with the history compacted meanwhile: a full list.
    b.kill9();
    wait_members(&a, 1);
    assert!(add(&a, 9803, 1).status.success());
    let out = run(a.cli().args(["persistent", "delete", "--start", "9801"]));
    assert!(out.status.success(), "{out:?}");
    let rev = status(&a)["revision"].as_i64().unwrap();
    let out = f.etcdctl(&["compact", &rev.to_string()]);
    assert!(out.status.success(), "{out:?}");
    b.launch();
    wait_connected(&b);
    wait_until("host-b catches up", Duration::from_secs(10), || {
        enforces(&b, 9803) && !enforces(&b, 9801) && enforces(&b, 9802)
    });
    assert!(b.log().contains("is compacted"), "{}", b.log());
}

#[test]
fn one_etcd_member_of_three_killed_and_operations_continue() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(3);
    // A new leader is elected when the dead member led: a second or more on a loaded machine.
    f.timeout_ms = 6000;
    let a = f.host("host-a");
    let b = f.host("host-b");
    wait_members(&a, 2);
    assert!(add(&a, 9900, 1).status.success());
    f.kill(0);
    // The client fails over to the other endpoints; the cluster keeps quorum.
    let out = add(&b, 9901, 1);
    assert!(out.status.success(), "{out:?}");
    wait_until("host-a enforces it", Duration::from_secs(10), || {
        enforces(&a, 9901)
    });
    let out = run(a.cli().args(["persistent", "delete", "--start", "9900"]));
    assert!(out.status.success(), "{out:?}");
    wait_until("host-b lets it go", Duration::from_secs(10), || {
        !enforces(&b, 9900)
    });
}

#[test]
fn a_member_cut_off_is_waited_for_then_dropped_and_reconciles_when_back() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let a = f.host("host-a");
    let c = f.host("host-c");
    wait_members(&a, 2);
    // A runtime block of host-c's, kept free on host-a.
    let (mut child, (held, _)) = run_in_cluster(&c, &["--count", "2"]);
    wait_until("host-a keeps it free", Duration::from_secs(10), || {
        enforces(&a, held)
    });
    f.link(1, false);
    // While its lease lives, a create waits for its verdict and fails naming it.
    let out = add(&a, 9950, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("member host-c did not answer"),
        "{err}"
    );
    assert!(!cluster_rows(&a).iter().any(|r| r.1 == 9950));
    // Once its lease has run out, the cluster goes on without it, and its runtime block is
    // free again on host-a (host-c itself still holds it for its command).
    wait_members(&a, 1);
    wait_until(
        "host-a frees host-c's block",
        Duration::from_secs(10),
        || !enforces(&a, held),
    );
    assert!(enforces(&c, held));
    let out = add(&a, 9951, 1);
    assert!(out.status.success(), "{out:?}");
    // Back: it joins again and enforces what was made meanwhile.
    f.link(1, true);
    wait_members(&a, 2);
    wait_until("host-c reconciles", Duration::from_secs(15), || {
        enforces(&c, 9951)
    });
    close(child.stdin.take());
    let _ = child.wait();
}

/// The ports of `PORTRES_PORTS` (`FIRST-LAST` or one port).
fn ports_of(line: &str) -> (u16, u16) {
    let line = line.trim();
    match line.split_once('-') {
        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
        None => (line.parse().unwrap(), line.parse().unwrap()),
    }
}

/// `portres run --cluster` on `d`, its command waiting for its standard input to close.
fn run_in_cluster(d: &TestDaemon, args: &[&str]) -> (std::process::Child, (u16, u16)) {
    let mut child = spawn(
        d.cli()
            .args(["run", "--cluster"])
            .args(args)
            .args(["--", "sh", "-c", "echo $PORTRES_PORTS; cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let line = first_line(&mut child);
    (child, ports_of(&line))
}

#[test]
fn a_cluster_runtime_block_is_kept_free_everywhere_until_its_session_or_host_ends() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let mut a = f.host("host-a");
    let b = f.host("host-b");
    let c = f.host("host-c");
    wait_members(&a, 3);
    // A port bound on host-b refuses that block, naming the member and the holder.
    let listener = b.bind_tcp(40100);
    let out = run(a.cli().args([
        "run",
        "--cluster",
        "--start",
        "40100",
        "--count",
        "2",
        "--",
        "true",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("member host-b refuses") && err.contains("40100"),
        "{err}"
    );
    assert!(!enforces(&c, 40100));
    // host-a let its own block go (its sysctl write follows the reply).
    wait_until("host-a lets it go", Duration::from_secs(5), || {
        !enforces(&a, 40100)
    });
    drop(listener);
    // A wildcard block: held on host-a, kept free on the others while the command runs.
    let (mut child, (first, last)) = run_in_cluster(&a, &["--count", "4"]);
    assert_eq!(last - first, 3);
    for h in [&b, &c] {
        wait_until("a member keeps it free", Duration::from_secs(10), || {
            enforces(h, first) && enforces(h, last)
        });
        let row = show(h)
            .into_iter()
            .find(|r| r["start"] == first)
            .expect("the block is shown");
        assert_eq!(row["scope"], "cluster");
        assert_eq!(row["cluster"]["runtime"], true);
        assert_eq!(row["cluster"]["node"], "host-a");
    }
    let row = show(&a).into_iter().find(|r| r["start"] == first).unwrap();
    assert_eq!(
        (row["kind"].as_str(), row["scope"].as_str()),
        (Some("runtime"), Some("cluster"))
    );
    // Another member cannot take any of it.
    let out = run(c.cli().args([
        "run",
        "--cluster",
        "--start",
        &last.to_string(),
        "--",
        "true",
    ]));
    assert!(!out.status.success(), "{out:?}");
    // The command ends: the block leaves every member.
    close(child.stdin.take());
    assert!(child.wait().unwrap().success());
    for h in [&b, &c] {
        wait_until("a member lets it go", Duration::from_secs(10), || {
            !enforces(h, first) && !show(h).iter().any(|r| r["start"] == first)
        });
    }
    // The granting host dies: its blocks are freed everywhere once its lease runs out.
    let (_child, (first, _)) = run_in_cluster(&a, &["--count", "2"]);
    wait_until("host-c keeps it free", Duration::from_secs(10), || {
        enforces(&c, first)
    });
    a.kill9();
    wait_until(
        "host-c frees it after the lease time",
        Duration::from_secs(15),
        || !enforces(&c, first),
    );
    assert!(!show(&b).iter().any(|r| r["start"] == first));
}

#[test]
fn concurrent_cluster_acquires_from_three_members_never_overlap() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let hosts: Vec<TestDaemon> = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|n| f.host(n))
        .collect();
    wait_members(&hosts[0], 3);
    // Every grant is held until all are made: blocks released meanwhile could be granted again.
    type Grants = (Vec<(String, u32, u32)>, Vec<portres_client::Reservation>);
    let granted: Vec<Grants> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                let client = h.client();
                let node = h.socket.display().to_string();
                s.spawn(move || {
                    let mut got = Vec::new();
                    let mut held = Vec::new();
                    for _ in 0..10 {
                        let r = client
                            .acquire_in_cluster(
                                portres_client::Protocol::Tcp,
                                0,
                                3,
                                portres_client::Mode::Exclude,
                            )
                            .expect("a cluster acquire");
                        got.push((
                            node.clone(),
                            u32::from(r.range().start()),
                            u32::from(r.range().last()),
                        ));
                        held.push(r);
                    }
                    (got, held)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (got, held): (Vec<_>, Vec<_>) = granted.into_iter().unzip();
    let mut all: Vec<(String, u32, u32)> = got.into_iter().flatten().collect();
    assert_eq!(all.len(), 30);
    all.sort_by_key(|g| g.1);
    for w in all.windows(2) {
        assert!(w[0].2 < w[1].1, "overlapping grants: {w:?}");
    }
    drop(held);
}

#[test]
fn reservation_file_entries_with_cluster_true_are_the_clusters() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    // Both members have the same files (as configuration management would give them).
    let files = tempfile::tempdir().unwrap();
    let text = "[[reservation]]\nports = 9300\ncluster = true\ndescription = \"agents\"\n\n\
                [[reservation]]\nports = 9310\n";
    std::fs::write(files.path().join("fleet.toml"), text).unwrap();
    let extra = format!("reservations_dir = \"{}\"\n", files.path().display());
    let a = f.host_with("host-a", &extra);
    let b = f.host_with("host-b", &extra);
    wait_members(&a, 2);
    // At start each member adds what the cluster lacks: one cluster reservation, and each
    // host its own 9310.
    for h in [&a, &b] {
        wait_until(
            "the file's cluster entry is enforced",
            Duration::from_secs(15),
            || enforces(h, 9300),
        );
        let rows = show(h);
        let c = rows.iter().find(|r| r["start"] == 9300).unwrap();
        assert_eq!(c["scope"], "cluster");
        assert!(c["file"].as_str().unwrap().ends_with("/fleet.toml"), "{c}");
        assert_eq!(c["description"], "agents");
        let local = rows.iter().find(|r| r["start"] == 9310).unwrap();
        assert_eq!(local["scope"], "host");
    }
    let out = run(a.cli().args(["apply", "--check"]));
    assert!(out.status.success(), "nothing to do: {out:?}");
    // A changed entry, applied on one member: changed on every member.
    std::fs::write(
        files.path().join("fleet.toml"),
        text.replace("\"agents\"", "\"the fleet's agents\""),
    )
    .unwrap();
    let out = run(a.cli().args(["apply", "--check"]));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("9300 [cluster]"), "{listed}");
    let out = run(a.cli().args(["apply", "--yes"]));
    assert!(out.status.success(), "{out:?}");
    wait_until("host-b sees the change", Duration::from_secs(10), || {
        show(&b)
            .iter()
            .any(|r| r["start"] == 9300 && r["description"] == "the fleet's agents")
    });
    // The entry removed from the files: the cluster reservation goes from every member.
    std::fs::write(
        files.path().join("fleet.toml"),
        "[[reservation]]\nports = 9310\n",
    )
    .unwrap();
    let out = run(b.cli().args(["--json", "apply", "--yes"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["removed"], 1);
    for h in [&a, &b] {
        wait_until("every member lets it go", Duration::from_secs(10), || {
            !enforces(h, 9300)
        });
        assert!(enforces(h, 9310));
    }
    // Without cluster mode, such an entry is refused with its file and line.
    let plain = TestDaemon::with_config(&extra);
    std::fs::write(
        files.path().join("fleet.toml"),
        "[[reservation]]\nports = 9300\ncluster = true\n",
    )
    .unwrap();
    let out = run(plain.cli().args(["apply", "--yes"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("fleet.toml:1")
            && err.contains("not in cluster mode"),
        "{err}"
    );
}

#[test]
fn a_cluster_runtime_block_carried_over_a_restart_keeps_its_lease() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let mut a = f.host("host-a");
    let b = f.host("host-b");
    wait_members(&a, 2);
    let (mut child, (first, _)) = run_in_cluster(&a, &["--count", "2"]);
    wait_until("host-b keeps it free", Duration::from_secs(10), || {
        enforces(&b, first)
    });
    // A restart (SIGTERM: live restore carries the block on): the new daemon renews the
    // block's lease, so host-b keeps it free past the lease time.
    assert!(a.terminate().success());
    a.launch();
    wait_connected(&a);
    wait_until("host-a adopts the block", Duration::from_secs(10), || {
        a.log().contains("carried on from before the restart")
    });
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        assert!(
            enforces(&b, first),
            "host-b freed a block whose session lives"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The command ends: the block leaves host-b.
    close(child.stdin.take());
    assert!(child.wait().unwrap().success());
    wait_until("host-b lets it go", Duration::from_secs(10), || {
        !enforces(&b, first)
    });
}

/// A CA, a server certificate for 10.77.0.1 and a client certificate (openssl(1)), in a
/// directory that lives as long as the test process.
fn make_certs() -> std::path::PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let sh = |script: &str| {
        let out = run(Command::new("sh").arg("-c").arg(script).current_dir(&dir));
        assert!(out.status.success(), "{script}: {out:?}");
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
        -subj /CN=portres-test-ca 2>/dev/null",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
        -subj /CN=etcd 2>/dev/null && \
        printf 'subjectAltName=IP:10.77.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > s.ext && \
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out server.pem -days 2 -extfile s.ext 2>/dev/null",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr \
        -subj /CN=portres 2>/dev/null && \
        printf 'extendedKeyUsage=clientAuth\\n' > c.ext && \
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out client.pem -days 2 -extfile c.ext 2>/dev/null",
    );
    dir
}

#[test]
fn members_reach_etcd_over_tls_with_client_certificates() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::with_tls();
    let a = f.host("host-a");
    let b = f.host("host-b");
    wait_members(&a, 2);
    let s = status(&a);
    assert!(
        s["endpoints"][0].as_str().unwrap().starts_with("https://"),
        "{s}"
    );
    let out = add(&a, 9990, 1);
    assert!(out.status.success(), "{out:?}");
    wait_until("host-b enforces it", Duration::from_secs(10), || {
        enforces(&b, 9990)
    });
}

#[test]
fn what_a_member_cannot_enforce_is_named_by_cluster_status_and_show_and_retried() {
    if run_elsewhere(Needs::Namespace) {
        return;
    }
    let mut f = Fabric::new(1);
    let a = f.host("host-a");
    let b = f.host("host-b");
    wait_members(&a, 2);
    // host-b away: the cluster reserves 9860 without it, while host-b reserves 9860 for itself.
    f.link(1, false);
    wait_members(&a, 1);
    assert!(add(&a, 9860, 1).status.success());
    let out = run(b.cli().args(["persistent", "add", "--start", "9860"]));
    assert!(out.status.success(), "{out:?}");
    // Back: host-b cannot enforce the cluster's, and says so.
    f.link(1, true);
    wait_members(&a, 2);
    let failures_of_b = || {
        status(&a)["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node"] == "host-b")
            .map(|m| m["failures"].as_array().unwrap().clone())
            .unwrap_or_default()
    };
    wait_until(
        "host-b reports the failure",
        Duration::from_secs(15),
        || !failures_of_b().is_empty(),
    );
    let f0 = failures_of_b()[0].clone();
    assert_eq!(
        (f0["start"].as_u64(), f0["count"].as_u64()),
        (Some(9860), Some(1))
    );
    assert!(f0["why"].as_str().unwrap().contains("9860"), "{f0}");
    let row = show(&a).into_iter().find(|r| r["start"] == 9860).unwrap();
    let state_of_b = row["cluster"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node"] == "host-b")
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(state_of_b.starts_with("failed: "), "{state_of_b}");
    let human = String::from_utf8(run(a.cli().args(["cluster", "status"])).stdout).unwrap();
    assert!(human.contains("cannot enforce 9860/tcp"), "{human}");
    // Its own reservation gone, host-b enforces the cluster's at its next try.
    let out = run(b.cli().args(["persistent", "delete", "--start", "9860"]));
    assert!(out.status.success(), "{out:?}");
    wait_until("host-b enforces it", Duration::from_secs(15), || {
        failures_of_b().is_empty() && cluster_rows(&b).contains(&("tcp".to_string(), 9860, 1))
    });
}
