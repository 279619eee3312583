//! Starts the real `strata serve` binary for crate tests: a fresh data directory, every
//! listener on 127.0.0.1 port 0, the `listening on` log line read for the HTTP address. The
//! process is killed in `Drop`, which prints its log when the test failed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running `strata serve`.
pub struct TestServer {
    child: Child,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: Arc<Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts the server with `extra_toml` appended to a config that binds everything to
    /// loopback port 0, in a fresh temporary data directory.
    pub fn start(extra_toml: &str) -> Result<TestServer> {
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("data");
        let mut s = Self::start_in(&data_dir, extra_toml)?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts the server on an existing data directory (to test restarts).
    pub fn start_in(data_dir: &Path, extra_toml: &str) -> Result<TestServer> {
        std::fs::create_dir_all(data_dir)?;
        let config = data_dir.with_extension("toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n{extra_toml}\n[http]\nlisten = \"127.0.0.1:0\"\n[tftp]\nlisten = \"127.0.0.1:0\"\n",
                data_dir
            ),
        )?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting strata serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
                let mut l = log2.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = loop {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(100)) {
                break addr;
            }
            if let Some(status) = child.try_wait()? {
                let l = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
                bail!("strata serve exited ({status}) before listening:\n{l}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("strata serve did not listen within 120 s");
            }
        };
        let http = addr
            .parse()
            .with_context(|| format!("bad listening address {addr:?}"))?;
        Ok(TestServer {
            child,
            http,
            data_dir: data_dir.to_owned(),
            log,
            _tmp: None,
        })
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the process a signal (`STOP`, `CONT`, ...).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()?;
        anyhow::ensure!(st.success(), "kill -{sig} {}", self.pid());
        Ok(())
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- strata serve log ----\n{}", self.log());
        }
    }
}
