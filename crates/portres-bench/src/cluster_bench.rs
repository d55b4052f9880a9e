//! `BENCH_ONLY=cluster` (feature `cluster`): cluster mode on a real etcd, each daemon in a
//! network namespace of its own (a "host") linked to a bridge in a fabric namespace where etcd
//! runs (one etcd member: on a 2-vCPU machine three would measure the VM's scheduler).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use portres_client::{Client, Mode, PersistentSpec, Protocol};

const ETCD_CLIENT: &str = "http://10.77.0.1:2379";

/// A process that keeps a network namespace (`unshare -n ... sleep`), after `setup` ran in it.
struct Ns(Child);

impl Ns {
    fn new(setup: &str) -> Result<Ns> {
        let mut child = Command::new("unshare")
            .args(["-n", "--", "sh", "-c"])
            .arg(format!(
                "ip link set lo up && {setup} echo ready && exec sleep 1000000"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("network namespace setup failed: {setup}");
        }
        Ok(Ns(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.pid()));
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Host {
    ns: Ns,
    daemon: Child,
    socket: PathBuf,
    bin: PathBuf,
    /// From spawning the daemon to its READY.
    ready: Duration,
}

impl Host {
    fn client(&self) -> Client {
        Client::connect_to(&self.socket).expect("connect")
    }

    /// Whether `port` is in this host's `ip_local_reserved_ports` (read in its namespace).
    fn excludes(&self, port: u16) -> bool {
        let pid = self.ns.pid();
        std::thread::spawn(move || {
            portres_sys::process::enter_net_namespace_of(pid).unwrap();
            let text =
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap();
            text.trim().split(',').any(|p| match p.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= port)
                        && b.parse::<u16>().is_ok_and(|b| port <= b)
                }
                None => p.parse::<u16>() == Ok(port),
            })
        })
        .join()
        .unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A stop meant as a stop: no keeper left behind.
        let _ = Command::new(&self.bin)
            .args(["daemon", "--stop"])
            .env("PORTRES_SOCKET", &self.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.daemon.wait();
    }
}

/// Starts a daemon on a new host `i` linked to the fabric.
fn host(bin: &Path, dir: &Path, fabric: &Ns, i: usize, node: &str) -> Result<Host> {
    let f = fabric.pid();
    let ns = Ns::new(&format!(
        "ip link add h0 type veth peer name v{i} netns {f} && ip addr add 10.77.0.{}/24 dev h0 \
         && ip link set h0 up && nsenter --net=/proc/{f}/ns/net sh -c 'ip link set v{i} master \
         br0 && ip link set v{i} up' &&",
        10 + i
    ))?;
    let hdir = dir.join(node);
    std::fs::create_dir_all(&hdir)?;
    let config = hdir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "deny = false\nnamespaces = \"daemon\"\n[cluster]\nendpoints = [\"{ETCD_CLIENT}\"]\n\
             node = \"{node}\"\nlease_ttl_secs = 10\n"
        ),
    )?;
    let socket = hdir.join("portres.sock");
    let t = Instant::now();
    let mut daemon = ns
        .nsenter()
        .arg(bin)
        .args(["daemon", "--print-ready", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(hdir.join("state"))
        .arg("--config")
        .arg(&config)
        .env(
            "PORTRES_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(daemon.stdout.take().unwrap()).read_line(&mut line)?;
    if line.trim() != "READY" {
        bail!("daemon {node} did not start");
    }
    let h = Host {
        ns,
        daemon,
        socket,
        bin: bin.into(),
        ready: t.elapsed(),
    };
    Ok(h)
}

/// Waits until `h` is linked to etcd and has applied `revision`; returns how long that took.
fn caught_up(h: &Host, revision: i64) -> Result<Duration> {
    let t = Instant::now();
    let c = h.client();
    loop {
        let s = c.cluster_status()?;
        if s.connected && s.applied_revision >= revision {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("a member did not catch up with revision {revision}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pct(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs `f` with an etcd client on a thread inside `ns` (the fabric), on a runtime of its own.
fn with_etcd<T: Send + 'static>(
    ns_pid: u32,
    f: impl AsyncFnOnce(&mut etcd_client::Client) -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        portres_sys::process::enter_net_namespace_of(ns_pid)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut c = etcd_client::Client::connect([ETCD_CLIENT], None).await?;
            f(&mut c).await
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("etcd thread panicked"))?
}

pub fn section_cluster(bin: &Path, dir: &Path) -> Result<()> {
    println!("### Cluster mode on etcd (3 members, one etcd)\n");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let fabric = Ns::new(
        "ip link add br0 type bridge && ip addr add 10.77.0.1/24 dev br0 && ip link set br0 up &&",
    )?;
    let mut etcd = fabric
        .nsenter()
        .arg("/usr/bin/etcd")
        .args(["--name", "e0", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", ETCD_CLIENT])
        .args(["--advertise-client-urls", ETCD_CLIENT])
        .args(["--listen-peer-urls", "http://10.77.0.1:2380"])
        .args(["--initial-advertise-peer-urls", "http://10.77.0.1:2380"])
        .args(["--initial-cluster", "e0=http://10.77.0.1:2380"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start etcd (Debian: etcd-server)")?;
    let result = measure(bin, dir, &fabric);
    let _ = etcd.kill();
    let _ = etcd.wait();
    result
}

fn measure(bin: &Path, dir: &Path, fabric: &Ns) -> Result<()> {
    let hosts: Vec<Host> = ["host-a", "host-b", "host-c"]
        .iter()
        .enumerate()
        .map(|(i, n)| host(bin, dir, fabric, i, n))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    while hosts[0].client().cluster_status()?.members.len() < 3 {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the members did not all join");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = 200;
    // The baseline: one compare-and-put transaction, as a create's commit is, from the same
    // machine to the same etcd.
    let bare = with_etcd(fabric.pid(), async move |c| {
        let mut v = Vec::new();
        for i in 0..n + 20 {
            let t = Instant::now();
            let txn = Txn::new()
                .when([Compare::create_revision(
                    format!("/bench/{i}"),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(format!("/bench/{i}"), "x", None)]);
            c.txn(txn).await?;
            if i >= 20 {
                v.push(t.elapsed());
            }
        }
        Ok(v)
    })?;
    // Creates on host-a, each followed by waiting until host-b and host-c enforce it.
    let a = hosts[0].client();
    let mut create = Vec::new();
    let mut propagation = Vec::new();
    for i in 0..n {
        let port = 20_000 + i as u32;
        let mut spec = PersistentSpec::new(Protocol::Tcp, port, 1);
        spec.cluster = true;
        let t = Instant::now();
        a.create_persistent(&spec)?;
        create.push(t.elapsed());
        let t = Instant::now();
        while !(hosts[1].excludes(port as u16) && hosts[2].excludes(port as u16)) {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("port {port} did not reach every member");
            }
        }
        propagation.push(t.elapsed());
    }
    let (b50, b99) = pct(bare);
    let (c50, c99) = pct(create);
    let (p50, p99) = pct(propagation);
    println!("| what | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| one bare etcd transaction (compare + put) | {} | {} |",
        ms(b50),
        ms(b99)
    );
    println!(
        "| cluster persistent create, 3 members (until the creator enforces it) | {} ({:.1}×) | {} |",
        ms(c50),
        c50.as_secs_f64() / b50.as_secs_f64(),
        ms(c99)
    );
    println!(
        "| propagation: from the create's reply until both other members enforce it | {} | {} |",
        ms(p50),
        ms(p99)
    );
    println!();
    // Concurrent acquires from the three members, every grant held to the end.
    let dur = Duration::from_secs(5);
    let grants: Vec<Vec<(u16, u16)>> = std::thread::scope(|s| {
        let hs: Vec<_> = hosts
            .iter()
            .map(|h| {
                let c = h.client();
                s.spawn(move || {
                    let t = Instant::now();
                    let mut held = Vec::new();
                    let mut got = Vec::new();
                    while t.elapsed() < dur {
                        match c.acquire_in_cluster(Protocol::Tcp, 0, 1, Mode::Exclude) {
                            Ok(r) => {
                                got.push((r.range().start(), r.range().last()));
                                held.push(r);
                            }
                            Err(e) => eprintln!("cluster acquire failed: {e}"),
                        }
                    }
                    got
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let per: Vec<usize> = grants.iter().map(Vec::len).collect();
    let mut all: Vec<(u16, u16)> = grants.into_iter().flatten().collect();
    all.sort();
    let overlaps = all.windows(2).filter(|w| w[0].1 >= w[1].0).count();
    println!(
        "Concurrent `acquire_in_cluster` of one port from the 3 members for {} s, every grant \
         held: {} grants ({:?} per member), **{:.0} grants/s**, **{overlaps} overlaps**.\n",
        dur.as_secs(),
        all.len(),
        per,
        all.len() as f64 / dur.as_secs_f64()
    );
    // Resync: 10,000 cluster reservations put straight into etcd, then a new member starts.
    let m = 10_000u32;
    let rev = with_etcd(fabric.pid(), async move |c| {
        let mut rev = 0;
        for chunk in (0..m).collect::<Vec<_>>().chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|i| {
                    let start = 30_000 - 2 * i;
                    TxnOp::put(
                        format!("/portres/reservations/udp/{start:05}"),
                        format!(
                            "{{\"protocol\":\"udp\",\"start\":{start},\"count\":1,\
                             \"mode\":\"exclude\",\"node\":\"bench\",\"created\":0,\
                             \"creator_uid\":0}}"
                        ),
                        None,
                    )
                })
                .collect();
            let r = c.txn(Txn::new().and_then(ops)).await?;
            rev = r.header().map_or(0, |h| h.revision());
        }
        Ok(rev)
    })?;
    for h in &hosts {
        caught_up(h, rev)?;
    }
    let total = m + n as u32;
    let full = resync_time(bin, dir, fabric, 3, "host-d", total)?;
    println!(
        "Resync of {total} cluster reservations ({m} put straight into etcd, {n} made above) \
         by a member that starts with none (a full list): **{}** from start to enforcing all \
         (READY after {}, with none).",
        ms(full.1),
        ms(full.0)
    );
    // The same member again, with all of them in its store and its revision kept: it
    // enforces them from the store before READY and resumes watching from its revision.
    caught_up(&full.2, rev)?;
    drop(full.2);
    let again = resync_time(bin, dir, fabric, 4, "host-d", total)?;
    let joined = caught_up(&again.2, rev)?;
    println!(
        "Restart of that member: READY after **{}**, enforcing all {total} at READY (from its \
         store), caught up from its saved revision {} later.\n",
        ms(again.0),
        ms(joined)
    );
    drop(again);
    drop(hosts);
    Ok(())
}

/// Starts a member (as link `i`) and times (READY, every `m` reservations enforced).
fn resync_time(
    bin: &Path,
    dir: &Path,
    fabric: &Ns,
    i: usize,
    node: &str,
    m: u32,
) -> Result<(Duration, Duration, Host)> {
    let t = Instant::now();
    let h = host(bin, dir, fabric, i, node)?;
    let c = h.client();
    loop {
        if c.status()?.counts.persistent >= u64::from(m) {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{node} did not take in the cluster's reservations");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let all = t.elapsed();
    Ok((h.ready, all, h))
}
