//! The trust policy engine, rule by rule: loading the guide's file, located errors,
//! scope matching, verdicts, reloading, and the `policy check` / `policy explain` commands.

use std::path::Path;
use std::process::{Command, Output};

use atcr_verify::policy::{
    Action, Evidence, NotCounted, PolicyError, PolicyHolder, Proof, ReloadOutcome, TrustPolicy,
    Unmatched, Verdict, VerdictAction,
};
use atcr_verify::syntax::{Did, ImageRef, parse_datetime};
use serde_json::json;
use time::{Duration, OffsetDateTime};

const ALICE: &str = "did:plc:alice2222222222222222222";
const BOB: &str = "did:plc:bob222222222222222222222";
const CAROL: &str = "did:plc:carol2222222222222222222";
const EVE: &str = "did:plc:eve222222222222222222222";

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/policy/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn t(s: &str) -> OffsetDateTime {
    parse_datetime(s).unwrap()
}

fn did(s: &str) -> Did {
    s.parse().unwrap()
}

fn image(s: &str) -> ImageRef {
    s.parse().unwrap()
}

fn load(yaml: &str) -> TrustPolicy {
    TrustPolicy::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

mod loading {
    use super::*;

    #[test]
    fn the_guides_example_loads_unchanged() {
        let policy = TrustPolicy::load(fixture("guide.yaml")).unwrap();
        let names: Vec<&str> = policy.policies().iter().map(|p| p.name()).collect();
        assert_eq!(names, ["production-images", "dev-images", "staging-images"]);
        assert_eq!(policy.unmatched(), Unmatched::Allow);

        let [prod, dev, staging] = policy.policies() else {
            panic!("three policies")
        };
        assert_eq!(prod.scope(), "atcr.io/*/prod-*");
        assert!(prod.requires_signature());
        assert_eq!(prod.min_signatures(), 1);
        assert_eq!(prod.action(), Action::Enforce);
        assert_eq!(prod.max_signature_age(), None);

        assert!(!dev.requires_signature());
        assert_eq!(dev.min_signatures(), 0);
        assert_eq!(dev.action(), Action::Audit);
        assert!(dev.trusted_dids().is_empty());

        // minSignatures defaults to 1.
        assert_eq!(staging.min_signatures(), 1);
        let dids: Vec<&str> = staging
            .trusted_dids()
            .iter()
            .map(|d| d.did().as_str())
            .collect();
        assert_eq!(
            dids,
            ["did:plc:alice123", "did:plc:bob456", "did:plc:charlie789"]
        );

        // Windows come from the top-level map; a DID absent from it has an open window.
        let [alice, bob, charlie] = staging.trusted_dids() else {
            panic!("three DIDs")
        };
        assert_eq!(alice.label(), Some("Alice (DevOps Lead)"));
        assert_eq!(alice.valid_from(), Some(t("2024-01-01T00:00:00Z")));
        assert_eq!(alice.expires_at(), None);
        assert_eq!(bob.label(), Some("Bob (Security Team)"));
        assert_eq!(bob.valid_from(), Some(t("2024-06-01T00:00:00Z")));
        assert_eq!(bob.expires_at(), Some(t("2025-12-31T23:59:59Z")));
        assert_eq!(charlie.label(), None);
        assert_eq!(charlie.valid_from(), None);
        assert_eq!(charlie.expires_at(), None);

        // The guide's placeholder DIDs load, with one warning each.
        let warnings: Vec<String> = policy.warnings().iter().map(|w| w.to_string()).collect();
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        for (w, (did, line)) in warnings.iter().zip([
            ("did:plc:alice123", 10),
            ("did:plc:bob456", 11),
            ("did:plc:charlie789", 30),
        ]) {
            assert!(
                w.starts_with(&format!("{}:{line}:9: ", fixture("guide.yaml"))),
                "{w}"
            );
            assert!(
                w.contains(&format!("{did} is not a canonical did:plc")),
                "{w}"
            );
        }
    }

    #[test]
    fn the_example_policy_loads_without_warnings() {
        let path = format!("{}/policy/trust-policy.yaml", env!("CARGO_MANIFEST_DIR"));
        let policy = TrustPolicy::load(&path).unwrap();
        assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
        assert_eq!(policy.policies().len(), 3);
    }

    #[test]
    fn version_is_checked() {
        for ok in ["1", "1.0", "\"1\"", "\"1.0\"", "1.00"] {
            let yaml = format!("version: {ok}\n");
            assert!(TrustPolicy::from_yaml(&yaml).is_ok(), "{yaml}");
        }
        for bad in ["2", "1.1", "0", "-1", "\"v1\"", "true", "null", "[1]"] {
            let yaml = format!("version: {bad}\n");
            let e = TrustPolicy::from_yaml(&yaml).unwrap_err();
            let d = e.diagnostic().unwrap();
            assert_eq!(d.field.as_deref(), Some("version"), "{bad}: {e}");
            assert_eq!(
                d.location.map(|l| (l.line, l.column)),
                Some((1, 10)),
                "{bad}"
            );
        }
        let e = TrustPolicy::from_yaml("policies: []\n").unwrap_err();
        assert!(e.to_string().contains("missing field `version`"), "{e}");
    }

    const HEAD: &str = "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/*\n";

    /// (case, yaml, line, column, field, message fragment)
    #[test]
    fn bad_files_are_refused_with_line_column_and_field() {
        let ok_dids = format!("    trustedDIDs: [{ALICE}, {BOB}]\n");
        let alice_entry = format!("trustedDIDs.{ALICE}");
        let alice_from = format!("trustedDIDs.{ALICE}.validFrom");
        let alice_expiry = format!("trustedDIDs.{ALICE}.expiresAt");
        let cases: Vec<(&str, String, usize, usize, &str, &str)> = vec![
            (
                "unknown policy key",
                format!("{HEAD}{ok_dids}    colour: red\n"),
                6,
                5,
                "policies[0]",
                "unknown field `colour`",
            ),
            (
                "unknown top-level key",
                "version: 1\npolcies: []\n".into(),
                2,
                1,
                "",
                "unknown field `polcies`",
            ),
            (
                "unknown defaults key",
                "version: 1\ndefaults:\n  unmached: deny\n".into(),
                3,
                3,
                "defaults",
                "unknown field `unmached`",
            ),
            (
                "unknown trusted-DID key",
                format!("version: 1\ntrustedDIDs:\n  {ALICE}:\n    validUntil: x\n"),
                4,
                5,
                &alice_entry,
                "unknown field `validUntil`",
            ),
            (
                "unknown requirement",
                format!("{HEAD}{ok_dids}    require:\n      - sbom: true\n"),
                7,
                9,
                "policies[0].require[0]",
                "unknown field `sbom`",
            ),
            (
                "bad glob",
                format!("version: 1\npolicies:\n  - name: a\n    scope: \"atcr.io/[a\"\n{ok_dids}"),
                4,
                12,
                "policies[0].scope",
                "not a valid glob",
            ),
            (
                "misplaced **",
                format!("version: 1\npolicies:\n  - name: a\n    scope: atcr.io/app**\n{ok_dids}"),
                4,
                12,
                "policies[0].scope",
                "whole path component",
            ),
            (
                "scope without a registry",
                format!("version: 1\npolicies:\n  - name: a\n    scope: alice/*\n{ok_dids}"),
                4,
                12,
                "policies[0].scope",
                "not a registry host",
            ),
            (
                "scope with uppercase path",
                format!(
                    "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/Alice/*\n{ok_dids}"
                ),
                4,
                12,
                "policies[0].scope",
                "uppercase",
            ),
            (
                "scope with a tag",
                format!(
                    "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/app:latest\n{ok_dids}"
                ),
                4,
                12,
                "policies[0].scope",
                "tags are not part",
            ),
            (
                "bad DID in a policy",
                format!("{HEAD}    trustedDIDs: [{ALICE}, \"did:Foo:x\"]\n"),
                5,
                53,
                "policies[0].trustedDIDs[1]",
                "invalid DID \"did:Foo:x\"",
            ),
            (
                "bad DID as a map key",
                "version: 1\ntrustedDIDs:\n  alice: {}\n".into(),
                3,
                3,
                "trustedDIDs",
                "invalid DID \"alice\"",
            ),
            (
                "DID listed twice in the map",
                format!("version: 1\ntrustedDIDs:\n  {ALICE}: {{}}\n  {ALICE}: {{}}\n"),
                4,
                3,
                "trustedDIDs",
                "listed twice",
            ),
            (
                "DID listed twice in a policy",
                format!("{HEAD}    trustedDIDs:\n      - {ALICE}\n      - {ALICE}\n"),
                7,
                9,
                "policies[0].trustedDIDs[1]",
                "listed twice",
            ),
            (
                "minSignatures 0",
                format!("{HEAD}{ok_dids}    minSignatures: 0\n"),
                6,
                20,
                "policies[0].minSignatures",
                "must be at least 1, found 0",
            ),
            (
                "minSignatures negative",
                format!("{HEAD}{ok_dids}    minSignatures: -1\n"),
                6,
                20,
                "policies[0].minSignatures",
                "must be at least 1",
            ),
            (
                "minSignatures above the trusted-DID count",
                format!("{HEAD}{ok_dids}    minSignatures: 3\n"),
                6,
                20,
                "policies[0].minSignatures",
                "minSignatures is 3 but the policy trusts only 2 DIDs",
            ),
            (
                "signature required, no trusted DIDs",
                HEAD.into(),
                3,
                5,
                "policies[0].trustedDIDs",
                "needs at least one DID",
            ),
            (
                "signature required, empty trusted DIDs",
                format!("{HEAD}    trustedDIDs: []\n"),
                5,
                18,
                "policies[0].trustedDIDs",
                "needs at least one DID",
            ),
            (
                "validFrom after expiresAt",
                format!(
                    "version: 1\ntrustedDIDs:\n  {ALICE}:\n    validFrom: \"2025-01-01T00:00:00Z\"\n    expiresAt: \"2024-01-01T00:00:00Z\"\n"
                ),
                4,
                16,
                &alice_from,
                "is not before expiresAt",
            ),
            (
                "validFrom equal to expiresAt",
                format!(
                    "version: 1\ntrustedDIDs:\n  {ALICE}:\n    validFrom: \"2025-01-01T00:00:00Z\"\n    expiresAt: \"2025-01-01T00:00:00Z\"\n"
                ),
                4,
                16,
                &alice_from,
                "is not before expiresAt",
            ),
            (
                "bad datetime",
                format!("version: 1\ntrustedDIDs:\n  {ALICE}:\n    expiresAt: 2025-13-01\n"),
                4,
                16,
                &alice_expiry,
                "invalid datetime",
            ),
            (
                "duplicate policy names",
                format!("{HEAD}{ok_dids}  - name: a\n    scope: atcr.io/**\n{ok_dids}"),
                6,
                11,
                "policies[1].name",
                "duplicate policy name \"a\"",
            ),
            (
                "empty policy name",
                format!("version: 1\npolicies:\n  - name: \"\"\n    scope: atcr.io/*\n{ok_dids}"),
                3,
                11,
                "policies[0].name",
                "policy name is empty",
            ),
            (
                "unknown action",
                format!("{HEAD}{ok_dids}    action: block\n"),
                6,
                13,
                "policies[0].action",
                "unknown variant `block`, expected `audit` or `enforce`",
            ),
            (
                "unknown unmatched default",
                "version: 1\ndefaults:\n  unmatched: maybe\n".into(),
                3,
                14,
                "defaults.unmatched",
                "unknown variant `maybe`, expected `allow` or `deny`",
            ),
            (
                "duration without a unit",
                format!("{HEAD}{ok_dids}    maxSignatureAge: \"90\"\n"),
                6,
                22,
                "policies[0].maxSignatureAge",
                "time unit needed",
            ),
            (
                "duration in an unknown unit",
                format!("{HEAD}{ok_dids}    maxSignatureAge: 1fortnight\n"),
                6,
                22,
                "policies[0].maxSignatureAge",
                "unknown time unit",
            ),
            (
                "zero duration",
                format!("{HEAD}{ok_dids}    maxSignatureAge: 0d\n"),
                6,
                22,
                "policies[0].maxSignatureAge",
                "longer than zero",
            ),
            (
                "empty require list",
                format!("{HEAD}{ok_dids}    require: []\n"),
                6,
                14,
                "policies[0].require",
                "require is empty",
            ),
            (
                "signature required twice",
                format!(
                    "{HEAD}{ok_dids}    require:\n      - signature: true\n      - signature: false\n"
                ),
                7,
                7,
                "policies[0].require",
                "more than once",
            ),
            (
                "not YAML",
                format!("{HEAD}   trustedDIDs: [{ALICE}]\n"),
                5,
                4,
                "",
                "did not find expected",
            ),
        ];
        for (case, yaml, line, column, field, needle) in cases {
            let e = match TrustPolicy::from_yaml(&yaml) {
                Err(e) => e,
                Ok(_) => panic!("{case}: accepted\n{yaml}"),
            };
            let d = e.diagnostic().unwrap_or_else(|| panic!("{case}: {e:?}"));
            let got = (
                d.location.map(|l| (l.line, l.column)),
                d.field.as_deref().unwrap_or(""),
            );
            assert_eq!(got, (Some((line, column)), field), "{case}: {e}\n{yaml}");
            assert!(d.message.contains(needle), "{case}: {e}");
            // Messages are one lowercase line that starts with the location.
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("line {line}, column {column}: ")),
                "{case}: {text}"
            );
            assert!(!text.contains('\n'), "{case}: {text}");
        }
    }

    #[test]
    fn errors_from_a_file_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust-policy.yaml");
        std::fs::write(
            &path,
            "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/*\n    action: block\n",
        )
        .unwrap();
        let e = TrustPolicy::load(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:5:13: policies[0].action: unknown variant `block`, expected `audit` or `enforce`",
                path.display()
            )
        );
        let missing = dir.path().join("nope.yaml");
        let e = TrustPolicy::load(&missing).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("reading {}: ", missing.display()))
        );

        std::fs::write(&path, vec![b'#'; 1024 * 1024 + 1]).unwrap();
        let e = TrustPolicy::load(&path).unwrap_err();
        assert!(matches!(e, PolicyError::TooLarge { .. }), "{e:?}");

        std::fs::write(&path, b"version: 1\n# \xff\n").unwrap();
        let e = TrustPolicy::load(&path).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }

    #[test]
    fn warnings_flag_likely_mistakes_without_refusing() {
        let yaml = format!(
            "version: 1
policies:
  - name: every
    scope: \"**\"
    trustedDIDs: [{ALICE}]
  - name: after-catch-all
    scope: \"atcr.io*/x\"
    require: [{{signature: false}}]
    minSignatures: 1
    maxSignatureAge: 1d
trustedDIDs:
  {ALICE}: {{}}
  {BOB}: {{}}
  did:plc:short: {{}}
"
        );
        let policy = load(&yaml);
        let got: Vec<(String, String)> = policy
            .warnings()
            .iter()
            .map(|w| (w.field.clone().unwrap_or_default(), w.message.clone()))
            .collect();
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "policies[1].minSignatures",
                "policies[1].maxSignatureAge",
                "policies[1].scope",
                "policies[1].scope",
                &*format!("trustedDIDs.{BOB}"),
                "trustedDIDs.did:plc:short",
                "trustedDIDs.did:plc:short",
            ],
            "{got:#?}"
        );
        let messages: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
        assert!(messages[0].contains("has no effect"));
        assert!(messages[2].contains("mixes text and wildcards"));
        assert!(messages[3].contains("never used: policy \"every\""));
        assert!(messages[4].contains("not in any policy"));
        assert!(messages[5].contains("not a canonical did:plc"));
        assert!(messages[6].contains("not in any policy"));
    }

    #[test]
    fn require_also_accepts_a_plain_mapping() {
        let policy = load(
            "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/*\n    require: {signature: false}\n",
        );
        assert!(!policy.policies()[0].requires_signature());
    }
}

