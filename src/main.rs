//! `portres`: the command line (docs/behaviour.md §7) and the daemon's entry point. Parsing,
//! dispatch and exit codes only; the work lives in the library crates.

mod daemon_cmd;
mod output;
mod run_cmd;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portres_client::paths::Scope;
use portres_client::{Client, Error, Mode, PersistentSpec, Protocol, ShowFilter, ShowInfo};

/// Port reservations for Linux, in the Windows model.
#[derive(Debug, Parser)]
#[command(name = "portres", version, about, propagate_version = true)]
struct Cli {
    /// The daemon's socket (default: the system socket, or the user's own).
    #[arg(long, global = true, env = "PORTRES_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print one JSON document on stdout (errors too).
    #[arg(long, global = true)]
    json: bool,
    /// TCP ports (the default).
    #[arg(long, global = true, conflicts_with = "udp")]
    tcp: bool,
    /// UDP ports.
    #[arg(long, global = true)]
    udp: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Daemon {
        /// Where persistent reservations are stored.
        #[arg(long, env = "PORTRES_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Configuration file (TOML); default /etc/portres/config.toml, or
        /// ~/.config/portres/config.toml for a user daemon.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also answer Google's portserver protocol (what portpicker's `pick_unused_port()`
        /// asks when PORTSERVER_ADDRESS is set) at ADDRESS: `@name` (an abstract socket) or a
        /// path; default `@unittest-portserver`. Overrides `portserver` in the configuration.
        #[arg(long, value_name = "ADDRESS", num_args = 0..=1,
              default_missing_value = portres_daemon::portserver::DEFAULT_ADDRESS)]
        portserver: Option<String>,
        /// Write READY on stdout once the socket accepts, then detach stdout (used by autostart).
        #[arg(long, hide = true)]
        print_ready: bool,
        /// Stop the running daemon, releasing every runtime reservation and restoring
        /// ip_local_reserved_ports (a stop meant as a stop; SIGTERM keeps them for the next
        /// daemon when live restore is on).
        #[arg(long, conflicts_with_all = ["state_dir", "config", "print_ready"])]
        stop: bool,
        /// With --stop: keep the runtime reservations for the next daemon, as SIGTERM does.
        #[arg(long, requires = "stop")]
        keep: bool,
        /// Remove what the deny layer left in the kernel after a crash (its pinned bind
        /// programs, links and maps under /sys/fs/bpf/portres, and empty run cgroups), for the
        /// daemon of --state-dir; refused while a daemon serves the socket.
        #[arg(long, conflicts_with_all = ["stop", "config", "print_ready"])]
        cleanup: bool,
    },
    /// Internal: a placeholder-holding helper of the daemon (reads its standard input).
    #[command(hide = true)]
    Holder,
    /// Internal: the daemon's keeper for live restore (its listening socket is standard input).
    #[command(hide = true)]
    Keeper {
        #[arg(long)]
        grace_secs: u64,
        #[arg(long)]
        state_dir: PathBuf,
        /// The daemon's socket is the service manager's (socket activation).
        #[arg(long)]
        activated: bool,
    },
    /// Daemon version, uptime, enforcement layers and counts.
    Status,
    /// Print the daemon's metrics in the Prometheus text format (for node_exporter's textfile
    /// collector: `portres metrics > /var/lib/node_exporter/portres.prom`).
    Metrics,
    /// Apply the reservation files (the daemon's reservations_dir, by default
    /// /etc/portres/reservations.d): shows the difference with what the daemon holds from
    /// files, then applies it, all or nothing, once confirmed.
    Apply {
        /// Apply without asking (for scripts).
        #[arg(long, conflicts_with = "check")]
        yes: bool,
        /// Only show the difference; exit status 3 if there is one, 0 if none (1: an error,
        /// 2: a usage error).
        #[arg(long)]
        check: bool,
    },
    /// Print the shell completion script for SHELL on standard output (e.g. `portres
    /// completions bash > /usr/share/bash-completion/completions/portres`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (portres(1) and one per command, e.g. portres-persistent-add(1))
    /// into DIR, generated from the same definition as --help.
    Man {
        /// Where to write them (made if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
    /// Every reservation with its owner.
    Show {
        /// `table` (default) or `netsh` (the layout of Windows'
        /// `netsh int ipv4 show excludedportrange`, for the protocol of --tcp/--udp).
        #[arg(long, default_value = "table", value_parser = ["table", "netsh"])]
        format: String,
        /// Only blocks that overlap these ports (`P` or `FIRST-LAST`). With --tcp or --udp
        /// given, only that protocol.
        #[arg(long, value_name = "PORTS")]
        ports: Option<String>,
        /// Only `runtime` or `persistent` reservations.
        #[arg(long, value_parser = ["runtime", "persistent"])]
        kind: Option<String>,
        /// Only reservations made by this user (name or uid).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Every network namespace the daemon serves (administrators); without it, only the
        /// caller's own namespace (port space).
        #[arg(long)]
        all_namespaces: bool,
    },
    /// Who has this port: reservation, live sockets and their processes, or nobody. Without
    /// --all, connections are summarised (by state, process, user and remote address).
    Who {
        /// The port.
        port: u32,
        /// List every socket on the port (streamed: a port may have very many). --json always
        /// lists every socket.
        #[arg(long)]
        all: bool,
    },
    /// Hold a runtime reservation while CMD runs.
    Run {
        /// Number of ports.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// First port (default: any free block of the dynamic range).
        #[arg(long)]
        start: Option<u32>,
        /// Pass the ports to CMD as bound sockets (systemd's LISTEN_FDS).
        #[arg(long)]
        listen: bool,
        /// A block free on every live member of the daemon's cluster (cluster mode), kept free
        /// on each while CMD runs.
        #[arg(long)]
        cluster: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<OsString>,
    },
    /// Persistent reservations (administrators).
    Persistent {
        #[command(subcommand)]
        op: PersistentOp,
    },
    /// Cluster mode (a daemon with `[cluster]` in its configuration).
    Cluster {
        #[command(subcommand)]
        op: ClusterOp,
    },
    /// The daemon's store of persistent reservations (with the daemon stopped).
    Store {
        #[command(subcommand)]
        op: StoreOp,
    },
}

