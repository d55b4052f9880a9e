//! The deny layer (docs/behaviour.md §3, layer 3): cgroup `bind4`/`bind6` programs at the cgroup2
//! root refuse every bind into a reserved port to everyone but the block's owner. The kernel
//! objects are in `portres_sys::deny`; this module decides what goes into the map, and keeps it in
//! step with the table.
//!
//! # Owners (who may bind a block's ports by number)
//! - Always the daemon itself (its process id is baked into the programs): it binds the sockets
//!   it hands out (`associate`, `run --listen`), so a `hold` block needs no placeholder at all.
//! - `hold` blocks: nobody else. Only sockets portres hands out use them (docs/behaviour.md §3).
//! - runtime `exclude` blocks: the acquiring process (its thread group id, from `SO_PEERCRED`).
//!   The reservation belongs to the process that asked, as on Windows; its children are not
//!   owners, because the kernel gives no unforgeable "descendant of" test for a process, and a
//!   uid would let every other process of the same user in. For a process tree, `portres run`
//!   asks for a cgroup of its own (`DenyLayer::own_by_cgroup`): the tree's processes bind by
//!   number (a cgroup's members cannot leave it without write access to a common ancestor,
//!   which only root has).
//! - persistent `exclude` blocks: the users and groups on their access list (a user's primary
//!   gid is checked by the program; other members of a named group are added as users when the
//!   reservation is loaded), or root alone when the list is empty.
//!
//! # Life cycle
//! Programs, links and maps are pinned in bpffs under `/sys/fs/bpf/portres/INSTANCE` (one
//! instance per state directory): a daemon that crashes or restarts leaves enforcement in place.
//! A starting daemon opens what is pinned, swaps in programs carrying its own process id
//! (`BPF_LINK_UPDATE`: never detached in between) and reconciles the map with its table
//! (`DenyLayer::reconcile`). A daemon that releases everything on stop, the keeper when no
//! successor came, and `portres daemon --cleanup` remove it all ([`cleanup`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use portres_core::{Mode, Protocol, Reservation, Table, Token};
use portres_sys::deny::{
    ALLOW_GID, ALLOW_UID, AllowKey, Hook, Link, Map, OWNER_CGROUP, OWNER_USERS, Owner, PortKey,
    Program, ProgramSettings,
};

/// Most entries of the ports map: each block takes at most 30.
const MAX_PORT_ENTRIES: u32 = 1 << 20;
/// Most entries of the allow map.
const MAX_ALLOW_ENTRIES: u32 = 1 << 16;
/// Where bpffs is mounted when it is not.
const BPFFS: &str = "/sys/fs/bpf";
/// Where cgroup2 is mounted when it is not.
const CGROUP2: &str = "/run/portres-cgroup2";
/// Name prefix of the cgroups `portres run` gets: `portres-run-INSTANCE-TOKEN`.
pub(crate) const RUN_CGROUP_PREFIX: &str = "portres-run-";

/// The prefix of the run cgroups of the daemon with state directory `state_dir`: its instance
/// is a short hash (FNV-1a) of the state directory's path, so that [`cleanup`] removes only its
/// own daemon's cgroups, never another daemon's that is just being filled.
fn run_cgroup_prefix(state_dir: &Path) -> String {
    let abs = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    format!("{RUN_CGROUP_PREFIX}{:08x}-", path_hash(&abs))
}

/// FNV-1a of a path's bytes.
fn path_hash(p: &Path) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in p.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The lock file a starting daemon holds while it opens its state (and takes over the pins)
/// until its socket accepts: `SOCKET.lock`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    p.into()
}

/// [`cleanup`], only when no daemon serves `socket` nor is starting on it (under the socket's
/// lock, which a starting daemon holds until it accepts): `Ok(None)` when one is.
pub fn cleanup_unless_served(socket: &Path, state_dir: &Path) -> io::Result<Option<Cleaned>> {
    // No directory for the socket: no daemon serves it, and none can start meanwhile.
    if socket
        .parent()
        .is_some_and(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        return cleanup(state_dir).map(Some);
    }
    let _lock = lock_socket(socket)?;
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Ok(None);
    }
    cleanup(state_dir).map(Some)
}