mod matching {
    use super::*;

    const FILE: &str = "version: 1
policies:
  - name: prod
    scope: atcr.io/*/prod-*
    trustedDIDs: [did:plc:alice2222222222222222222]
  - name: deep-prod
    scope: atcr.io/**/prod-*
    trustedDIDs: [did:plc:alice2222222222222222222]
  - name: atcr-port
    scope: atcr.io:5000/**
    trustedDIDs: [did:plc:alice2222222222222222222]
  - name: hub-official
    scope: index.docker.io/library/*
    trustedDIDs: [did:plc:alice2222222222222222222]
  - name: hub-alice
    scope: docker.io/alice/*
    trustedDIDs: [did:plc:alice2222222222222222222]
  - name: upper
    scope: GHCR.IO/acme/*
    trustedDIDs: [did:plc:alice2222222222222222222]
  - name: atcr-rest
    scope: atcr.io/**
    trustedDIDs: [did:plc:alice2222222222222222222]
";

    /// (image reference, policy that applies)
    #[test]
    fn first_match_in_file_order_on_the_normalized_name() {
        let policy = load(FILE);
        let digest = format!("sha256:{}", "ab".repeat(32));
        for (reference, expected) in [
            // `*` stays in one component, `**` crosses; file order decides.
            ("atcr.io/alice/prod-api", Some("prod")),
            ("atcr.io/alice/team/prod-api", Some("deep-prod")),
            ("atcr.io/prod-api", Some("deep-prod")),
            ("atcr.io/alice/dev-api", Some("atcr-rest")),
            ("atcr.io/x", Some("atcr-rest")),
            // Tags and digests are not part of the name.
            ("atcr.io/alice/prod-api:v1", Some("prod")),
            (&*format!("atcr.io/alice/prod-api@{digest}"), Some("prod")),
            (
                &*format!("atcr.io/alice/prod-api:v1@{digest}"),
                Some("prod"),
            ),
            // Docker Hub normalization, on both sides.
            ("nginx", Some("hub-official")),
            ("nginx:1.25", Some("hub-official")),
            ("docker.io/library/nginx", Some("hub-official")),
            ("index.docker.io/nginx", Some("hub-official")),
            ("registry-1.docker.io/library/nginx:1", Some("hub-official")),
            ("registry-1.docker.io:443/nginx", Some("hub-official")),
            ("index.docker.io:443/nginx", Some("hub-official")),
            ("docker.io:443/library/nginx", Some("hub-official")),
            ("registry-1.docker.io/alice/app", Some("hub-alice")),
            ("alice/app", Some("hub-alice")),
            ("docker.io/alice/app", Some("hub-alice")),
            ("bob/app", None),
            // Host confusion: a scope never matches more than its text says.
            ("atcr.io.evil.com/alice/prod-api", None),
            ("evilatcr.io/alice/prod-api", None),
            ("atcr.io.evil.com/x", None),
            ("atcr.io:5000/alice/prod-api", Some("atcr-port")),
            ("atcr.io:05000/alice/prod-api", Some("atcr-port")),
            ("atcr.io:4430/alice/prod-api", None),
            ("index.docker.io:5000/library/nginx", None),
            // The HTTPS port is the default: the same registry, so the same name.
            ("atcr.io:443/alice/prod-api", Some("prod")),
            ("ATCR.IO:0443/alice/prod-api:v1", Some("prod")),
            ("atcr.io:443/alice/dev-api", Some("atcr-rest")),
            ("localhost:5000/atcr.io/alice/prod-api", None),
            // Uppercase hosts are normalized, on both sides.
            ("ATCR.IO/alice/prod-api", Some("prod")),
            ("ghcr.io/acme/app", Some("upper")),
            ("Ghcr.Io/acme/app", Some("upper")),
            ("ghcr.io/acme/team/app", None),
        ] {
            let image = image(reference);
            let got = policy.matching(&image).map(|p| p.name());
            assert_eq!(got, expected, "{reference} (normalized {})", image.name());
            assert_eq!(policy.explain(&image).policy().map(|p| p.name()), expected);
        }
        // Uppercase in a repository path is refused, never silently unmatched.
        assert!("atcr.io/Alice/prod-api".parse::<ImageRef>().is_err());
    }

    /// Regression: `atcr.io:443/…` and `registry-1.docker.io/…` are the registries of
    /// `atcr.io/…` and `docker.io/…` to containerd, so they must not fall outside a scope
    /// (and, with `defaults.unmatched: allow`, be admitted without checks).
    #[test]
    fn registry_aliases_do_not_step_around_a_scope() {
        let policy = load(&format!(
            "version: 1
policies:
  - name: prod
    scope: atcr.io/*/prod-*
    trustedDIDs: [{ALICE}]
  - name: hub-official
    scope: docker.io/library/*
    trustedDIDs: [{ALICE}]
defaults:
  unmatched: allow
"
        ));
        for (reference, name, expected) in [
            (
                "atcr.io:443/acme/prod-api:v1",
                "atcr.io/acme/prod-api",
                "prod",
            ),
            ("ATCR.IO:443/acme/prod-api", "atcr.io/acme/prod-api", "prod"),
            (
                "atcr.io:0443/acme/prod-api",
                "atcr.io/acme/prod-api",
                "prod",
            ),
            (
                "registry-1.docker.io/library/nginx:1",
                "docker.io/library/nginx",
                "hub-official",
            ),
            (
                "registry-1.docker.io:443/library/nginx:1",
                "docker.io/library/nginx",
                "hub-official",
            ),
            (
                "registry-1.docker.io/nginx",
                "docker.io/library/nginx",
                "hub-official",
            ),
            (
                "index.docker.io:443/library/nginx",
                "docker.io/library/nginx",
                "hub-official",
            ),
        ] {
            let image = image(reference);
            assert_eq!(image.name(), name, "{reference}");
            assert_eq!(
                policy.matching(&image).map(|p| p.name()),
                Some(expected),
                "{reference}"
            );
            // Unsigned, it is judged by that policy and denied, not admitted as unmatched.
            let v = policy.evaluate(&image, &[], t("2025-01-01T00:00:00Z"));
            assert_eq!(v.policy.as_deref(), Some(expected), "{reference}");
            assert!(v.deny && !v.verified, "{reference}: {v:?}");
        }
        // Scopes written with an alias are the same scopes.
        let aliased = load(&format!(
            "version: 1
policies:
  - name: prod
    scope: atcr.io:443/*/prod-*
    trustedDIDs: [{ALICE}]
  - name: hub-official
    scope: registry-1.docker.io/library/*
    trustedDIDs: [{ALICE}]
"
        ));
        let [prod, hub] = aliased.policies() else {
            panic!("two policies")
        };
        assert_eq!(prod.scope(), "atcr.io/*/prod-*");
        assert_eq!(hub.scope(), "docker.io/library/*");
        for (reference, expected) in [
            ("atcr.io/acme/prod-api", "prod"),
            ("atcr.io:443/acme/prod-api", "prod"),
            ("nginx", "hub-official"),
            ("index.docker.io/library/nginx", "hub-official"),
        ] {
            assert_eq!(
                aliased.matching(&image(reference)).map(|p| p.name()),
                Some(expected),
                "{reference}"
            );
        }
    }

    #[test]
    fn explain_names_the_shadowed_policies() {
        let policy = load(FILE);
        let e = policy.explain(&image("atcr.io/alice/prod-api:v1"));
        let shadowed: Vec<&str> = e.shadowed().iter().map(|p| p.name()).collect();
        assert_eq!(shadowed, ["deep-prod", "atcr-rest"]);
        let text = e.to_string();
        assert!(
            text.contains("policy:   prod (policies[0], first match in file order)"),
            "{text}"
        );
        assert!(
            text.contains("also matches (unused, first match wins): deep-prod, atcr-rest"),
            "{text}"
        );
    }
}

