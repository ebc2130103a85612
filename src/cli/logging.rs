//! Logging for the command-line faces: `tracing-subscriber`'s fmt layer on stderr, text or
//! JSON, filtered by `ATCR_VERIFY_LOG`.

use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The variable that sets what is logged: a level (`error`, `warn`, `info`, `debug`,
/// `trace`), or targets with levels, `info,atcr_verify=debug`.
pub const ENV: &str = "ATCR_VERIFY_LOG";

/// Logs to stderr at `default` level, unless [`ENV`] says otherwise; `json` for one JSON
/// object per line. A second call does nothing.
pub fn init(json: bool, default: Level) {
    let setting = std::env::var(ENV).ok();
    let parsed = setting.as_deref().map(str::parse::<Targets>);
    let filter = match &parsed {
        Some(Ok(targets)) => targets.clone(),
        _ => Targets::new().with_default(default),
    };
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    let format = if json {
        format.json().boxed()
    } else {
        format.boxed()
    };
    let installed = tracing_subscriber::registry()
        .with(format.with_filter(filter))
        .try_init();
    if let (Ok(()), Some(Err(e)), Some(value)) = (installed, parsed, setting) {
        tracing::warn!("{ENV}={value:?} not understood ({e}); logging at {default}");
    }
}
