//! What the CLI prints: human text or one JSON document (docs/behaviour.md §7).

use std::time::{SystemTime, UNIX_EPOCH};

use portres_client::trust::printable;
use portres_client::{Error, Protocol, ReservationInfo, ShowInfo, StatusInfo, Token, WhoInfo};
use serde_json::json;

/// Prints an error: `{"error": {...}}` on stdout with `--json`, else `portres: ...` on stderr.
pub fn print_error(e: &anyhow::Error, json: bool) {
    let client_error = e.chain().find_map(|c| c.downcast_ref::<Error>());
    if json {
        let (code, windows_code) = match client_error {
            Some(ce) => (ce.code_name(), ce.windows_code()),
            None => ("Failed", 1359),
        };
        let doc = json!({"error": {"code": code, "windows_code": windows_code, "message": format!("{e:#}")}});
        println!("{doc}");
    } else {
        // Untrusted parts (other processes' names and command lines) were made printable where
        // the message was made; the message itself may span lines (a log's tail).
        eprintln!("portres: {e:#}");
    }
}

/// `persistent add` / `lookup`: the token.
pub fn token(token: Token, protocol: Protocol, start: u32, count: u32, json: bool) {
    if json {
        let doc = json!({"token": token.to_string(), "protocol": protocol.as_str(), "start": start, "count": count});
        println!("{doc}");
    } else {
        println!("{token}");
    }
}

/// `persistent delete`.
pub fn deleted(protocol: Protocol, start: u32, count: u32, json: bool) {
    if json {
        let doc =
            json!({"deleted": true, "protocol": protocol.as_str(), "start": start, "count": count});
        println!("{doc}");
    } else {
        let last = start + count - 1;
        println!("deleted persistent reservation {start}-{last}/{protocol}");
    }
}

fn ago(created: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(created);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `status`.
pub fn status(s: &StatusInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).expect("serialisable"));
        return;
    }
    println!(
        "portres daemon {} (protocol {}), pid {}, up {}s",
        s.daemon_version, s.protocol_version, s.pid, s.uptime_secs
    );
    println!("  scope:          {}", s.scope);
    println!("  socket:         {}", s.socket);
    println!("  state:          {}", s.state_dir);
    println!(
        "  dynamic range:  {} (from {})",
        s.dynamic_range, s.dynamic_range_source
    );
    println!("  runtime quota:  {} ports per user", s.runtime_quota_ports);
    let c = &s.counts;
    println!(
        "  reservations:   {} runtime ({} hold, {} exclude), {} persistent ({} hold, {} exclude)",
        c.runtime,
        c.runtime_hold,
        c.runtime_exclude,
        c.persistent,
        c.persistent_hold,
        c.persistent_exclude
    );
    println!(
        "  ports:          {} reserved, {} held, {} handed out",
        c.ports_reserved, c.ports_held, c.ports_handed_out
    );
    println!("  sessions:       {}", c.sessions);
    if let Some(p) = &s.portserver {
        println!("  portserver:     {}", printable(p));
    }
    if let Some(m) = &s.metrics {
        println!("  metrics:        {}", printable(m));
    }
    if let Some(d) = &s.declared {
        println!(
            "  files:          {} reservations from {}",
            d.reservations,
            printable(&d.dir)
        );
        if let Some(p) = &d.problem {
            line_80(&format!("    NOT APPLIED: {}", printable(p)));
        }
    }
    if let Some(ns) = &s.netns {
        println!(
            "  namespace:      {} (clients are served in {}); the lines above are its",
            netns_label(ns),
            if s.namespace_mode.as_deref() == Some("daemon") {
                "the daemon's namespace, whatever theirs: namespaces = \"daemon\""
            } else {
                "their own network namespace"
            }
        );
    }
    for p in &s.namespace_problems {
        println!("  NOT ENFORCED: {}", printable(p));
    }
    if s.namespaces.len() > 1 {
        println!("  namespaces served: {}", s.namespaces.len());
        for n in &s.namespaces {
            line_80(&format!(
                "    {}: {} sessions, {} reservations, {} ports",
                netns_label(&n.netns),
                n.sessions,
                n.reservations,
                n.ports_reserved
            ));
        }
    }
    if c.accept_paused > 0 {
        println!(
            "  descriptors:    ran out {} times (open-file limit {}): new connections waited \
             until sessions ended; see the log",
            c.accept_paused, c.open_files_limit
        );
    }
    println!("  enforcement:");
    for l in &s.layers {
        let state = if l.active { "active" } else { "off" };
        println!("    {:<8} {state:<7} {}", l.name, l.reason);
    }
    if let Some(r) = &s.restore {
        restore(r);
    }
}

