//! `atcr-verify scan FILE|-`: how much of a cluster (or a list of images) runs verified
//! images. Reads `kubectl get pods -A -o json` output or references one a line
//! ([`input`]), verifies each distinct image once through the engine, a bounded number at a
//! time, and prints a table and a summary.
//!
//! Exit codes: 0 the scan ran (whatever the verdicts); 1 with `--fail-on denied` when an
//! image is denied, with `--fail-on undecided` when one is denied or could not be decided;
//! 2 the input cannot be read (or bad flags or policy).

mod input;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Serialize;
use time::OffsetDateTime;

use super::ErrorBody;
use super::engine::{EngineArgs, parse_duration};
use crate::policy::TrustPolicy;
use crate::verify::{Failure, ImageReport, Verifier};
use input::MAX_INPUT_BYTES;

/// `scan` flags.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// `kubectl get pods -A -o json` output, or image references one a line; `-` for stdin.
    #[arg(value_name = "FILE|-")]
    input: PathBuf,
    /// Trust-policy file (default: the example policy built into the binary).
    #[arg(long, value_name = "FILE", env = "ATCR_VERIFY_POLICY")]
    policy: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 1 when an image is `denied`, or when one is denied or `undecided` (could not be
    /// verified: upstream failure, bad reference). Without it the exit is 0 whatever the
    /// verdicts.
    #[arg(long, value_name = "denied|undecided")]
    fail_on: Option<FailOn>,
    /// Images verified at once.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Budget for each image's verification.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    engine: EngineArgs,
}

/// What `--fail-on` fails on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FailOn {
    /// An image the policy denies.
    Denied,
    /// An image denied or not decided.
    Undecided,
}

/// One image's line of the `--json` output.
#[derive(Debug, Serialize)]
struct Row {
    image: String,
    verified: bool,
    deny: bool,
    did: Option<String>,
    policy: Option<String>,
    pods: usize,
    error: Option<Failure>,
    #[serde(skip)]
    handle: Option<String>,
}

impl Row {
    fn undecided(&self) -> bool {
        self.error.is_some()
    }
}

/// The `--json` summary.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    images: usize,
    verified: usize,
    denied: usize,
    undecided: usize,
    pods: usize,
    pods_admitted: usize,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    images: &'a [Row],
    summary: &'a Summary,
}

/// Runs `scan`.
pub fn run(args: &ScanArgs) -> ExitCode {
    super::logging::init(args.json, tracing::Level::WARN);
    let fail = |code: &'static str, message: String| {
        ErrorBody::permanent(code, message).exit(args.json, None)
    };
    let bytes = match read_input(&args.input) {
        Ok(b) => b,
        Err(e) => return fail("input", format!("reading {}: {e}", args.input.display())),
    };
    let inventory = match input::parse(&bytes) {
        Ok(i) => i,
        Err(e) => return fail("input", format!("{}: {e}", args.input.display())),
    };
    drop(bytes);
    let policy = match TrustPolicy::load_or_builtin(args.policy.as_deref()) {
        Ok(p) => p,
        Err(e) => return fail("usage", e.to_string()),
    };
    let engine = match args.engine.build() {
        Ok(e) => e,
        Err(e) => return fail("usage", e),
    };
    let runtime = match super::runtime() {
        Ok(r) => r,
        Err(e) => return fail("usage", e),
    };
    let rows = runtime.block_on(verify_all(
        &engine.verifier,
        &policy,
        inventory.images.clone(),
        args,
    ));
    let summary = summarize(&rows, &inventory);
    if args.json {
        let out = Output {
            images: &rows,
            summary: &summary,
        };
        match serde_json::to_string_pretty(&out) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail("usage", format!("printing the results: {e}")),
        }
    } else {
        print!("{}", table(&rows, &summary));
    }
    let failed = match args.fail_on {
        None => false,
        Some(FailOn::Denied) => summary.denied > 0,
        Some(FailOn::Undecided) => summary.denied + summary.undecided > 0,
    };
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The input's bytes, at most [`MAX_INPUT_BYTES`] + 1 (so that a larger one is refused).
fn read_input(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let cap = MAX_INPUT_BYTES as u64;
    if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .take(cap.saturating_add(1))
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    } else {
        crate::file::read_capped(path, cap)
    }
}