mod verdicts {
    use super::*;

    /// Alice: trusted from 2024-01-01, open end. Bob: 2024-06-01 to 2025-01-01. Carol: only
    /// in policies (open window). Eve: never trusted.
    fn policy() -> TrustPolicy {
        load(&format!(
            "version: 1
policies:
  - name: prod
    scope: atcr.io/*/prod-*
    trustedDIDs: [{ALICE}, {BOB}, {CAROL}]
    maxSignatureAge: 90d
  - name: release
    scope: atcr.io/*/release-*
    trustedDIDs: [{ALICE}, {BOB}, {CAROL}]
    minSignatures: 2
  - name: audited
    scope: atcr.io/*/audit-*
    trustedDIDs: [{ALICE}]
    action: audit
  - name: dev
    scope: atcr.io/*/dev-*
    require:
      - signature: false
trustedDIDs:
  {ALICE}:
    name: Alice
    validFrom: \"2024-01-01T00:00:00Z\"
    expiresAt: null
  {BOB}:
    name: Bob
    validFrom: \"2024-06-01T00:00:00Z\"
    expiresAt: \"2025-01-01T00:00:00Z\"
"
        ))
    }

    fn sig(who: &str, signed_at: &str) -> Evidence {
        Evidence::verified(
            did(who),
            format!("at://{who}/io.atcr.manifest/x"),
            t(signed_at),
        )
    }

