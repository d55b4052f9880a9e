//! `portres daemon`: find the paths, make sure exactly one daemon serves the socket, open the
//! store, bind, announce readiness, serve until SIGINT/SIGTERM.

use std::fs::{self, File};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use portres_client::paths::{self, Scope};
use portres_client::trust;
use portres_daemon::{Config, Daemon, Placement};

pub struct Options {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub print_ready: bool,
    /// `--portserver [ADDRESS]`.
    pub portserver: Option<String>,
}

use portres_daemon::deny::lock_path;

pub fn run(opts: Options) -> anyhow::Result<ExitCode> {
    // Before any thread starts: the socket systemd passed, if any (and LISTEN_* cleared).
    let inherited = portres_sys::activation::take_listeners()?;
    init_logging();
    abort_on_panic();

    let scope = Scope::for_current_user();
    let activated = activated_listener(inherited)?;
    let socket = match &activated {
        // The socket unit's path; `--socket` only names it for messages then.
        Some(l) => l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .context(
                "socket activation: the inherited socket has no path (ListenStream= must be a \
                 path, not an abstract name)",
            )?,
        None => opts.socket.unwrap_or_else(|| paths::default_socket(scope)),
    };
    let state_dir = opts.state_dir.unwrap_or_else(|| paths::state_dir(scope));
    let config_path = opts
        .config
        .clone()
        .unwrap_or_else(|| paths::config_file(scope));
    if scope == Scope::System {
        check_system_config(&config_path)?;
    }
    let mut config = match &opts.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(&paths::config_file(scope), false)?,
    };
    // Declarative reservation files: reservations.d beside the configuration file, unless the
    // configuration names another directory (or is /dev/null: none).
    if config.reservations_dir.is_none() && config_path != Path::new("/dev/null") {
        config.reservations_dir = config_path.parent().map(|d| d.join("reservations.d"));
    }

    // The socket's directory: world-traversable for the system daemon, private for a user's.
    let dir_mode = if scope == Scope::System { 0o755 } else { 0o700 };
    if let Some(dir) = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    // Checked on every start, without following symbolic links: the system daemon's socket
    // directory is root's and writable by root alone; a user daemon's directories are private.
    let me = portres_sys::creds::effective_uid();
    let socket_dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let checked = match scope {
        Scope::System => {
            trust::check_dir(socket_dir, &[me]).and_then(|()| trust::check_dir(&state_dir, &[me]))
        }
        Scope::User => trust::check_private_dir(socket_dir, me)
            .and_then(|()| trust::check_private_dir(&state_dir, me)),
    };
    if let Err(why) = checked {
        bail!("refusing to start: {why}");
    }

    // One daemon per socket: under the lock, a live daemon means we step aside.
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(&socket))
        .with_context(|| format!("cannot open lock file {}", lock_path(&socket).display()))?;
    portres_sys::process::lock_exclusive(&lock_file).context("cannot lock the socket")?;
    // An inherited socket is the service manager's: nobody else serves it, and connecting to it
    // would only queue a connection to ourselves.
    if activated.is_none() && UnixStream::connect(&socket).is_ok() {
        if opts.print_ready {
            // Autostart race lost: exit without READY; the starter finds the winner answering.
            tracing::info!(socket = %socket.display(), "another daemon serves this socket already");
            return Ok(ExitCode::SUCCESS);
        }
        bail!(
            "a portres daemon already serves {}; stop it first, or give this one another --socket",
            socket.display()
        );
    }
    if activated.is_none() {
        match fs::remove_file(&socket) {
            Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).context(format!("cannot remove stale socket {}", socket.display()));
            }
        }
    }

    let placement = Placement {
        scope: scope.as_str().into(),
        socket: socket.clone(),
        state_dir: state_dir.clone(),
        activated: activated.is_some(),
    };
    let portserver = opts
        .portserver
        .clone()
        .or_else(|| config.portserver.clone());
    let config_metrics = config.metrics_listen;
    let mut daemon = Daemon::open(config, placement)?;
    if let Some(addr) = config_metrics {
        // As the portserver: a taken address never keeps the daemon from starting.
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
                daemon.serve_metrics(l);
            }
            Err(e) => {
                let why = format!("cannot listen on {addr}: {e}");
                tracing::error!("metrics: NOT SERVED: {why}");
                daemon.metrics_problem(&why);
            }
        }
    }
    if let Some(address) = &portserver {
        // Not being able to answer portpicker never keeps the daemon from starting (anyone may
        // squat an abstract name first): it says so, in the log and in `status`.
        match portres_daemon::portserver::bind(address) {
            Ok(l) => {
                daemon.serve_portserver(l, address);
                tracing::info!(%address, "answering the portserver protocol");
            }
            Err(e) => {
                let why = format!(
                    "NOT SERVED: cannot listen on {address}: {e} (another process has it; give \
                     another address, e.g. a path in the daemon's runtime directory, which \
                     nobody else can take)"
                );
                tracing::error!("portserver: {why}");
                daemon.portserver_problem(&why);
            }
        }
    }
    let (listener, our_socket) = match activated {
        Some(l) => {
            // The service manager made it (its SocketMode=) and removes it: never ours to remove.
            tracing::info!(socket = %socket.display(), "serving the socket passed by the service manager");
            (l, None)
        }
        None => {
            let listener = UnixListener::bind(&socket)
                .with_context(|| format!("cannot listen on {}", socket.display()))?;
            let ours = fs::symlink_metadata(&socket).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
            // Anyone may connect to the system daemon (docs/behaviour.md §4: authorisation is
            // per request, from SO_PEERCRED); a user daemon's socket is its user's alone.
            let sock_mode = if scope == Scope::System { 0o666 } else { 0o600 };
            fs::set_permissions(&socket, fs::Permissions::from_mode(sock_mode))
                .with_context(|| format!("cannot set permissions of {}", socket.display()))?;
            (listener, ours)
        }
    };
    listener.set_nonblocking(true)?;
    portres_sys::process::unlock(&lock_file)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        // Handlers first: a SIGTERM that arrives right after READY must stop us gracefully.
        let shutdown = shutdown_signal()?;
        tracing::info!(socket = %socket.display(), scope = scope.as_str(), pid = std::process::id(), "ready");
        if opts.print_ready {
            ready_line();
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        daemon.run(listener, shutdown).await;
        anyhow::Ok(())
    })?;

    // Remove the socket under the lock, so a daemon starting now sees a clean slate; unless a
    // successor started meanwhile (after a SIGTERM with live restore) and bound its own there.
    portres_sys::process::lock_exclusive(&lock_file)?;
    if our_socket.is_some()
        && fs::symlink_metadata(&socket).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            Some((m.dev(), m.ino())) == our_socket
        })
    {
        let _ = fs::remove_file(&socket);
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The socket passed by the service manager (socket activation), if any: the only one, or
/// the one named `portres` (`FileDescriptorName=portres`) among several.
fn activated_listener(
    inherited: Vec<(String, UnixListener)>,
) -> anyhow::Result<Option<UnixListener>> {
    if inherited.len() <= 1 {
        return Ok(inherited.into_iter().next().map(|(_, l)| l));
    }
    let names: Vec<String> = inherited.iter().map(|(n, _)| n.clone()).collect();
    inherited
        .into_iter()
        .find(|(n, _)| n == "portres")
        .map(|(_, l)| Some(l))
        .with_context(|| {
            format!(
                "socket activation: {} sockets were passed ({}) and none is named \"portres\"; \
                 give the daemon's socket FileDescriptorName=portres",
                names.len(),
                names.join(", ")
            )
        })
}

/// Logs to standard error: plain lines with timestamps, or, when standard error is the journal
/// (`JOURNAL_STREAM`), no timestamps of our own (the journal has them) and each line prefixed
/// with its priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug: `sd-daemon(3)`).
fn init_logging() {
    // The etcd client's transport (cluster mode) logs every frame at debug: its crates stay
    // at info unless PORTRES_LOG names them.
    let quiet = ",h2=info,tower=info,tonic=info,hyper=info,hyper_util=info,rustls=info";
    let filter = std::env::var("PORTRES_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(format!("{v}{quiet}")).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(format!("info{quiet}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if portres_sys::activation::stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_ansi(false);
        builder
            .with_ansi(false)
            .event_format(JournalPriority(format))
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Prefixes each event with its journal priority (`sd-daemon(3)`), then formats it with `F`.
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        // Formatted whole first: a line break inside the event starts a new journal entry,
        // which gets the same priority (not the journal's default).
        let mut text = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut text),
            event,
        )?;
        let body = text.trim_end_matches('\n');
        writeln!(
            writer,
            "<{priority}>{}",
            body.replace('\n', &format!("\n<{priority}>"))
        )
    }
}