#[derive(Debug, Subcommand)]
enum StoreOp {
    /// Rebuild a damaged store from its journal; reports what was restored and what was lost
    /// (exit status 3 when some journal lines were unreadable). The old file is kept beside it.
    Restore {
        /// The daemon's state directory (default: the system's, or the user's own).
        #[arg(long, env = "PORTRES_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterOp {
    /// This member's link to etcd, the live members (last heartbeat, how far behind the
    /// cluster's revision each is) and what each failed to enforce.
    Status,
}

#[derive(Debug, Subcommand)]
enum PersistentOp {
    /// Create one; prints its token.
    Add {
        /// First port.
        #[arg(long)]
        start: u32,
        /// Number of ports.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// `exclude` (default: the port's service binds it itself) or `hold`.
        #[arg(long, default_value = "exclude")]
        mode: Mode,
        /// A user (name or uid) who may consume it; repeatable.
        #[arg(long = "allow-user", value_name = "USER")]
        allow_users: Vec<String>,
        /// A group (name or gid) whose members may consume it; repeatable.
        #[arg(long = "allow-group", value_name = "GROUP")]
        allow_groups: Vec<String>,
        /// The network namespace it is for, by its `ip netns` name (a file of /run/netns);
        /// default: the daemon's own (the host's, for the system daemon).
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
        /// A reservation of the whole cluster (a daemon in cluster mode): granted only when
        /// every live member can enforce it (none has a port of it reserved or bound), then
        /// enforced by each.
        #[arg(long, conflicts_with = "netns")]
        cluster: bool,
        /// Why it exists, shown by `show` and `who` (at most 512 bytes).
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
    },
    /// Print the token of the one with exactly this start and count.
    Lookup {
        /// First port.
        #[arg(long)]
        start: u32,
        /// Number of ports.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The network namespace it is for, by its `ip netns` name (a file of /run/netns);
        /// default: the daemon's own (the host's, for the system daemon).
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
    },
    /// Delete the one with exactly this start and count.
    Delete {
        /// First port.
        #[arg(long)]
        start: u32,
        /// Number of ports.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The network namespace it is for, by its `ip netns` name (a file of /run/netns);
        /// default: the daemon's own (the host's, for the system daemon).
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
    },
}

impl Cli {
    fn protocol(&self) -> Protocol {
        if self.udp {
            Protocol::Udp
        } else {
            Protocol::Tcp
        }
    }

