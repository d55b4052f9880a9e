//! `poll(2)`, the one way this crate waits on descriptors.

use std::io;
use std::time::Duration;

pub(crate) use rustix::event::{PollFd, PollFlags};

/// `poll(2)` on `fds` for up to `timeout` (`None`: no limit), again after `EINTR`; returns how
/// many are ready (their `revents` say which).
pub(crate) fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let ts = timeout.map(|t| rustix::event::Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    loop {
        match rustix::event::poll(fds, ts.as_ref()) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