/// `portres daemon --stop`: asks the daemon to stop (never starts one), and waits until it has.
pub fn stop(socket: Option<PathBuf>, release: bool, json: bool) -> anyhow::Result<ExitCode> {
    let socket = socket.unwrap_or_else(|| paths::default_socket(Scope::for_current_user()));
    let client = match portres_client::Client::connect_to(&socket) {
        Ok(c) => c,
        Err(portres_client::Error::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"stopped": false, "running": false})
                );
            } else {
                println!("no daemon is running on {}", socket.display());
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    let status = client.status()?;
    let pid = client.daemon().pid;
    let pidfd = portres_sys::process::pidfd_open(pid).ok();
    client.shutdown(release)?;
    drop(client);
    // The daemon exits once it has answered: wait for that (bounded).
    let limit = std::time::Duration::from_secs(30);
    let exited = match &pidfd {
        Some(fd) => portres_sys::fdpass::wait_readable(fd, Some(limit)).unwrap_or(false),
        None => true,
    };
    if !exited {
        bail!(
            "the daemon (pid {pid}) accepted the stop but has not exited within {} s; see its log",
            limit.as_secs()
        );
    }
    let runtime = status.counts.runtime;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "stopped": true, "pid": pid, "released": release,
                "runtime_reservations": runtime,
            })
        );
    } else if release {
        println!(
            "stopped the daemon (pid {pid}); its {runtime} runtime reservations were released \
             and ip_local_reserved_ports restored"
        );
    } else {
        println!(
            "stopped the daemon (pid {pid}); its {runtime} runtime reservations are kept for the \
             next daemon"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `portres daemon --cleanup`: removes what the deny layer of the daemon with this state
/// directory left in the kernel (pinned programs, links and maps; empty run cgroups), when no
/// daemon serves the socket.
pub fn cleanup(
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let scope = Scope::for_current_user();
    let socket = socket.unwrap_or_else(|| paths::default_socket(scope));
    let state_dir = state_dir.unwrap_or_else(|| paths::state_dir(scope));
    let Some(cleaned) = portres_daemon::deny::cleanup_unless_served(&socket, &state_dir)
        .with_context(|| {
            format!(
                "removing the deny layer's pins of state directory {}",
                state_dir.display()
            )
        })?
    else {
        bail!(
            "a daemon serves {}: it owns the deny layer's programs and map; stop it first with \
             `portres daemon --stop` (which removes them too), then clean up what is left",
            socket.display()
        );
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "pin_dir": cleaned.pin_dir.as_ref().map(|p| p.display().to_string()),
                "removed_pins": cleaned.pin_dir.is_some(),
                "removed_cgroups": cleaned.cgroups,
            })
        );
    } else {
        match &cleaned.pin_dir {
            Some(p) => println!(
                "removed the deny layer's programs, links and maps pinned in {} (binds into \
                 its reservations are no longer refused)",
                p.display()
            ),
            None => println!(
                "nothing pinned for state directory {} (no deny layer left behind)",
                state_dir.display()
            ),
        }
        if cleaned.cgroups > 0 {
            println!("removed {} empty portres-run cgroups", cleaned.cgroups);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The system daemon's configuration grants administrator rights: it must be root's and
/// writable by root alone, and so must its directory (`stat`, following the path as it is
/// read). A missing file is fine (defaults).
fn check_system_config(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Empty by construction (benchmarks and tests run with defaults this way).
    if path == Path::new("/dev/null") {
        return Ok(());
    }
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context(format!("cannot examine {}", path.display())),
    };
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 || mode & 0o022 != 0 {
        bail!(
            "refusing the configuration {}: it is owned by {} with mode {mode:04o}, so a user \
             other than root could change it, and it decides who administers portres; make it \
             root's and writable by root alone (chown root {}; chmod go-w {})",
            path.display(),
            trust::who_is(meta.uid()),
            path.display(),
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(why) = trust::check_dir(dir, &[0])
    {
        bail!(
            "refusing the configuration {}: {why} (whoever can write it can replace the file)",
            path.display()
        );
    }
    Ok(())
}

/// A panic anywhere ends the daemon (SIGABRT) after the usual message: a daemon that lost a
/// thread or poisoned its state mutex would stay alive without serving, and no supervisor
/// would restart it. With the process gone, systemd's `Restart=on-failure` (or the next
/// autostart) starts a fresh daemon, which restores the persistent reservations from the store
/// and `ip_local_reserved_ports` from its journal.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Inside the store library on a file that may be damaged: caught and reported as damage.
        if portres_daemon::store::panic_expected() {
            return;
        }
        default(info);
        tracing::error!("panic: {info}; the daemon stops so that it can be restarted cleanly");
        std::process::abort();
    }));
}