    fn client(&self) -> Result<Client, Error> {
        match &self.socket {
            Some(s) => Client::connect_or_start(s, Scope::for_current_user()),
            None => Client::connect(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Autostart runs this very executable as the daemon, whatever it is called.
    if let Ok(me) = std::env::current_exe() {
        portres_client::set_daemon_binary(me);
    }
    let json = cli.json;
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            output::print_error(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// `portres apply`: the difference, then (confirmed, or `--yes`) the same difference applied.
fn apply(cli: &Cli, yes: bool, check: bool) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, IsTerminal, Write};
    let client = cli.client()?;
    let shown = client.apply(true, None)?;
    let count = shown.added + shown.changed + shown.removed;
    let differs = count > 0;
    if check || !differs {
        output::apply_diff(&shown, cli.json);
        return Ok(if differs && check {
            ExitCode::from(3)
        } else {
            ExitCode::SUCCESS
        });
    }
    if !yes {
        if cli.json || !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "not applying {} changes without confirmation: standard input is not a \
                 terminal{}; pass --yes to apply them, or --check to only see them",
                count,
                if cli.json {
                    " (or --json was given)"
                } else {
                    ""
                }
            );
        }
        output::apply_diff(&shown, false);
        print!("apply these {count} changes? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing was changed");
            return Ok(ExitCode::from(1));
        }
    } else if !cli.json {
        output::apply_diff(&shown, false);
    }
    let applied = client.apply(false, Some(&shown.digest))?;
    output::applied(&applied, cli.json);
    Ok(if applied.cluster_errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let protocol = cli.protocol();
    match &cli.command {
        Command::Daemon {
            stop: true, keep, ..
        } => daemon_cmd::stop(cli.socket.clone(), !*keep, cli.json),
        Command::Daemon {
            cleanup: true,
            state_dir,
            ..
        } => daemon_cmd::cleanup(cli.socket.clone(), state_dir.clone(), cli.json),
        Command::Daemon {
            state_dir,
            config,
            print_ready,
            portserver,
            ..
        } => daemon_cmd::run(daemon_cmd::Options {
            socket: cli.socket.clone(),
            state_dir: state_dir.clone(),
            config: config.clone(),
            print_ready: *print_ready,
            portserver: portserver.clone(),
        }),
        Command::Holder => {
            portres_daemon::holder::serve_stdin()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keeper {
            grace_secs,
            state_dir,
            activated,
        } => {
            portres_daemon::keeper::serve_stdin(
                std::time::Duration::from_secs(*grace_secs),
                state_dir,
                *activated,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Metrics => {
            let text = cli.client()?.metrics()?;
            if cli.json {
                println!("{}", serde_json::json!({ "metrics": text }));
            } else {
                print!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { yes, check } => apply(&cli, *yes, *check),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "portres",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir).map_err(|e| {
                anyhow::anyhow!("cannot write the man pages into {}: {e}", dir.display())
            })?;
            let mut pages: Vec<String> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("portres") && n.ends_with(".1"))
                .collect();
            pages.sort();
            if cli.json {
                println!("{}", serde_json::json!({"dir": dir, "pages": pages}));
            } else {
                println!("wrote {} man pages into {}", pages.len(), dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let status = cli.client()?.status()?;
            output::status(&status, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Show {
            format,
            ports,
            kind,
            user,
            all_namespaces,
        } => {
            let filter = ShowFilter {
                all_namespaces: *all_namespaces,
                protocol: (cli.tcp || cli.udp).then(|| protocol.as_str().to_string()),
                ports: ports.as_deref().map(parse_ports).transpose()?,
                kind: kind.clone(),
                user: user.clone(),
            };
            let client = cli.client()?;
            if cli.json {
                let mut out = output::ShowJson::start()?;
                client.show_each(&filter, |r| out.row(&r))?;
                out.finish()?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows = Vec::new();
            client.show_each(&filter, |r| {
                rows.push(r);
                Ok(())
            })?;
            let show = ShowInfo {
                reservations: rows,
                more: false,
                total: None,
            };
            if format == "netsh" {
                print!("{}", output::netsh(&show, protocol));
            } else {
                output::show(&show, false);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Who { port, all } => {
            let client = cli.client()?;
            if cli.json {
                let mut first = true;
                client.who_all(protocol, *port, output::who_json_head, |s| {
                    let r = output::who_json_socket(&s, first);
                    first = false;
                    r
                })?;
                output::who_json_end()?;
            } else if *all {
                client.who_all(protocol, *port, output::who_all_head, |s| {
                    output::who_all_socket(&s)
                })?;
            } else {
                output::who(&client.who(protocol, *port)?, false);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            count,
            start,
            listen,
            cluster,
            cmd,
        } => run_cmd::run(
            &cli.client()?,
            protocol,
            *start,
            *count,
            *listen,
            *cluster,
            cmd,
        ),
        Command::Store {
            op: StoreOp::Restore { state_dir },
        } => daemon_cmd::store_restore(state_dir.clone(), cli.json),
        Command::Cluster {
            op: ClusterOp::Status,
        } => {
            let info = cli.client()?.cluster_status()?;
            output::cluster_status(&info, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Persistent { op } => {
            let client = cli.client()?;
            match op {
                PersistentOp::Add {
                    start,
                    count,
                    mode,
                    allow_users,
                    allow_groups,
                    netns,
                    cluster,
                    description,
                } => {
                    let spec = PersistentSpec {
                        protocol,
                        start: *start,
                        count: *count,
                        mode: *mode,
                        allow_users: allow_users.clone(),
                        allow_groups: allow_groups.clone(),
                        netns: netns.clone(),
                        cluster: *cluster,
                        description: description.clone(),
                    };
                    let token = client.create_persistent(&spec)?;
                    output::token(token, protocol, *start, *count, cli.json);
                }
                PersistentOp::Lookup {
                    start,
                    count,
                    netns,
                } => {
                    let token =
                        client.lookup_persistent_in(netns.as_deref(), protocol, *start, *count)?;
                    output::token(token, protocol, *start, *count, cli.json);
                }
                PersistentOp::Delete {
                    start,
                    count,
                    netns,
                } => {
                    client.delete_persistent_in(netns.as_deref(), protocol, *start, *count)?;
                    output::deleted(protocol, *start, *count, cli.json);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `P` or `FIRST-LAST`, for `show --ports`.
fn parse_ports(s: &str) -> anyhow::Result<(u16, u16)> {
    let bad = || {
        anyhow::anyhow!(
            "--ports {s:?}: give a port (e.g. 8080) or a range FIRST-LAST (e.g. 9000-9100) of \
             ports from 1 to 65535"
        )
    };
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}