/// The live-restore lines of `status`.
fn restore(r: &portres_client::RestoreInfo) {
    match (r.live_restore_secs, &r.problem, r.keeper_pid) {
        (0, _, _) => println!(
            "  live restore:   off (live_restore_secs = 0): a stop releases every runtime \
             reservation"
        ),
        (secs, Some(why), _) => println!("  live restore:   NOT WORKING: {why} (grace {secs} s)"),
        (secs, None, pid) => println!(
            "  live restore:   on: runtime reservations outlive a restart or crash of the daemon \
             for up to {secs} s, kept by the keeper (pid {}); `portres daemon --stop` releases \
             them",
            pid.map_or("?".to_string(), |p| p.to_string())
        ),
    }
    if r.restored {
        println!(
            "  last start:     carried on from the previous daemon: {} runtime reservations kept \
             ({} held ports never unbound), {} dropped (owner gone), {} lost",
            r.kept,
            r.placeholders_kept,
            r.dropped.len(),
            r.lost.len()
        );
        for d in &r.dropped {
            println!("    dropped: {}", portres_core::printable(d));
        }
        for l in &r.lost {
            println!("    LOST:    {}", portres_core::printable(l));
        }
    }
}

/// `show`: an aligned table sorted by protocol then port, or `{"reservations": [...]}`.
pub fn show(s: &ShowInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).expect("serialisable"));
        return;
    }
    if s.reservations.is_empty() {
        println!("no reservations");
        return;
    }
    let rows: Vec<[String; 8]> = s
        .reservations
        .iter()
        .map(|r| {
            [
                r.protocol.clone(),
                ports(r),
                r.kind.clone(),
                r.scope.clone(),
                r.mode.clone(),
                format!(
                    "{}/{}",
                    r.handed_out_count.max(r.handed_out.len() as u32),
                    r.count
                ),
                ago(r.created),
                owner(r),
            ]
        })
        .collect();
    let head = [
        "PROTO", "PORTS", "KIND", "SCOPE", "MODE", "USED", "CREATED", "OWNER",
    ];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 8]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 7 {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        // Keep lines readable at 80 columns.
        if out.chars().count() > 79 {
            out = out.chars().take(78).collect::<String>() + "…";
        }
        println!("{}", out.trim_end());
    };
    // Rows come grouped by namespace; a heading names each one when any is not the daemon's.
    let headings = s
        .reservations
        .iter()
        .any(|r| r.netns.as_ref().is_some_and(|n| !n.daemon));
    let mut last: Option<u64> = None;
    if !headings {
        line(head);
    }
    for (row, r) in rows.iter().zip(&s.reservations) {
        if headings && r.netns.as_ref().map(|n| n.inode) != last {
            last = r.netns.as_ref().map(|n| n.inode);
            if let Some(n) = &r.netns {
                line_80(&format!("network namespace {}:", netns_label(n)));
            }
            line(head);
        }
        line(row.each_ref().map(String::as_str));
        origin_line(r);
        cluster_lines(r);
        handed_out_lines(r);
    }
}

/// Under a row: why a reservation exists and the file that declares it, when it has either.
fn origin_line(r: &ReservationInfo) {
    match (&r.description, &r.file) {
        (Some(d), Some(f)) => line_80(&format!("  why: {} (from {})", printable(d), printable(f))),
        (Some(d), None) => line_80(&format!("  why: {}", printable(d))),
        (None, Some(f)) => line_80(&format!("  from {}", printable(f))),
        (None, None) => {}
    }
}

/// Under a cluster reservation's row: where it lives in the cluster and each member's state.
fn cluster_lines(r: &ReservationInfo) {
    let Some(c) = &r.cluster else { return };
    let what = if c.runtime {
        format!(
            "  a runtime block of member {}, kept free here",
            printable(&c.node)
        )
    } else {
        format!("  cluster reservation made on {}", printable(&c.node))
    };
    line_80(&format!("{what} ({})", printable(&c.key)));
    for m in &c.members {
        line_80(&format!(
            "    {}: {}",
            printable(&m.node),
            printable(&m.state)
        ));
    }
}

