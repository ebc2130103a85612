//! The provider binary (`atcr-verify serve`) as a child process on free loopback ports,
//! ready when `/readyz` answers 200, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::free_port;

pub struct Server {
    child: Child,
    /// `https://127.0.0.1:PORT` (use `http://` with `--insecure-http`).
    pub url: String,
    /// `http://127.0.0.1:PORT` of /healthz, /readyz, /metrics.
    pub metrics: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `atcr-verify serve ARGS` (plus listen addresses and a 200 ms reload interval).
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let port = free_port();
        let metrics_port = free_port();
        let log = dir.join(format!("server-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--reload-interval", "200ms"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Server {
            child,
            url: format!("https://127.0.0.1:{port}"),
            metrics: format!("http://127.0.0.1:{metrics_port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", metrics_port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.contains("200 OK") {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not get ready: {}",
                server.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it holds `needle` (the server writes lines in batches, at least every
    /// 50 ms), or what it holds after 5 s.
    pub fn logs_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let logs = self.logs();
            if logs.contains(needle) || Instant::now() > deadline {
                return logs;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