    fn eval(image_ref: &str, evidence: &[Evidence], now: &str) -> Verdict {
        policy().evaluate(&image(image_ref), evidence, t(now))
    }

    fn reasons(v: &Verdict) -> Vec<Option<String>> {
        v.signatures
            .iter()
            .map(|s| s.reason.as_ref().map(ToString::to_string))
            .collect()
    }

    const NOW: &str = "2024-12-01T00:00:00Z";
    const PROD: &str = "atcr.io/acme/prod-api:v1";

    /// (case, evidence, now, verified, per-signature reasons)
    #[test]
    #[allow(clippy::type_complexity)] // a table of cases
    fn which_signatures_count() {
        let failed = Evidence::failed(
            Some(did(ALICE)),
            Some("at://x/io.atcr.manifest/y".into()),
            "commit signature: signature does not verify",
        );
        let cases: Vec<(&str, Vec<Evidence>, &str, bool, Vec<Option<&str>>)> = vec![
            (
                "trusted, in window",
                vec![sig(ALICE, "2024-11-01T00:00:00Z")],
                NOW,
                true,
                vec![None],
            ),
            ("no signatures", vec![], NOW, false, vec![]),
            (
                "untrusted DID",
                vec![sig(EVE, "2024-11-01T00:00:00Z")],
                NOW,
                false,
                vec![Some("untrusted DID")],
            ),
            (
                "proof failed",
                vec![failed.clone()],
                NOW,
                false,
                vec![Some(
                    "proof failed: commit signature: signature does not verify",
                )],
            ),
            (
                "proof failed then a good one",
                vec![failed, sig(BOB, "2024-11-01T00:00:00Z")],
                NOW,
                true,
                vec![
                    Some("proof failed: commit signature: signature does not verify"),
                    None,
                ],
            ),
            // Window edges: [validFrom, expiresAt).
            (
                "signed exactly at validFrom",
                vec![sig(BOB, "2024-06-01T00:00:00Z")],
                "2024-07-01T00:00:00Z",
                true,
                vec![None],
            ),
            (
                "signed 1ns before validFrom",
                vec![sig(BOB, "2024-05-31T23:59:59.999999999Z")],
                "2024-07-01T00:00:00Z",
                false,
                vec![Some("outside validity window")],
            ),
            (
                "now exactly at expiresAt",
                vec![sig(BOB, "2024-12-01T00:00:00Z")],
                "2025-01-01T00:00:00Z",
                false,
                vec![Some("outside validity window")],
            ),
            (
                "now 1ns before expiresAt",
                vec![sig(BOB, "2024-12-01T00:00:00Z")],
                "2024-12-31T23:59:59.999999999Z",
                true,
                vec![None],
            ),
            (
                "signed in window, now after expiry",
                vec![sig(BOB, "2024-12-01T00:00:00Z")],
                "2025-01-02T00:00:00Z",
                false,
                vec![Some("outside validity window")],
            ),
            (
                "open window (DID only in the policy)",
                vec![sig(CAROL, "2000-01-01T00:00:00Z")],
                "2000-02-01T00:00:00Z",
                true,
                vec![None],
            ),
            // maxSignatureAge 90d: exactly 90 days counts, one second more does not.
            (
                "exactly maxSignatureAge old",
                vec![sig(ALICE, "2024-09-02T00:00:00Z")],
                NOW,
                true,
                vec![None],
            ),
            (
                "older than maxSignatureAge",
                vec![sig(ALICE, "2024-09-01T23:59:59Z")],
                NOW,
                false,
                vec![Some("too old")],
            ),
            // Post-dated signatures: within the 5-minute skew they count, beyond it not.
            (
                "signed 5 minutes ahead",
                vec![sig(ALICE, "2024-12-01T00:05:00Z")],
                NOW,
                true,
                vec![None],
            ),
            (
                "signed 6 minutes ahead",
                vec![sig(ALICE, "2024-12-01T00:06:00Z")],
                NOW,
                false,
                vec![Some("signed in the future")],
            ),
            (
                "duplicate DID counts once",
                vec![
                    sig(ALICE, "2024-11-01T00:00:00Z"),
                    sig(ALICE, "2024-11-02T00:00:00Z"),
                ],
                NOW,
                true,
                vec![None, Some("duplicate")],
            ),
            (
                "a stale signature does not block a fresh one from the same DID",
                vec![
                    sig(ALICE, "2024-01-01T00:00:00Z"),
                    sig(ALICE, "2024-11-02T00:00:00Z"),
                ],
                NOW,
                true,
                vec![Some("too old"), None],
            ),
            (
                "no signing time",
                vec![Evidence {
                    did: Some(did(ALICE)),
                    uri: None,
                    signed_at: None,
                    repository: None,
                    key: None,
                    proof: Proof::Verified,
                }],
                NOW,
                false,
                vec![Some("no signing time")],
            ),
            (
                "verified proof without a DID",
                vec![Evidence {
                    did: None,
                    uri: Some("at://?".into()),
                    signed_at: Some(t(NOW)),
                    repository: None,
                    key: None,
                    proof: Proof::Verified,
                }],
                NOW,
                false,
                vec![Some("proof failed: the evidence names no signer DID")],
            ),
        ];
        for (case, evidence, now, verified, expected) in cases {
            let v = eval(PROD, &evidence, now);
            assert_eq!(v.verified, verified, "{case}: {v:#?}");
            assert_eq!(
                v.deny, !verified,
                "{case}: enforce denies exactly when not verified"
            );
            assert_eq!(v.action, VerdictAction::Enforce, "{case}");
            assert_eq!(v.policy.as_deref(), Some("prod"), "{case}");
            let expected: Vec<Option<String>> =
                expected.into_iter().map(|r| r.map(str::to_owned)).collect();
            assert_eq!(reasons(&v), expected, "{case}");
            for s in &v.signatures {
                assert_eq!(s.counted, s.reason.is_none(), "{case}");
            }
            assert_eq!(v.reason.is_some(), !verified, "{case}: {:?}", v.reason);
        }
    }

