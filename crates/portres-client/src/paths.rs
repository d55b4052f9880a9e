//! Where things live by default (docs/behaviour.md §7).
//!
//! | | system (root) | user (anyone else) |
//! |---|---|---|
//! | socket | `/run/portres/portres.sock` | `$XDG_RUNTIME_DIR/portres/portres.sock` (else `/tmp/portres-UID/portres.sock`) |
//! | state | `/var/lib/portres` | `$XDG_STATE_HOME/portres` (else `~/.local/state/portres`) |
//! | config | `/etc/portres/config.toml` | `$XDG_CONFIG_HOME/portres/config.toml` (else `~/.config/portres/config.toml`) |
//!
//! `PORTRES_SOCKET` overrides the socket and `PORTRES_STATE_DIR` the state directory.

use std::env;
use std::path::PathBuf;

/// System-wide or per-user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One daemon for the machine, run by root; its socket is open to every local user.
    System,
    /// A daemon private to one user.
    User,
}

impl Scope {
    /// The scope a process with this effective uid runs a daemon in.
    pub fn for_current_user() -> Scope {
        if portres_sys::creds::effective_uid() == 0 {
            Scope::System
        } else {
            Scope::User
        }
    }

    /// `"system"` or `"user"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::System => "system",
            Scope::User => "user",
        }
    }
}

/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/portres/portres.sock";
/// The system daemon's state directory.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/portres";
/// The system daemon's configuration file.
pub const SYSTEM_CONFIG: &str = "/etc/portres/config.toml";

fn env_path(name: &str) -> Option<PathBuf> {
    env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/"))
}

/// The default socket of a daemon in `scope` (ignoring `PORTRES_SOCKET`).
pub fn default_socket(scope: Scope) -> PathBuf {
    match scope {
        Scope::System => PathBuf::from(SYSTEM_SOCKET),
        Scope::User => match env_path("XDG_RUNTIME_DIR") {
            Some(d) => d.join("portres").join("portres.sock"),
            None => PathBuf::from(format!(
                "/tmp/portres-{}/portres.sock",
                portres_sys::creds::effective_uid()
            )),
        },
    }
}

/// `PORTRES_SOCKET`, if set.
pub fn socket_override() -> Option<PathBuf> {
    env_path("PORTRES_SOCKET")
}

/// The state directory: `PORTRES_STATE_DIR`, else the default of `scope`.
pub fn state_dir(scope: Scope) -> PathBuf {
    if let Some(d) = env_path("PORTRES_STATE_DIR") {
        return d;
    }
    match scope {
        Scope::System => PathBuf::from(SYSTEM_STATE_DIR),
        Scope::User => env_path("XDG_STATE_HOME")
            .unwrap_or_else(|| home().join(".local/state"))
            .join("portres"),
    }
}

/// The default configuration file of `scope`.
pub fn config_file(scope: Scope) -> PathBuf {
    match scope {
        Scope::System => PathBuf::from(SYSTEM_CONFIG),
        Scope::User => env_path("XDG_CONFIG_HOME")
            .unwrap_or_else(|| home().join(".config"))
            .join("portres/config.toml"),
    }
}

/// Whether `PORTRES_AUTOSTART` allows starting a daemon (anything but `0`, `false`, `no`).
pub fn autostart_enabled() -> bool {
    !matches!(
        env::var("PORTRES_AUTOSTART").as_deref(),
        Ok("0") | Ok("false") | Ok("no") | Ok("off")
    )
}