/// Takes the socket's lock (held by a daemon while it starts), until the file is dropped.
pub fn lock_socket(socket: &Path) -> io::Result<std::fs::File> {
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(socket))?;
    portres_sys::process::lock_exclusive(&lock)?;
    Ok(lock)
}

/// The deny layer's settings, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenySettings {
    /// Whether to load it at all.
    pub enabled: bool,
    /// The errno of a refused bind (`None`: EPERM, the hook's own).
    pub errno: Option<u32>,
    /// Key without the network namespace: host reservations hold in every namespace.
    pub all_namespaces: bool,
}

impl Default for DenySettings {
    fn default() -> Self {
        DenySettings {
            enabled: true,
            errno: Some(portres_sys::deny::EADDRINUSE),
            all_namespaces: false,
        }
    }
}

/// The name of an errno the layer may answer with.
pub fn errno_name(errno: Option<u32>) -> &'static str {
    use portres_sys::deny::{EACCES, EADDRINUSE, EPERM};
    match errno {
        None | Some(EPERM) => "EPERM",
        Some(EADDRINUSE) => "EADDRINUSE",
        Some(EACCES) => "EACCES",
        Some(_) => "another errno",
    }
}

/// The pin directory of the daemon whose state directory is `state_dir`: `portres/` under
/// bpffs, then the state directory's path with `/` turned into `-` (like systemd's unit names)
/// and every character but letters, digits, `_` and `-` into `_`.
pub fn pin_dir(bpffs: &Path, state_dir: &Path) -> PathBuf {
    let abs = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let mut name: String = abs
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| match c {
            '/' => '-',
            // bpffs refuses names with a dot (reserved for its own files).
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => c,
            _ => '_',
        })
        .collect();
    if name.len() > 180 {
        name.truncate(180);
    }
    // Two paths that read alike once sanitised (`/a-b`, `/a/b`) still get their own pins.
    bpffs
        .join("portres")
        .join(format!("{name}-{:08x}", path_hash(&abs)))
}

/// Where bpffs is mounted (mounting it at `/sys/fs/bpf` if it is nowhere), and whether this
/// call mounted it.
fn bpffs() -> io::Result<(PathBuf, bool)> {
    if let Some(p) = portres_sys::deny::mount_of("bpf") {
        return Ok((p, false));
    }
    portres_sys::deny::mount_fs("bpf", Path::new(BPFFS))?;
    Ok((PathBuf::from(BPFFS), true))
}

/// Where cgroup2 is mounted (mounting it if it is nowhere), and whether this call mounted it.
fn cgroup2() -> io::Result<(PathBuf, bool)> {
    if let Some(p) = portres_sys::deny::mount_of("cgroup2") {
        return Ok((p, false));
    }
    portres_sys::deny::mount_fs("cgroup2", Path::new(CGROUP2))?;
    Ok((PathBuf::from(CGROUP2), true))
}

/// What one block's entries say.
#[derive(Debug, Clone)]
struct Entry {
    /// The cookie of the network namespace the block is in.
    netns: u64,
    protocol: Protocol,
    range: portres_core::PortRange,
    owner: Owner,
    /// The run cgroup that owns it (to remove when the block ends).
    cgroup: Option<PathBuf>,
    /// Its allow list (persistent), to remove when the block ends.
    allow: Vec<AllowKey>,
}

/// The layer, or why it is off, shared by the enforcers of every namespace the daemon serves
/// (locked only under the state lock, so never contended).
pub(crate) type SharedDeny = std::sync::Arc<std::sync::Mutex<Result<DenyLayer, String>>>;

/// The loaded layer.
pub(crate) struct DenyLayer {
    ports: Map,
    allow: Map,
    links: Vec<(Hook, Link)>,
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    netns: u64,
    settings: DenySettings,
    entries: HashMap<Token, Entry>,
    next_allow_id: u32,
    /// Run cgroups whose block ended but that still had processes in them.
    empty_later: Vec<PathBuf>,
    /// What start-up had to do (mounts, pins found), for `status`.
    notes: Vec<String>,
    /// Name prefix of this daemon's run cgroups.
    run_prefix: String,
}

