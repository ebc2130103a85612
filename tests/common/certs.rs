//! Test certificates made at test time with rcgen: CAs, serving and client certificates,
//! expired ones, and PEM files for the server to read.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose, expired: bool) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![usage];
        let now = OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - Duration::days(30);
            params.not_after = now - Duration::days(1);
        } else {
            params.not_before = now - Duration::days(1);
            params.not_after = now + Duration::days(30);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    pub fn expired_client(&self, name: &str) -> Leaf {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth, true)
    }
}

impl Leaf {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir` (atomically, by rename).
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_atomic(&cert, self.cert_pem.as_bytes());
        write_atomic(&key, self.key_pem.as_bytes());
        (cert, key)
    }

    /// The client identity PEM (certificate + key) for reqwest.
    pub fn identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.cert_pem, self.key_pem).as_bytes())
            .unwrap()
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The DNS name Gatekeeper's client certificate carries (namespace gatekeeper-system).
pub const GATEKEEPER_SAN: &str = "gatekeeper-webhook-service.gatekeeper-system.svc";

/// A provider's serving identity and a Gatekeeper-like client identity, files in a dir.
pub struct Pki {
    pub server_ca: Ca,
    pub client_ca: Ca,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca_file: PathBuf,
    pub gatekeeper: Leaf,
}

impl Pki {
    /// The `serve` flags for this identity: serving certificate and key, mandatory client
    /// certificates from the Gatekeeper-like CA, pinned to [`GATEKEEPER_SAN`].
    pub fn serve_args(&self) -> Vec<&str> {
        vec![
            "--tls-cert",
            self.cert.to_str().unwrap(),
            "--tls-key",
            self.key.to_str().unwrap(),
            "--client-ca",
            self.client_ca_file.to_str().unwrap(),
            "--client-san",
            GATEKEEPER_SAN,
        ]
    }
}

/// Writes `tls.crt`/`tls.key` (for localhost and 127.0.0.1) and `client-ca.crt` into `dir`.
pub fn pki(dir: &Path) -> Pki {
    let server_ca = Ca::new("atcr-verify test CA");
    let client_ca = Ca::new("gatekeeper-ca");
    let (cert, key) = server_ca
        .server(&["localhost", "127.0.0.1"])
        .write(dir, "tls");
    let client_ca_file = dir.join("client-ca.crt");
    write_atomic(&client_ca_file, client_ca.pem().as_bytes());
    let gatekeeper = client_ca.client(GATEKEEPER_SAN);
    Pki {
        server_ca,
        client_ca,
        cert,
        key,
        client_ca_file,
        gatekeeper,
    }
}