    /// `changes_at` is the first instant a re-evaluation could differ: nothing changes
    /// before it, and something has changed soon after it.
    #[test]
    fn changes_at_is_the_next_time_boundary() {
        let cases: Vec<(&str, &str, Vec<Evidence>, Option<&str>)> = vec![
            // Bob's window ends 2025-01-01, before his signature is 90 days old.
            (
                "prod",
                "atcr.io/acme/prod-api:v1",
                vec![sig(BOB, "2024-12-01T00:00:00Z")],
                Some("2025-01-01T00:00:00Z"),
            ),
            // Alice's window is open: the 90-day age limit is the boundary.
            (
                "prod",
                PROD,
                vec![sig(ALICE, "2024-11-01T00:00:00Z")],
                Some("2025-01-30T00:00:00Z"),
            ),
            // Two signers: the earlier boundary.
            (
                "release",
                "atcr.io/acme/release-api:v1",
                vec![
                    sig(ALICE, "2024-11-01T00:00:00Z"),
                    sig(BOB, "2024-11-01T00:00:00Z"),
                ],
                Some("2025-01-01T00:00:00Z"),
            ),
            // Open window, no age limit, untrusted, unscoped, no signature required: never.
            (
                "release",
                "atcr.io/acme/release-api:v1",
                vec![sig(ALICE, "2024-11-01T00:00:00Z")],
                None,
            ),
            (
                "untrusted",
                PROD,
                vec![sig(EVE, "2024-11-01T00:00:00Z")],
                None,
            ),
            (
                "unscoped",
                "docker.io/library/nginx:1",
                vec![sig(ALICE, "2024-11-01T00:00:00Z")],
                None,
            ),
            ("dev", "atcr.io/acme/dev-api:v1", vec![], None),
            // Texts naming the current time change at once.
            (
                "too old",
                PROD,
                vec![sig(ALICE, "2024-09-01T00:00:00Z")],
                Some(NOW),
            ),
            (
                "post-dated",
                PROD,
                vec![sig(ALICE, "2024-12-01T00:06:00Z")],
                Some(NOW),
            ),
            (
                "expired now",
                PROD,
                vec![sig(BOB, "2024-12-01T00:00:00Z")],
                Some("2025-01-02T00:00:00Z"),
            ),
        ];
        for (case, image_ref, evidence, expected) in cases {
            let now = if case == "expired now" {
                "2025-01-02T00:00:00Z"
            } else {
                NOW
            };
            let verdict = eval(image_ref, &evidence, now);
            assert_eq!(verdict.changes_at, expected.map(t), "{case}");
            let Some(at) = verdict.changes_at.filter(|&at| at > t(now)) else {
                continue;
            };
            let same = |mut v: Verdict| {
                v.changes_at = None;
                v
            };
            let just_before = policy().evaluate(
                &image(image_ref),
                &evidence,
                at - time::Duration::nanoseconds(1),
            );
            assert_eq!(
                same(just_before),
                same(verdict.clone()),
                "{case}: changed before {at}"
            );
            let after = policy().evaluate(
                &image(image_ref),
                &evidence,
                at + time::Duration::seconds(1),
            );
            assert_ne!(
                after.verified, verdict.verified,
                "{case}: nothing changed at {at}"
            );
        }
    }

    #[test]
    fn distinct_dids_reach_min_signatures() {
        let release = "atcr.io/acme/release-1";
        let v = eval(
            release,
            &[
                sig(ALICE, "2024-11-01T00:00:00Z"),
                sig(ALICE, "2024-11-02T00:00:00Z"),
            ],
            NOW,
        );
        assert!(!v.verified);
        assert_eq!((v.required_signatures, v.counted_signatures), (2, 1));
        assert_eq!(
            v.reason.as_deref(),
            Some(&*format!(
                "policy \"release\" requires 2 signatures from its trusted DIDs, 1 counted: {ALICE}: duplicate"
            ))
        );
        let v = eval(
            release,
            &[
                sig(EVE, "2024-11-01T00:00:00Z"),
                sig(CAROL, "2024-11-01T00:00:00Z"),
                sig(ALICE, "2024-11-02T00:00:00Z"),
            ],
            NOW,
        );
        assert!(v.verified);
        assert_eq!((v.required_signatures, v.counted_signatures), (2, 2));
        // `did` and `signedAt` are those of the first signature that counted.
        assert_eq!(v.did, Some(did(CAROL)));
        assert_eq!(v.signed_at, Some(t("2024-11-01T00:00:00Z")));
        assert_eq!(v.reason, None);
    }

    #[test]
    fn audit_never_denies_and_says_so() {
        let v = eval(
            "atcr.io/acme/audit-x",
            &[sig(EVE, "2024-11-01T00:00:00Z")],
            NOW,
        );
        assert_eq!(v.action, VerdictAction::Audit);
        assert!(!v.verified);
        assert!(!v.deny);
        assert_eq!(
            v.reason.as_deref(),
            Some(&*format!(
                "policy \"audited\" requires 1 signature from its trusted DIDs, 0 counted: {EVE}: untrusted DID (action audit: reported, not denied)"
            ))
        );
        let v = eval("atcr.io/acme/audit-x", &[], NOW);
        assert!(!v.deny);
        assert!(
            v.reason
                .unwrap()
                .ends_with("no signatures found (action audit: reported, not denied)")
        );
        let v = eval(
            "atcr.io/acme/audit-x",
            &[sig(ALICE, "2024-11-01T00:00:00Z")],
            NOW,
        );
        assert!(v.verified && !v.deny && v.reason.is_none());
    }

    #[test]
    fn a_policy_without_a_signature_requirement_verifies() {
        let v = eval("atcr.io/acme/dev-x", &[], NOW);
        assert!(v.verified && !v.deny);
        assert_eq!(v.required_signatures, 0);
        assert_eq!(v.policy.as_deref(), Some("dev"));
        // Signatures are still reported; none is trusted by this policy.
        let v = eval(
            "atcr.io/acme/dev-x",
            &[sig(ALICE, "2024-11-01T00:00:00Z")],
            NOW,
        );
        assert!(v.verified);
        assert_eq!(reasons(&v), [Some("untrusted DID".to_owned())]);
    }

    #[test]
    fn unmatched_images_follow_defaults() {
        let base = format!(
            "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/*\n    trustedDIDs: [{ALICE}]\n"
        );
        for (defaults, verified, deny, action) in [
            ("", true, false, VerdictAction::None),
            (
                "defaults:\n  unmatched: allow\n",
                true,
                false,
                VerdictAction::None,
            ),
            (
                "defaults:\n  unmatched: deny\n",
                false,
                true,
                VerdictAction::Deny,
            ),
        ] {
            let policy = load(&format!("{base}{defaults}"));
            let v = policy.evaluate(
                &image("nginx"),
                &[sig(ALICE, "2024-11-01T00:00:00Z")],
                t(NOW),
            );
            assert_eq!(
                (v.verified, v.deny, v.action),
                (verified, deny, action),
                "{defaults}"
            );
            assert_eq!(v.policy, None);
            assert_eq!(v.did, None);
            assert_eq!(reasons(&v), [Some("no matching policy".to_owned())]);
            assert_eq!(v.required_signatures, 0);
            if deny {
                assert_eq!(
                    v.reason.as_deref(),
                    Some("no policy scopes docker.io/library/nginx and defaults.unmatched is deny")
                );
            } else {
                assert_eq!(v.reason, None);
            }
        }
    }

