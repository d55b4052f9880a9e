//! `portres run`: hold a runtime reservation while a command runs.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use anyhow::Context;
use portres_client::{Client, Mode, Protocol, SocketKind};

pub fn run(
    client: &Client,
    protocol: Protocol,
    start: Option<u32>,
    count: u32,
    listen: bool,
    cmd: &[OsString],
) -> anyhow::Result<ExitCode> {
    // With --listen the ports arrive as sockets, so the block is held; without, the command
    // binds the ports itself, so the block is in `exclude` mode.
    let mode = if listen { Mode::Hold } else { Mode::Exclude };
    let block = client.acquire_with(protocol, start.unwrap_or(0), count, mode)?;
    let r = block.range();
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
    let status = portres_sys::process::wait_forwarding_signals(&mut child)
        .context("waiting for the command")?;
    drop(block);
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128 + sig as u8),
        _ => ExitCode::FAILURE,
    })
}
