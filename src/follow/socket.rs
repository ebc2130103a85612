//! The guarded WebSocket connection to a repo event stream.
//!
//! Not through [`crate::net::HttpClient`] (reqwest speaks no WebSocket), so the same rules
//! are applied here by hand: the URL passes [`Guard::check_url`] (as its http(s) twin: plain
//! `ws://` only where plain `http://` is allowed), the host's addresses are resolved and
//! each is checked with [`is_public`] unless private addresses are allowed, the TCP
//! connection goes to a checked address within the connect timeout, `wss://` runs on
//! tokio-rustls with the process's ring provider and the platform verifier (what reqwest
//! uses), and frames and messages are capped at [`MAX_FRAME`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use url::Url;

use super::frame::MAX_FRAME;
use crate::net::{Guard, is_public};

/// A byte stream a WebSocket runs on: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open event stream.
pub type Socket = WebSocketStream<Box<dyn Io>>;

/// Why no stream could be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The outbound rules refuse the URL or every address of its host.
    #[error("{url}: refused: {reason}")]
    Refused {
        /// The stream URL.
        url: String,
        /// Which rule.
        reason: String,
    },
    /// Resolving, connecting, TLS or the WebSocket handshake failed.
    #[error("{url}: {reason}")]
    Failed {
        /// The stream URL.
        url: String,
        /// What failed.
        reason: String,
    },
}

/// The `subscribeRepos` URL of a PDS or relay given as `https://host` (or `wss://host`):
/// `wss://host/xrpc/com.atproto.sync.subscribeRepos` (`ws://` for `http://`).
pub fn stream_url(base: &Url) -> Result<Url, String> {
    let scheme = match base.scheme() {
        "https" | "wss" => "wss",
        "http" | "ws" => "ws",
        other => return Err(format!("{base}: scheme {other:?} is not http(s) or ws(s)")),
    };
    let host = base.host_str().ok_or_else(|| format!("{base}: no host"))?;
    let authority = match base.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let host_part = if host.contains(':') && !host.starts_with('[') {
        format!("[{authority}]")
    } else {
        authority
    };
    Url::parse(&format!(
        "{scheme}://{host_part}/xrpc/com.atproto.sync.subscribeRepos"
    ))
    .map_err(|e| format!("{base}: {e}"))
}

/// Opens the stream at `url` (a `ws://` or `wss://` URL) under `guard`.
pub async fn connect(url: &Url, guard: &Guard, timeout: Duration) -> Result<Socket, ConnectError> {
    let shown = url.as_str().to_owned();
    let refused = |reason: String| ConnectError::Refused {
        url: shown.clone(),
        reason,
    };
    let failed = |reason: String| ConnectError::Failed {
        url: shown.clone(),
        reason,
    };
    let tls = match url.scheme() {
        "wss" => true,
        "ws" => false,
        other => return Err(refused(format!("scheme {other:?} is not ws or wss"))),
    };
    let mut twin = url.clone();
    twin.set_scheme(if tls { "https" } else { "http" })
        .map_err(|()| refused("cannot check this URL".into()))?;
    guard.check_url(&twin).map_err(|r| refused(r.0))?;
    let host = url
        .host_str()
        .ok_or_else(|| refused("URL has no host".into()))?
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| refused("URL has no port".into()))?;
    let lookup = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(timeout, tokio::net::lookup_host((lookup.as_str(), port)))
            .await
            .map_err(|_| failed(format!("resolving {host}: no answer within {timeout:?}")))?
            .map_err(|e| failed(format!("resolving {host}: {e}")))?
            .collect();
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| guard.allow_private_addresses || is_public(a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(refused(format!(
            "{host} resolves to no allowed address ({} private, loopback or metadata; \
             allow with --allow-private-addresses)",
            addrs.len()
        )));
    }
    let mut last = String::from("no address tried");
    let mut tcp = None;
    for addr in allowed {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("cannot connect to {addr}: {e}"),
            Err(_) => last = format!("cannot connect to {addr} within {timeout:?}"),
        }
    }
    let tcp = tcp.ok_or_else(|| failed(last))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if tls {
        crate::net::install_crypto_provider();
        let config = <rustls::ClientConfig as rustls_platform_verifier::ConfigVerifierExt>::with_platform_verifier()
            .map_err(|e: rustls::Error| failed(format!("TLS setup: {e}")))?;
        let name = rustls_pki_types::ServerName::try_from(lookup.clone())
            .map_err(|e| refused(format!("server name {lookup:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| failed(format!("TLS handshake not done within {timeout:?}")))?
            .map_err(|e| failed(format!("TLS handshake: {e}")))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    let (socket, _) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::client_async_with_config(url.as_str(), io, Some(config)),
    )
    .await
    .map_err(|_| failed(format!("WebSocket handshake not done within {timeout:?}")))?
    .map_err(|e| failed(format!("WebSocket handshake: {e}")))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls_follow_the_pds_scheme() {
        let url = |s: &str| stream_url(&Url::parse(s).unwrap());
        assert_eq!(
            url("https://pds.example.com").unwrap().as_str(),
            "wss://pds.example.com/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            url("http://localhost:2583/").unwrap().as_str(),
            "ws://localhost:2583/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            url("wss://relay.example.com/some/path").unwrap().as_str(),
            "wss://relay.example.com/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert!(url("ftp://x").is_err());
    }

    #[tokio::test]
    async fn the_outbound_rules_apply_to_streams() {
        let guard = Guard::default();
        let t = Duration::from_secs(1);
        for (u, needle) in [
            ("ws://pds.example.com/x", "plain http"),
            ("wss://127.0.0.1:1/x", "private"),
            ("wss://localhost:1/x", "no allowed address"),
            ("wss://user:pw@pds.example.com/x", "credentials"),
        ] {
            match connect(&Url::parse(u).unwrap(), &guard, t).await {
                Err(ConnectError::Refused { reason, .. }) => {
                    assert!(reason.contains(needle), "{u}: {reason}")
                }
                Err(other) => panic!("{u}: {other}"),
                Ok(_) => panic!("{u}: connected"),
            }
        }
    }
}
