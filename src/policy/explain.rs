//! `atcr-verify policy explain`: which policy applies to an image and what it requires.

use std::fmt;

use super::TrustPolicy;
use super::compile::Policy;
use super::duration::Human;
use super::eval::window_text;
use super::file::{Action, Unmatched};
use crate::syntax::ImageRef;

/// Which policy scopes an image (first match in file order), which later policies also match
/// but are not used, and what the applying policy requires. `Display` is the text the CLI
/// prints.
#[derive(Debug)]
pub struct Explanation<'a> {
    image: ImageRef,
    matched: Option<(usize, &'a Policy)>,
    shadowed: Vec<&'a Policy>,
    unmatched: Unmatched,
}

impl<'a> Explanation<'a> {
    pub(super) fn new(policy: &'a TrustPolicy, image: &ImageRef) -> Explanation<'a> {
        let name = image.name();
        let mut hits = policy
            .policies()
            .iter()
            .enumerate()
            .filter(|(_, p)| p.matches_name(&name));
        let matched = hits.next();
        Explanation {
            image: image.clone(),
            matched,
            shadowed: hits.map(|(_, p)| p).collect(),
            unmatched: policy.unmatched(),
        }
    }

    /// The policy that applies, if any.
    pub fn policy(&self) -> Option<&'a Policy> {
        self.matched.map(|(_, p)| p)
    }

    /// Later policies whose scope also matches but which first-match-wins leaves unused.
    pub fn shadowed(&self) -> &[&'a Policy] {
        &self.shadowed
    }
}

impl fmt::Display for Explanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image:    {}", self.image)?;
        writeln!(f, "name:     {}", self.image.name())?;
        let Some((index, p)) = self.matched else {
            writeln!(f, "policy:   none (no scope matches)")?;
            return match self.unmatched {
                Unmatched::Allow => writeln!(
                    f,
                    "result:   defaults.unmatched is allow: admitted without checks (action none)"
                ),
                Unmatched::Deny => writeln!(
                    f,
                    "result:   defaults.unmatched is deny: denied (action deny)"
                ),
            };
        };
        writeln!(
            f,
            "policy:   {} (policies[{index}], first match in file order)",
            p.name()
        )?;
        writeln!(f, "scope:    {}", p.scope())?;
        match p.action() {
            Action::Enforce => writeln!(f, "action:   enforce (denied when not verified)")?,
            Action::Audit => writeln!(
                f,
                "action:   audit (reported when not verified, never denied)"
            )?,
        }
        if p.requires_signature() {
            let n = p.trusted_dids().len();
            writeln!(
                f,
                "requires: signatures from at least {} of {n} trusted DID{}, each proven, \
                 within the DID's window at signing time and now",
                p.min_signatures(),
                if n == 1 { "" } else { "s" }
            )?;
        } else {
            writeln!(f, "requires: no signature (always verified)")?;
        }
        if let Some(age) = p.max_signature_age() {
            writeln!(
                f,
                "maxSignatureAge: {} (older signatures do not count)",
                Human(age)
            )?;
        }
        for t in p.trusted_dids() {
            write!(f, "  - {}", t.did())?;
            if let Some(label) = t.label() {
                write!(f, " ({label})")?;
            }
            writeln!(
                f,
                ": trusted {}",
                window_text(t.valid_from(), t.expires_at())
            )?;
            for key in t.pinned_keys() {
                writeln!(f, "      signing key pinned: {key}")?;
            }
        }
        if !self.shadowed.is_empty() {
            let names: Vec<&str> = self.shadowed.iter().map(|p| p.name()).collect();
            writeln!(
                f,
                "also matches (unused, first match wins): {}",
                names.join(", ")
            )?;
        }
        Ok(())
    }
}
