//! Outcomes of docs/behaviour.md §2: stable names, their Windows codes, and the [`Refusal`] every
//! failed operation returns.

use std::fmt;
use std::str::FromStr;

use crate::range::{PortRange, Protocol};
use crate::table::Owner;

/// The operations of docs/behaviour.md §2. The Windows code of an outcome depends on the
/// operation: runtime and association calls report Winsock codes, persistent calls report Win32
/// codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `SIO_ACQUIRE_PORT_RESERVATION`.
    AcquireRuntime,
    /// `SIO_RELEASE_PORT_RESERVATION`.
    ReleaseRuntime,
    /// `SIO_ASSOCIATE_PORT_RESERVATION` plus the bind.
    Associate,
    /// `CreatePersistent{Tcp,Udp}PortReservation`.
    CreatePersistent,
    /// `LookupPersistent{Tcp,Udp}PortReservation`.
    LookupPersistent,
    /// `DeletePersistent{Tcp,Udp}PortReservation`.
    DeletePersistent,
    /// Anything else (status, show, the handshake): reported with Winsock codes.
    Other,
}

impl Operation {
    /// Whether this is one of the persistent (Win32-coded) calls.
    pub fn is_persistent(self) -> bool {
        matches!(
            self,
            Operation::CreatePersistent | Operation::LookupPersistent | Operation::DeletePersistent
        )
    }
}

/// Every way a request can fail, by its stable name (docs/behaviour.md §2), plus two for the
/// transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// WSAEINVAL 10022: bad count or range, unknown or ended token, port outside the block.
    InvalidArgument,
    /// WSAEADDRINUSE 10048: overlapping reservation, port in use, block exhausted.
    AddressInUse,
    /// WSAENOBUFS 10055: no free block of the asked size in the dynamic range.
    NoBufferSpace,
    /// WSAENOBUFS 10055: the caller's per-user quota would be exceeded.
    QuotaExceeded,
    /// WSAEACCES 10013 (runtime) / ERROR_ACCESS_DENIED 5 (persistent).
    AccessDenied,
    /// ERROR_INVALID_PARAMETER 87: zero start or count, or past port 65535.
    InvalidParameter,
    /// ERROR_SHARING_VIOLATION 32: a persistent block overlaps a reservation or a port in use.
    SharingViolation,
    /// ERROR_NOT_FOUND 1168: no persistent reservation with exactly that start and count.
    NotFound,
    /// The request could not be understood (bad frame, unknown field, wrong version).
    MalformedRequest,
    /// The daemon failed for a reason of its own (e.g. the store could not be written).
    Internal,
}

