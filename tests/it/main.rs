//! Integration tests: the real daemon (`portres daemon`, in a private network namespace), the
//! real client library and the real CLI.
//!
//! Every test here starts its daemon with `unshare -n` so that port probes never touch the
//! host's port tables. Run as root, every test runs. Run as an ordinary user, each test says
//! first what it needs (`util::run_elsewhere`): most run again as root of a user + network +
//! mount namespace of their own; those that need a second uid or root on the host are skipped,
//! each saying so on standard error.

mod util;

mod needs_root {
    mod autostart;
    mod capi;
    mod cli;
    #[cfg(feature = "cluster")]
    mod cluster;
    mod declarative;
    mod deny;
    mod edges;
    mod enforcement;
    mod handover;
    mod hardening;
    mod kernel_safety;
    mod lifecycle;
    mod live_restore;
    mod namespaces;
    mod operators;
    mod persistent;
    mod portserver;
    mod protocol;
    mod python_client;
    mod reliability;
    mod runtime;
    mod scale;
    mod security;
    mod testing_helpers;
    mod visibility;
}
