//! The `atcr-verify` binary: everything lives in the library; this only dispatches.

fn main() -> std::process::ExitCode {
    atcr_verify::cli::run()
}