/// `portres cluster status`.
pub fn cluster_status(c: &portres_client::ClusterInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string(c).expect("serialisable"));
        return;
    }
    println!("member:        {}", printable(&c.node));
    println!(
        "etcd:          {} ({})",
        printable(&c.endpoints.join(", ")),
        if c.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        }
    );
    if let Some(e) = &c.error {
        println!("  last error:  {}", printable(e));
    }
    println!("prefix:        {}", printable(&c.prefix));
    println!(
        "revision:      {} (applied here: {})",
        c.revision, c.applied_revision
    );
    println!("reservations:  {}", c.reservations);
    println!("members:       {}", c.members.len());
    for m in &c.members {
        println!(
            "  {:<20} pid {:<8} heartbeat {:>6} ms ago  behind {:>4}  failures {}",
            printable(&m.node),
            m.pid,
            m.heartbeat_age_ms,
            m.behind,
            m.failures.len()
        );
        for f in &m.failures {
            println!(
                "    cannot enforce {}/{} ({}): {}",
                block(f.start, f.count),
                f.protocol,
                printable(&f.key),
                printable(&f.why)
            );
        }
    }
}

/// `net:[INODE]`, with what is known of it: the daemon's own, its `ip netns` name, a process
/// in it.
pub fn netns_label(n: &portres_client::NetnsInfo) -> String {
    let mut out = format!("net:[{}]", n.inode);
    if n.daemon {
        out.push_str(" (the daemon's own)");
    } else if let Some(name) = &n.name {
        out.push_str(&format!(" (ip netns {})", printable(name)));
    } else if let Some(pid) = n.pid {
        match &n.command {
            Some(c) => out.push_str(&format!(" (first client pid {pid} `{}`)", printable(c))),
            None => out.push_str(&format!(" (first client pid {pid})")),
        }
    }
    out
}

/// One line per process holding sockets handed out from `r`, however many ports it has.
fn handed_out_lines(r: &ReservationInfo) {
    let mut by_holder: Vec<(String, Vec<u16>)> = Vec::new();
    for h in &r.handed_out_to {
        let to = match (h.pid, &h.command) {
            (Some(pid), Some(cmd)) => format!("pid {pid} `{}`", printable(cmd)),
            (Some(pid), None) => format!("pid {pid}"),
            _ => "a process the daemon cannot see".into(),
        };
        match by_holder.iter_mut().find(|(t, _)| *t == to) {
            Some((_, ports)) => ports.push(h.port),
            None => by_holder.push((to, vec![h.port])),
        }
    }
    for (to, ports) in &by_holder {
        let what = match ports.as_slice() {
            [one] => format!("port {one}"),
            many => format!("{} ports ({})", many.len(), port_runs(many)),
        };
        line_80(&format!("    {what} handed out to {to}"));
    }
    let listed = r.handed_out_to.len() as u32;
    if r.handed_out_count > listed {
        line_80(&format!(
            "    and {} more ports handed out (portres --json show lists them)",
            r.handed_out_count - listed
        ));
    }
}

