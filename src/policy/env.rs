//! The implicit policy of the integration guide's Deployment: when `serve` has no
//! `--policy` and the environment sets `REQUIRE_SIGNATURE` and/or `TRUSTED_DIDS`
//! (`REQUIRE_SIGNATURE=true`, `TRUSTED_DIDS=did:plc:a,did:plc:b`), the trust policy is one
//! policy named `env` scoping every image (`**`):
//!
//! - `REQUIRE_SIGNATURE=true` (or unset): a signature by one of `TRUSTED_DIDS` is required
//!   (`minSignatures: 1`, `action: enforce`): an image without one is denied;
//! - `REQUIRE_SIGNATURE=false`: no signature is required (`require: [signature: false]`,
//!   `action: audit`): every image is admitted, its signatures by `TRUSTED_DIDS` reported.
//!
//! The policy is written as YAML (each DID a quoted string) and loaded with
//! [`TrustPolicy::from_yaml`], so the file checks apply: a malformed DID, or no DID when a
//! signature is required, is an error at start.

use super::{PolicyError, TrustPolicy};

/// Why the environment's policy cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvPolicyError {
    /// `REQUIRE_SIGNATURE` is neither `true` nor `false`.
    #[error("REQUIRE_SIGNATURE must be true or false, not {0:?}")]
    RequireSignature(String),
    /// The policy built from the environment does not pass the policy checks.
    #[error("the policy from REQUIRE_SIGNATURE/TRUSTED_DIDS is invalid: {0}")]
    Invalid(#[source] PolicyError),
}

/// The policy `REQUIRE_SIGNATURE` and `TRUSTED_DIDS` (comma-separated) describe, as YAML;
/// `None` when neither is set.
pub fn env_policy_yaml(
    require_signature: Option<&str>,
    trusted_dids: Option<&str>,
) -> Result<Option<String>, EnvPolicyError> {
    if require_signature.is_none() && trusted_dids.is_none() {
        return Ok(None);
    }
    let require = match require_signature.map(str::trim) {
        None => true,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(EnvPolicyError::RequireSignature(
                crate::syntax::text::outside(v),
            ));
        }
    };
    let dids: Vec<&str> = trusted_dids
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let mut yaml = String::from(
        "version: 1\ndefaults:\n  unmatched: deny\npolicies:\n  - name: env\n    scope: \"**\"\n",
    );
    if !dids.is_empty() || require {
        yaml.push_str("    trustedDIDs:");
        if dids.is_empty() {
            yaml.push_str(" []");
        }
        yaml.push('\n');
        for did in &dids {
            // A JSON string is a YAML string: whatever the variable holds stays one value.
            let quoted = serde_json::Value::from(*did).to_string();
            yaml.push_str(&format!("      - {quoted}\n"));
        }
    }
    if require {
        yaml.push_str(
            "    require:\n      - signature: true\n    minSignatures: 1\n    action: enforce\n",
        );
    } else {
        yaml.push_str("    require:\n      - signature: false\n    action: audit\n");
    }
    Ok(Some(yaml))
}

/// The policy `REQUIRE_SIGNATURE` and `TRUSTED_DIDS` describe (see the module docs); `None`
/// when neither is set.
pub fn env_policy(
    require_signature: Option<&str>,
    trusted_dids: Option<&str>,
) -> Result<Option<TrustPolicy>, EnvPolicyError> {
    env_policy_yaml(require_signature, trusted_dids)?
        .map(|yaml| TrustPolicy::from_yaml(&yaml).map_err(EnvPolicyError::Invalid))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
    const B: &str = "did:plc:ragtjsm2j2vknwkz3zp4oxrd";

    #[test]
    fn the_guides_environment_gives_one_enforcing_policy() {
        assert!(env_policy(None, None).unwrap().is_none());
        let dids = format!("{A}, {B}");
        let policy = env_policy(Some("true"), Some(&dids)).unwrap().unwrap();
        assert_eq!(policy.policies().len(), 1);
        let yaml = env_policy_yaml(Some("TRUE"), Some(&dids)).unwrap().unwrap();
        assert!(yaml.contains("scope: \"**\""), "{yaml}");
        assert!(
            yaml.contains(&format!("- \"{A}\"\n      - \"{B}\"")),
            "{yaml}"
        );
        assert!(yaml.contains("minSignatures: 1"), "{yaml}");
        assert!(yaml.contains("action: enforce"), "{yaml}");
        assert_eq!(policy.policies()[0].name(), "env");
        assert_eq!(policy.policies()[0].scope(), "**");
        let image = "registry.example.com/any/thing:v1".parse().unwrap();
        let explained = policy.explain(&image).to_string();
        assert!(explained.contains("env"), "{explained}");
        // Unset REQUIRE_SIGNATURE requires a signature too (fails closed).
        let yaml = env_policy_yaml(None, Some(A)).unwrap().unwrap();
        assert!(yaml.contains("action: enforce"), "{yaml}");
    }

    #[test]
    fn require_signature_false_admits_and_reports() {
        let yaml = env_policy_yaml(Some("false"), Some(A)).unwrap().unwrap();
        assert!(yaml.contains("signature: false"), "{yaml}");
        assert!(!yaml.contains("enforce"), "{yaml}");
        env_policy(Some("false"), Some(A)).unwrap().unwrap();
        env_policy(Some("false"), None).unwrap().unwrap();
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = env_policy(Some("yes please"), Some(A)).unwrap_err();
        assert!(e.to_string().contains("REQUIRE_SIGNATURE"), "{e}");
        let e = env_policy(Some("true"), Some("did:plc:a, not-a-did\n: x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid"), "{e}");
        // A signature required from nobody.
        assert!(env_policy(Some("true"), Some(" , ")).is_err());
    }
}