/// Verifies each image once, `--concurrency` at a time, with a progress bar on a terminal.
async fn verify_all(
    verifier: &Verifier,
    policy: &TrustPolicy,
    images: Vec<input::Wanted>,
    args: &ScanArgs,
) -> Vec<Row> {
    let progress = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(images.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images checked ({elapsed})",
        ) {
            bar.set_style(style);
        }
        // Redrawn while verifications are in flight, not only when one ends.
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let now = OffsetDateTime::now_utc();
    let progress = &progress;
    let mut rows: Vec<Row> = futures_util::stream::iter(images.into_iter().map(|w| async move {
        // The policy that applies, named even when the verification fails.
        let applies = w
            .image
            .as_ref()
            .ok()
            .and_then(|image| policy.matching(image))
            .map(|p| p.name().to_owned());
        let result = match &w.image {
            Ok(image) => {
                let work = verifier.verify(image, policy, now);
                match tokio::time::timeout(args.timeout, work).await {
                    Ok(Ok(report)) => Ok(report),
                    Ok(Err(e)) => Err(Failure::from(&e)),
                    Err(_) => Err(Failure::from(&crate::verify::VerifyError::Deadline(
                        args.timeout,
                    ))),
                }
            }
            Err(reason) => Err(Failure::new("invalid_reference", reason, false)),
        };
        progress.inc(1);
        row(w, result, applies)
    }))
    .buffer_unordered(usize::from(args.concurrency))
    .collect()
    .await;
    progress.finish_and_clear();
    rows.sort_by(|a, b| a.image.cmp(&b.image));
    rows
}

fn row(w: input::Wanted, result: Result<ImageReport, Failure>, applies: Option<String>) -> Row {
    let pods = w.pods.len();
    match result {
        Ok(report) => Row {
            image: w.name,
            verified: report.verdict.verified,
            deny: report.verdict.deny,
            did: report.verdict.did.as_ref().map(ToString::to_string),
            policy: report.verdict.policy.clone(),
            pods,
            error: None,
            handle: report.handle,
        },
        Err(failure) => Row {
            image: w.name,
            verified: false,
            deny: false,
            did: None,
            policy: applies,
            pods,
            error: Some(failure),
            handle: None,
        },
    }
}

/// Counts; a pod is admitted when none of its images is denied or undecided.
fn summarize(rows: &[Row], inventory: &input::Inventory) -> Summary {
    let mut blocked: BTreeSet<usize> = BTreeSet::new();
    for (row, wanted) in rows.iter().zip(sorted(&inventory.images)) {
        if row.deny || row.undecided() {
            blocked.extend(wanted.pods.iter().copied());
        }
    }
    Summary {
        images: rows.len(),
        verified: rows.iter().filter(|r| r.verified).count(),
        denied: rows.iter().filter(|r| r.deny).count(),
        undecided: rows.iter().filter(|r| r.undecided()).count(),
        pods: inventory.pods,
        pods_admitted: inventory.pods.saturating_sub(blocked.len()),
    }
}

/// The inventory's images in the rows' order (by name).
fn sorted(images: &[input::Wanted]) -> Vec<&input::Wanted> {
    let mut v: Vec<&input::Wanted> = images.iter().collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn table(rows: &[Row], s: &Summary) -> String {
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let verdict = match &r.error {
                Some(e) => format!("undecided: {}", e.code),
                None if r.verified => "verified".to_owned(),
                None if r.deny => "denied".to_owned(),
                None => "not verified (admitted)".to_owned(),
            };
            let signer = match (&r.did, &r.handle) {
                (Some(did), Some(h)) => format!("{did} ({h})"),
                (Some(did), None) => did.clone(),
                _ => "-".to_owned(),
            };
            let policy = r.policy.clone().unwrap_or_else(|| "-".to_owned());
            [r.image.clone(), verdict, signer, policy, r.pods.to_string()]
        })
        .collect();
    let header = ["IMAGE", "VERDICT", "SIGNER", "POLICY", "PODS"];
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cols: [&str; 5]| {
        let mut l = String::new();
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&mut out, header);
    for row in &cells {
        line(&mut out, [&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    for r in rows {
        if let Some(e) = &r.error {
            let _ = writeln!(out, "{}: {}: {}", r.image, e.code, e.message);
        }
    }
    let _ = write!(
        out,
        "{} images: {} verified, {} denied, {} undecided",
        s.images, s.verified, s.denied, s.undecided
    );
    // A list of references has no pods to count.
    if s.pods > 0 {
        let _ = write!(out, "; {} pods, {} admitted", s.pods, s.pods_admitted);
    }
    out.push('\n');
    out
}
