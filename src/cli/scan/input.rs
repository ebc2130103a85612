//! What `scan` reads (pure, no I/O): `kubectl get pods -A -o json` output (a `v1` `List` or
//! `PodList` of Pods) or plain image references one a line, turned into the distinct images
//! to verify and how many pods use each.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::syntax::ImageRef;
use crate::syntax::text::inert;

/// Largest input read, in bytes (a `kubectl get pods -A -o json` of ~10 000 pods).
pub const MAX_INPUT_BYTES: usize = 64 * 1024 * 1024;
/// Most distinct images one scan verifies; a larger input is refused, not cut.
pub const MAX_IMAGES: usize = 10_000;
/// Longest spelling of a bad reference kept to report it.
const MAX_SHOWN: usize = 256;

/// Why the input cannot be scanned (exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Over [`MAX_INPUT_BYTES`].
    #[error("input is over {MAX_INPUT_BYTES} bytes")]
    TooLarge,
    /// Not UTF-8.
    #[error("input is not UTF-8 text")]
    NotText,
    /// JSON, but not a list of Pods.
    #[error(
        "input starts with '{{' but is not `kubectl get pods -o json` output (a v1 List or PodList of Pods): {0}"
    )]
    NotPodList(String),
    /// Over [`MAX_IMAGES`].
    #[error("input names more than {MAX_IMAGES} distinct images")]
    TooManyImages,
}

/// One distinct image of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The reference as verified (normalized), or the input's spelling when it does not
    /// parse (made inert).
    pub name: String,
    /// The parsed reference, or why the spelling is not one.
    pub image: Result<ImageRef, String>,
    /// The pods using it (by namespace/name); empty for a list of references.
    pub pods: BTreeSet<usize>,
}

/// The input, scanned: the distinct images (sorted by name) and how many pods there were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// The distinct images.
    pub images: Vec<Wanted>,
    /// Pods read (0 for a list of references).
    pub pods: usize,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    kind: Option<String>,
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    spec: Option<PodSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    containers: Vec<Container>,
    #[serde(default)]
    init_containers: Vec<Container>,
    #[serde(default)]
    ephemeral_containers: Vec<Container>,
}

#[derive(Deserialize)]
struct Container {
    #[serde(default)]
    image: Option<String>,
}

/// Reads the input: a pod list when it starts with `{`, else references one a line (blank
/// lines and `#` comments skipped). A line or container image that is not a reference is
/// that image's error, not the input's.
pub fn parse(bytes: &[u8]) -> Result<Inventory, InputError> {
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(InputError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| InputError::NotText)?;
    let mut builder = Builder::default();
    let pods = if text.trim_start().starts_with('{') {
        let list: List = serde_json::from_str(text)
            .map_err(|e| InputError::NotPodList(inert(&e.to_string(), MAX_SHOWN)))?;
        if let Some(kind) = list
            .kind
            .as_deref()
            .filter(|k| !matches!(*k, "List" | "PodList"))
        {
            return Err(InputError::NotPodList(format!(
                "kind {:?}, expected List or PodList",
                inert(kind, MAX_SHOWN)
            )));
        }
        for (i, pod) in list.items.iter().enumerate() {
            if let Some(kind) = pod.kind.as_deref().filter(|k| *k != "Pod") {
                return Err(InputError::NotPodList(format!(
                    "item {i} is a {:?}, expected Pod",
                    inert(kind, MAX_SHOWN)
                )));
            }
            let Some(spec) = &pod.spec else { continue };
            let containers = spec
                .containers
                .iter()
                .chain(&spec.init_containers)
                .chain(&spec.ephemeral_containers);
            for image in containers.filter_map(|c| c.image.as_deref()) {
                builder.add(image, Some(i))?;
            }
        }
        list.items.len()
    } else {
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            builder.add(line, None)?;
        }
        0
    };
    Ok(Inventory {
        images: builder.images.into_values().collect(),
        pods,
    })
}

#[derive(Default)]
struct Builder {
    images: BTreeMap<String, Wanted>,
}

impl Builder {
    fn add(&mut self, spelling: &str, pod: Option<usize>) -> Result<(), InputError> {
        let (name, image) = match spelling.parse::<ImageRef>() {
            Ok(image) => (image.to_string(), Ok(image)),
            Err(e) => (
                inert(spelling, MAX_SHOWN),
                Err(inert(&e.to_string(), MAX_SHOWN)),
            ),
        };
        if !self.images.contains_key(&name) && self.images.len() >= MAX_IMAGES {
            return Err(InputError::TooManyImages);
        }
        let wanted = self.images.entry(name.clone()).or_insert_with(|| Wanted {
            name,
            image,
            pods: BTreeSet::new(),
        });
        if let Some(pod) = pod {
            wanted.pods.insert(pod);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(inv: &Inventory) -> Vec<(&str, usize, bool)> {
        inv.images
            .iter()
            .map(|w| (w.name.as_str(), w.pods.len(), w.image.is_ok()))
            .collect()
    }

    #[test]
    fn a_pod_list_counts_pods_per_distinct_image() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "List",
            "items": [
                {"kind": "Pod", "spec": {
                    "containers": [{"image": "nginx:1"}, {"image": "docker.io/library/nginx:1"}],
                    "initContainers": [{"image": "ghcr.io/a/init:v1"}]}},
                {"kind": "Pod", "spec": {
                    "containers": [{"image": "nginx:1"}],
                    "ephemeralContainers": [{"image": "Bad Ref"}]}},
                {"kind": "Pod", "spec": {}},
            ]
        });
        let inv = parse(json.to_string().as_bytes()).unwrap();
        assert_eq!(inv.pods, 3);
        assert_eq!(
            names(&inv),
            [
                ("Bad Ref", 1, false),
                ("docker.io/library/nginx:1", 2, true),
                ("ghcr.io/a/init:v1", 1, true),
            ]
        );
    }

    #[test]
    fn lines_skip_blanks_and_comments_and_keep_bad_lines_as_errors() {
        let inv = parse(b"# prod\n\nnginx:1\n  ghcr.io/a/b@sha256:x  \nnginx:1\n").unwrap();
        assert_eq!(inv.pods, 0);
        assert_eq!(
            names(&inv),
            [
                ("docker.io/library/nginx:1", 0, true),
                ("ghcr.io/a/b@sha256:x", 0, false)
            ]
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let e = parse(b"{\"items\": 3}").unwrap_err();
        assert!(e.to_string().contains("PodList"), "{e}");
        let deployments = br#"{"kind": "List", "items": [{"kind": "Deployment"}]}"#;
        assert!(
            parse(deployments)
                .unwrap_err()
                .to_string()
                .contains("Deployment")
        );
        assert!(parse(br#"{"kind": "ConfigMap", "items": []}"#).is_err());
        assert_eq!(parse(b"\xff\xfe").unwrap_err(), InputError::NotText);
        let many: String = (0..=MAX_IMAGES).map(|i| format!("r/i{i}:1\n")).collect();
        assert_eq!(
            parse(many.as_bytes()).unwrap_err(),
            InputError::TooManyImages
        );
        let big = vec![b'a'; MAX_INPUT_BYTES + 1];
        assert_eq!(parse(&big).unwrap_err(), InputError::TooLarge);
    }
}
