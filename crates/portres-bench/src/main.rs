//! `portres-bench`: every figure of docs/behaviour.md §8 measured beside its baseline in one run,
//! printed as Markdown for BENCHMARKS.md. Run it with `bench/run.sh` (as root: it works in a
//! private network namespace, starts its own daemon, and, when given one, Google's portserver).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[cfg(feature = "cluster")]
mod cluster_bench;

use anyhow::{Context, Result, bail};
use portres_client::{Client, Mode, PersistentSpec, Protocol};
use portres_core::{
    Caller, ClaimError, Owner, PortClaim, PortRange, Table, TableConfig, Token, TokenSource,
};

fn pct(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Servers (the daemon, the echo baselines, portserver) run on CPU 1 and the harness's clients
/// on CPU 0, so every round trip crosses CPUs the same way, whatever the scheduler would do.
fn server_command(program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", "1"]).arg(program);
    c
}

/// A `kB` line of `/proc/PID/status`, e.g. `VmRSS` or `VmHWM` (the peak).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// RSS of `pid` and all its descendants (the daemon and its `portres holder` helpers).
fn tree_rss_kib(pid: u32) -> u64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    rss_kib(pid)
        + children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .map(tree_rss_kib)
            .sum::<u64>()
}

fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, dir: &Path, fresh: bool) -> Result<(Daemon, Duration)> {
        // The deny layer changes how blocks are held: only its own section turns it on.
        Self::start_with(bin, dir, fresh, "deny = false\n")
    }

    /// [`Daemon::start`] with a configuration file holding `config` (unless BENCH_CONFIG names
    /// one).
    fn start_with(bin: &Path, dir: &Path, fresh: bool, config: &str) -> Result<(Daemon, Duration)> {
        if fresh {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config)?;
        let socket = dir.join("portres.sock");
        let t = Instant::now();
        let mut child = server_command(bin)
            .args(["daemon", "--print-ready", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--config")
            // BENCH_CONFIG: a configuration file for the daemon (e.g. to compare settings).
            .arg(std::env::var_os("BENCH_CONFIG").unwrap_or_else(|| config_path.into()))
            .env(
                "PORTRES_LOG",
                std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the daemon")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        if line.trim() != "READY" {
            bail!("daemon did not start");
        }
        Ok((
            Daemon {
                child,
                socket,
                dir: dir.into(),
                bin: bin.into(),
            },
            t.elapsed(),
        ))
    }

    fn client(&self) -> Client {
        Client::connect_to(&self.socket).expect("connect")
    }

    /// A stop meant as a stop (`portres daemon --stop`): everything released, no keeper left
    /// holding ports for a successor. A binary without `--stop` gets SIGTERM.
    fn stop(mut self) {
        let stopped = Command::new(&self.bin)
            .args(["daemon", "--stop"])
            .env("PORTRES_SOCKET", &self.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
        }
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// A process that echoes 16-byte messages on a Unix socket: the floor for any daemon RPC.
fn echo_server(path: &str) -> Result<()> {
    let l = UnixListener::bind(path)?;
    println!("ready");
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    let mut buf = [0u8; 16];
    while s.read_exact(&mut buf).is_ok() {
        s.write_all(&buf)?;
    }
    Ok(())
}

/// Like [`echo_server`], for many connections (a thread each).
fn echo_server_multi(path: &str) -> Result<()> {
    let l = UnixListener::bind(path)?;
    println!("ready");
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let mut s = s?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// The floor for any daemon whose grant is two request/reply round trips: a bare echo server
/// in another process, `clients` threads each doing two round trips per "grant".
fn grants_bare(clients: usize, dur: Duration) -> Result<f64> {
    let path = std::env::temp_dir().join(format!("portres-bench-echo-m-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut child = server_command(&std::env::current_exe()?)
        .arg("--echo-server-multi")
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let r = rate(clients, dur, || {
        let mut s = UnixStream::connect(&path).unwrap();
        move || {
            let mut buf = [7u8; 16];
            (0..2).all(|_| s.write_all(&buf).is_ok() && s.read_exact(&mut buf).is_ok())
        }
    });
    child.kill()?;
    child.wait()?;
    let _ = std::fs::remove_file(&path);
    Ok(r)
}

/// A connection to an echo server in another process: the bare request/reply.
struct Echo {
    child: Child,
    stream: UnixStream,
    path: PathBuf,
}

impl Echo {
    fn start() -> Result<Echo> {
        let path = std::env::temp_dir().join(format!("portres-bench-echo-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut child = server_command(&std::env::current_exe()?)
            .arg("--echo-server")
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        let stream = UnixStream::connect(&path)?;
        Ok(Echo {
            child,
            stream,
            path,
        })
    }

    fn round_trip(&mut self) -> Duration {
        let mut buf = [7u8; 16];
        let t = Instant::now();
        self.stream.write_all(&buf).unwrap();
        self.stream.read_exact(&mut buf).unwrap();
        t.elapsed()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bare_bind(n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let l = std::net::TcpListener::bind(("::", 0)).unwrap();
            drop(l);
            t.elapsed()
        })
        .collect()
}

fn section_rpc(d: &Daemon, n: usize) -> Result<()> {
    // Every measurement runs in 20 interleaved rounds (baseline, then each operation), so that
    // the machine's moods fall on all of them alike.
    let mut echo = Echo::start()?;
    let c = d.client();
    let block = c.acquire(Protocol::Tcp, 1)?;
    let port = block.port();
    let per = (n / 20).max(1);
    let (mut ping_v, mut bind_v, mut status_v, mut hold_v, mut excl_v, mut later_v, mut assoc_v) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..20 {
        ping_v.extend((0..per).map(|_| echo.round_trip()));
        bind_v.extend(bare_bind(per));
        status_v.extend((0..per).map(|_| {
            let t = Instant::now();
            c.status().unwrap();
            t.elapsed()
        }));
        for (mode, v) in [(Mode::Hold, &mut hold_v), (Mode::Exclude, &mut excl_v)] {
            v.extend((0..per).map(|_| {
                let t = Instant::now();
                let r = c.acquire_with(Protocol::Tcp, 0, 1, mode).unwrap();
                r.release().unwrap();
                t.elapsed()
            }));
        }
        later_v.extend((0..per).map(|_| {
            let t = Instant::now();
            let r = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold).unwrap();
            r.release_later().unwrap();
            t.elapsed()
        }));
        assoc_v.extend((0..per).map(|_| {
            let t = Instant::now();
            let l = block.listen(port).unwrap();
            let e = t.elapsed();
            drop(l);
            e
        }));
    }
    drop(echo);
    let (ping, bind, status, hold, excl, later, assoc) = (
        pct(ping_v),
        pct(bind_v),
        pct(status_v),
        pct(hold_v),
        pct(excl_v),
        pct(later_v),
        pct(assoc_v),
    );
    println!("### Round trips ({n} each, in 20 interleaved rounds; p50 / p99)\n");
    println!(
        "| what | p50 | p99 | p50 ÷ bare ping-pong | p50 ÷ status (one daemon round trip that does no work) |"
    );
    println!("|---|---|---|---|---|");
    let row = |name: &str, (p50, p99): (Duration, Duration)| {
        println!(
            "| {name} | {} | {} | {:.2}× | {:.2}× |",
            us(p50),
            us(p99),
            p50.as_secs_f64() / ping.0.as_secs_f64(),
            p50.as_secs_f64() / status.0.as_secs_f64()
        );
    };
    row(
        "bare Unix-socket ping-pong between two processes (baseline)",
        ping,
    );
    row(
        "bare socket()+bind(port 0)+close in-process (baseline)",
        bind,
    );
    row("status request (one daemon round trip)", status);
    row(
        "acquire + release, wildcard, 1 port, hold (two round trips)",
        hold,
    );
    row(
        "acquire + release, wildcard, 1 port, exclude (two round trips)",
        excl,
    );
    row(
        "acquire + `release_later` (release not awaited; its reply read with the next request), hold",
        later,
    );
    row(
        "association: TCP listener handed over (one round trip + SCM_RIGHTS)",
        assoc,
    );
    println!();
    Ok(())
}

/// Runs `clients` threads, each calling its `grant` (made by `make`) until `dur` has passed;
/// returns successful grants per second.
fn rate<G: FnMut() -> bool + Send + 'static>(
    clients: usize,
    dur: Duration,
    mut make: impl FnMut() -> G,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let mut grant = make();
            let (stop, count) = (stop.clone(), count.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if grant() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

fn grants_portres(d: &Daemon, clients: usize, dur: Duration, later: bool) -> f64 {
    rate(clients, dur, || {
        let c = d.client();
        move || match c.acquire(Protocol::Tcp, 1) {
            Ok(r) if later => r.release_later().is_ok(),
            Ok(r) => r.release().is_ok(),
            Err(_) => false,
        }
    })
}

fn portserver_request(addr: &std::os::unix::net::SocketAddr) -> Option<u16> {
    let mut s = UnixStream::connect_addr(addr).ok()?;
    s.write_all(format!("{}\n", std::process::id()).as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.trim().parse().ok().filter(|&p| p != 0)
}

fn grants_portserver(script: &Path, clients: usize, dur: Duration) -> Result<f64> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("portres-bench-{}-{clients}", std::process::id());
    let mut server = server_command(Path::new("python3"))
        .arg(script)
        .arg(format!("--portserver_address=@{name}"))
        .arg("--portserver_static_pool=10000-60000")
        .stderr(Stdio::null())
        .spawn()?;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let t0 = Instant::now();
    while UnixStream::connect_addr(&addr).is_err() {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("portserver did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = rate(clients, dur, || {
        let addr = addr.clone();
        move || portserver_request(&addr).is_some()
    });
    server.kill()?;
    server.wait()?;
    Ok(rate)
}

fn section_grants(d: &Daemon, portserver: Option<&Path>) -> Result<()> {
    println!(
        "### Grants per second (2 s per cell; portres: acquire + release of one wildcard port)\n"
    );
    println!(
        "| clients | portres | portserver | ratio | bare floor: echo server, two round trips per grant | ratio floor ÷ portserver | portres with `release_later` | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for clients in [1, 8, 64] {
        let ours = grants_portres(d, clients, Duration::from_secs(2), false);
        let ours_later = grants_portres(d, clients, Duration::from_secs(2), true);
        let floor = grants_bare(clients, Duration::from_secs(2))?;
        let theirs = match portserver {
            Some(p) => Some(grants_portserver(p, clients, Duration::from_secs(2))?),
            None => None,
        };
        match theirs {
            Some(t) => println!(
                "| {clients} | {ours:.0}/s | {t:.0}/s | {:.1}× | {floor:.0}/s | {:.1}× | {ours_later:.0}/s | {:.1}× |",
                ours / t,
                floor / t,
                ours_later / t
            ),
            None => println!(
                "| {clients} | {ours:.0}/s | (not run) | | {floor:.0}/s | | {ours_later:.0}/s | |"
            ),
        }
    }
    println!();
    Ok(())
}

struct NoKernel;
impl PortClaim for NoKernel {
    fn claim(&mut self, _: Token, _: Protocol, _: PortRange, _: Mode) -> Result<(), ClaimError> {
        Ok(())
    }
}
struct Xor(u64);
impl TokenSource for Xor {
    fn random_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn section_allocator() {
    println!(
        "### Allocator alone (no I/O): wildcard acquire + release of 1-4 ports among n live fragmented reservations\n"
    );
    println!("| live reservations | per acquire + release | growth vs n = 100 |");
    println!("|---|---|---|");
    let mut base = 0.0;
    for n in [100u32, 1000, 10_000, 30_000] {
        let mut t = Table::new(TableConfig {
            dynamic_range: PortRange::inclusive(1024, 65535).unwrap(),
            runtime_quota: u32::MAX,
        });
        t.open_session(
            1,
            Owner {
                pid: Some(1),
                uid: 0,
                command: None,
            },
        );
        let caller = Caller {
            session: 1,
            pid: 1,
            uid: 0,
            gids: vec![],
            admin: true,
        };
        let mut rng = Xor(0x1234_5678);
        // n single-port blocks spread over the range, leaving gaps of 1-3 ports between them.
        let stride = 64_512 / n;
        for i in 0..n {
            let start =
                1024 + i * stride + (rng.random_u64() % u64::from(stride.max(2) - 1)) as u32;
            let _ = t.acquire(
                &caller,
                Protocol::Tcp,
                start,
                1,
                Mode::Hold,
                0,
                &mut rng,
                &mut NoKernel,
            );
        }
        let ops = 200_000;
        let start = Instant::now();
        for i in 0..ops {
            let r = t
                .acquire(
                    &caller,
                    Protocol::Tcp,
                    0,
                    1 + i % 4,
                    Mode::Hold,
                    0,
                    &mut rng,
                    &mut NoKernel,
                )
                .unwrap();
            t.release(&caller, r.token.get()).unwrap();
        }
        let per = start.elapsed().as_secs_f64() / f64::from(ops) * 1e9;
        if n == 100 {
            base = per;
        }
        println!(
            "| {n} ({} live) | {:.0} ns | {:.2}× |",
            t.len(),
            per,
            per / base
        );
    }
    println!();
}

/// The raw cost of holding `n` TCP ports from 20,000 in-process: the same kind of socket
/// portres binds (dual-stack, `SO_REUSEPORT`), as root, no holder uid.
#[derive(Default)]
struct RawCost {
    bind: Duration,
    close: Duration,
    slab_kib: u64,
}

fn raw_placeholders(n: u16) -> RawCost {
    let slab0 = slab_kib();
    let t = Instant::now();
    let raw: Vec<_> = (0..n)
        .map(|i| portres_sys::hold::placeholder(Protocol::Tcp, 20_000 + i, None, None).unwrap())
        .collect();
    let bind = t.elapsed();
    let slab_kib = slab_kib().saturating_sub(slab0);
    let t = Instant::now();
    drop(raw);
    RawCost {
        bind,
        close: t.elapsed(),
        slab_kib,
    }
}

/// One table of [`section_hold`]: the raw baseline beside portres's acquire and release.
fn hold_table(
    raw_title: &str,
    ours_title: &str,
    raw: &RawCost,
    (acquire, release, slab): (Duration, Duration, u64),
    rss_row: &str,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| what | {raw_title} | {ours_title} | ratio |");
    println!("|---|---|---|---|");
    for (what, r, o) in [
        ("bind / acquire", raw.bind, acquire),
        ("close / release", raw.close, release),
    ] {
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {:.2}× |",
            ms(r),
            ms(o),
            o.as_secs_f64() / r.as_secs_f64()
        );
    }
    println!(
        "| kernel memory (Slab growth) | {} KiB | {slab} KiB | |",
        raw.slab_kib
    );
    println!("{rss_row}");
}

fn section_hold(bin: &Path, dir: &Path) -> Result<()> {
    println!("### Holding a large TCP block\n");
    let limit = portres_sys::hold::raise_nofile_limit();
    let n: u16 = 18_000;
    let first = raw_placeholders(n);
    // Closed sockets are freed after an RCU grace period; let that work finish before the next
    // phase so that no phase pays for the previous one.
    let settle = || std::thread::sleep(Duration::from_secs(1));
    settle();

    let (d, _) = Daemon::start(bin, dir, true)?;
    let c = d.client();
    let rss0 = rss_kib(d.child.id());
    let slab0 = slab_kib();
    let t = Instant::now();
    let r = c.acquire_at(Protocol::Tcp, 20_000, u32::from(n))?;
    let acquire = t.elapsed();
    let rss = rss_kib(d.child.id()).saturating_sub(rss0);
    let slab = slab_kib().saturating_sub(slab0);
    let t = Instant::now();
    r.release()?;
    let release = t.elapsed();
    settle();
    // The raw cost again, after the daemon's run (the faster of the two is the baseline).
    let again = raw_placeholders(n);
    let raw = RawCost {
        bind: first.bind.min(again.bind),
        close: first.close.min(again.close),
        slab_kib: first.slab_kib,
    };
    hold_table(
        &format!("{n} ports, raw placeholders in-process (baseline)"),
        &format!("{n} ports through portres"),
        &raw,
        (acquire, release, slab),
        &format!(
            "| daemon RSS growth | | {rss} KiB ({:.0} B/port) | |",
            rss as f64 * 1024.0 / f64::from(n)
        ),
    );
    println!();
    // 30,000 ports: more than one process may keep open (limit {limit}). The raw cost is
    // binding them as two batches of 15,000 (closing between); portres keeps all 30,000 bound,
    // in helper processes.
    settle();
    let mut raw30 = RawCost::default();
    for _ in 0..2 {
        let batch = raw_placeholders(15_000);
        raw30.bind += batch.bind;
        raw30.close += batch.close;
        raw30.slab_kib += batch.slab_kib;
        settle();
    }
    let slab0 = slab_kib();
    let rss0 = tree_rss_kib(d.child.id());
    let t = Instant::now();
    let big = c.acquire_at(Protocol::Tcp, 20_000, 30_000)?;
    let big_acquire = t.elapsed();
    let big_slab = slab_kib().saturating_sub(slab0);
    let big_rss = tree_rss_kib(d.child.id()).saturating_sub(rss0);
    let t = Instant::now();
    big.release()?;
    let big_release = t.elapsed();
    hold_table(
        "30,000 ports, raw placeholders (2 × 15,000, baseline)",
        "30,000 ports through portres (helper processes)",
        &raw30,
        (big_acquire, big_release, big_slab),
        &format!(
            "| RSS growth of the daemon and its helper processes | | {big_rss} KiB ({:.0} B/port) | |",
            big_rss as f64 * 1024.0 / 30_000.0
        ),
    );
    println!(
        "\nThe daemon's open-file limit here is {limit} (not raisable): blocks beyond its own budget go to helper processes.\n"
    );

    // Memory per idle session.
    let rss0 = rss_kib(d.child.id());
    let sessions: Vec<Client> = (0..1000).map(|_| d.client()).collect();
    let per_session = (rss_kib(d.child.id()).saturating_sub(rss0)) as f64 * 1024.0 / 1000.0;
    drop(sessions);
    println!("Memory per idle session (1,000 open): {per_session:.0} B of daemon RSS.\n");
    d.stop();
    Ok(())
}

/// Median, minimum and maximum of `v` (sorted here).
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Nanoseconds per `socket() + bind() + close()` of a TCP socket (`ports::port_in_use`) on ports from
/// `first` (none of them reserved), `n` of them.
fn bind_loop(first: u16, n: u16) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        assert!(!portres_sys::ports::port_in_use(Protocol::Tcp, first + i));
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

/// The deny layer: what its programs add to every bind on the machine, and what a 30,000-port
/// hold block costs with it, with placeholders, and raw.
fn section_deny(bin: &Path, dir: &Path) -> Result<()> {
    use portres_sys::deny::{Hook, Map, Owner, PortKey, Program, ProgramSettings};
    println!("### Deny layer\n");
    // 1. One bind, with the layer's two programs attached at the cgroup2 root and 1,000 blocks
    // in the map, against none attached: alternating rounds in a private network namespace.
    let (with, without) = std::thread::spawn(|| -> Result<(Vec<f64>, Vec<f64>)> {
        portres_sys::process::enter_private_net_namespace()?;
        let ports = Map::new_ports(1 << 16)?;
        let allow = Map::new_allow(1024)?;
        let netns = portres_sys::deny::netns_cookie()?;
        for i in 0..1000u16 {
            let k = PortKey {
                netns,
                protocol: 6,
                port: 1000 + i * 8,
                port_bits: 13,
            };
            ports.set_port(k, Owner::default())?;
        }
        let settings = ProgramSettings {
            daemon_tgid: 1,
            errno: Some(98),
            all_namespaces: false,
        };
        let progs = [
            Program::load(Hook::Bind4, &ports, &allow, settings)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            Program::load(Hook::Bind6, &ports, &allow, settings)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ];
        let root = portres_sys::deny::open_dir(
            &portres_sys::deny::mount_of("cgroup2").context("cgroup2")?,
        )?;
        let (mut with, mut without) = (Vec::new(), Vec::new());
        bind_loop(40_000, 2000);
        for _ in 0..9 {
            without.push(bind_loop(40_000, 5000));
            let links: Vec<_> = progs
                .iter()
                .map(|p| p.attach(std::os::fd::AsFd::as_fd(&root)))
                .collect::<Result<_, _>>()?;
            with.push(bind_loop(40_000, 5000));
            drop(links);
        }
        Ok((with, without))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bind thread panicked"))??;
    let (mut with, mut without) = (with, without);
    let ratios: Vec<f64> = with.iter().zip(&without).map(|(a, b)| a / b).collect();
    let (w, wmin, wmax) = spread(&mut with);
    let (wo, womin, womax) = spread(&mut without);
    let (r, rmin, rmax) = spread(&mut ratios.clone());
    println!(
        "| socket() + bind() + close(), TCP dual-stack, 9 rounds of 5,000 | median | min | max |"
    );
    println!("|---|---|---|---|");
    println!("| no programs attached | {wo:.0} ns | {womin:.0} ns | {womax:.0} ns |");
    println!(
        "| deny programs attached (1,000 blocks in the map) | {w:.0} ns | {wmin:.0} ns | {wmax:.0} ns |"
    );
    println!("| ratio per round (with ÷ without) | {r:.3}× | {rmin:.3}× | {rmax:.3}× |\n");

    // 2. A 30,000-port hold block: acquire + release through the deny layer, through
    // placeholders (helper processes), and raw placeholder binding, 5+ repetitions each.
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let settle = || std::thread::sleep(Duration::from_millis(500));
    let mut raw = Vec::new();
    for _ in 0..5 {
        let mut total = Duration::ZERO;
        for _ in 0..2 {
            let b = raw_placeholders(15_000);
            total += b.bind + b.close;
            settle();
        }
        raw.push(ms(total));
    }
    let (d, _) = Daemon::start(bin, dir, true)?;
    let c = d.client();
    let mut placeholders = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        c.acquire_at(Protocol::Tcp, 20_000, 30_000)?.release()?;
        placeholders.push(ms(t.elapsed()));
        settle();
    }
    drop(c);
    d.stop();
    let (d, _) = Daemon::start_with(bin, dir, true, "deny = true\n")?;
    let c = d.client();
    let files0 = std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))?.count();
    let mut denied = Vec::new();
    let mut files = 0;
    for i in 0..9 {
        let t = Instant::now();
        let r = c.acquire_at(Protocol::Tcp, 20_000, 30_000)?;
        let acquired = t.elapsed();
        if i == 0 {
            files = std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))?.count();
        }
        let t = Instant::now();
        r.release()?;
        denied.push(ms(acquired + t.elapsed()));
    }
    drop(c);
    d.stop();
    let (dm, dmin, dmax) = spread(&mut denied);
    let (pm, pmin, pmax) = spread(&mut placeholders);
    let (rm, rmin, rmax) = spread(&mut raw);
    println!(
        "| acquire + release of a 30,000-port TCP hold block | median | min | max | placeholders ÷ this |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| deny layer (9 runs) | {dm:.2} ms | {dmin:.2} ms | {dmax:.2} ms | {:.0}× |",
        pm / dm
    );
    println!(
        "| placeholders, in helper processes (5 runs) | {pm:.1} ms | {pmin:.1} ms | {pmax:.1} ms | 1× |"
    );
    println!(
        "| raw placeholder binding in-process, 2 × 15,000 (5 runs) | {rm:.1} ms | {rmin:.1} ms | {rmax:.1} ms | {:.2}× |",
        pm / rm
    );
    println!(
        "\nOpen files of the daemon with the 30,000-port block held under the deny layer: {files} \
         ({files0} before it).\n"
    );
    Ok(())
}

/// A new state directory under `dir` whose store holds `blocks` (protocol, start, count) as
/// exclude-mode persistent reservations, written in one transaction.
fn fresh_store(dir: &Path, blocks: impl Iterator<Item = (&'static str, u16, u16)>) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("state"))?;
    let (store, _) = portres_daemon::Store::open(&dir.join("state"))?;
    let recs: Vec<_> = blocks
        .zip(1u64..)
        .map(
            |((protocol, start, count), token)| portres_daemon::store::StoredReservation {
                token,
                protocol: protocol.into(),
                start,
                count,
                mode: "exclude".into(),
                allow_users: vec![],
                allow_groups: vec![],
                created: 0,
                creator_uid: 0,
                creator_command: Some("bench".into()),
                file: None,
                description: None,
                cluster_key: None,
                cluster_node: None,
                cluster_runtime: false,
            },
        )
        .collect();
    store.put_all(&recs)?;
    Ok(())
}

fn section_restart(bin: &Path, dir: &Path) -> Result<()> {
    fresh_store(
        dir,
        (0..10_000u32).map(|i| {
            let protocol = if i % 2 == 0 { "tcp" } else { "udp" };
            (protocol, (2000 + (i / 2) * 6) as u16, 3)
        }),
    )?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let (d, ready) = Daemon::start(bin, dir, false)?;
        let n = d.client().status()?.counts.persistent;
        assert_eq!(n, 10_000);
        times.push(ready);
        d.stop();
    }
    times.sort();
    println!("### Restart to ready with 10,000 persistent reservations\n");
    println!(
        "Median of 5 starts, from exec to the socket accepting (store read, table built, sysctl written): {:.1} ms (fastest {:.1} ms).\n",
        times[2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );
    Ok(())
}

/// Live restore: 10,000 runtime reservations (half held, half exclude) of 1,000 sessions, a
/// restart (SIGTERM, then `kill -9`) with strangers trying to find a held port unbound and an
/// excluded port missing from the sysctl meanwhile; time from the signal to every session
/// served again (re-attached).
fn section_live(bin: &Path, dir: &Path) -> Result<()> {
    const SESSIONS: usize = 1_000;
    const PER: usize = 10;
    let (mut d, _) = Daemon::start(bin, dir, true)?;
    let mut clients = Vec::with_capacity(SESSIONS);
    let mut blocks = Vec::with_capacity(SESSIONS * PER);
    let (mut held, mut excluded) = (Vec::new(), Vec::new());
    for _ in 0..SESSIONS {
        let c = d.client();
        for j in 0..PER {
            let (protocol, mode) = if j % 2 == 0 {
                (Protocol::Tcp, Mode::Hold)
            } else {
                (Protocol::Udp, Mode::Exclude)
            };
            let r = c.acquire_with(protocol, 0, 1, mode)?;
            match mode {
                Mode::Hold => held.push(r.port()),
                Mode::Exclude => excluded.push(r.port()),
            }
            blocks.push(r);
        }
        clients.push(c);
    }
    // Strangers: binding the held ports by number, reading the sysctl for the excluded ones.
    let stop = Arc::new(AtomicBool::new(false));
    let binder = {
        let (stop, held) = (stop.clone(), held.clone());
        std::thread::spawn(move || {
            let (mut attempts, mut stolen) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                for &p in &held {
                    attempts += 1;
                    if std::net::TcpListener::bind(("0.0.0.0", p)).is_ok() {
                        stolen += 1;
                    }
                }
            }
            (attempts, stolen)
        })
    };
    let watcher = {
        let (stop, excluded) = (stop.clone(), excluded.clone());
        std::thread::spawn(move || {
            let want: Vec<u16> = excluded;
            let (mut reads, mut missing_reads) = (0u64, 0u64);
            let mut longest = Duration::ZERO;
            let mut missing_since: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                let set = portres_sys::reserved_ports::read().unwrap_or_default();
                reads += 1;
                let missing = want.iter().any(|&p| !set.contains(p));
                match (missing, missing_since) {
                    (true, None) => missing_since = Some(Instant::now()),
                    (false, Some(t)) => {
                        longest = longest.max(t.elapsed());
                        missing_since = None;
                    }
                    _ => {}
                }
                missing_reads += u64::from(missing);
            }
            (reads, missing_reads, longest)
        })
    };
    println!(
        "### Live restore: {} runtime reservations of {SESSIONS} sessions across a restart\n",
        SESSIONS * PER
    );
    println!(
        "Half are held TCP ports, half exclude-mode UDP ports. From the signal to the new daemon \
         ready, and to every session served again (each of the 1,000 clients re-attached and \
         answered, 8 threads of clients).\n"
    );
    println!("| restart | signal → ready | signal → all 1,000 sessions served | kept |");
    println!("|---|---|---|---|");
    for how in ["SIGTERM", "SIGKILL"] {
        let t = Instant::now();
        let _ = Command::new("kill")
            .arg(if how == "SIGTERM" { "-TERM" } else { "-KILL" })
            .arg(d.child.id().to_string())
            .status();
        let _ = d.child.wait();
        let (nd, _) = Daemon::start(bin, dir, false)?;
        let ready = t.elapsed();
        let per = clients.len().div_ceil(8);
        let each: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = clients
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|c| {
                                let t = Instant::now();
                                c.status().expect("served after the restart");
                                t.elapsed()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let all = t.elapsed();
        if std::env::var_os("BENCH_DEBUG").is_some() {
            let (p50, p99) = pct(each);
            eprintln!("per client: p50 {} p99 {}", us(p50), us(p99));
        }
        let kept = nd.client().status()?.restore.map_or(0, |r| r.kept);
        println!(
            "| {how} | {:.1} ms | {:.1} ms | {kept} |",
            ready.as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3
        );
        d = nd;
    }
    stop.store(true, Ordering::Relaxed);
    let (attempts, stolen) = binder.join().unwrap();
    let (reads, missing_reads, longest) = watcher.join().unwrap();
    println!(
        "\nUnprotected meanwhile: {stolen} of {attempts} binds of held ports by number \
         succeeded; {missing_reads} of {reads} reads of ip_local_reserved_ports missed an \
         excluded port (longest gap {:.1} ms).\n",
        longest.as_secs_f64() * 1e3
    );
    let keeper_rss = d
        .client()
        .status()?
        .restore
        .and_then(|r| r.keeper_pid)
        .map_or(0, |p| status_kib(p, "VmRSS"));
    println!(
        "The keeper's RSS with these 10,000 reservations: {keeper_rss} KiB (the daemon's: {} \
         KiB).\n",
        rss_kib(d.child.id())
    );
    drop(blocks);
    drop(clients);
    d.stop();
    Ok(())
}

/// Wall time of a command whose output is discarded.
fn time_command(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run command");
    let d = t.elapsed();
    assert!(st.success(), "{cmd:?} failed");
    d
}

fn median(v: Vec<Duration>) -> Duration {
    pct(v).0
}

/// `show` of 10,000 persistent and 10,000 runtime reservations: time and daemon memory.
fn section_show(bin: &Path, dir: &Path) -> Result<()> {
    fresh_store(
        dir,
        (0..10_000u32).map(|i| ("tcp", (2000 + i * 3) as u16, 2)),
    )?;
    let (d, _) = Daemon::start(bin, dir, false)?;
    let c = d.client();
    let mut held = Vec::new();
    for i in 0..10_000u32 {
        held.push(c.acquire_with(Protocol::Udp, 40_000 + i, 1, Mode::Hold)?);
    }
    let pid = d.child.id();
    let rss_before = rss_kib(pid);
    let mut lib = Vec::new();
    let mut cli = Vec::new();
    let mut status = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let n = d.client().show()?.reservations.len();
        lib.push(t.elapsed());
        assert_eq!(n, 20_000);
        cli.push(time_command(
            Command::new(bin)
                .args(["--json", "show"])
                .env("PORTRES_SOCKET", &d.socket),
        ));
        status.push(time_command(
            Command::new(bin)
                .args(["--json", "status"])
                .env("PORTRES_SOCKET", &d.socket),
        ));
    }
    let hwm = status_kib(pid, "VmHWM");
    println!("### show of 20,000 reservations (10,000 persistent, 10,000 runtime)\n");
    println!("| what | median of 5 |\n|---|---|");
    println!(
        "| `Client::show` (streamed, collected) | {:.1} ms |",
        median(lib).as_secs_f64() * 1e3
    );
    println!(
        "| `portres --json show` (whole process) | {:.1} ms |",
        median(cli).as_secs_f64() * 1e3
    );
    println!(
        "| `portres --json status` (whole process, for scale) | {:.1} ms |",
        median(status).as_secs_f64() * 1e3
    );
    println!(
        "| daemon RSS before / peak after (VmHWM) | {} KiB / {} KiB |\n",
        rss_before, hwm
    );
    drop(held);
    d.stop();
    Ok(())
}

/// Reservation files (`portres apply`) of 1,000 and 10,000 entries, beside the same number of
/// `persistent add` requests one at a time; and a metrics scrape of that many reservations.
fn section_apply(bin: &Path, dir: &Path) -> Result<()> {
    println!(
        "### Reservation files (`apply`) beside one `persistent add` per reservation
"
    );
    println!(
        "| entries | apply (all or nothing) | again, nothing to do | remove all (files gone) | that many `persistent add`, one by one | per reservation: add ÷ apply | metrics scrape | status |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in [1_000u32, 10_000] {
        let files = dir.join("files");
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(&files)?;
        let config = format!("deny = false\nreservations_dir = \"{}\"\n", files.display());
        let (d, _) = Daemon::start_with(bin, dir, false, &config)?;
        let c = d.client();
        let mut text = String::new();
        for i in 0..n {
            text += &format!(
                "[[reservation]]\nports = {}\ndescription = \"entry {i}\"\n",
                10_000 + 4 * i
            );
        }
        std::fs::write(files.join("many.toml"), &text)?;
        let t = Instant::now();
        let applied = c.apply(false, None)?;
        let apply = t.elapsed();
        assert_eq!(applied.added, u64::from(n));
        let t = Instant::now();
        let again = c.apply(false, None)?;
        let nothing = t.elapsed();
        assert_eq!(again.added + again.changed + again.removed, 0);
        let t = Instant::now();
        let scrape = c.metrics()?;
        let metrics = t.elapsed();
        assert!(scrape.contains("portres_reservations"));
        let t = Instant::now();
        c.status()?;
        let status = t.elapsed();
        std::fs::remove_file(files.join("many.toml"))?;
        let t = Instant::now();
        let removed = c.apply(false, None)?;
        let remove = t.elapsed();
        assert_eq!(removed.removed, u64::from(n));
        // The baseline: the same blocks by requests (one store transaction and fsync each).
        let t = Instant::now();
        for i in 0..n {
            c.create_persistent(&PersistentSpec::new(Protocol::Tcp, 10_002 + 4 * i, 1))?;
        }
        let adds = t.elapsed();
        println!(
            "| {n} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.1}× | {:.1} ms | {:.2} ms |",
            apply.as_secs_f64() * 1e3,
            nothing.as_secs_f64() * 1e3,
            remove.as_secs_f64() * 1e3,
            adds.as_secs_f64() * 1e3,
            adds.as_secs_f64() / apply.as_secs_f64(),
            metrics.as_secs_f64() * 1e3,
            status.as_secs_f64() * 1e3,
        );
        d.stop();
    }
    println!();
    Ok(())
}

/// `who` of a port with 1, 1,000 and 100,000 sockets against `ss -tanp sport = :PORT`.
fn section_who(bin: &Path, dir: &Path) -> Result<()> {
    let (d, _) = Daemon::start(bin, dir, true)?;
    let pid = d.child.id();
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/it/busy_port.py");
    println!("### who on a busy port, against `ss -tanp sport = :PORT`\n");
    println!(
        "Median of 5 interleaved runs, whole processes; the daemon's peak RSS after each size.\n"
    );
    println!(
        "| sockets on the port | `portres who` | `portres who --all` | `portres --json who` | `ss -tanp` | who / ss | --json / ss | daemon VmHWM |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, n) in [0usize, 999, 99_999].into_iter().enumerate() {
        let port = 9000 + i as u16;
        let mut busy = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 20000; exec python3 {} {port} {n}",
                helper.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(busy.stdout.as_mut().unwrap()).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("busy_port.py did not start");
        }
        let (mut who, mut all, mut json, mut ss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let cli = |args: &[&str]| {
                time_command(
                    Command::new(bin)
                        .args(args)
                        .env("PORTRES_SOCKET", &d.socket),
                )
            };
            let p = port.to_string();
            who.push(cli(&["who", &p]));
            all.push(cli(&["who", &p, "--all"]));
            json.push(cli(&["--json", "who", &p]));
            ss.push(time_command(Command::new("ss").args([
                "-tanp",
                "sport",
                "=",
                &format!(":{port}"),
            ])));
        }
        let (w, a, j, s) = (median(who), median(all), median(json), median(ss));
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x | {:.2}x | {} KiB |",
            n + 1,
            w.as_secs_f64() * 1e3,
            a.as_secs_f64() * 1e3,
            j.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            w.as_secs_f64() / s.as_secs_f64(),
            j.as_secs_f64() / s.as_secs_f64(),
            status_kib(pid, "VmHWM")
        );
        drop(busy.stdin.take());
        let _ = busy.wait();
    }
    println!();
    d.stop();
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--echo-server") {
        return echo_server(&args[2]);
    }
    if args.get(1).map(String::as_str) == Some("--echo-server-multi") {
        return echo_server_multi(&args[2]);
    }
    if args.get(1).map(String::as_str) == Some("--ns-client") {
        return ns_client(&args[2], args[3].parse()?);
    }
    if args.get(1).map(String::as_str) == Some("--ns-hold") {
        return ns_hold(&args[2]);
    }
    let bin = PathBuf::from(
        std::env::var("PORTRES_BIN").unwrap_or_else(|_| "target/release/portres".into()),
    );
    let portserver = std::env::var_os("PORTSERVER").map(PathBuf::from);
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("portres-bench-{}", std::process::id()));
    portres_sys::hold::raise_nofile_limit();
    // The harness's threads on CPU 0, the servers on CPU 1 (see `server_command`).
    if let Err(e) = portres_sys::process::pin_to_cpu(0) {
        eprintln!("cannot pin the harness to CPU 0: {e}");
    }
    println!(
        "## Run of {}\n",
        std::process::Command::new("date")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    // BENCH_ONLY=rpc,grants,allocator,hold,restart,deny,live,show,who,portserver,netns,apply,cluster
    // runs only those sections (default: all but cluster, which needs etcd).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |s: &str| only.is_empty() || only.split(',').any(|o| o.trim() == s);
    if run("rpc") || run("grants") {
        let (d, _) = Daemon::start(&bin, &dir, true)?;
        if run("rpc") {
            section_rpc(&d, n)?;
        }
        if run("grants") {
            section_grants(&d, portserver.as_deref())?;
        }
        d.stop();
    }
    if run("allocator") {
        section_allocator();
    }
    if run("hold") {
        section_hold(&bin, &dir)?;
    }
    if run("restart") {
        section_restart(&bin, &dir)?;
    }
    if run("deny") {
        section_deny(&bin, &dir)?;
    }
    if run("live") {
        section_live(&bin, &dir)?;
    }
    if run("show") {
        section_show(&bin, &dir)?;
    }
    if run("who") {
        section_who(&bin, &dir)?;
    }
    if run("portserver") {
        match portserver.as_deref() {
            Some(p) => section_portserver(&bin, &dir, p)?,
            None => println!("### Portserver protocol\n\n(not run: PORTSERVER is not set)\n"),
        }
    }
    if run("netns") {
        section_netns(&bin, &dir)?;
    }
    if run("apply") {
        section_apply(&bin, &dir)?;
    }
    // Only when asked for: it needs etcd (Debian's etcd-server) and a build with `cluster`.
    if only.split(',').any(|o| o.trim() == "cluster") {
        #[cfg(feature = "cluster")]
        cluster_bench::section_cluster(&bin, &dir)?;
        #[cfg(not(feature = "cluster"))]
        println!("### Cluster mode\n\n(not run: build portres-bench with --features cluster)\n");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `--ns-client SOCKET N`: N acquire + release round trips (hold, one port) from this process
/// (run in the daemon's namespace or in one of its own); prints the median in nanoseconds.
fn ns_client(socket: &str, n: usize) -> Result<()> {
    let c = Client::connect_to(Path::new(socket))?;
    for _ in 0..200 {
        c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold)?.release()?;
    }
    let v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let r = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold).unwrap();
            r.release().unwrap();
            t.elapsed()
        })
        .collect();
    println!("{}", pct(v).0.as_nanos());
    Ok(())
}