/// "40000-40009,40012" for sorted ports.
fn port_runs(ports: &[u16]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let mut j = i;
        while j + 1 < ports.len() && u32::from(ports[j + 1]) == u32::from(ports[j]) + 1 {
            j += 1;
        }
        out.push(if i == j {
            ports[i].to_string()
        } else {
            format!("{}-{}", ports[i], ports[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// `show --json` of a table of any size: `{"reservations": [` then each row as it arrives.
pub struct ShowJson {
    first: bool,
}

impl ShowJson {
    /// Starts the document.
    pub fn start() -> std::io::Result<ShowJson> {
        use std::io::Write;
        std::io::stdout().lock().write_all(b"{\"reservations\":[")?;
        Ok(ShowJson { first: true })
    }

    /// One row.
    pub fn row(&mut self, r: &ReservationInfo) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if !self.first {
            out.write_all(b",")?;
        }
        self.first = false;
        serde_json::to_writer(&mut out, r).map_err(std::io::Error::other)
    }

    /// Ends the document.
    pub fn finish(self) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(b"]}\n")?;
        out.flush()
    }
}

fn line_80(text: &str) {
    if text.chars().count() > 79 {
        println!("{}…", text.chars().take(78).collect::<String>());
    } else {
        println!("{text}");
    }
}

fn ports(r: &ReservationInfo) -> String {
    block(r.start, r.count)
}

/// `P` for one port, `FIRST-LAST` for more.
fn block(start: u16, count: u16) -> String {
    if count <= 1 {
        start.to_string()
    } else {
        format!("{start}-{}", u32::from(start) + u32::from(count) - 1)
    }
}

/// Like [`owner`], with the command line cut to `max` characters.
fn owner_short(r: &ReservationInfo, max: usize) -> String {
    let full = owner(r);
    if full.chars().count() > max {
        full.chars().take(max - 1).collect::<String>() + "…"
    } else {
        full
    }
}

fn owner(r: &ReservationInfo) -> String {
    let who = r
        .owner
        .user
        .clone()
        .unwrap_or_else(|| format!("uid {}", r.owner.uid));
    match r.owner.pid {
        Some(pid) => format!(
            "{who} pid {pid} {}",
            printable(r.owner.command.as_deref().unwrap_or(""))
        ),
        None => who,
    }
}

/// `show --format netsh`: the layout of Windows' `netsh int ipv4 show excludedportrange
/// protocol=tcp`, persistent (administered) rows marked `*`.
pub fn netsh(s: &ShowInfo, protocol: Protocol) -> String {
    let mut out = format!(
        "\nProtocol {protocol} Port Exclusion Ranges\n\nStart Port    End Port\n----------    --------\n"
    );
    for r in s
        .reservations
        .iter()
        .filter(|r| r.protocol == protocol.as_str())
    {
        let last = u32::from(r.start) + u32::from(r.count) - 1;
        // As netsh prints it: start right-aligned under "Start Port", end under "End Port".
        out.push_str(&format!("{:>10}    {:>8}", r.start, last));
        if r.kind == "persistent" {
            out.push_str("     *");
        }
        out.push('\n');
    }
    out.push_str("\n* - Administered port exclusions.\n\n");
    out
}

/// `who PORT`.
pub fn who(w: &WhoInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string(w).expect("serialisable"));
        return;
    }
    let connections = w.summary.as_ref().map_or(0, |s| s.sockets);
    let head = format!("port {}/{}", w.port, w.protocol);
    if w.reservation.is_none() && w.sockets.is_empty() && connections == 0 {
        println!("{head}: nobody (no reservation covers it and no socket uses it)");
        if let Some(n) = &w.not_visible {
            println!("  note: {n}");
        }
        return;
    }
    println!("{head}");
    who_reservation(w);
    for s in &w.sockets {
        println!("  {}", printable(&s.description));
    }
    if let Some(sum) = &w.summary
        && sum.not_listed > 0
    {
        who_summary(sum, w.port);
    }
    if let Some(n) = &w.not_visible {
        println!("  note: {n}");
    }
}

fn who_reservation(w: &WhoInfo) {
    match &w.reservation {
        Some(r) => {
            println!(
                "  in {} reservation {}/{} ({}), made {}",
                r.kind,
                ports(r),
                r.protocol,
                r.mode,
                ago(r.created)
            );
            let by = match r.owner.pid {
                Some(_) => owner_short(r, 66),
                None => format!("administrator {}", owner_short(r, 52)),
            };
            println!("    by {by}");
            if let Some(d) = &r.description {
                println!("    why: {}", printable(d));
            }
            if let Some(f) = &r.file {
                println!("    declared in {}", printable(f));
            }
            if !r.allow_users.is_empty() || !r.allow_groups.is_empty() {
                let mut allowed = Vec::new();
                if !r.allow_users.is_empty() {
                    allowed.push(format!("users {}", printable(&r.allow_users.join(", "))));
                }
                if !r.allow_groups.is_empty() {
                    allowed.push(format!("groups {}", printable(&r.allow_groups.join(", "))));
                }
                println!("    allowed: {}", allowed.join("; "));
            }
            if let Some(b) = &r.binds {
                println!("    deny layer: {b}");
            }
            if let Some(n) = r.netns.as_ref().filter(|n| !n.daemon) {
                println!("    in network namespace {}", netns_label(n));
            }
        }
        None => println!("  no reservation covers it"),
    }
}

fn counted(list: &[portres_client::Counted]) -> String {
    list.iter()
        .map(|c| format!("{} {}", c.count, printable(&c.name)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn who_summary(sum: &portres_client::WhoSummary, port: u16) {
    println!(
        "  {} sockets on the port in all ({} not listed above): {}",
        sum.sockets,
        sum.not_listed,
        counted(&sum.by_state)
    );
    line_80(&format!("    by process: {}", counted(&sum.by_process)));
    line_80(&format!("    by user: {}", counted(&sum.by_user)));
    if !sum.top_remotes.is_empty() {
        line_80(&format!(
            "    top remote addresses: {}",
            counted(&sum.top_remotes)
        ));
    }
    println!("  (portres who {port} --all lists every socket)");
}

/// `who PORT --all` (human): the head first, then each socket as it arrives.
pub fn who_all_head(w: &WhoInfo) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "port {}/{}", w.port, w.protocol)?;
    drop(out);
    who_reservation(w);
    if let Some(sum) = &w.summary {
        println!("  {} sockets: {}", sum.sockets, counted(&sum.by_state));
    }
    if let Some(n) = &w.not_visible {
        println!("  note: {n}");
    }
    Ok(())
}

/// One socket of `who PORT --all`.
pub fn who_all_socket(s: &portres_client::SocketInfo) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "  {}", printable(&s.description))
}