impl ErrorCode {
    /// Every code, for tables and tests.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidArgument,
        ErrorCode::AddressInUse,
        ErrorCode::NoBufferSpace,
        ErrorCode::QuotaExceeded,
        ErrorCode::AccessDenied,
        ErrorCode::InvalidParameter,
        ErrorCode::SharingViolation,
        ErrorCode::NotFound,
        ErrorCode::MalformedRequest,
        ErrorCode::Internal,
    ];

    /// The stable name used on the wire, in JSON and in the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "InvalidArgument",
            ErrorCode::AddressInUse => "AddressInUse",
            ErrorCode::NoBufferSpace => "NoBufferSpace",
            ErrorCode::QuotaExceeded => "QuotaExceeded",
            ErrorCode::AccessDenied => "AccessDenied",
            ErrorCode::InvalidParameter => "InvalidParameter",
            ErrorCode::SharingViolation => "SharingViolation",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::MalformedRequest => "MalformedRequest",
            ErrorCode::Internal => "Internal",
        }
    }

    /// The Windows code a ported program expects for this outcome of `op`.
    pub fn windows_code(self, op: Operation) -> u32 {
        const WSAEACCES: u32 = 10013;
        const WSAEINVAL: u32 = 10022;
        const WSAEADDRINUSE: u32 = 10048;
        const WSAENOBUFS: u32 = 10055;
        const WSASYSCALLFAILURE: u32 = 10107;
        const ERROR_ACCESS_DENIED: u32 = 5;
        const ERROR_SHARING_VIOLATION: u32 = 32;
        const ERROR_INVALID_PARAMETER: u32 = 87;
        const ERROR_NOT_FOUND: u32 = 1168;
        const ERROR_INTERNAL_ERROR: u32 = 1359;
        const ERROR_NOT_ENOUGH_QUOTA: u32 = 1816;
        let win32 = op.is_persistent();
        match (self, win32) {
            (ErrorCode::InvalidArgument | ErrorCode::InvalidParameter, false) => WSAEINVAL,
            (ErrorCode::InvalidArgument | ErrorCode::InvalidParameter, true) => {
                ERROR_INVALID_PARAMETER
            }
            (ErrorCode::MalformedRequest, false) => WSAEINVAL,
            (ErrorCode::MalformedRequest, true) => ERROR_INVALID_PARAMETER,
            (ErrorCode::AddressInUse, _) => WSAEADDRINUSE,
            (ErrorCode::NoBufferSpace, _) => WSAENOBUFS,
            (ErrorCode::QuotaExceeded, false) => WSAENOBUFS,
            (ErrorCode::QuotaExceeded, true) => ERROR_NOT_ENOUGH_QUOTA,
            (ErrorCode::AccessDenied, false) => WSAEACCES,
            (ErrorCode::AccessDenied, true) => ERROR_ACCESS_DENIED,
            (ErrorCode::SharingViolation, _) => ERROR_SHARING_VIOLATION,
            (ErrorCode::NotFound, _) => ERROR_NOT_FOUND,
            (ErrorCode::Internal, false) => WSASYSCALLFAILURE,
            (ErrorCode::Internal, true) => ERROR_INTERNAL_ERROR,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or(())
    }
}

/// What holds a conflicting port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A reservation in the table.
    Reservation {
        /// Its block.
        range: PortRange,
        /// `true` for persistent reservations.
        persistent: bool,
        /// Who made it.
        owner: Owner,
    },
    /// A live socket outside portres; `description` names its process when that could be found.
    Socket {
        /// e.g. `"nginx (pid 4121, user www-data), listening on [::]:8080"`.
        description: Option<String>,
    },
}

/// The first conflicting port of a refused request and what holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Protocol of the port.
    pub protocol: Protocol,
    /// The port.
    pub port: u16,
    /// What has it.
    pub holder: Holder,
}

impl Conflict {
    /// What holds the port, in words: "is in runtime reservation 40000-40009/tcp of pid 42
    /// (uid 1000, `sleep 9`)" or "is in use by nginx (pid 4121)".
    pub fn holder_text(&self) -> String {
        match &self.holder {
            Holder::Reservation {
                range,
                persistent,
                owner,
            } => {
                let kind = if *persistent { "persistent" } else { "runtime" };
                format!(
                    "is in {kind} reservation {range}/{} of {owner}",
                    self.protocol
                )
            }
            Holder::Socket {
                description: Some(d),
            } => format!("is in use by {d}"),
            Holder::Socket { description: None } => {
                "is bound by another socket (its process could not be identified)".into()
            }
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "port {}/{} {}",
            self.port,
            self.protocol,
            self.holder_text()
        )
    }
}

/// A refused request: the outcome code, its Windows number, and a message for people that says
/// what was asked, why it failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable outcome name.
    pub code: ErrorCode,
    /// The Windows code for the operation that failed.
    pub windows_code: u32,
    /// Human message.
    pub message: String,
    /// For `AddressInUse` and `SharingViolation`: the first conflicting port and its holder.
    pub conflict: Option<Conflict>,
}

impl Refusal {
    /// A refusal of `op` with `code` and a message.
    pub fn new(op: Operation, code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            windows_code: code.windows_code(op),
            message: message.into(),
            conflict: None,
        }
    }

    /// Attaches the conflicting port.
    pub fn with_conflict(mut self, conflict: Conflict) -> Self {
        self.conflict = Some(conflict);
        self
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}
