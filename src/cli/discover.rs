//! `atcr-verify discover REF`: the signature artifacts attached to an image, as `oras
//! discover --artifact-type application/vnd.atproto.signature.v1+json` lists them, with the
//! signer and record each **claims**. Nothing is proven (that is `atcr-verify image`).
//!
//! Exit codes: 0 listed (zero artifacts too), 2 could not list (bad reference or flags, no
//! such image, registry failure, deadline).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::ErrorBody;
use super::engine::{EngineArgs, parse_duration};
use crate::resolve::{ARTIFACT_MEDIA_TYPE, ArtifactResult};
use crate::syntax::ImageRef;
use crate::verify::Discovery;

/// `discover` flags.
#[derive(Debug, clap::Args)]
pub struct DiscoverArgs {
    /// The image: [registry/]repository[:tag][@sha256:digest].
    #[arg(value_name = "REF")]
    image: String,
    /// Print the listing as JSON.
    #[arg(long)]
    json: bool,
    /// Budget for the whole listing.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    engine: EngineArgs,
}

/// The `--json` listing.
#[derive(Debug, Serialize)]
struct Listing<'a> {
    image: &'a str,
    digest: &'a str,
    artifacts: Vec<Entry>,
}

/// One artifact: its claims, or why it could not be read.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    /// The artifact manifest's digest (`null` only when a read failure does not name it).
    digest: Option<String>,
    /// The claims (`null` when the artifact could not be read).
    did: Option<String>,
    record_uri: Option<String>,
    claimed_pds: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

impl From<&ArtifactResult> for Entry {
    fn from(a: &ArtifactResult) -> Self {
        match a {
            Ok(a) => Entry {
                digest: a.digest.as_ref().map(ToString::to_string),
                did: Some(a.did.to_string()),
                record_uri: Some(a.record_uri.to_string()),
                claimed_pds: a.claimed_pds.clone(),
                error: None,
            },
            Err(e) => Entry {
                digest: e.artifact().map(ToString::to_string),
                did: None,
                record_uri: None,
                claimed_pds: None,
                error: Some(ErrorBody::permanent(e.code(), e)),
            },
        }
    }
}

/// Runs `discover`.
pub fn run(args: &DiscoverArgs) -> ExitCode {
    super::logging::init(args.json, tracing::Level::WARN);
    let image: ImageRef = match args.image.parse() {
        Ok(i) => i,
        Err(e) => {
            return ErrorBody::permanent("invalid_reference", e).exit(args.json, Some(&args.image));
        }
    };
    let engine = match args.engine.build() {
        Ok(e) => e,
        Err(e) => return ErrorBody::permanent("usage", e).exit(args.json, None),
    };
    let work = engine.verifier.discover(&image);
    let found = match super::block_within(args.timeout, work) {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return ErrorBody::of(&e).exit(args.json, Some(&image.to_string())),
        Err(e) => return ErrorBody::permanent("usage", e).exit(args.json, None),
    };
    let name = image.to_string();
    if args.json {
        let listing = Listing {
            image: &name,
            digest: found.manifest.digest.as_str(),
            artifacts: found.artifacts.iter().map(Entry::from).collect(),
        };
        match serde_json::to_string_pretty(&listing) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                return ErrorBody::permanent("usage", format!("printing the listing: {e}"))
                    .exit(true, None);
            }
        }
    } else {
        print!("{}", human(&name, &found));
    }
    ExitCode::SUCCESS
}

fn human(name: &str, found: &Discovery) -> String {
    let mut out = String::new();
    let n = found.artifacts.len();
    let bare = name.split('@').next().unwrap_or(name);
    let _ = writeln!(out, "{bare}@{}", found.manifest.digest);
    let _ = writeln!(
        out,
        "{n} signature artifact{} ({ARTIFACT_MEDIA_TYPE})",
        if n == 1 { "" } else { "s" }
    );
    if n > 0 {
        let _ = writeln!(
            out,
            "UNVERIFIED claims: read from the registry, nothing proven \
             (`atcr-verify image` proves them)"
        );
    }
    for a in &found.artifacts {
        match a {
            Ok(a) => {
                let digest = a.digest.as_ref().map_or("?".into(), ToString::to_string);
                let _ = writeln!(out, "- {digest}");
                let _ = writeln!(out, "    claimed signer: {}", a.did);
                let _ = writeln!(out, "    claimed record: {}", a.record_uri);
                let pds = a.claimed_pds.as_deref().unwrap_or("(none)");
                let _ = writeln!(out, "    claimed PDS:    {pds}");
            }
            Err(e) => {
                let digest = e
                    .artifact()
                    .map_or_else(|| "(digest unknown)".to_owned(), ToString::to_string);
                let _ = writeln!(out, "- {digest}");
                let _ = writeln!(out, "    unreadable: {}: {e}", e.code());
            }
        }
    }
    out
}
