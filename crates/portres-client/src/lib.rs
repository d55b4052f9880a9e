//! Blocking Rust client for the portres daemon. No async runtime needed.
//!
//! ```no_run
//! use portres_client::{Client, Protocol};
//!
//! let client = Client::connect()?; // finds (or starts) the daemon
//! let block = client.acquire(Protocol::Tcp, 3)?; // any 3 contiguous free ports
//! println!("ports {}", block.range());
//! drop(block); // released (it also ends when the process exits)
//! # Ok::<(), portres_client::Error>(())
//! ```
//!
//! # Layout
//! - [`Client`] and [`Reservation`] (`client.rs`): connections, requests, RAII reservations.
//! - [`Error`] (`error.rs`): one variant per outcome of docs/behaviour.md §2, plus transport
//!   failures.
//! - [`paths`]: where the daemon's socket, state and configuration live by default.
//! - `autostart.rs`: starting a user-mode daemon when none answers.
//! - [`testing`]: reserved ports for tests (`cargo test`, `cargo nextest`), never probed.
//! - [`windows`]: the persistent functions with their Windows names and conventions.
#![deny(missing_docs)]

mod autostart;
mod client;
mod error;
pub mod paths;
pub mod testing;
pub mod trust;
pub mod windows;

pub use autostart::set_daemon_binary;
pub use client::{Client, PersistentSpec, Reservation, SocketKind, TcpSocket, reconnect_limit};
pub use error::{Details, Error};
pub use portres_core::{ErrorCode, Mode, PortRange, Protocol, Token};
pub use portres_proto::{
    ApplyChange, ApplyInfo, AttachInfo, ChangeAction, ClusterEntryInfo, ClusterFailureInfo,
    ClusterInfo, ClusterMemberInfo, ClusterMemberState, ConflictInfo, Counted, Counts,
    DeclaredStatus, HandedOutInfo, LayerInfo, LostToken, NamespaceStatus, NetnsInfo, OwnerInfo,
    ReservationInfo, RestoreInfo, ShowFilter, ShowInfo, SocketInfo, StatusInfo, WhoInfo,
    WhoSummary,
};