    #[test]
    fn verdict_json_has_the_documented_shape() {
        let v = eval(
            PROD,
            &[
                sig(EVE, "2024-11-01T00:00:00Z"),
                sig(ALICE, "2024-11-02T03:04:05Z"),
                Evidence::failed(
                    None,
                    Some("at://bad/io.atcr.manifest/z".into()),
                    "signer DID \"x\" is invalid",
                ),
            ],
            NOW,
        );
        let value = serde_json::to_value(&v).unwrap();
        assert_eq!(
            value,
            json!({
                "image": "atcr.io/acme/prod-api:v1",
                "verified": true,
                "deny": false,
                "policy": "prod",
                "action": "enforce",
                "did": ALICE,
                "signedAt": "2024-11-02T03:04:05Z",
                "requiredSignatures": 1,
                "countedSignatures": 1,
                "signatures": [
                    {
                        "did": EVE,
                        "uri": format!("at://{EVE}/io.atcr.manifest/x"),
                        "signedAt": "2024-11-01T00:00:00Z",
                        "counted": false,
                        "reason": "untrusted DID",
                        "detail": null
                    },
                    {
                        "did": ALICE,
                        "uri": format!("at://{ALICE}/io.atcr.manifest/x"),
                        "signedAt": "2024-11-02T03:04:05Z",
                        "counted": true,
                        "reason": null,
                        "detail": null
                    },
                    {
                        "did": null,
                        "uri": "at://bad/io.atcr.manifest/z",
                        "signedAt": null,
                        "counted": false,
                        "reason": "proof failed: signer DID \"x\" is invalid",
                        "detail": null
                    }
                ],
                "omittedSignatures": 0,
                "reason": null
            })
        );
        // A denial carries its one-line reason and the per-signature detail.
        let v = eval(
            PROD,
            &[sig(BOB, "2024-12-01T00:00:00Z")],
            "2025-02-01T00:00:00Z",
        );
        let value = serde_json::to_value(&v).unwrap();
        assert_eq!(value["deny"], true);
        assert_eq!(value["did"], serde_json::Value::Null);
        assert_eq!(value["signatures"][0]["reason"], "outside validity window");
        assert_eq!(
            value["signatures"][0]["detail"],
            format!(
                "{BOB} is trusted from 2024-06-01T00:00:00Z until 2025-01-01T00:00:00Z (exclusive); now is 2025-02-01T00:00:00Z"
            )
        );
        assert_eq!(
            value["reason"],
            format!(
                "policy \"prod\" requires 1 signature from its trusted DIDs, 0 counted: {BOB}: outside validity window"
            )
        );
        let v = eval(PROD, &[sig(ALICE, "2024-01-01T00:00:00Z")], NOW);
        assert_eq!(
            v.signatures[0].detail.as_deref(),
            Some("signed 335d ago, maxSignatureAge is 90d")
        );
        assert_eq!(v.signatures[0].reason, Some(NotCounted::TooOld));
    }

    #[test]
    fn evaluation_is_pure() {
        let p = policy();
        let evidence = [sig(ALICE, "2024-11-01T00:00:00Z")];
        let a = p.evaluate(&image(PROD), &evidence, t(NOW));
        let b = p.evaluate(&image(PROD), &evidence, t(NOW));
        assert_eq!(a, b);
        let later = t(NOW) + Duration::days(365);
        assert!(!p.evaluate(&image(PROD), &evidence, later).verified);
    }
}

mod reload {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn policy_named(name: &str) -> String {
        format!(
            "version: 1\npolicies:\n  - name: {name}\n    scope: atcr.io/**\n    trustedDIDs: [{ALICE}]\n"
        )
    }

    const BAD: &str =
        "version: 1\npolicies:\n  - name: broken\n    scope: atcr.io/**\n    minSignatures: 0\n";

    fn current_name(h: &PolicyHolder) -> String {
        h.current().policies()[0].name().to_owned()
    }

    fn counts(h: &PolicyHolder) -> (u64, u64) {
        let s = h.reload_stats();
        (s.successes, s.failures)
    }

    #[test]
    fn edits_reload_and_a_bad_edit_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust-policy.yaml");
        std::fs::write(&path, policy_named("one")).unwrap();
        let holder = PolicyHolder::watch_file(&path).unwrap();
        assert_eq!(holder.path(), Some(path.as_path()));
        assert_eq!(current_name(&holder), "one");
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Unchanged
        ));
        assert_eq!(counts(&holder), (0, 0));

        std::fs::write(&path, policy_named("two")).unwrap();
        let snapshot = holder.current();
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Reloaded
        ));
        assert_eq!(current_name(&holder), "two");
        // A snapshot taken before the reload is unchanged (evaluations in flight keep theirs).
        assert_eq!(snapshot.policies()[0].name(), "one");
        assert_eq!(counts(&holder), (1, 0));

        std::fs::write(&path, BAD).unwrap();
        match holder.reload_if_changed() {
            ReloadOutcome::Failed(e) => {
                assert!(e.to_string().contains("policies[0].minSignatures"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(current_name(&holder), "two");
        assert_eq!(counts(&holder), (1, 1));
        let last = holder.reload_stats().last_error.unwrap();
        assert!(
            last.starts_with(&format!("{}:5:20: ", path.display())),
            "{last}"
        );
        // The same bad content is not re-counted on every tick.
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Unchanged
        ));
        assert_eq!(counts(&holder), (1, 1));

        // The file disappears: a failure, counted once, and the policy stays.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Failed(PolicyError::Read { .. })
        ));
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Unchanged
        ));
        assert_eq!(counts(&holder), (1, 2));
        assert_eq!(current_name(&holder), "two");

        std::fs::write(&path, policy_named("three")).unwrap();
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Reloaded
        ));
        assert_eq!(current_name(&holder), "three");
        assert_eq!(counts(&holder), (2, 2));
        assert_eq!(holder.reload_stats().last_error, None);
    }

    /// A ConfigMap volume: `trust-policy.yaml -> ..data/trust-policy.yaml`,
    /// `..data -> ..<timestamp>`; an update writes a new timestamped directory and renames a
    /// new `..data` symlink over the old one. The file itself is never written.
    #[cfg(unix)]
    #[test]
    fn a_configmap_data_symlink_swap_is_caught() {
        use std::os::unix::fs::symlink;

        fn version(dir: &Path, stamp: &str, content: &str) {
            let d = dir.join(stamp);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("trust-policy.yaml"), content).unwrap();
        }
        fn swap(dir: &Path, stamp: &str) {
            let tmp = dir.join("..data_tmp");
            symlink(stamp, &tmp).unwrap();
            std::fs::rename(&tmp, dir.join("..data")).unwrap();
        }

        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path();
        version(mount, "..2026_01_01_00_00_00.1", &policy_named("one"));
        symlink("..2026_01_01_00_00_00.1", mount.join("..data")).unwrap();
        symlink("..data/trust-policy.yaml", mount.join("trust-policy.yaml")).unwrap();

        let holder = PolicyHolder::watch_file(mount.join("trust-policy.yaml")).unwrap();
        assert_eq!(current_name(&holder), "one");

        version(mount, "..2026_01_02_00_00_00.2", &policy_named("two"));
        swap(mount, "..2026_01_02_00_00_00.2");
        std::fs::remove_dir_all(mount.join("..2026_01_01_00_00_00.1")).unwrap();
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Reloaded
        ));
        assert_eq!(current_name(&holder), "two");

        // A bad ConfigMap update keeps the last good policy.
        version(mount, "..2026_01_03_00_00_00.3", BAD);
        swap(mount, "..2026_01_03_00_00_00.3");
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Failed(_)
        ));
        assert_eq!(current_name(&holder), "two");

        // A swap to identical content is not a reload.
        version(mount, "..2026_01_04_00_00_00.4", &policy_named("four"));
        swap(mount, "..2026_01_04_00_00_00.4");
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Reloaded
        ));
        version(mount, "..2026_01_05_00_00_00.5", &policy_named("four"));
        swap(mount, "..2026_01_05_00_00_00.5");
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Unchanged
        ));
        assert_eq!(current_name(&holder), "four");
        assert_eq!(counts(&holder), (2, 1));
    }

    #[test]
    fn a_bad_initial_file_is_an_error_and_a_fixed_policy_never_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, BAD).unwrap();
        assert!(PolicyHolder::watch_file(&path).is_err());
        let holder = PolicyHolder::new(load(&policy_named("fixed")));
        assert!(matches!(
            holder.reload_if_changed(),
            ReloadOutcome::Unchanged
        ));
        assert_eq!(holder.path(), None);
        assert_eq!(current_name(&holder), "fixed");
    }

    #[test]
    fn readers_never_wait_for_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, policy_named("p0")).unwrap();
        let holder = Arc::new(PolicyHolder::watch_file(&path).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (holder, stop) = (holder.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let p = holder.current();
                        let v = p.evaluate(&image("atcr.io/x"), &[], OffsetDateTime::UNIX_EPOCH);
                        assert!(v.policy.unwrap().starts_with('p'));
                        seen += 1;
                    }
                    seen
                })
            })
            .collect();
        for i in 1..=20 {
            std::fs::write(&path, policy_named(&format!("p{i}"))).unwrap();
            assert!(matches!(
                holder.reload_if_changed(),
                ReloadOutcome::Reloaded
            ));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        assert_eq!(current_name(&holder), "p20");
        assert_eq!(counts(&holder), (20, 0));
    }
}

