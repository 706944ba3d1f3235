//! A Redis server of a test's own, which it may kill and start again. Shared by the
//! realtime crate's outage tests and the server's multi-node tests (`#[path]`).

use std::time::Duration;

/// A Redis server of the test's own on a free loopback port, so that it can be killed
/// and started again; killed when dropped.
pub(crate) struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// `None` (with a message) when `redis-server` cannot be started.
    pub(crate) fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        let mut redis = Self { port, child: None };
        redis.restart()?;
        Some(redis)
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, after [`Self::kill`]) on the same port.
    pub(crate) fn restart(&mut self) -> Option<()> {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("skipped: redis-server cannot be started here");
            return None;
        };
        self.child = Some(child);
        for _ in 0..100 {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited ({status}): port {} taken?", self.port);
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not listen on {}", self.port);
    }

    /// SIGKILL.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
