//! A real SMTP server on loopback for the e-mail tests: Python's aiosmtpd with the
//! handler the queue crate's tests use (`crates/mindsp-queue/tests/smtp_sink.py`),
//! which stores each accepted message as `NNNNNN.eml` plus its envelope as
//! `NNNNNN.json`.
//!
//! Needs `python3` with `aiosmtpd`. Without it [`SmtpSink::start`] says "skipped" and
//! answers `None`, unless the `CI` variable is set: then it panics, so CI cannot pass
//! without having run the e-mail tests.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running aiosmtpd; killed and its directory removed when dropped (also on panic).
pub struct SmtpSink {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One message the server accepted.
pub struct Received {
    /// Envelope sender.
    pub mail_from: String,
    /// Envelope recipients.
    pub rcpt_tos: Vec<String>,
    /// The message as received.
    pub raw: Vec<u8>,
}

fn aiosmtpd_available() -> bool {
    Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl SmtpSink {
    /// Starts a server on a free port, or answers `None` (after saying so) when
    /// aiosmtpd is missing outside CI.
    pub fn start() -> Option<Self> {
        if !aiosmtpd_available() {
            if std::env::var_os("CI").is_some() {
                panic!("aiosmtpd is required in CI: pip install aiosmtpd");
            }
            eprintln!("skipped: aiosmtpd not installed");
            return None;
        }
        // A port found free may be taken before aiosmtpd binds it: try a few.
        for _ in 0..3 {
            if let Some(sink) = Self::on_port(free_port()) {
                return Some(sink);
            }
        }
        panic!("aiosmtpd did not start; see its output above");
    }

    /// Starts a server on `port` (e.g. the port of one stopped earlier) with an empty
    /// message directory; `None` if it exited before listening (the port was taken).
    pub fn on_port(port: u16) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("mindsp-smtp-{}", uuid::Uuid::new_v4()));
        let sink_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mindsp-queue/tests");
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "smtp_sink.Sink"])
            .arg(&dir)
            .env("PYTHONPATH", sink_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3 -m aiosmtpd");
        let mut sink = SmtpSink { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(sink);
            }
            if sink.child.try_wait().expect("poll aiosmtpd").is_some() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `smtp://127.0.0.1:PORT`, plain text (aiosmtpd runs without TLS here).
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut emls: Vec<PathBuf> = entries
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        emls.sort();
        emls.into_iter()
            .map(|eml| {
                let envelope: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(eml.with_extension("json")).expect("read the envelope"),
                )
                .expect("parse the envelope");
                Received {
                    mail_from: envelope["mail_from"].as_str().unwrap().to_owned(),
                    rcpt_tos: envelope["rcpt_tos"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_owned())
                        .collect(),
                    raw: std::fs::read(&eml).expect("read the message"),
                }
            })
            .collect()
    }

    /// Waits until `n` messages arrived (at most `limit`), then answers them all.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} message(s) arrived, expected {n}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