mod cli {
    use super::*;

    fn run(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
            .args(args)
            .output()
            .expect("running atcr-verify")
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn check_exits_0_on_a_valid_file_with_warnings_on_stderr() {
        let guide = fixture("guide.yaml");
        let out = run(&["policy", "check", &guide]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("{guide}: valid, 3 policies, 3 warnings, unmatched images: allow\n")
        );
        let stderr = text(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 3, "{stderr}");
        assert!(
            lines[0].starts_with(&format!(
                "warning: {guide}:10:9: policies[0].trustedDIDs[0]: did:plc:alice123"
            )),
            "{stderr}"
        );

        let example = format!("{}/policy/trust-policy.yaml", env!("CARGO_MANIFEST_DIR"));
        let out = run(&["policy", "check", &example]);
        assert_eq!(out.status.code(), Some(0));
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    }

    #[test]
    fn check_exits_1_on_an_invalid_file_and_2_on_an_unreadable_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/*\n    trustedDIDs: [did:plc:x]\n    minSignatures: 2\n").unwrap();
        let out = run(&["policy", "check", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        assert_eq!(
            text(&out.stderr),
            format!(
                "error: {}:6:20: policies[0].minSignatures: minSignatures is 2 but the policy trusts only 1 DID, so it could never be met\n",
                path.display()
            )
        );
        let missing = dir.path().join("missing.yaml");
        let out = run(&["policy", "check", missing.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains("missing.yaml"));
    }

    /// Every rule a file breaks is reported at once, in file order, so a policy author
    /// fixes them in one pass.
    #[test]
    fn check_reports_every_error_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        let did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
        std::fs::write(
            &path,
            format!(
                "version: 1\n\
                 trustedDIDs:\n  {did}:\n    validFrom: \"2026-02-01T00:00:00Z\"\n    expiresAt: \"2026-01-01T00:00:00Z\"\n\
                 policies:\n  - name: a\n    scope: atcr.io/*\n    trustedDIDs: [{did}, {did}]\n\
                 \x20 - name: a\n    scope: atcr.io/**\n    trustedDIDs: [{did}]\n    minSignatures: 2\n"
            ),
        )
        .unwrap();
        let out = run(&["policy", "check", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = text(&out.stderr);
        let fields: Vec<&str> = stderr
            .lines()
            .map(|l| {
                assert!(l.starts_with(&format!("error: {}:", path.display())), "{l}");
                l.split(": ").nth(2).unwrap()
            })
            .collect();
        assert_eq!(
            fields,
            [
                format!("trustedDIDs.{did}.validFrom"),
                "policies[0].trustedDIDs[1]".to_owned(),
                "policies[1].name".to_owned(),
                "policies[1].minSignatures".to_owned(),
            ],
            "{stderr}"
        );
        // The library error holds them all, and shows them on one line.
        let e = TrustPolicy::load(&path).unwrap_err();
        assert_eq!(e.diagnostics().len(), 4);
        assert!(!e.to_string().contains('\n') && e.to_string().matches("; ").count() >= 3);
    }

    #[test]
    fn explain_prints_the_policy_and_its_requirements() {
        let guide = fixture("guide.yaml");
        let out = run(&["policy", "explain", &guide, "atcr.io/alice/prod-api:v1"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            "image:    atcr.io/alice/prod-api:v1
name:     atcr.io/alice/prod-api
policy:   production-images (policies[0], first match in file order)
scope:    atcr.io/*/prod-*
action:   enforce (denied when not verified)
requires: signatures from at least 1 of 2 trusted DIDs, each proven, within the DID's window at signing time and now
  - did:plc:alice123 (Alice (DevOps Lead)): trusted from 2024-01-01T00:00:00Z (no expiry)
  - did:plc:bob456 (Bob (Security Team)): trusted from 2024-06-01T00:00:00Z until 2025-12-31T23:59:59Z (exclusive)
"
        );
        let out = run(&["policy", "explain", &guide, "atcr.io/alice/dev-tools"]);
        let stdout = text(&out.stdout);
        assert!(stdout.contains("policy:   dev-images"), "{stdout}");
        assert!(
            stdout.contains("action:   audit (reported when not verified, never denied)"),
            "{stdout}"
        );
        assert!(
            stdout.contains("requires: no signature (always verified)"),
            "{stdout}"
        );

