//! The heart of portres: the reservation table and the rules of docs/behaviour.md §1 and §2, with
//! no I/O.
//!
//! Everything here is plain data and pure functions over it. The daemon feeds in who is asking
//! ([`Caller`]), the time, fresh random numbers ([`TokenSource`]) and the kernel's side of taking
//! a block ([`PortClaim`]); this crate decides and records the outcome. Because it never
//! touches the outside world it is exhaustively property-tested (see `src/tests.rs`).
//!
//! # Layout
//! - [`range`]: `Protocol`, `PortRange`, `Token` — the vocabulary, with their invariants in types.
//! - [`outcome`]: the error codes of docs/behaviour.md §2 with their Windows numbers, and
//!   [`Refusal`], the error every operation returns.
//! - [`gaps`]: the free-space index of the dynamic range that makes wildcard acquires O(log n).
//! - [`portset`]: a set of ports with the text form of `ip_local_reserved_ports`.
//! - [`table`]: [`Table`], the set of live reservations, sessions and quotas, and the operations.
#![deny(missing_docs)]

pub mod gaps;
pub mod outcome;
pub mod portset;
pub mod range;
pub mod table;
pub mod text;

pub use outcome::{Conflict, ErrorCode, Holder, Operation, Refusal};
pub use portset::PortSet;
pub use range::{Mode, PortRange, Protocol, Token};
pub use table::{
    Acl, Caller, ClaimError, ClusterOrigin, Kind, Origin, Owner, PortClaim, Reservation, SessionId,
    SocketInUse, Table, TableConfig, TableCounts, TokenSource,
};
pub use text::printable;

#[cfg(test)]
mod tests;
