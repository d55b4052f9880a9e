//! The client's error type: one variant per outcome of docs/behaviour.md §2, plus transport
//! failures.

use std::io;
use std::path::PathBuf;

use portres_core::ErrorCode;
use portres_proto::{ConflictInfo, ErrorBody};

/// What the daemon said about a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Details {
    /// The Windows code for the operation (e.g. 10048, or 32 for persistent calls).
    pub windows_code: u32,
    /// What was asked, why it failed and what to do.
    pub message: String,
    /// For conflicts: the first conflicting port and its holder.
    pub conflict: Option<Box<ConflictInfo>>,
}

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// WSAEINVAL: bad count or range, unknown or ended token, port outside the block.
    #[error("{}", .0.message)]
    InvalidArgument(Details),
    /// WSAEADDRINUSE: overlap with a reservation, port in use, block exhausted.
    #[error("{}", .0.message)]
    AddressInUse(Details),
    /// WSAENOBUFS: no free block of that size in the dynamic range.
    #[error("{}", .0.message)]
    NoBufferSpace(Details),
    /// WSAENOBUFS: the per-user runtime quota would be exceeded.
    #[error("{}", .0.message)]
    QuotaExceeded(Details),
    /// WSAEACCES / ERROR_ACCESS_DENIED.
    #[error("{}", .0.message)]
    AccessDenied(Details),
    /// ERROR_INVALID_PARAMETER.
    #[error("{}", .0.message)]
    InvalidParameter(Details),
    /// ERROR_SHARING_VIOLATION.
    #[error("{}", .0.message)]
    SharingViolation(Details),
    /// ERROR_NOT_FOUND.
    #[error("{}", .0.message)]
    NotFound(Details),
    /// The daemon could not read what was sent.
    #[error("{}", .0.message)]
    MalformedRequest(Details),
    /// The daemon failed for a reason of its own.
    #[error("{}", .0.message)]
    Internal(Details),
    /// No daemon could be reached at `path`.
    #[error(
        "cannot connect to the portres daemon at {path}: {source}; start one with `portres daemon`, \
         set PORTRES_SOCKET to the socket of a running one, or allow autostart (unset \
         PORTRES_AUTOSTART)"
    )]
    Connect {
        /// The socket tried.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Starting a daemon failed.
    #[error("could not start a portres daemon for {socket}: {why}")]
    Autostart {
        /// The socket it was to listen on.
        socket: PathBuf,
        /// What went wrong, with the daemon's log when there is one.
        why: String,
    },
    /// The connection failed or the daemon spoke nonsense.
    #[error("talking to the portres daemon failed: {0}")]
    Transport(String),
    /// The socket or the process behind it is not one the client trusts (SECURITY.md): its
    /// directory belongs to another user or others may write it, it is reached through a
    /// symbolic link, or the daemon runs as another user.
    #[error("{why}")]
    Untrusted {
        /// The socket.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The daemon went away (a restart, an upgrade, a crash) and the client could not carry its
    /// session over to the one that came back (or none came back in time).
    #[error("the portres daemon at {socket} restarted: {why}")]
    Restarted {
        /// The socket.
        socket: PathBuf,
        /// What happened, and what it means for this session's reservations.
        why: String,
        /// Whether this session's runtime reservations are still reserved (a daemon came back
        /// and carried them over, but this client cannot talk to it): they end when the
        /// process exits.
        reserved: bool,
    },
    /// Writing out what the daemon sent failed (e.g. the reader of our output went away).
    #[error("writing the output failed: {0}")]
    Output(String),
}

impl Error {
    pub(crate) fn from_body(body: ErrorBody) -> Error {
        let d = Details {
            windows_code: body.windows_code,
            message: body.message,
            conflict: body.conflict.map(Box::new),
        };
        match body.code.parse::<ErrorCode>() {
            Ok(ErrorCode::InvalidArgument) => Error::InvalidArgument(d),
            Ok(ErrorCode::AddressInUse) => Error::AddressInUse(d),
            Ok(ErrorCode::NoBufferSpace) => Error::NoBufferSpace(d),
            Ok(ErrorCode::QuotaExceeded) => Error::QuotaExceeded(d),
            Ok(ErrorCode::AccessDenied) => Error::AccessDenied(d),
            Ok(ErrorCode::InvalidParameter) => Error::InvalidParameter(d),
            Ok(ErrorCode::SharingViolation) => Error::SharingViolation(d),
            Ok(ErrorCode::NotFound) => Error::NotFound(d),
            Ok(ErrorCode::MalformedRequest) => Error::MalformedRequest(d),
            Ok(ErrorCode::Internal) => Error::Internal(d),
            Err(()) => Error::Transport(format!(
                "the daemon answered with an unknown error code {:?}: {}",
                body.code, d.message
            )),
        }
    }

    /// The outcome name, for refusals by the daemon.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::AddressInUse(_) => ErrorCode::AddressInUse,
            Error::NoBufferSpace(_) => ErrorCode::NoBufferSpace,
            Error::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            Error::AccessDenied(_) => ErrorCode::AccessDenied,
            Error::InvalidParameter(_) => ErrorCode::InvalidParameter,
            Error::SharingViolation(_) => ErrorCode::SharingViolation,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::MalformedRequest(_) => ErrorCode::MalformedRequest,
            Error::Internal(_) => ErrorCode::Internal,
            _ => return None,
        })
    }

    /// The daemon's details, for refusals.
    pub fn details(&self) -> Option<&Details> {
        match self {
            Error::InvalidArgument(d)
            | Error::AddressInUse(d)
            | Error::NoBufferSpace(d)
            | Error::QuotaExceeded(d)
            | Error::AccessDenied(d)
            | Error::InvalidParameter(d)
            | Error::SharingViolation(d)
            | Error::NotFound(d)
            | Error::MalformedRequest(d)
            | Error::Internal(d) => Some(d),
            _ => None,
        }
    }

    /// The Windows code: the daemon's for refusals; for transport failures
    /// `ERROR_SERVICE_NOT_ACTIVE` (1062) when no daemon could be reached, else
    /// `ERROR_INTERNAL_ERROR` (1359).
    pub fn windows_code(&self) -> u32 {
        match self {
            Error::Connect { .. } | Error::Autostart { .. } | Error::Restarted { .. } => 1062,
            // ERROR_ACCESS_DENIED.
            Error::Untrusted { .. } => 5,
            Error::Transport(_) => 1359,
            other => other.details().map_or(1359, |d| d.windows_code),
        }
    }

    /// The name used in `--json` error output: the outcome name, or `DaemonUnavailable` /
    /// `Transport` for failures to reach or talk to the daemon.
    pub fn code_name(&self) -> &'static str {
        match (self.code(), self) {
            (Some(c), _) => c.as_str(),
            (None, Error::Connect { .. } | Error::Autostart { .. }) => "DaemonUnavailable",
            (None, Error::Untrusted { .. }) => "UntrustedDaemon",
            (None, Error::Restarted { .. }) => "DaemonRestarted",
            (None, _) => "Transport",
        }
    }
}

impl From<portres_proto::FrameError> for Error {
    fn from(e: portres_proto::FrameError) -> Self {
        Error::Transport(match e {
            portres_proto::FrameError::Closed => {
                "the daemon closed the connection (it stopped or restarted)".into()
            }
            other => other.to_string(),
        })
    }
}
