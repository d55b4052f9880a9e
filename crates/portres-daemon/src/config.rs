//! The daemon's configuration file (TOML).
//!
//! ```toml
//! # Users and groups (names or numeric ids) who administer this daemon, besides root.
//! admin_users = ["alice"]
//! admin_groups = ["portres-admin"]
//! # Most runtime ports one non-administrator user may hold at once.
//! runtime_quota_ports = 4096
//! # Where wildcard blocks come from; default: the kernel's ip_local_port_range.
//! dynamic_range = "49152-65535"
//! # The uid that owns placeholder and handed-out sockets (system daemon only): a uid no process
//! # runs as. Only sockets of the same uid can share a held port.
//! holder_uid = 2147483646
//! # A client that reads none of a reply for this long is dropped (its session ends).
//! reply_timeout_ms = 10000
//! # Live restore: on SIGTERM (or a crash) the runtime reservations are kept this long for the
//! # next daemon to carry on (0: off, SIGTERM releases everything). `portres daemon --stop`
//! # always releases everything.
//! live_restore_secs = 60
//! # The deny layer (root only): cgroup bind programs refuse a bind into a reserved port to all
//! # but its owner. The errno such a bind fails with: "EADDRINUSE" (what programs expect of a
//! # taken port, and what they fall back on), "EACCES" (Windows' WSAEACCES) or "EPERM".
//! deny = true
//! deny_errno = "EADDRINUSE"
//! # Key the layer without network namespaces: host reservations then hold in every namespace
//! # on the machine (containers with their own port space included).
//! deny_all_namespaces = false
//! # Which network namespace (port space) a client is served in: "client" (its own: a client in
//! # a container gets a reservation in the container's ports) or "daemon" (the daemon's, for
//! # every client: a daemon dedicated to one namespace, driven from outside it).
//! namespaces = "client"
//! # Also answer Google's portserver protocol (portpicker's PORTSERVER_ADDRESS) here: "@name"
//! # (an abstract socket) or a path; grants come from portserver_range, or the dynamic range.
//! portserver = "@unittest-portserver"
//! portserver_range = "20000-29999"
//! # Persistent reservations declared in files (`portres apply`); default: reservations.d
//! # beside this file (/etc/portres/reservations.d for the system daemon).
//! reservations_dir = "/etc/portres/reservations.d"
//! # Serve the Prometheus metrics (the same as `portres metrics`) at http://ADDR:PORT/metrics.
//! metrics_listen = "127.0.0.1:9642"
//!
//! # Cluster mode (a build with the `cluster` feature): reservations that hold on every member
//! # of a fleet, kept in etcd v3 (docs/cluster.md).
//! [cluster]
//! endpoints = ["http://10.0.0.1:2379"]   # etcd client URLs
//! node = "host-a"                        # this member's name; default: the host name
//! prefix = "/portres/"                   # default
//! lease_ttl_secs = 10                    # how long a dead member's runtime blocks outlive it
//! verdict_timeout_ms = 5000              # how long a create waits for every member's verdict
//! request_timeout_ms = 5000              # how long any etcd call may take
//! # TLS to etcd (https:// endpoints): the CA, and a client certificate and key if etcd asks.
//! ca_file = "/etc/portres/etcd-ca.pem"
//! cert_file = "/etc/portres/etcd-client.pem"
//! key_file = "/etc/portres/etcd-client-key.pem"
//! ```

use std::path::{Path, PathBuf};

use portres_core::PortRange;
use serde::Deserialize;

/// Default per-user runtime quota, in ports.
pub const DEFAULT_RUNTIME_QUOTA: u32 = 4096;

/// Default holder uid: high, unassigned, and not `(uid_t)-1` or `-2`.
pub const DEFAULT_HOLDER_UID: u32 = 2_147_483_646;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    admin_users: Vec<String>,
    #[serde(default)]
    admin_groups: Vec<String>,
    runtime_quota_ports: Option<u32>,
    dynamic_range: Option<String>,
    holder_uid: Option<u32>,
    reply_timeout_ms: Option<u64>,
    live_restore_secs: Option<u64>,
    deny: Option<bool>,
    deny_errno: Option<String>,
    deny_all_namespaces: Option<bool>,
    namespaces: Option<String>,
    portserver: Option<String>,
    portserver_range: Option<String>,
    reservations_dir: Option<PathBuf>,
    metrics_listen: Option<String>,
    cluster: Option<ClusterFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    endpoints: Vec<String>,
    node: Option<String>,
    prefix: Option<String>,
    lease_ttl_secs: Option<u64>,
    verdict_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// `[cluster]`: cluster mode on etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// This member's name.
    pub node: String,
    /// The key prefix (ends in `/`).
    pub prefix: String,
    /// The members' and runtime blocks' lease time to live.
    pub lease_ttl_secs: u64,
    /// How long a create waits for every live member's verdict.
    pub verdict_timeout: std::time::Duration,
    /// How long one etcd call may take.
    pub request_timeout: std::time::Duration,
    /// TLS: the CA certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// TLS: a client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// TLS: the client certificate's key (PEM).
    pub key_file: Option<PathBuf>,
}