fn io_context(what: &str) -> impl FnOnce(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl DenyLayer {
    /// Loads the layer: mounts bpffs and cgroup2 if needed, opens or creates the pinned maps,
    /// loads the programs with this process's id and attaches them to the cgroup2 root (or
    /// swaps them into the pinned links). The map is reconciled later, with the table.
    pub(crate) fn load(state_dir: &Path, settings: DenySettings) -> Result<DenyLayer, String> {
        if !settings.enabled {
            return Err("turned off in the configuration (deny = false)".into());
        }
        if portres_sys::creds::effective_uid() != 0 {
            return Err(
                "loading cgroup BPF programs needs root (CAP_BPF and CAP_NET_ADMIN); \
                        a per-user daemon runs without this layer"
                    .into(),
            );
        }
        if std::env::var("PORTRES_FAILPOINT").is_ok_and(|v| v.split(',').any(|f| f == "no-ebpf")) {
            return Err("eBPF turned off by PORTRES_FAILPOINT=no-ebpf".into());
        }
        if let Some(why) = portres_sys::deny::pid_namespace_problem() {
            return Err(why);
        }
        let mut notes = Vec::new();
        let (cgroup_root, mounted) = cgroup2().map_err(io_context(
            "cgroup2 is not mounted and mounting it failed (the bind hooks attach to its root)",
        ))?;
        if mounted {
            tracing::warn!(
                "cgroup2 was not mounted: mounted it at {}",
                cgroup_root.display()
            );
            notes.push(format!("mounted cgroup2 at {}", cgroup_root.display()));
        }
        let (bpffs, mounted) =
            bpffs().map_err(io_context("bpffs is not mounted and mounting it failed"))?;
        if mounted {
            tracing::info!("bpffs was not mounted: mounted it at {}", bpffs.display());
            notes.push(format!("mounted bpffs at {}", bpffs.display()));
        }
        let pin_dir = pin_dir(&bpffs, state_dir);
        std::fs::create_dir_all(&pin_dir)
            .map_err(io_context(&format!("creating {}", pin_dir.display())))?;
        let netns = if settings.all_namespaces {
            0
        } else {
            portres_sys::deny::netns_cookie().map_err(io_context(
                "reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14)",
            ))?
        };
        let open_or_create = |name: &str,
                              open: fn(&Path) -> io::Result<Map>,
                              create: &dyn Fn() -> io::Result<Map>|
         -> Result<(Map, bool), String> {
            let path = pin_dir.join(name);
            match open(&path) {
                Ok(m) => Ok((m, true)),
                Err(e) => {
                    if path.exists() {
                        tracing::warn!(error = %e, "replacing pinned map {}", path.display());
                        let _ = std::fs::remove_file(&path);
                    }
                    let m = create().map_err(io_context("bpf(BPF_MAP_CREATE)"))?;
                    m.pin(&path)
                        .map_err(io_context(&format!("pinning {}", path.display())))?;
                    Ok((m, false))
                }
            }
        };
        let (ports, found) = open_or_create("ports", Map::open_pinned_ports, &|| {
            Map::new_ports(MAX_PORT_ENTRIES)
        })?;
        let (allow, _) = open_or_create("allow", Map::open_pinned_allow, &|| {
            Map::new_allow(MAX_ALLOW_ENTRIES)
        })?;
        if found {
            notes.push(format!(
                "took over the programs and map pinned in {} by an earlier daemon",
                pin_dir.display()
            ));
        }
        let mut program_settings = ProgramSettings {
            daemon_tgid: std::process::id(),
            errno: settings.errno,
            all_namespaces: settings.all_namespaces,
        };
        let load_both = |s: ProgramSettings| {
            [Hook::Bind4, Hook::Bind6].map(|hook| {
                Program::load(hook, &ports, &allow, s)
                    .map_err(|e| format!("the kernel refused the {} program: {e}", hook.name()))
            })
        };
        let mut settings = settings;
        let mut programs = load_both(program_settings);
        if programs.iter().any(Result::is_err) && settings.errno.is_some() {
            // Kernels before 5.18 have no bpf_set_retval: refuse with the hook's EPERM.
            program_settings.errno = None;
            let without = load_both(program_settings);
            if without.iter().all(Result::is_ok) {
                let why = programs.iter().find_map(|p| p.as_ref().err()).cloned();
                let why = why.unwrap_or_default();
                tracing::warn!("{why}: refused binds fail with EPERM");
                notes.push(format!(
                    "refused binds fail with EPERM: this kernel cannot set another errno ({why})"
                ));
                settings.errno = None;
                programs = without;
            }
        }
        let root = portres_sys::deny::open_dir(&cgroup_root)
            .map_err(io_context(&format!("opening {}", cgroup_root.display())))?;
        let mut links = Vec::new();
        for (hook, program) in [Hook::Bind4, Hook::Bind6].into_iter().zip(programs) {
            let program = program?;
            let path = pin_dir.join(hook.name());
            let link = match Link::open_pinned(&path) {
                Ok(link) => {
                    link.update(&program)
                        .map_err(io_context("bpf(BPF_LINK_UPDATE) of the pinned link"))?;
                    link
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                    let link = program.attach(root.as_fd()).map_err(io_context(&format!(
                        "attaching the {} program to {} (bpf(BPF_LINK_CREATE))",
                        hook.name(),
                        cgroup_root.display()
                    )))?;
                    link.pin(&path)
                        .map_err(io_context(&format!("pinning {}", path.display())))?;
                    link
                }
            };
            links.push((hook, link));
        }
        tracing::info!(
            pins = %pin_dir.display(),
            cgroup = %cgroup_root.display(),
            "deny layer: bind4/bind6 programs attached"
        );
        Ok(DenyLayer {
            ports,
            allow,
            links,
            pin_dir,
            cgroup_root,
            netns,
            settings,
            entries: HashMap::new(),
            next_allow_id: 1,
            empty_later: Vec::new(),
            notes,
            run_prefix: run_cgroup_prefix(state_dir),
        })
    }

    /// The map key of a piece of a block in the namespace with cookie `netns` (0 for every
    /// namespace when the layer is keyed without them).
    fn key(&self, netns: u64, protocol: Protocol, first: u16, bits: u8) -> PortKey {
        PortKey {
            netns: if self.settings.all_namespaces {
                0
            } else {
                netns
            },
            protocol: ip_proto(protocol),
            port: first,
            port_bits: bits,
        }
    }

    fn write(
        &self,
        netns: u64,
        protocol: Protocol,
        range: portres_core::PortRange,
        owner: Owner,
    ) -> io::Result<()> {
        for (first, bits) in range.prefixes() {
            self.ports
                .set_port(self.key(netns, protocol, first, bits), owner)?;
        }
        Ok(())
    }

    fn erase(&self, netns: u64, protocol: Protocol, range: portres_core::PortRange) {
        for (first, bits) in range.prefixes() {
            if let Err(e) = self
                .ports
                .delete_port(self.key(netns, protocol, first, bits))
            {
                tracing::error!(error = %e, "deny layer: removing an entry of {range}/{protocol} failed");
            }
        }
    }

    /// Puts a block being claimed in the network namespace with cookie `netns` into the map
    /// with no owner but the daemon, before the check that its ports are free: from here on
    /// nobody else can bind them.
    pub(crate) fn claim(
        &mut self,
        token: Token,
        protocol: Protocol,
        range: portres_core::PortRange,
        netns: u64,
    ) -> io::Result<()> {
        let owner = Owner::default();
        if let Err(e) = self.write(netns, protocol, range, owner) {
            self.erase(netns, protocol, range);
            return Err(e);
        }
        self.entries.insert(
            token,
            Entry {
                netns,
                protocol,
                range,
                owner,
                cgroup: None,
                allow: Vec::new(),
            },
        );
        Ok(())
    }

    /// The owner a reservation's entries should name (see the module documentation), and the
    /// allow list it needs.
    fn owner_of(&mut self, r: &Reservation, reuse: Option<u32>) -> (Owner, Vec<AllowKey>) {
        if r.mode == Mode::Hold {
            return (Owner::default(), Vec::new());
        }
        match &r.kind {
            portres_core::Kind::Runtime { .. } => (
                Owner {
                    tgid: r.owner.pid.unwrap_or(0),
                    ..Owner::default()
                },
                Vec::new(),
            ),
            portres_core::Kind::Persistent { acl, .. } => {
                let id = reuse.filter(|&id| id != 0).unwrap_or_else(|| {
                    let id = self.next_allow_id;
                    self.next_allow_id = self.next_allow_id.wrapping_add(1).max(1);
                    id
                });
                let mut keys = Vec::new();
                let mut users: Vec<u32> = acl.users.clone();
                for &g in &acl.groups {
                    keys.push(AllowKey {
                        allow_id: id,
                        kind: ALLOW_GID,
                        id: g,
                    });
                    users.extend(portres_sys::creds::group_members(g));
                }
                if acl.users.is_empty() && acl.groups.is_empty() {
                    users.push(0);
                }
                users.sort_unstable();
                users.dedup();
                keys.extend(users.into_iter().map(|u| AllowKey {
                    allow_id: id,
                    kind: ALLOW_UID,
                    id: u,
                }));
                (
                    Owner {
                        flags: OWNER_USERS,
                        allow_id: id,
                        ..Owner::default()
                    },
                    keys,
                )
            }
        }
    }

    /// Names a granted (or changed) reservation's owner in its entries.
    pub(crate) fn set_owner(&mut self, r: &Reservation) {
        let Some(e) = self.entries.get(&r.token) else {
            return;
        };
        if e.owner.flags & OWNER_CGROUP != 0 {
            // `own_by_cgroup` already made it the run cgroup's.
            return;
        }
        let reuse = Some(e.owner.allow_id);
        let (owner, allow) = self.owner_of(r, reuse);
        let old_allow = std::mem::take(&mut self.entries.get_mut(&r.token).expect("checked").allow);
        if owner == self.entries[&r.token].owner && old_allow == allow {
            self.entries.get_mut(&r.token).expect("checked").allow = old_allow;
            return;
        }
        let written = allow
            .iter()
            .try_for_each(|k| self.allow.set_allow(*k))
            .and_then(|()| self.write(self.entries[&r.token].netns, r.protocol, r.range, owner));
        if let Err(err) = written {
            // The entry keeps its old owner (the daemon alone at a grant), and the next change
            // tries again: refusing too many binds, never too few.
            tracing::error!(error = %err, "deny layer: cannot name the owner of {}/{}", r.range, r.protocol);
            self.entries.get_mut(&r.token).expect("checked").allow = old_allow;
            return;
        }
        for k in old_allow.iter().filter(|k| !allow.contains(k)) {
            let _ = self.allow.delete_allow(*k);
        }
        let e = self.entries.get_mut(&r.token).expect("checked");
        e.owner = owner;
        e.allow = allow;
    }

    /// Makes a runtime block owned by a cgroup of its own, made below process `pid`'s cgroup,
    /// and moves `pid` into it: that process and every process it starts from now on may bind
    /// the block's ports by number (`portres run`). Returns the cgroup's path (relative to the
    /// cgroup2 root).
    pub(crate) fn own_by_cgroup(&mut self, r: &Reservation, pid: u32) -> Result<String, String> {
        let Some(entry) = self.entries.get(&r.token) else {
            return Err("the deny layer has no entry for this reservation".into());
        };
        if let Some(dir) = &entry.cgroup {
            return Ok(self.relative(dir));
        }
        let current = portres_sys::deny::cgroup_of(pid).map_err(|e| e.to_string())?;
        let mut parent = self.cgroup_root.join(current.trim_start_matches('/'));
        // A process already in one of our run cgroups (a second block) gets a sibling, not a
        // cgroup inside the first.
        if parent
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&self.run_prefix))
            && let Some(up) = parent.parent()
        {
            parent = up.to_path_buf();
        }
        let dir = parent.join(format!("{}{}", self.run_prefix, r.token));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!("creating the cgroup {} failed: {e}", dir.display()));
            }
        }
        let fail = |what: String, dir: &Path| {
            let _ = std::fs::remove_dir(dir);
            Err(what)
        };
        let id = match portres_sys::deny::cgroup_id(&dir) {
            Ok(id) => id,
            Err(e) => return fail(format!("reading the id of {}: {e}", dir.display()), &dir),
        };
        let level = dir
            .strip_prefix(&self.cgroup_root)
            .map_or(0, |p| p.components().count()) as u32;
        let owner = Owner {
            flags: OWNER_CGROUP,
            tgid: r.owner.pid.unwrap_or(0),
            cgroup_level: level,
            cgroup_id: id,
            allow_id: 0,
        };
        // The entries name the cgroup before the process moves: it never loses the right.
        let netns = self.entries[&r.token].netns;
        if let Err(e) = self.write(netns, r.protocol, r.range, owner) {
            return fail(format!("updating the deny map: {e}"), &dir);
        }
        if let Err(e) = portres_sys::deny::move_to_cgroup(&dir, pid) {
            let old = self.entries[&r.token].owner;
            let _ = self.write(netns, r.protocol, r.range, old);
            return fail(
                format!(
                    "moving process {pid} into {} failed: {e} (a cgroup with controllers \
                     enabled for its children, or a threaded cgroup, cannot take it)",
                    dir.display()
                ),
                &dir,
            );
        }
        let rel = self.relative(&dir);
        let e = self.entries.get_mut(&r.token).expect("checked");
        e.owner = owner;
        e.cgroup = Some(dir);
        Ok(rel)
    }

    fn relative(&self, dir: &Path) -> String {
        format!(
            "/{}",
            dir.strip_prefix(&self.cgroup_root).unwrap_or(dir).display()
        )
    }

    /// A block ended: its entries and allow list leave the maps; its run cgroup is removed
    /// once empty.
    pub(crate) fn retire(&mut self, token: Token) {
        let Some(e) = self.entries.remove(&token) else {
            return;
        };
        self.erase(e.netns, e.protocol, e.range);
        for k in e.allow {
            let _ = self.allow.delete_allow(k);
        }
        if let Some(dir) = e.cgroup {
            self.empty_later.push(dir);
        }
        self.remove_empty_cgroups();
    }

    /// Whether run cgroups wait to be removed.
    pub(crate) fn cgroups_pending(&self) -> bool {
        !self.empty_later.is_empty()
    }

    /// Removes the run cgroups of ended blocks that are empty now (a process that has just
    /// exited leaves its cgroup a moment after its connection closes).
    pub(crate) fn remove_empty_cgroups(&mut self) {
        self.empty_later
            .retain(|dir| match std::fs::remove_dir(dir) {
                Ok(()) => false,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(_) => true,
            });
    }

    /// At start: makes the map say exactly what the table holds. Entries of the blocks carried
    /// over keep their owner when it is a run cgroup; everything else is written afresh;
    /// entries of blocks that no longer exist are removed last (so nothing the table holds is
    /// unprotected at any moment).
    /// `netns` is the daemon's namespace's cookie: at start the table holds only its blocks
    /// (another namespace's blocks end with the daemon that served them).
    pub(crate) fn reconcile(&mut self, table: &Table, netns: u64) -> io::Result<()> {
        let existing: BTreeMap<PortKey, Owner> = self.ports.port_entries()?.into_iter().collect();
        let old_allow = self.allow.allow_entries()?;
        self.next_allow_id = old_allow.iter().map(|k| k.allow_id).max().unwrap_or(0) + 1;
        let mut wanted: std::collections::BTreeSet<PortKey> = Default::default();
        let mut wanted_allow: std::collections::HashSet<AllowKey> = Default::default();
        self.entries.clear();
        for r in table.reservations() {
            let pieces = r.range.prefixes();
            let keys: Vec<PortKey> = pieces
                .iter()
                .map(|&(f, b)| self.key(netns, r.protocol, f, b))
                .collect();
            // A run cgroup that still owns a carried-over runtime block stays its owner.
            let kept_cgroup = (!r.is_persistent())
                .then(|| existing.get(&keys[0]).copied())
                .flatten()
                .filter(|o| o.flags & OWNER_CGROUP != 0)
                .and_then(|o| {
                    let pid = r.owner.pid?;
                    let path = portres_sys::deny::cgroup_of(pid).ok()?;
                    let dir = self.cgroup_root.join(path.trim_start_matches('/'));
                    (portres_sys::deny::cgroup_id(&dir).ok()? == o.cgroup_id).then_some((o, dir))
                });
            let (owner, allow, cgroup) = match kept_cgroup {
                Some((o, dir)) => (o, Vec::new(), Some(dir)),
                None => {
                    let (o, a) = self.owner_of(r, None);
                    (o, a, None)
                }
            };
            for k in &allow {
                self.allow.set_allow(*k)?;
                wanted_allow.insert(*k);
            }
            for k in &keys {
                if existing.get(k) != Some(&owner) {
                    self.ports.set_port(*k, owner)?;
                }
                wanted.insert(*k);
            }
            self.entries.insert(
                r.token,
                Entry {
                    netns,
                    protocol: r.protocol,
                    range: r.range,
                    owner,
                    cgroup,
                    allow,
                },
            );
        }
        let mut removed = 0;
        for k in existing.keys().filter(|k| !wanted.contains(k)) {
            self.ports.delete_port(*k)?;
            removed += 1;
        }
        for k in old_allow.iter().filter(|k| !wanted_allow.contains(k)) {
            self.allow.delete_allow(*k)?;
        }
        tracing::info!(
            entries = wanted.len(),
            found = existing.len(),
            removed,
            "deny layer: map reconciled with the table"
        );
        Ok(())
    }

    /// Who may bind `token`'s ports, in words (for `who`, `show`); no name lookups (it runs
    /// under the state lock): the users and groups are in the reservation's access list.
    pub(crate) fn describe_owner(&self, token: Token) -> Option<String> {
        let e = self.entries.get(&token)?;
        let mut who = Vec::new();
        if let Some(dir) = &e.cgroup {
            who.push(format!("processes in cgroup {}", self.relative(dir)));
        } else if e.owner.tgid != 0 {
            who.push(format!("process {}", e.owner.tgid));
        }
        if e.owner.flags & OWNER_USERS != 0 {
            let (uids, gids): (Vec<&AllowKey>, Vec<&AllowKey>) =
                e.allow.iter().partition(|k| k.kind == ALLOW_UID);
            who.extend(uids.iter().map(|k| format!("uid {}", k.id)));
            if !gids.is_empty() {
                let gids: Vec<String> = gids.iter().map(|k| format!("gid {}", k.id)).collect();
                who.push(format!(
                    "processes whose primary group is {}",
                    gids.join(" or ")
                ));
            }
        }
        who.push("sockets portres hands out".into());
        Some(format!("only {} may bind it", who.join(", ")))
    }

    /// For `status`.
    pub(crate) fn info(&self) -> portres_proto::DenyInfo {
        let mut programs = Vec::new();
        let mut links = Vec::new();
        for (_, l) in &self.links {
            if let Ok((link, prog)) = l.ids() {
                links.push(link);
                programs.push(prog);
            }
        }
        portres_proto::DenyInfo {
            program_ids: programs,
            link_ids: links,
            map_id: self.ports.id().unwrap_or(0),
            // Derived (a status request is rare; each block is at most 30 pieces).
            map_entries: self
                .entries
                .values()
                .map(|e| e.range.prefixes().len() as u64)
                .sum(),
            blocks: self.entries.len() as u64,
            pin_dir: self.pin_dir.display().to_string(),
            cgroup_root: self.cgroup_root.display().to_string(),
            errno: errno_name(self.settings.errno).into(),
            all_namespaces: self.settings.all_namespaces,
        }
    }

    /// The layer's line in `status`.
    pub(crate) fn reason(&self) -> String {
        let info = self.info();
        let scope = if self.settings.all_namespaces {
            "keyed without network namespaces: host reservations hold in every namespace, \
             containers included"
                .to_string()
        } else {
            format!("keyed by network namespace (cookie {})", self.netns)
        };
        let notes = if self.notes.is_empty() {
            String::new()
        } else {
            format!("; {}", self.notes.join("; "))
        };
        format!(
            "bind4/bind6 programs (ids {:?}) attached at the cgroup2 root {} (links {:?}, pinned \
             in {}): a bind into a reserved port by anyone but its owner fails with {}; {} map \
             entries for {} blocks; {scope}; autobind (bind to port 0, connect) is not seen by \
             bind hooks: ip_local_reserved_ports keeps it out{notes}",
            info.program_ids,
            info.cgroup_root,
            info.link_ids,
            info.pin_dir,
            info.errno,
            info.map_entries,
            info.blocks,
        )
    }

    /// Removes everything the layer put in the kernel (at a stop that releases everything).
    pub(crate) fn remove(self) {
        let DenyLayer {
            pin_dir,
            mut empty_later,
            entries,
            ..
        } = self;
        empty_later.extend(entries.into_values().filter_map(|e| e.cgroup));
        for dir in empty_later {
            let _ = std::fs::remove_dir(dir);
        }
        match remove_pins(&pin_dir) {
            Ok(()) => tracing::info!("deny layer removed ({})", pin_dir.display()),
            Err(e) => tracing::error!(error = %e, "removing the deny layer's pins failed"),
        }
    }
}

