//! `portres run`: hold a runtime reservation while a command runs.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use portres_client::{Client, Mode, Protocol};

pub fn run(
    client: &Client,
    protocol: Protocol,
    start: Option<u32>,
    count: u32,
    listen: bool,
    cmd: &[OsString],
) -> anyhow::Result<ExitCode> {
    if listen {
        bail!(
            "`portres run --listen` hands the reserved ports to the command as bound sockets, \
             which needs socket handover; this version of portres does not have it yet. Run \
             without --listen: the command gets the port numbers in PORTRES_PORTS and binds \
             them itself"
        );
    }
    // Without --listen the command binds the ports itself, so the block is in `exclude` mode.
    let block = client.acquire_with(protocol, start.unwrap_or(0), count, Mode::Exclude)?;
    let r = block.range();
    let (program, args) = cmd.split_first().expect("clap requires CMD");
    let mut child = Command::new(program)
        .args(args)
        .env("PORTRES_TOKEN", block.token().to_string())
        .env("PORTRES_PROTOCOL", protocol.as_str())
        .env("PORTRES_PORTS", format!("{}-{}", r.start(), r.last()))
        .env("PORTRES_PORT", r.start().to_string())
        .spawn()
        .with_context(|| format!("cannot run {:?}", program))?;
    // Ctrl-C reaches the command (same process group); we stay to release after it exits.
    portres_sys::process::ignore_terminal_interrupts();
    let status = child.wait().context("waiting for the command")?;
    drop(block);
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128 + sig as u8),
        _ => ExitCode::FAILURE,
    })
}
