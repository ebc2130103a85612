//! The provider binary (`atcr-verify serve`) as a child process on free loopback ports,
//! ready when `/readyz` answers 200, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::free_port;

/// A child process of the binary, its stderr in a file, killed when dropped.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts the binary with `args`, stderr to `log`, and waits until `/readyz` on
    /// `metrics_port` answers 200 `ready`.
    pub fn start(args: &[String], log: PathBuf, metrics_port: u16) -> Process {
        Process::start_with_env(args, &[], log, metrics_port)
    }

    /// As [`Process::start`], with `env` added to the environment.
    pub fn start_with_env(
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
        metrics_port: u16,
    ) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let process = Process { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", metrics_port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
                    assert!(out.ends_with("ready\n"), "{out}");
                    return process;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server did not get ready:\n{}",
                process.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it holds `needle` (a line from another thread than the one answering,
    /// such as a reload's, may come after the answer), or what it holds after 5 s.
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

/// `atcr-verify serve` on free loopback ports.
pub struct Server {
    process: Process,
    /// `https://127.0.0.1:PORT` (`http://` with `--insecure-http`).
    pub url: String,
    /// `http://127.0.0.1:PORT` of /healthz, /readyz, /metrics.
    pub metrics: String,
}

impl std::ops::Deref for Server {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl Server {
    /// Starts `atcr-verify serve ARGS` (plus listen addresses and a 200 ms reload interval).
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Server::start_with_env(dir, args, &[])
    }

    /// As [`Server::start`], with `env` added to the environment.
    pub fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let metrics_port = free_port();
        let mut all: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--reload-interval".into(),
            "200ms".into(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let log = dir.join(format!("server-{port}.log"));
        let scheme = if args.contains(&"--insecure-http") {
            "http"
        } else {
            "https"
        };
        Server {
            process: Process::start_with_env(&all, env, log, metrics_port),
            url: format!("{scheme}://127.0.0.1:{port}"),
            metrics: format!("http://127.0.0.1:{metrics_port}"),
        }
    }

    /// The `/metrics` page now.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A Gatekeeper `ProviderRequest` for `keys`.
pub fn provider_request(keys: &[&str]) -> serde_json::Value {
    serde_json::json!({"apiVersion": "externaldata.gatekeeper.sh/v1beta1",
                       "kind": "ProviderRequest", "request": {"keys": keys}})
}

/// POSTs a Gatekeeper `ProviderRequest` for `keys` to `{url}/provide`; the answer's JSON.
pub async fn provide(client: &reqwest::Client, url: &str, keys: &[&str]) -> serde_json::Value {
    client
        .post(format!("{url}/provide"))
        .json(&provider_request(keys))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
