//! Integration tests: the real daemon (`portres daemon`, in a private network namespace), the
//! real client library and the real CLI.
//!
//! Every test here starts its daemon with `unshare -n` so that port probes never touch the
//! host's port tables, and several run clients as `nobody`: they need root, and say so by their
//! module name. Run as root: `cargo test --workspace`.

mod util;

mod needs_root {
    mod autostart;
    mod capi;
    mod cli;
    mod deny;
    mod edges;
    mod enforcement;
    mod handover;
    mod hardening;
    mod kernel_safety;
    mod lifecycle;
    mod live_restore;
    mod namespaces;
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
