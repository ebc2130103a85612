//! TLS for the provider: rustls (ring), TLS 1.3 (1.2 on request), the serving certificate
//! and the client CA read from files and **reloaded when they change** (cert-manager and
//! Gatekeeper rotate them) without dropping connections, and optional pinning of the
//! client certificate's DNS name.
//!
//! Reloading: the certificate is chosen per handshake from an atomically swapped
//! `CertifiedKey` ([`ReloadingCert`]); client certificates are checked by a verifier that
//! delegates to an atomically swapped `WebPkiClientVerifier` ([`ReloadingClientVerifier`]).
//! A file that fails to load keeps the previous one in force and counts a failure.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use super::metrics::ReloadCounters;

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    reason: String,
}

fn tls_err(what: &'static str, path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key, checking they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err("certificate", cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err("certificate", cert, e))?;
    if chain.is_empty() {
        return Err(tls_err(
            "certificate",
            cert,
            "no CERTIFICATE block in the PEM file",
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err("private key", key, e))?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        tls_err(
            "private key",
            key,
            format!("does not match the certificate: {e}"),
        )
    })
}

fn load_client_verifier(ca: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(ca).map_err(|e| tls_err("client CA", ca, e))? {
        let der = der.map_err(|e| tls_err("client CA", ca, e))?;
        roots.add(der).map_err(|e| tls_err("client CA", ca, e))?;
    }
    if roots.is_empty() {
        return Err(tls_err(
            "client CA",
            ca,
            "no CERTIFICATE block in the PEM file",
        ));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| tls_err("client CA", ca, e))
}

/// Chooses the current serving certificate for each handshake.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Verifies client certificates against the current client CA, and optionally pins the
/// DNS name they must carry.
#[derive(Debug)]
pub struct ReloadingClientVerifier {
    current: ArcSwap<Arc<dyn ClientCertVerifier>>,
    san: Option<ServerName<'static>>,
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the CA can change under us, so send none (clients such as
        // Gatekeeper present their one configured certificate regardless).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .current
            .load()
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(name) = &self.san {
            let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
            cert.verify_is_valid_for_subject_name(name).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            })?;
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().supported_verify_schemes()
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, watched for changes.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Generated at start, self-signed by a generated CA (no configuration needed).
    SelfSigned {
        /// DNS names (and IPs) the certificate is valid for.
        names: Vec<String>,
    },
}

/// TLS settings.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The serving certificate.
    pub cert: CertSource,
    /// Client CA: when set, a client certificate is required and verified.
    pub client_ca: Option<PathBuf>,
    /// DNS name the client certificate must carry.
    pub client_san: Option<String>,
    /// Also accept TLS 1.2.
    pub allow_tls12: bool,
}

/// The live TLS state: the rustls config and what reloads it.
#[derive(Debug)]
pub struct Tls {
    settings: TlsSettings,
    cert: Arc<ReloadingCert>,
    client: Option<Arc<ReloadingClientVerifier>>,
    fingerprints: std::sync::Mutex<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    counters: Arc<ReloadCounters>,
    /// For a generated certificate: the CA, PEM (what `caBundle` must hold).
    pub generated_ca_pem: Option<String>,
}

fn read_or_empty(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

impl Tls {
    /// Loads everything once; any failure here is fatal (the server does not start).
    pub fn new(settings: TlsSettings, counters: Arc<ReloadCounters>) -> Result<Tls, TlsError> {
        let (key, generated_ca_pem) = match &settings.cert {
            CertSource::Files { cert, key } => (load_certified_key(cert, key)?, None),
            CertSource::SelfSigned { names } => {
                let (key, ca) = self_signed(names)?;
                (key, Some(ca))
            }
        };
        let client = match &settings.client_ca {
            Some(ca) => {
                let san = match &settings.client_san {
                    Some(name) => Some(
                        ServerName::try_from(name.clone())
                            .map_err(|e| tls_err("--client-san", Path::new(name), e))?,
                    ),
                    None => None,
                };
                Some(Arc::new(ReloadingClientVerifier {
                    current: ArcSwap::from_pointee(load_client_verifier(ca)?),
                    san,
                }))
            }
            None => None,
        };
        let fingerprints = std::sync::Mutex::new(Self::read_fingerprints(&settings));
        Ok(Tls {
            cert: Arc::new(ReloadingCert {
                current: ArcSwap::from_pointee(key),
            }),
            client,
            fingerprints,
            counters,
            generated_ca_pem,
            settings,
        })
    }

    fn read_fingerprints(settings: &TlsSettings) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let (cert, key) = match &settings.cert {
            CertSource::Files { cert, key } => (read_or_empty(cert), read_or_empty(key)),
            CertSource::SelfSigned { .. } => (Vec::new(), Vec::new()),
        };
        let ca = settings
            .client_ca
            .as_deref()
            .map(read_or_empty)
            .unwrap_or_default();
        (cert, key, ca)
    }

    /// The rustls server configuration (built once; reloads swap what it points at).
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let versions: &[&rustls::SupportedProtocolVersion] = if self.settings.allow_tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| tls_err("TLS", Path::new("protocol versions"), e))?;
        let builder = match &self.client {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Re-reads the files when their bytes changed; a bad file keeps the old material.
    /// Returns whether anything was reloaded.
    pub fn reload_if_changed(&self) -> bool {
        let now = Self::read_fingerprints(&self.settings);
        let Ok(mut seen) = self.fingerprints.lock() else {
            return false;
        };
        if *seen == now {
            return false;
        }
        let mut reloaded = false;
        let mut ok = true;
        if let CertSource::Files { cert, key } = &self.settings.cert
            && (seen.0 != now.0 || seen.1 != now.1)
        {
            match load_certified_key(cert, key) {
                Ok(k) => {
                    self.cert.current.store(Arc::new(k));
                    reloaded = true;
                    tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(
                        "serving certificate not reloaded, keeping the previous one: {e}"
                    );
                }
            }
        }
        if let (Some(ca), Some(client)) = (&self.settings.client_ca, &self.client)
            && seen.2 != now.2
        {
            match load_client_verifier(ca) {
                Ok(v) => {
                    client.current.store(Arc::new(v));
                    reloaded = true;
                    tracing::info!(ca = %ca.display(), "client CA reloaded");
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!("client CA not reloaded, keeping the previous one: {e}");
                }
            }
        }
        let counter = if ok {
            &self.counters.successes
        } else {
            &self.counters.failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
        *seen = now;
        reloaded
    }
}

/// A CA and a serving certificate signed by it, valid for `names`; returns the key and the
/// CA's PEM.
pub fn self_signed(names: &[String]) -> Result<(CertifiedKey, String), TlsError> {
    let err = |e: rcgen::Error| tls_err("generated certificate", Path::new("(memory)"), e);
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "atcr-verify generated CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.signed_by(&key, &ca).map_err(err)?;
    let chain = vec![cert.der().clone()];
    let private = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| tls_err("generated key", Path::new("(memory)"), e))?;
    let certified = CertifiedKey::from_der(chain, private, &provider())
        .map_err(|e| tls_err("generated key", Path::new("(memory)"), e))?;
    Ok((certified, ca.pem()))
}
