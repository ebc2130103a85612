//! The integration tests, as one binary (ripgrep's `tests/tests.rs`): the test world — the
//! official PDS and PLC directory, started by `common::world` — starts once per run, not once
//! per file. Each module is one area; `cargo test --test tests <module>::` runs one of them.
//! Nothing here installs anything: `.ci/run` (or `bash tests/world/install.sh` and
//! `bash tests/world/install-system.sh`) does; a missing tool fails with that command.

mod common;

mod admission;
mod bundle;
mod ci_templates;
mod cli;
mod cli_faces;
mod deploy;
mod follow;
mod follow_events;
mod hostile;
mod identity;
mod image;
mod kyverno;
mod mst_interop;
mod pinned_keys;
mod policy;
mod process_faces;
mod proof_props;
mod proof_real;
mod rego;
mod rollback;
mod server;
mod sign;
mod verify;