/// `who PORT --json`: the head's fields, then `"sockets": [` and each socket as it arrives.
pub fn who_json_head(w: &WhoInfo) -> std::io::Result<()> {
    use std::io::Write;
    let mut head = serde_json::to_value(w).map_err(std::io::Error::other)?;
    let map = head.as_object_mut().expect("an object");
    map.remove("sockets");
    map.remove("more");
    let text = serde_json::to_string(&head).map_err(std::io::Error::other)?;
    let mut out = std::io::stdout().lock();
    // `{...}` without its closing brace, then the sockets array.
    out.write_all(&text.as_bytes()[..text.len() - 1])?;
    out.write_all(b",\"sockets\":[")
}

/// One socket of `who --json`; `first` says whether a comma goes before it.
pub fn who_json_socket(s: &portres_client::SocketInfo, first: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if !first {
        out.write_all(b",")?;
    }
    serde_json::to_writer(&mut out, s).map_err(std::io::Error::other)
}

/// Ends `who --json`.
pub fn who_json_end() -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(b"]}\n")?;
    out.flush()
}

/// The difference `portres apply` found (or `--check`): one line per change.
pub fn apply_diff(a: &portres_client::ApplyInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string(a).expect("serialisable"));
        return;
    }
    let files = match a.files.len() {
        100.. => "100 or more files".to_string(),
        1 => "1 file".to_string(),
        n => format!("{n} files"),
    };
    if a.added + a.changed + a.removed == 0 {
        println!(
            "nothing to apply: the {} reservations of {} ({files}) are as the files say",
            a.unchanged,
            printable(&a.dir)
        );
        return;
    }
    println!(
        "{} ({files}): {} changes ({} to add, {} to change, {} to remove), {} reservations \
         unchanged",
        printable(&a.dir),
        a.added + a.changed + a.removed,
        a.added,
        a.changed,
        a.removed,
        a.unchanged
    );
    for c in &a.changes {
        let block = block(c.start, c.count);
        let at = match c.line {
            Some(l) => format!("{}:{l}", printable(&c.file)),
            None => printable(&c.file).to_string(),
        };
        // A reservation of the whole cluster (an entry with `cluster = true`).
        let block = match c.scope.as_deref() {
            Some("cluster") => format!("{block} [cluster]"),
            _ => block,
        };
        match c.action {
            portres_client::ChangeAction::Add => println!(
                "  + add     {} {block}: {} ({at})",
                c.protocol,
                printable(c.after.as_deref().unwrap_or(""))
            ),
            portres_client::ChangeAction::Remove => println!(
                "  - remove  {} {block}: {} (its entry is gone from {at})",
                c.protocol,
                printable(c.before.as_deref().unwrap_or(""))
            ),
            portres_client::ChangeAction::Change => {
                println!("  ~ change  {} {block} ({at}):", c.protocol);
                println!(
                    "      was: {}",
                    printable(c.before.as_deref().unwrap_or(""))
                );
                println!("      now: {}", printable(c.after.as_deref().unwrap_or("")));
            }
        }
    }
    if a.not_listed > 0 {
        println!(
            "  ... and {} more changes (not listed: one reply holds the first ones)",
            a.not_listed
        );
    }
}

/// What `portres apply` applied.
pub fn applied(a: &portres_client::ApplyInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string(a).expect("serialisable"));
        return;
    }
    println!(
        "applied {} changes from {} ({} added, {} changed, {} removed)",
        a.added + a.changed + a.removed,
        printable(&a.dir),
        a.added,
        a.changed,
        a.removed
    );
    if !a.cluster_errors.is_empty() {
        println!(
            "but {} changes of cluster reservations were not made (this host's were):",
            a.cluster_errors.len()
        );
        for e in &a.cluster_errors {
            println!("  {}", printable(e));
        }
    }
}
