//! Whom a client trusts (SECURITY.md): a daemon socket only in a directory that its owner — root,
//! the caller, or the configured daemon user — alone can write, and only a daemon that runs as
//! one of them (`SO_PEERCRED`). The same checks keep the daemon's own directories private.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The uids a client trusts to run its daemon: root, itself, and `PORTRES_DAEMON_USER` (a name
/// or uid) when set.
pub fn trusted_uids() -> Vec<u32> {
    let me = portres_sys::creds::effective_uid();
    let mut uids = vec![0, me];
    if let Some(u) = std::env::var("PORTRES_DAEMON_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .and_then(|u| portres_sys::creds::resolve_user(&u))
    {
        uids.push(u);
    }
    uids.sort_unstable();
    uids.dedup();
    uids
}

/// A user in words: `alice (uid 1000)`.
pub fn who_is(uid: u32) -> String {
    match portres_sys::creds::user_name(uid) {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

fn list(uids: &[u32]) -> String {
    uids.iter()
        .map(|&u| who_is(u))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Checks, without following symbolic links (`lstat`), that `dir` is a directory owned by one
/// of `owners` that nobody else may write (no group or other write bit). Returns why not.
pub fn check_dir(dir: &Path, owners: &[u32]) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot examine directory {}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(dir)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(format!(
            "{} is a symbolic link (to {target}), not a directory: portres never follows a \
             link for its sockets and state, since whoever made it chooses where they lead",
            dir.display()
        ));
    }
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if !owners.contains(&meta.uid()) || mode & 0o022 != 0 {
        return Err(format!(
            "directory {} is owned by {} with mode {mode:04o}; it must belong to {} and be \
             writable by its owner alone",
            dir.display(),
            who_is(meta.uid()),
            list(owners)
        ));
    }
    Ok(())
}

/// [`check_dir`], and no access at all for group and others (mode `0700` or stricter): a
/// per-user daemon's runtime and state directories.
pub fn check_private_dir(dir: &Path, owner: u32) -> Result<(), String> {
    check_dir(dir, &[owner])?;
    let mode = std::fs::symlink_metadata(dir)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "directory {} has mode {mode:04o}; a per-user daemon's directory must be private \
             (0700): chmod 700 {}",
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700 if it is missing, then checks it with
/// [`check_private_dir`].
pub fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    }
    check_private_dir(dir, portres_sys::creds::effective_uid())
}

/// The directory check for a daemon socket, with what to do when it fails.
pub fn check_socket_dir(socket: &Path, owners: &[u32]) -> Result<(), String> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_dir(dir, owners).map_err(|why| {
        format!(
            "refusing to use the daemon socket {}: {why}. Another user may have made it to \
             impersonate the daemon. Remove it if it is not yours (rm -r {}), or point \
             XDG_RUNTIME_DIR or PORTRES_SOCKET at a directory of your own; if another user \
             runs your daemon on purpose, set PORTRES_DAEMON_USER to that user",
            socket.display(),
            dir.display()
        )
    })
}

/// Escapes control characters in text that comes from other users (command lines, process
/// names), so that it cannot move a terminal's cursor, change its colours or forge a line of a
/// log: each becomes `\u{..}` (newline `\n`, tab `\t`). Everything else is kept.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    portres_core::printable(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_must_be_private_and_real() {
        let d = tempfile::tempdir().unwrap();
        let me = portres_sys::creds::effective_uid();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check_dir(d.path(), &[me]).is_ok());
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_dir(d.path(), &[me]).unwrap_err();
        assert!(e.contains("0777"), "{e}");
        let e = check_dir(d.path(), &[me + 1]).unwrap_err();
        assert!(e.contains("owned by"), "{e}");
        let link = d.path().join("link");
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = check_dir(&link, &[me]).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
    }
}
