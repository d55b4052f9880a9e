//! What the CLI prints: human text or one JSON document (SPEC §7).

use std::time::{SystemTime, UNIX_EPOCH};

use portres_client::{Error, Protocol, ShowInfo, StatusInfo, Token};
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
    println!(
        "  reservations:   {} runtime, {} persistent, {} ports ({} held, {} handed out); {} sessions",
        s.counts.runtime,
        s.counts.persistent,
        s.counts.ports_reserved,
        s.counts.ports_held,
        s.counts.ports_handed_out,
        s.counts.sessions
    );
    println!("  enforcement:");
    for l in &s.layers {
        let state = if l.active { "active" } else { "off" };
        println!("    {:<8} {state:<7} {}", l.name, l.reason);
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
    let rows: Vec<[String; 6]> = s
        .reservations
        .iter()
        .map(|r| {
            let last = u32::from(r.start) + u32::from(r.count) - 1;
            let ports = if r.count == 1 {
                r.start.to_string()
            } else {
                format!("{}-{last}", r.start)
            };
            let who = r
                .owner
                .user
                .clone()
                .unwrap_or_else(|| format!("uid {}", r.owner.uid));
            let owner = match r.owner.pid {
                Some(pid) => format!(
                    "{who} pid {pid} {}",
                    r.owner.command.as_deref().unwrap_or("")
                ),
                None => who,
            };
            [
                r.protocol.clone(),
                ports,
                r.kind.clone(),
                r.mode.clone(),
                ago(r.created),
                owner,
            ]
        })
        .collect();
    let head = ["PROTO", "PORTS", "KIND", "MODE", "CREATED", "OWNER"];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 5 {
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
    line(head);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
}