/// Default of `[cluster] prefix`.
pub const DEFAULT_CLUSTER_PREFIX: &str = "/portres/";

/// Default of `[cluster] lease_ttl_secs`.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 10;

/// Default of `verdict_timeout_ms` and `request_timeout_ms`.
pub const DEFAULT_CLUSTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ClusterFile {
    fn resolve(self, base: Option<&Path>) -> Result<ClusterConfig, String> {
        if self.endpoints.is_empty() {
            return Err(
                "[cluster] endpoints = []: give at least one etcd client URL, e.g. \
                        [\"http://10.0.0.1:2379\"]"
                    .into(),
            );
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "[cluster] endpoints: {e:?} is not an etcd client URL; write it as \
                     \"http://HOST:2379\" (or https:// with ca_file)"
                ));
            }
        }
        let node = match self.node {
            Some(n) => n,
            None => portres_sys::process::host_name()
                .ok_or("[cluster] node is not set and the host name cannot be read; set node")?,
        };
        if node.is_empty()
            || node.len() > 64
            || !node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "[cluster] node = {node:?}: a member name is 1 to 64 letters, digits, '-', '_' \
                 or '.'"
            ));
        }
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_CLUSTER_PREFIX.into());
        if !prefix.ends_with('/') || prefix.len() < 2 {
            return Err(format!(
                "[cluster] prefix = {prefix:?}: a key prefix ending in '/', e.g. \"/portres/\""
            ));
        }
        let lease_ttl_secs = self.lease_ttl_secs.unwrap_or(DEFAULT_LEASE_TTL_SECS);
        if !(2..=3600).contains(&lease_ttl_secs) {
            return Err(format!(
                "[cluster] lease_ttl_secs = {lease_ttl_secs}: between 2 and 3600 seconds"
            ));
        }
        let ms = |what: &str, v: Option<u64>| match v {
            None => Ok(DEFAULT_CLUSTER_TIMEOUT),
            Some(v) if (100..=600_000).contains(&v) => Ok(std::time::Duration::from_millis(v)),
            Some(v) => Err(format!(
                "[cluster] {what} = {v}: between 100 and 600000 milliseconds"
            )),
        };
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("[cluster] cert_file and key_file go together".into());
        }
        let rel = |p: Option<PathBuf>| {
            p.map(|p| match base {
                Some(b) if p.is_relative() => b.join(p),
                _ => p,
            })
        };
        Ok(ClusterConfig {
            endpoints: self.endpoints,
            node,
            prefix,
            lease_ttl_secs,
            verdict_timeout: ms("verdict_timeout_ms", self.verdict_timeout_ms)?,
            request_timeout: ms("request_timeout_ms", self.request_timeout_ms)?,
            ca_file: rel(self.ca_file),
            cert_file: rel(self.cert_file),
            key_file: rel(self.key_file),
        })
    }
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("configuration {path} is invalid: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        why: String,
    },
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Uids with administrator rights (besides root and the daemon's own user).
    pub admin_uids: Vec<u32>,
    /// Gids whose members have administrator rights.
    pub admin_gids: Vec<u32>,
    /// Runtime ports one non-administrator user may hold.
    pub runtime_quota: u32,
    /// Override of the dynamic range.
    pub dynamic_range: Option<PortRange>,
    /// The uid that owns held and handed-out sockets (system daemon).
    pub holder_uid: u32,
    /// How long a reply may wait for a client that does not read it before the client is
    /// dropped.
    pub reply_timeout: std::time::Duration,
    /// How long a stopped daemon's runtime reservations are kept for its successor (0: off).
    pub live_restore_secs: u64,
    /// The deny layer's settings.
    pub deny: crate::deny::DenySettings,
    /// Whether each client is served in its own network namespace (`namespaces = "client"`,
    /// the default) or in the daemon's (`"daemon"`).
    pub per_client_namespaces: bool,
    /// The portserver protocol's address (`@name` or a path), when it is served.
    pub portserver: Option<String>,
    /// Where portserver grants come from (default: the dynamic range).
    pub portserver_range: Option<PortRange>,
    /// The directory of declarative reservation files (`portres apply`); `None`: none.
    pub reservations_dir: Option<PathBuf>,
    /// Where the Prometheus metrics are served over HTTP, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Cluster mode (`[cluster]`), when configured.
    pub cluster: Option<ClusterConfig>,
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
}