        let out = run(&["policy", "explain", &guide, "nginx"]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            text(&out.stdout),
            "image:    docker.io/library/nginx
name:     docker.io/library/nginx
policy:   none (no scope matches)
result:   defaults.unmatched is allow: admitted without checks (action none)
"
        );
    }

    #[test]
    fn explain_shows_registry_aliases_under_their_one_name() {
        let guide = fixture("guide.yaml");
        let out = run(&["policy", "explain", &guide, "atcr.io:443/acme/prod-api:v1"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with(
                "image:    atcr.io/acme/prod-api:v1
name:     atcr.io/acme/prod-api
policy:   production-images (policies[0], first match in file order)
scope:    atcr.io/*/prod-*
action:   enforce (denied when not verified)
"
            ),
            "{stdout}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.yaml");
        std::fs::write(
            &path,
            format!(
                "version: 1
policies:
  - name: hub-official
    scope: docker.io/library/*
    trustedDIDs: [{ALICE}]
defaults:
  unmatched: allow
"
            ),
        )
        .unwrap();
        let out = run(&[
            "policy",
            "explain",
            path.to_str().unwrap(),
            "registry-1.docker.io/library/nginx:1",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with(
                "image:    docker.io/library/nginx:1
name:     docker.io/library/nginx
policy:   hub-official (policies[0], first match in file order)
scope:    docker.io/library/*
"
            ),
            "{stdout}"
        );
    }

    #[test]
    fn explain_exits_2_on_bad_input() {
        let guide = fixture("guide.yaml");
        for (args, needle) in [
            (
                vec!["policy", "explain", &*guide, "atcr.io/Alice/app"],
                "must be lowercase",
            ),
            (
                vec!["policy", "explain", &*guide, "atcr.io/app@sha256:abc"],
                "digest",
            ),
            (
                vec!["policy", "explain", "/nonexistent/p.yaml", "nginx"],
                "/nonexistent/p.yaml",
            ),
            (vec!["policy", "explain", &*guide], "IMAGE_REF"),
            (vec!["policy", "lint", &*guide], "lint"),
        ] {
            let out = run(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            assert!(out.stdout.is_empty(), "{args:?}");
            let stderr = text(&out.stderr);
            assert!(stderr.contains(needle), "{args:?}: {stderr}");
        }
    }
}

mod properties {
    //! No input panics the parsers, and normalization is a fixed point.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn image_refs_never_panic(s in "[a-zA-Z0-9./:@_\\[\\]-]{0,80}") {
            let _ = s.parse::<ImageRef>();
        }

        #[test]
        fn normalized_refs_parse_back_to_themselves(
            s in "(([a-zA-Z0-9]{1,5}\\.)?[a-z0-9]{1,8}(:[1-9][0-9]{0,3})?/)?[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?(/[a-z0-9]{1,6}){0,2}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,10})?"
        ) {
            let r: ImageRef = s.parse().unwrap();
            let again: ImageRef = r.to_string().parse().unwrap();
            prop_assert_eq!(&again, &r);
            prop_assert_eq!(again.to_string(), r.to_string());
            prop_assert!(r.name().starts_with(r.registry()));
        }

        #[test]
        fn policy_text_never_panics(s in "[ -~\n]{0,200}") {
            let _ = TrustPolicy::from_yaml(&s);
        }

        #[test]
        fn scopes_never_panic_and_match_only_their_registry(
            host in "[a-z]{1,6}\\.io",
            path in "[a-z*?/]{1,12}",
            other in "[a-z]{1,6}\\.[a-z]{1,3}",
            repo in "[a-z]{1,6}(/[a-z]{1,6}){0,2}",
        ) {
            let yaml = format!(
                "version: 1\npolicies:\n  - name: a\n    scope: \"{host}/{path}\"\n    require: [{{signature: false}}]\n"
            );
            if let Ok(policy) = TrustPolicy::from_yaml(&yaml) {
                let image: ImageRef = format!("{other}/{repo}").parse().unwrap();
                if image.registry() != host {
                    prop_assert!(policy.matching(&image).is_none(), "{} matched {}/{}", image, host, path);
                }
            }
        }
    }
}

mod pinning {
    //! `keys:` in the top-level `trustedDIDs` map: only signatures proven under a pinned key
    //! count for that DID.
    use super::*;
    use crate::common::repo::Signer;

    const NOW: &str = "2026-06-01T00:00:00Z";
    const PROD: &str = "atcr.io/acme/prod-api:v1";

    fn policy(keys: &str) -> String {
        format!(
            "version: 1
policies:
  - name: prod
    scope: atcr.io/*/prod-*
    trustedDIDs: [{ALICE}, {BOB}]
trustedDIDs:
  {ALICE}:
    name: Alice
    keys: {keys}
"
        )
    }

    fn signed(who: &str, key: Option<String>) -> Evidence {
        let e = Evidence::verified(
            did(who),
            format!("at://{who}/io.atcr.manifest/x"),
            t("2026-05-01T00:00:00Z"),
        );
        match key {
            Some(k) => e.with_key(k),
            None => e,
        }
    }

    #[test]
    fn only_a_pinned_key_counts_for_its_did() {
        let (pinned, p256, other) = (Signer::k256(1), Signer::p256(2), Signer::k256(3));
        let p = load(&policy(&format!(
            "[{}, {}]",
            pinned.did_key(),
            p256.did_key()
        )));
        let alice = p.policies()[0].trusted(&did(ALICE)).unwrap();
        assert_eq!(alice.pinned_keys(), [pinned.did_key(), p256.did_key()]);
        let eval = |e: Evidence| p.evaluate(&image(PROD), &[e], t(NOW));

        for key in [pinned.did_key(), p256.did_key()] {
            let v = eval(signed(ALICE, Some(key.clone())));
            assert!(v.verified, "{key}: {:?}", v.reason);
        }
        let v = eval(signed(ALICE, Some(other.did_key())));
        assert!(!v.verified);
        let s = &v.signatures[0];
        assert_eq!(s.reason, Some(NotCounted::UnpinnedKey));
        assert_eq!(s.reason.as_ref().unwrap().to_string(), "unpinned key");
        let detail = s.detail.as_deref().unwrap();
        assert_eq!(
            detail,
            format!(
                "signed under {}; the policy pins these keys for {ALICE}: {}, {}",
                other.did_key(),
                pinned.did_key(),
                p256.did_key()
            )
        );
        assert!(v.reason.unwrap().contains("unpinned key"));
        // Evidence without its key cannot show it was a pinned one.
        let v = eval(signed(ALICE, None));
        assert_eq!(v.signatures[0].reason, Some(NotCounted::UnpinnedKey));
        assert!(
            v.signatures[0]
                .detail
                .as_deref()
                .unwrap()
                .starts_with("the proof names no signing key"),
            "{v:?}"
        );
        // Bob pins nothing: his document's key counts, whichever it is.
        assert!(eval(signed(BOB, Some(other.did_key()))).verified);
        assert!(eval(signed(BOB, None)).verified);
    }

    #[test]
    fn many_pinned_keys_are_named_within_the_detail_bound() {
        let keys: Vec<String> = (1..=16).map(|n| Signer::k256(n).did_key()).collect();
        let p = load(&policy(&format!("[{}]", keys.join(", "))));
        let v = p.evaluate(
            &image(PROD),
            &[signed(ALICE, Some(Signer::k256(99).did_key()))],
            t(NOW),
        );
        let detail = v.signatures[0].detail.as_deref().unwrap();
        assert!(detail.ends_with(" and 13 more"), "{detail}");
        assert!(detail.len() <= atcr_verify::policy::MAX_DETAIL_BYTES);
    }

    /// A key as a P-256 did:key in uncompressed form is the same key: compared canonically.
    #[test]
    fn keys_are_compared_in_canonical_form() {
        let signer = Signer::p256(5);
        let atcr_verify::crypto::PublicKey::P256(key) = signer.public() else {
            panic!("p256")
        };
        let mut bytes = vec![0x80, 0x24];
        bytes.extend_from_slice(key.to_encoded_point(false).as_bytes());
        let uncompressed = format!(
            "did:key:{}",
            multibase::encode(multibase::Base::Base58Btc, bytes)
        );
        assert_ne!(uncompressed, signer.did_key());
        let p = load(&policy(&format!("[{uncompressed}]")));
        let v = p.evaluate(
            &image(PROD),
            &[signed(ALICE, Some(signer.did_key()))],
            t(NOW),
        );
        assert!(v.verified, "{:?}", v.reason);
        let other = Signer::p256(6).did_key();
        let v = p.evaluate(&image(PROD), &[signed(ALICE, Some(other))], t(NOW));
        assert_eq!(v.signatures[0].reason, Some(NotCounted::UnpinnedKey));
    }

    fn check(yaml: &str) -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, yaml).unwrap();
        let (code, _, stderr) = crate::common::cli(&["policy", "check", path.to_str().unwrap()]);
        (code, stderr.replace(&path.display().to_string(), "p.yaml"))
    }

    #[test]
    fn policy_check_validates_the_keys() {
        let good = Signer::k256(1).did_key();
        let (code, stderr) = check(&policy(&format!("[{good}]")));
        assert_eq!(code, 0, "{stderr}");

        for (keys, expected) in [
            (
                "[did:key:zNotBase58!]".to_owned(),
                format!(
                    "error: p.yaml:9:12: trustedDIDs.{ALICE}.keys[0]: public key \"zNotBase58!\" is \
                     not base58btc multibase (expected a leading 'z') (expected did:key:z… of a \
                     K-256 or P-256 public key)\n"
                ),
            ),
            (
                format!("[{good}, {}]", good.replace("did:key:", "")),
                format!(
                    "trustedDIDs.{ALICE}.keys[1]: {:?} is not a did:key",
                    good.replace("did:key:", "")
                ),
            ),
            (
                "[]".to_owned(),
                format!("error: p.yaml:9:11: trustedDIDs.{ALICE}.keys: keys is empty"),
            ),
            (
                format!("[{good}, {good}]"),
                format!("trustedDIDs.{ALICE}.keys[1]: {good} is listed twice in {ALICE}'s keys"),
            ),
            (
                // An Ed25519 did:key (multicodec 0xed01) is not an ATProto signing key.
                "[did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK]".to_owned(),
                format!(
                    "trustedDIDs.{ALICE}.keys[0]: public key multicodec prefix ed01 is not \
                     secp256k1 (e701) or P-256 (8024)"
                ),
            ),
        ] {
            let (code, stderr) = check(&policy(&keys));
            assert_eq!(code, 1, "{keys}: {stderr}");
            assert!(
                stderr.contains(&expected),
                "{keys}:\n{stderr}\nexpected: {expected}"
            );
        }
        let many: Vec<String> = (1..=17).map(|n| Signer::k256(n).did_key()).collect();
        let (code, stderr) = check(&policy(&format!("[{}]", many.join(", "))));
        assert_eq!(code, 1);
        assert!(
            stderr.contains("17 keys pinned for did:plc:alice2222222222222222222, at most 16"),
            "{stderr}"
        );
    }

    #[test]
    fn explain_shows_the_pinned_keys() {
        let key = Signer::k256(1).did_key();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, policy(&format!("[{key}]"))).unwrap();
        let (code, out, err) =
            crate::common::cli(&["policy", "explain", path.to_str().unwrap(), PROD]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!(
                "  - {ALICE} (Alice): trusted always\n      signing key pinned: {key}\n  - {BOB}"
            )),
            "{out}"
        );
    }
}