fn ip_proto(p: Protocol) -> u8 {
    portres_sys::deny::ip_protocol(p)
}

/// Unpins the links and maps in `pin_dir` and removes it: once the last descriptor closes, the
/// programs are detached and freed.
fn remove_pins(pin_dir: &Path) -> io::Result<()> {
    for name in ["bind4", "bind6", "ports", "allow"] {
        match std::fs::remove_file(pin_dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The shared parent goes too when this was the last instance.
    if let Some(parent) = pin_dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// What [`cleanup`] removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    /// The pin directory, if there was one.
    pub pin_dir: Option<PathBuf>,
    /// Empty run cgroups removed.
    pub cgroups: usize,
}

/// Removes everything the deny layer of the daemon with state directory `state_dir` left in the
/// kernel: its pinned programs (detaching them), links and maps, and, when it finds them, the
/// daemon's empty run cgroups
/// (`portres daemon --cleanup`; the keeper when no successor came). Call it only when no daemon
/// of that state directory runs.
pub fn cleanup(state_dir: &Path) -> io::Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    let Some(dir) = portres_sys::deny::mount_of("bpf")
        .map(|bpffs| pin_dir(&bpffs, state_dir))
        .filter(|d| d.exists())
    else {
        // No layer was left behind (a stop that released everything removed its cgroups too):
        // nothing to walk the cgroup tree for.
        return Ok(cleaned);
    };
    remove_pins(&dir)?;
    cleaned.pin_dir = Some(dir);
    if let Some(root) = portres_sys::deny::mount_of("cgroup2") {
        cleaned.cgroups = remove_run_cgroups(&root, &run_cgroup_prefix(state_dir), 0);
    }
    Ok(cleaned)
}

/// Removes empty run cgroups named `prefix*` anywhere below `dir` (a walk of the cgroup tree, a
/// few levels deep).
fn remove_run_cgroups(dir: &Path, prefix: &str, depth: usize) -> usize {
    if depth > 8 {
        return 0;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        n += remove_run_cgroups(&path, prefix, depth + 1);
        if e.file_name().to_string_lossy().starts_with(prefix) && std::fs::remove_dir(&path).is_ok()
        {
            n += 1;
        }
    }
    n
}
