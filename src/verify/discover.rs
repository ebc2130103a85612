//! Discovery: which signature artifacts an image has, and what each claims — read through
//! the same registry source, caps and caches as a verification, with nothing proven.

use super::{Mode, Verifier, VerifyError};
use crate::resolve::{ArtifactResult, ManifestFact};
use crate::syntax::ImageRef;

/// The signature artifacts attached to an image, as the registry lists them (the Referrers
/// API, else the `sha256-<hex>` tag schema), each read and checked for shape but **not
/// proven**: the DID, record URI and PDS in them are claims.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The manifest the reference resolves to now (the signature subject).
    pub manifest: ManifestFact,
    /// Each listed artifact in listing order (at most `--max-pointers`): its claims, or why it
    /// could not be read.
    pub artifacts: Vec<ArtifactResult>,
}

impl Verifier {
    /// Lists the signature artifacts of `image` without proving any: what `oras discover
    /// --artifact-type application/vnd.atproto.signature.v1+json` shows, plus each artifact's
    /// claimed signer. An error when the image or its listing cannot be read.
    pub async fn discover(&self, image: &ImageRef) -> Result<Discovery, VerifyError> {
        let manifest = self.resolve(image).await?;
        let artifacts = match self
            .registry
            .artifacts(image, &manifest.digest, Mode::Load)
            .await
        {
            Some((Ok(list), _)) => list.as_ref().clone(),
            Some((Err(source), _)) => {
                return Err(VerifyError::Upstream {
                    context: "finding signatures in the registry",
                    source,
                });
            }
            None => return Err(VerifyError::Internal("a load gave no answer")),
        };
        Ok(Discovery {
            manifest,
            artifacts,
        })
    }
}
