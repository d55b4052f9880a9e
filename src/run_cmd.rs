//! `portres run`: hold a runtime reservation while a command runs.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use portres_client::{Client, Error, Mode, Protocol, SocketKind};

pub fn run(
    client: &Client,
    protocol: Protocol,
    start: Option<u32>,
    count: u32,
    listen: bool,
    cluster: bool,
    cmd: &[OsString],
) -> anyhow::Result<ExitCode> {
    // With --listen the ports arrive as sockets, so the block is held; without, the command
    // binds the ports itself, so the block is in `exclude` mode.
    let mode = if listen { Mode::Hold } else { Mode::Exclude };
    let block = if cluster {
        client.acquire_in_cluster(protocol, start.unwrap_or(0), count, mode)?
    } else {
        client.acquire_with(protocol, start.unwrap_or(0), count, mode)?
    };
    let r = block.range();
    // Under the deny layer, this process and everything it starts (the command and its
    // descendants) become the block's owner: they bind its ports by number, everyone else is
    // refused. With the layer off (a per-user daemon), exclude mode keeps only autobind out.
    match client.own_tree(block.token()) {
        Ok(_) | Err(Error::InvalidArgument(_)) => {}
        Err(e) => eprintln!(
            "portres run: the command's process tree could not be made the owner of {}/{} \
             ({e}); the reservation stands, but under the deny layer the command may be refused \
             binding its ports by number",
            r,
            protocol.as_str()
        ),
    }
    let (program, args) = cmd.split_first().expect("clap requires CMD");
    let mut command = if listen {
        let kind = match protocol {
            Protocol::Tcp => SocketKind::Listener { backlog: 4096 },
            Protocol::Udp => SocketKind::Datagram,
        };
        let mut fds = Vec::new();
        for port in r.ports() {
            let (fd, _) = client
                .associate(block.token(), kind, None, port)
                .with_context(|| format!("binding port {port} for the command"))?;
            fds.push(fd);
        }
        let names: Vec<String> = r.ports().map(|p| p.to_string()).collect();
        // systemd's protocol: LISTEN_PID must be the command's own pid, which only a shell that
        // then execs the command knows.
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        portres_sys::process::pass_fds(&mut c, &fds).context("passing the sockets")?;
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    };
    // SIGTERM, SIGHUP and SIGINT (and SIGQUIT) sent to us are passed on to the command, and we
    // wait for it before releasing; if we are killed outright, the command gets SIGTERM.
    portres_sys::process::prepare_signal_forwarding(&mut command)
        .context("preparing to forward signals to the command")?;
    let mut child = command
        .env("PORTRES_TOKEN", block.token().to_string())
        .env("PORTRES_PROTOCOL", protocol.as_str())
        .env("PORTRES_PORTS", format!("{}-{}", r.start(), r.last()))
        .env("PORTRES_PORT", r.start().to_string())
        .spawn()
        .with_context(|| format!("cannot run {:?}", program))?;
    // Our copies of the sockets close with `command`; the command holds them now.
    drop(command);
    let lost = Arc::new(AtomicBool::new(false));
    watch_daemon(client, &block, lost.clone());
    let status = portres_sys::process::wait_forwarding_signals(&mut child)
        .context("waiting for the command")?;
    let what = describe(&block);
    match block.release() {
        Ok(()) => {}
        Err(e @ Error::Restarted { reserved: true, .. }) => {
            // Still reserved until we exit, which is now.
            eprintln!("portres run: {e}");
        }
        Err(e) => {
            if !lost.swap(true, Ordering::SeqCst) {
                eprintln!("portres run: releasing {what} failed: {e}");
            }
        }
    }
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    };
    if lost.load(Ordering::SeqCst) {
        eprintln!(
            "portres run: {what} was not reserved for the whole run (see above); exiting with \
             status {}",
            code.max(1)
        );
        return Ok(ExitCode::from(code.max(1)));
    }
    Ok(ExitCode::from(code))
}

fn describe(block: &portres_client::Reservation) -> String {
    let r = block.range();
    format!(
        "the reservation of ports {}-{}/{} (token {})",
        r.start(),
        r.last(),
        block.protocol(),
        block.token()
    )
}

/// Watches the connection while the command runs: when the daemon goes away (a restart, an
/// upgrade, a crash), says so, waits for it to come back and re-attaches the reservation, and
/// says whether it was kept. A loss sets `lost`.
fn watch_daemon(client: &Client, block: &portres_client::Reservation, lost: Arc<AtomicBool>) {
    let client = client.clone();
    let token = block.token().to_string();
    let what = describe(block);
    // The thread inherits the blocked signals (they are waited for by the main thread).
    let _ = std::thread::Builder::new()
        .name("daemon-watch".into())
        .spawn(move || {
            loop {
                if client.wait_disconnected().is_err() {
                    return;
                }
                if !client.daemon_gone() {
                    // Answered meanwhile by a request of the main thread's (which reconnects
                    // by itself), or the connection was made again already.
                    continue;
                }
                eprintln!(
                    "portres run: the daemon went away; waiting up to {} s for it to come back \
                     (PORTRES_RECONNECT_SECS)",
                    client.reconnect_limit().as_secs()
                );
                match client.reattach() {
                    Ok(None) => {}
                    Ok(Some(info)) => {
                        if let Some(l) = info.lost.iter().find(|l| l.token == token) {
                            eprintln!("portres run: {what} is LOST: {}", l.why);
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        eprintln!(
                            "portres run: the daemon is back (pid {}); {what} is kept",
                            client.daemon_now().pid
                        );
                    }
                    Err(e @ Error::Restarted { reserved: true, .. }) => {
                        eprintln!("portres run: {e}");
                        return;
                    }
                    Err(e) => {
                        eprintln!("portres run: {e}");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
}
