//! Which addresses and URLs outbound requests may reach.
//!
//! Every URL the verifier fetches is influenced by someone else: registries are named by
//! whoever writes a Pod spec, PDS endpoints come from DID documents, token realms from
//! registries. Unless the operator says otherwise, requests to loopback, private,
//! link-local, shared, multicast, unspecified and cloud-metadata addresses are refused —
//! checked on the addresses DNS returns (so a public name pointing inward is caught) and on
//! IP literals in URLs and redirects. Plain `http://` is refused except to registries the
//! operator names as insecure, or everywhere when private addresses are allowed (local
//! testing).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// The outbound address rules.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Allow private, loopback and link-local addresses, and plain HTTP, everywhere.
    pub allow_private_addresses: bool,
    /// `host:port` of registries reached over plain HTTP (and allowed on private addresses).
    pub insecure_registries: HashSet<String>,
}

/// Why a URL or address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Guard {
    /// Whether `host` (a hostname or IP, no port) belongs to an insecure registry.
    fn exempt_host(&self, host: &str) -> bool {
        self.insecure_registries
            .iter()
            .any(|hp| host_of(hp).eq_ignore_ascii_case(host))
    }

    fn exempt_authority(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        self.insecure_registries
            .iter()
            .any(|hp| hp.eq_ignore_ascii_case(&authority))
    }

    /// Checks a URL before it is requested (and each redirect target).
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_private_addresses || self.exempt_authority(url) => {}
            "http" => {
                return Err(Refusal(format!(
                    "plain http:// to {} is refused (use https, or --insecure-registry HOST:PORT \
                     for a registry, or --allow-private-addresses for local testing)",
                    url.host_str().unwrap_or("")
                )));
            }
            other => return Err(Refusal(format!("scheme {other:?} is not allowed"))),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refusal("credentials in URLs are refused".into()));
        }
        // The resolver exempts an insecure registry's host by name; only its exact
        // HOST:PORT may use that, not other ports of the same host.
        if !self.allow_private_addresses
            && !self.exempt_authority(url)
            && url.host_str().is_some_and(|h| self.exempt_host(h))
        {
            return Err(Refusal(format!(
                "{} is exempt only at the HOST:PORT named by --insecure-registry",
                url.host_str().unwrap_or("")
            )));
        }
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(Host::Domain(_)) => return Ok(()),
            None => return Err(Refusal("URL has no host".into())),
        };
        if self.allow_private_addresses || self.exempt_authority(url) || is_public(ip) {
            Ok(())
        } else {
            Err(Refusal(format!(
                "address {ip} is private, loopback, link-local or metadata \
                 (allow with --allow-private-addresses)"
            )))
        }
    }

    /// A DNS resolver that drops refused addresses, for the HTTP client.
    pub fn resolver(self: &Arc<Self>) -> GuardedResolver {
        GuardedResolver {
            guard: Arc::clone(self),
        }
    }
}

fn host_of(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
}

/// Resolves names with the system resolver, keeping only allowed addresses.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<Guard>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let open = guard.allow_private_addresses || guard.exempt_host(&host);
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| open || is_public(a.ip()))
                .collect();
            if allowed.is_empty() {
                let found: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                return Err(Box::new(Refusal(format!(
                    "{host} resolves only to refused addresses [{}] (private, loopback, \
                     link-local or metadata; allow with --allow-private-addresses)",
                    found.join(", ")
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Whether an address is globally routable (not loopback, private, link-local, shared,
/// documentation, benchmarking, multicast, unspecified, reserved or a metadata address).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, includes the 169.254.169.254 metadata address
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 shared address space
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24 protocol assignments
        || (a == 198 && (18..20).contains(&b)) // 198.18/15 benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let first = s.first().copied().unwrap_or(0);
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7 (includes fd00:ec2::254)
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first == 0x2001 && s.get(1) == Some(&0x0db8)) // documentation
        || (first & 0xffc0) == 0xfec0 // deprecated site-local fec0::/10
        || (first == 0x64 && s.get(1) == Some(&0xff9b)) // NAT64 (64:ff9b::/96, 64:ff9b:1::/48)
        || (first == 0x2001 && s.get(1) == Some(&0)) // Teredo 2001::/32
        || (first == 0x2002 && !embedded_6to4_is_public(&s)) // 6to4 embeds an IPv4 address
        || ip.to_ipv4().is_some()) // deprecated IPv4-compatible
}

/// The IPv4 address a 6to4 address (2002:AABB:CCDD::/48) embeds is public.
fn embedded_6to4_is_public(segments: &[u16; 8]) -> bool {
    let (hi, lo) = (segments[1], segments[2]);
    is_public_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_classes() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
            "2002:a00:1::1",
            "2002:7f00:1::1",
            "64:ff9b:1::a00:1",
            "fec0::1",
            "2001:0:4136:e378::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "140.82.112.3",
            "2606:4700::1111",
            "2002:101:101::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn urls() {
        let strict = Guard::default();
        let ok = |g: &Guard, u: &str| g.check_url(&u.parse().unwrap()).is_ok();
        assert!(ok(&strict, "https://plc.directory/did:plc:x"));
        assert!(!ok(&strict, "http://plc.directory/did:plc:x"));
        assert!(!ok(&strict, "https://127.0.0.1/x"));
        assert!(!ok(&strict, "https://[::1]/x"));
        assert!(!ok(&strict, "https://169.254.169.254/latest"));
        assert!(!ok(&strict, "ftp://example.com/"));
        assert!(!ok(&strict, "https://user:pw@example.com/"));
        let insecure = Guard {
            insecure_registries: ["127.0.0.1:5000".to_owned()].into(),
            ..Guard::default()
        };
        assert!(ok(&insecure, "http://127.0.0.1:5000/v2/"));
        assert!(!ok(&insecure, "http://127.0.0.1:5001/v2/"));
        assert!(
            !ok(&insecure, "https://127.0.0.1:9443/x"),
            "other port of an insecure host"
        );
        let named = Guard {
            insecure_registries: ["localhost:5000".to_owned()].into(),
            ..Guard::default()
        };
        assert!(ok(&named, "http://localhost:5000/v2/"));
        assert!(
            !ok(&named, "https://localhost:9443/xrpc"),
            "PDS on another port"
        );
        let open = Guard {
            allow_private_addresses: true,
            ..Guard::default()
        };
        assert!(ok(&open, "http://localhost:2582/did:plc:x"));
        assert!(ok(&open, "http://127.0.0.1:2583/xrpc"));
    }

    #[tokio::test]
    async fn resolver_drops_private_addresses() {
        let strict = Arc::new(Guard::default()).resolver();
        let err = strict
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("refused addresses"), "{err}");
        let open = Arc::new(Guard {
            allow_private_addresses: true,
            ..Guard::default()
        })
        .resolver();
        assert!(open.resolve("localhost".parse().unwrap()).await.is_ok());
    }
}
