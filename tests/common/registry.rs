//! A real OCI registry for integration tests: the CNCF distribution registry from Debian's
//! `docker-registry` package (2.8: no Referrers API, so verifiers must use the
//! `sha256-<hex>` tag fallback), on a free loopback port with its own storage, started once
//! per test process. Plus a push client that works against it and the fake registry.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const SIG_TYPE: &str = "application/vnd.atproto.signature.v1+json";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `host:port` of the real registry (started on first use; lives as long as the test
/// process: a shell holds it and kills it when our end of its stdin closes).
pub fn real_registry() -> &'static str {
    static REGISTRY: OnceLock<String> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let bin = which("docker-registry").unwrap_or_else(|| {
            panic!(
                "docker-registry is not installed (Debian package docker-registry); \
                 run tests/world/install-system.sh"
            )
        });
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("atcr-registry-")
            .tempdir()
            .unwrap()
            .keep();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
                 http: {{addr: 127.0.0.1:{port}}}\nlog: {{level: error}}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{bin} serve {} >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid; rm -rf {}",
                config.display(),
                dir.display()
            ))
            .stdin(Stdio::piped())
            .spawn()
            .expect("start docker-registry");
        // Keep the write end of its stdin open for the life of the process.
        let stdin = child.stdin.take().unwrap();
        std::mem::forget(stdin);
        std::mem::forget(child);
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                break;
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        addr
    })
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

/// Pushes content through the distribution API (blob upload, manifest PUT).
#[derive(Clone)]
pub struct Pusher {
    pub base: String,
    http: reqwest::Client,
}

pub struct Pushed {
    pub digest: String,
    pub size: usize,
    pub bytes: Vec<u8>,
}

impl Pusher {
    pub fn new(host_port: &str) -> Pusher {
        Pusher {
            base: format!("http://{host_port}"),
            http: super::client(),
        }
    }

    pub async fn blob(&self, repo: &str, data: &[u8]) -> Pushed {
        let digest = sha256(data);
        let r = self
            .http
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "start upload");
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .http
            .put(format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            201,
            "finish upload: {:?}",
            r.text().await
        );
        Pushed {
            digest,
            size: data.len(),
            bytes: data.to_vec(),
        }
    }

    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &serde_json::Value,
    ) -> Pushed {
        let bytes = serde_json::to_vec(body).unwrap();
        self.manifest_bytes(repo, reference, media_type, bytes)
            .await
    }

    pub async fn manifest_bytes(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Pushed {
        let r = self
            .http
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header("content-type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            201,
            "PUT manifest {reference}: {:?}",
            r.text().await
        );
        Pushed {
            digest: sha256(&bytes),
            size: bytes.len(),
            bytes,
        }
    }

    /// A tiny single-layer image, unique per `seed`, tagged `tag`.
    pub async fn image(&self, repo: &str, tag: &str, seed: &str) -> Pushed {
        let layer = self.blob(repo, format!("layer {seed}").as_bytes()).await;
        let config = self
            .blob(
                repo,
                json!({"architecture": "amd64", "os": "linux", "seed": seed})
                    .to_string()
                    .as_bytes(),
            )
            .await;
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.digest, "size": layer.size}],
        });
        self.manifest(repo, tag, OCI_MANIFEST, &manifest).await
    }

    /// Attaches a signature artifact whose layer is `payload` to `subject`, pushing it by
    /// digest and adding it to the `sha256-<hex>` referrers tag (as clients must for
    /// registries without the Referrers API). Returns the artifact manifest.
    pub async fn attach(
        &self,
        repo: &str,
        subject: &Pushed,
        payload: &serde_json::Value,
    ) -> Pushed {
        self.attach_annotated(repo, subject, payload, None).await
    }

    /// As [`Pusher::attach`], with `annotations` on the artifact manifest (which a
    /// registry copies into its referrers list).
    pub async fn attach_annotated(
        &self,
        repo: &str,
        subject: &Pushed,
        payload: &serde_json::Value,
        annotations: Option<serde_json::Value>,
    ) -> Pushed {
        let empty = self.blob(repo, b"{}").await;
        let layer = self.blob(repo, &serde_json::to_vec(payload).unwrap()).await;
        let mut manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIG_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.digest, "size": empty.size},
            "layers": [{"mediaType": SIG_TYPE, "digest": layer.digest, "size": layer.size}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.size},
        });
        if let Some(a) = annotations {
            manifest["annotations"] = a;
        }
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let digest = sha256(&bytes);
        let artifact = self
            .manifest_bytes(repo, &digest, OCI_MANIFEST, bytes)
            .await;
        // Read-modify-write the fallback tag index.
        let tag = subject.digest.replacen(':', "-", 1);
        let existing = self
            .http
            .get(format!("{}/v2/{repo}/manifests/{tag}", self.base))
            .header("accept", OCI_INDEX)
            .send()
            .await
            .unwrap();
        let mut manifests = if existing.status().is_success() {
            let index: serde_json::Value = existing.json().await.unwrap();
            index["manifests"].as_array().cloned().unwrap_or_default()
        } else {
            Vec::new()
        };
        manifests.push(json!({"mediaType": OCI_MANIFEST, "digest": artifact.digest, "size": artifact.size, "artifactType": SIG_TYPE}));
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        self.manifest(repo, &tag, OCI_INDEX, &index).await;
        artifact
    }
}

/// The signature artifact payload the guide describes, pointing at `uri`.
pub fn payload(subject: &str, did: &str, uri: &str, pds: &str) -> serde_json::Value {
    json!({
        "$type": "io.atcr.atproto.signature", "version": "1.0",
        "subject": {"digest": subject, "mediaType": OCI_MANIFEST},
        "atproto": {"did": did, "handle": "x.test", "pdsEndpoint": pds, "recordUri": uri,
                     "commitCid": "bafyreih8", "signedAt": "2026-01-01T00:00:00Z"},
        "signature": {"algorithm": "ECDSA-K256-SHA256", "keyId": format!("{did}#atproto")},
    })
}