/// The readiness line for whoever started us with `--print-ready`; then stdout is detached so
/// the starter's pipe sees EOF.
fn ready_line() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    drop(out);
    let _ = portres_sys::process::stdout_to_dev_null();
}

/// Installs the SIGTERM/SIGINT handlers now; the future completes on the first signal.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}

/// `portres store restore`: rebuilds a damaged store from its journal.
pub fn store_restore(state_dir: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    // The store library may panic on the damaged file: that is caught and reported.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !portres_daemon::store::panic_expected() {
            default(info);
        }
    }));
    let state_dir = state_dir.unwrap_or_else(|| paths::state_dir(Scope::for_current_user()));
    let report = portres_daemon::Store::restore(&state_dir)?;
    if json {
        let doc = serde_json::json!({
            "restored": report.restored.len(),
            "reservations": report.restored.iter().map(|r| serde_json::json!({
                "protocol": r.protocol, "start": r.start, "count": r.count,
                "token": r.token.to_string(), "mode": r.mode,
            })).collect::<Vec<_>>(),
            "lost": report.lost.iter().map(|b| serde_json::json!({"line": b.line, "why": b.why})).collect::<Vec<_>>(),
            "kept_damaged": report.kept_damaged.as_ref().map(|p| p.display().to_string()),
        });
        println!("{doc}");
    } else {
        println!(
            "restored {} persistent reservations into {}",
            report.restored.len(),
            state_dir.join("portres.redb").display()
        );
        for r in &report.restored {
            let last = u32::from(r.start) + u32::from(r.count) - 1;
            println!(
                "  {}-{last}/{} ({}), token {}",
                r.start, r.protocol, r.mode, r.token
            );
        }
        if let Some(p) = &report.kept_damaged {
            println!("the old file is kept as {}", p.display());
        }
        if report.lost.is_empty() {
            println!("every line of the journal was readable: nothing was lost");
        } else {
            println!(
                "{} journal lines could not be read; what they held is lost:",
                report.lost.len()
            );
            for b in &report.lost {
                println!("  line {}: {}", b.line, b.why);
            }
        }
    }
    Ok(if report.lost.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
