//! Every Linux call portres makes, in one place, each wrapper naming the syscall or `/proc` file
//! it uses. Nothing else in the workspace contains `unsafe`; here each unsafe block says why it
//! is sound in a `// SAFETY:` comment.
//!
//! # Layout
//! - [`creds`]: peer credentials and supplementary groups of a Unix socket, user and group names.
//! - [`ports`]: the dynamic port range, and probing whether a port is bound.
//! - [`process`]: command lines of processes, the OS random source, file locks, stdio.
#![allow(unsafe_code)]
#![deny(missing_docs)]

pub mod creds;
pub mod ports;
pub mod process;