/// `--ns-hold SOCKET`: holds one port (a session) until stdin closes; prints `ready` first.
fn ns_hold(socket: &str) -> Result<()> {
    let c = Client::connect_to(Path::new(socket))?;
    let _r = c.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold)?;
    println!("ready");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    Ok(())
}

/// The harness binary, run in a network namespace of its own (`unshare -n`) when `own_ns`.
fn harness_command(own_ns: bool) -> Result<Command> {
    let me = std::env::current_exe()?;
    Ok(if own_ns {
        let mut c = Command::new("unshare");
        c.args(["-n", "--"]).arg(me);
        c
    } else {
        Command::new(me)
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn section_netns(bin: &Path, dir: &Path) -> Result<()> {
    println!("### Network namespaces\n");
    let (d, _) = Daemon::start_with(bin, dir, true, "deny = false\nnamespaces = \"client\"\n")?;
    let socket = d.socket.to_str().context("socket path")?.to_string();
    // 1. Acquire + release from a client in another namespace (the daemon enters it to bind
    // the placeholder) against one in the daemon's own: alternating rounds, separate processes.
    let per = 2000;
    let (mut own, mut other) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        for (own_ns, v) in [(false, &mut own), (true, &mut other)] {
            let out = harness_command(own_ns)?
                .args(["--ns-client", &socket, &per.to_string()])
                .output()?;
            if !out.status.success() {
                bail!("ns client: {}", String::from_utf8_lossy(&out.stderr));
            }
            v.push(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()? / 1000.0);
        }
    }
    let ratios: Vec<f64> = own.iter().zip(&other).map(|(a, b)| b / a).collect();
    let (mut o, mut x, mut r) = (own.clone(), other.clone(), ratios.clone());
    let (om, _, _) = spread(&mut o);
    let (xm, _, _) = spread(&mut x);
    let (rm, rlo, rhi) = spread(&mut r);
    println!("| acquire + release (hold, 1 port), median of 7 rounds × {per} | µs |");
    println!("|---|---|");
    println!("| client in the daemon's namespace | {om:.1} |");
    println!("| client in another namespace | {xm:.1} |");
    println!(
        "| **ratio, paired per round** (goal ≤ 1.2×) | **{rm:.2}×** (rounds {rlo:.2}–{rhi:.2}) |\n"
    );
    // 2. What a served namespace costs the daemon: K sessions holding one port each, in K
    // namespaces, against K such sessions in the daemon's own namespace.
    let k = 100;
    let mut cost = Vec::new();
    for own_ns in [false, true] {
        let (rss0, fds0, slab0) = (rss_kib(d.child.id()), open_fds(d.child.id()), slab_kib());
        let mut kids = Vec::new();
        for _ in 0..k {
            let mut c = harness_command(own_ns)?
                .args(["--ns-hold", &socket])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut line = String::new();
            BufReader::new(c.stdout.take().unwrap()).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("ns hold client did not get ready");
            }
            kids.push(c);
        }
        let (rss1, fds1, slab1) = (rss_kib(d.child.id()), open_fds(d.child.id()), slab_kib());
        cost.push((
            rss1 as f64 - rss0 as f64,
            fds1 as f64 - fds0 as f64,
            slab1 as f64 - slab0 as f64,
        ));
        for mut c in kids {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
    let kf = k as f64;
    let (rss, fds, slab) = (
        (cost[1].0 - cost[0].0) / kf,
        (cost[1].1 - cost[0].1) / kf,
        (cost[1].2 - cost[0].2) / kf,
    );
    println!(
        "| {k} sessions holding one port each | daemon RSS | daemon open files | kernel slab (machine-wide) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| in the daemon's namespace | +{:.0} KiB | +{:.0} | +{:.0} KiB |",
        cost[0].0, cost[0].1, cost[0].2
    );
    println!(
        "| each in a namespace of its own | +{:.0} KiB | +{:.0} | +{:.0} KiB |",
        cost[1].0, cost[1].1, cost[1].2
    );
    println!(
        "| **per served namespace** (difference ÷ {k}) | **{rss:.1} KiB** | **{fds:.1}** | {slab:.1} KiB |\n"
    );
    d.stop();
    Ok(())
}

/// Grants per second from the daemon's portserver endpoint (a fresh daemon, ports from
/// 10000-60000 as Google's portserver is given), with the same client as Google's.
fn grants_portres_portserver(bin: &Path, dir: &Path, clients: usize, dur: Duration) -> Result<f64> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("portres-bench-ps-{}-{clients}", std::process::id());
    let config =
        format!("deny = false\nportserver = \"@{name}\"\nportserver_range = \"10000-60000\"\n");
    let (d, _) = Daemon::start_with(bin, dir, true, &config)?;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let rate = rate(clients, dur, || {
        let addr = addr.clone();
        move || portserver_request(&addr).is_some()
    });
    d.stop();
    Ok(rate)
}

fn section_portserver(bin: &Path, dir: &Path, script: &Path) -> Result<()> {
    println!("### Portserver protocol: portres's endpoint beside Google's portserver\n");
    println!(
        "Same client (connect, write the pid, read the port), same pool (10000-60000), 2 s per \
         cell, cells alternating.\n"
    );
    println!("| clients | portres --portserver | Google's portserver | ratio |");
    println!("|---|---|---|---|");
    for clients in [1, 8, 64] {
        let ours = grants_portres_portserver(bin, dir, clients, Duration::from_secs(2))?;
        let theirs = grants_portserver(script, clients, Duration::from_secs(2))?;
        println!(
            "| {clients} | {ours:.0}/s | {theirs:.0}/s | **{:.2}×** |",
            ours / theirs
        );
    }
    println!();
    Ok(())
}