/// Default of `live_restore_secs`.
pub const DEFAULT_LIVE_RESTORE_SECS: u64 = 60;

/// Most of `live_restore_secs` (a day).
pub const MAX_LIVE_RESTORE_SECS: u64 = 86_400;

/// Default of `reply_timeout_ms`.
pub const DEFAULT_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for Config {
    fn default() -> Self {
        Config {
            admin_uids: Vec::new(),
            admin_gids: Vec::new(),
            runtime_quota: DEFAULT_RUNTIME_QUOTA,
            dynamic_range: None,
            holder_uid: DEFAULT_HOLDER_UID,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            live_restore_secs: DEFAULT_LIVE_RESTORE_SECS,
            deny: crate::deny::DenySettings::default(),
            per_client_namespaces: true,
            portserver: None,
            portserver_range: None,
            reservations_dir: None,
            metrics_listen: None,
            cluster: None,
            source: None,
        }
    }
}

impl Config {
    /// Loads `path`. When `required` is false a missing file gives the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses the text of a configuration file (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |why: String| ConfigError::Invalid {
            path: path.into(),
            why,
        };
        let file: ConfigFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let admin_uids = file
            .admin_users
            .iter()
            .map(|u| {
                portres_sys::creds::resolve_user(u)
                    .ok_or_else(|| invalid(format!("admin_users: there is no user named {u:?}")))
            })
            .collect::<Result<_, _>>()?;
        let admin_gids = file
            .admin_groups
            .iter()
            .map(|g| {
                portres_sys::creds::resolve_group(g)
                    .ok_or_else(|| invalid(format!("admin_groups: there is no group named {g:?}")))
            })
            .collect::<Result<_, _>>()?;
        let dynamic_range = file
            .dynamic_range
            .map(|r| {
                r.parse::<PortRange>()
                    .map_err(|e| invalid(format!("dynamic_range: {e}; write it as \"FIRST-LAST\"")))
            })
            .transpose()?;
        let holder_uid = file.holder_uid.unwrap_or(DEFAULT_HOLDER_UID);
        if holder_uid == 0 || holder_uid == u32::MAX {
            return Err(invalid(format!(
                "holder_uid = {holder_uid}: it must be a uid no process runs as (not root, not (uid_t)-1)"
            )));
        }
        let live_restore_secs = file.live_restore_secs.unwrap_or(DEFAULT_LIVE_RESTORE_SECS);
        if live_restore_secs > MAX_LIVE_RESTORE_SECS {
            return Err(invalid(format!(
                "live_restore_secs = {live_restore_secs}: at most {MAX_LIVE_RESTORE_SECS} (a \
                 day); 0 turns live restore off"
            )));
        }
        let errno = match file.deny_errno.as_deref() {
            None | Some("EADDRINUSE") => Some(portres_sys::deny::EADDRINUSE),
            Some("EACCES") => Some(portres_sys::deny::EACCES),
            Some("EPERM") => None,
            Some(other) => {
                return Err(invalid(format!(
                    "deny_errno = {other:?}: use \"EADDRINUSE\" (the default), \"EACCES\" or \
                     \"EPERM\""
                )));
            }
        };
        let deny = crate::deny::DenySettings {
            enabled: file.deny.unwrap_or(true),
            errno,
            all_namespaces: file.deny_all_namespaces.unwrap_or(false),
        };
        let per_client_namespaces = match file.namespaces.as_deref() {
            None | Some("client") => true,
            Some("daemon") => false,
            Some(other) => {
                return Err(invalid(format!(
                    "namespaces = {other:?}: use \"client\" (the default: each client is served \
                     in its own network namespace) or \"daemon\" (every client in the daemon's)"
                )));
            }
        };
        if let Some(a) = &file.portserver
            && (a.is_empty() || a == "@")
        {
            return Err(invalid(
                "portserver = \"\": give \"@name\" (an abstract socket) or a path".into(),
            ));
        }
        let portserver_range = file
            .portserver_range
            .map(|r| {
                r.parse::<PortRange>().map_err(|e| {
                    invalid(format!("portserver_range: {e}; write it as \"FIRST-LAST\""))
                })
            })
            .transpose()?;
        let metrics_listen = file
            .metrics_listen
            .map(|a| {
                a.parse::<std::net::SocketAddr>().map_err(|_| {
                    invalid(format!(
                        "metrics_listen = {a:?}: not an address and port; write it as \
                         \"127.0.0.1:9642\" or \"[::1]:9642\""
                    ))
                })
            })
            .transpose()?;
        // Relative to the configuration file, as a path in it is read.
        let reservations_dir = file.reservations_dir.map(|d| match path.parent() {
            Some(base) if d.is_relative() => base.join(d),
            _ => d,
        });
        let cluster = file
            .cluster
            .map(|c| c.resolve(path.parent()))
            .transpose()
            .map_err(invalid)?;
        Ok(Config {
            cluster,
            metrics_listen,
            reservations_dir,
            portserver: file.portserver,
            portserver_range,
            per_client_namespaces,
            live_restore_secs,
            deny,
            admin_uids,
            admin_gids,
            runtime_quota: file.runtime_quota_ports.unwrap_or(DEFAULT_RUNTIME_QUOTA),
            dynamic_range,
            holder_uid,
            reply_timeout: file
                .reply_timeout_ms
                .filter(|&ms| ms > 0)
                .map_or(DEFAULT_REPLY_TIMEOUT, std::time::Duration::from_millis),
            source: Some(path.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("test.toml");
        let c = Config::parse(
            "admin_users = [\"root\", \"1234\"]\nadmin_groups = [\"0\"]\nruntime_quota_ports = 7\ndynamic_range = \"40000-40100\"\n",
            p,
        )
        .unwrap();
        assert_eq!(c.admin_uids, vec![0, 1234]);
        assert_eq!(c.admin_gids, vec![0]);
        assert_eq!(c.runtime_quota, 7);
        assert_eq!(
            c.dynamic_range,
            Some(PortRange::inclusive(40000, 40100).unwrap())
        );
        for bad in [
            "admin_users = [\"no-such-user-xyz\"]",
            "dynamic_range = \"5-1\"",
            "quota = 3",
            "runtime_quota_ports = \"many\"",
            "holder_uid = 0",
            "live_restore_secs = 100000",
            "deny_errno = \"ENOENT\"",
            "deny = \"yes\"",
            "namespaces = \"host\"",
            "portserver = \"\"",
            "portserver_range = \"9-1\"",
            "metrics_listen = \"localhost\"",
            "metrics_listen = \"127.0.0.1:99999\"",
            "reservations = \"/x\"",
            "[cluster]\nendpoints = []",
            "[cluster]\nendpoints = [\"10.0.0.1:2379\"]",
            "[cluster]\nendpoints = [\"http://a:2379\"]\nnode = \"a b\"",
            "[cluster]\nendpoints = [\"http://a:2379\"]\nprefix = \"/p\"",
            "[cluster]\nendpoints = [\"http://a:2379\"]\nlease_ttl_secs = 1",
            "[cluster]\nendpoints = [\"http://a:2379\"]\nverdict_timeout_ms = 5",
            "[cluster]\nendpoints = [\"http://a:2379\"]\ncert_file = \"c.pem\"",
            "[cluster]\nendpoints = [\"http://a:2379\"]\ncolour = 1",
        ] {
            let e = Config::parse(bad, p).unwrap_err().to_string();
            assert!(e.contains("test.toml"), "{e}");
        }
        // reservations_dir relative to the file; metrics_listen an address and port.
        let c = Config::parse(
            "reservations_dir = \"files.d\"\nmetrics_listen = \"[::1]:9642\"\n",
            Path::new("/etc/portres/config.toml"),
        )
        .unwrap();
        assert_eq!(
            c.reservations_dir.as_deref(),
            Some(Path::new("/etc/portres/files.d"))
        );
        assert_eq!(c.metrics_listen, Some("[::1]:9642".parse().unwrap()));
        let c = Config::parse(
            "[cluster]\nendpoints = [\"http://10.0.0.1:2379\"]\nnode = \"host-a\"\n\
             ca_file = \"ca.pem\"\n",
            Path::new("/etc/portres/config.toml"),
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(
            (c.node.as_str(), c.prefix.as_str(), c.lease_ttl_secs),
            ("host-a", "/portres/", 10)
        );
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("/etc/portres/ca.pem")));
        let c = Config::parse("reservations_dir = \"/srv/r\"\n", p).unwrap();
        assert_eq!(c.reservations_dir.as_deref(), Some(Path::new("/srv/r")));
        assert_eq!(
            Config::load(Path::new("/nonexistent/x.toml"), false).unwrap(),
            Config::default()
        );
        assert!(Config::load(Path::new("/nonexistent/x.toml"), true).is_err());
    }
}
