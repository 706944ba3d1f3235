//! The floor under any WebSocket server on this machine: what the kernel charges for one
//! delivery, that is one small write to one loopback TCP socket and its read by a client.
//!
//! No WebSocket, no storage, no hub: a "server" thread accepts `MINDSP_FLOOR_CONNS`
//! (1,000) loopback connections (`TCP_NODELAY`, as `mindsp-server serve` sets) and writes
//! a frame of `MINDSP_FLOOR_BYTES` (350, the size of a `new_message` frame) to each in
//! turn, at `MINDSP_FLOOR_RATE` (100,000) writes per second in bursts of one
//! millisecond, for `MINDSP_FLOOR_SECS` (10) seconds. A "client" thread reads every
//! connection with a tokio runtime of its own, as the load generator does. Each thread's
//! CPU time (user + system, `/proc/thread-self/stat`) is divided by the writes.
//!
//! ```sh
//! cargo bench -p mindsp-benches --bench floor
//! ```
//!
//! On loopback the receiving side's TCP work (and the wake-up of the reader) runs on
//! the writer's system call, so the server's figure is the floor of `load.rs`'s "server
//! CPU per delivery" (also measured on loopback) for a server that writes each delivery
//! on its own. Over a real network the receiver's share would not be the server's.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mindsp_benches::cpu_time;
use tokio::io::AsyncReadExt;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let conns = env_or("MINDSP_FLOOR_CONNS", 1_000).max(1) as usize;
    let bytes = env_or("MINDSP_FLOOR_BYTES", 350) as usize;
    let rate = env_or("MINDSP_FLOOR_RATE", 100_000).max(1);
    let secs = env_or("MINDSP_FLOOR_SECS", 10).max(1);
    let total = rate * secs;
    println!("# floor: {conns} loopback connections, {bytes}-byte writes, {rate}/s for {secs} s");

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));

    // The client: one task per connection, reading until the server closes it.
    let client = {
        let received = received.clone();
        std::thread::spawn(move || -> anyhow::Result<Duration> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?;
            rt.block_on(async move {
                let mut tasks = Vec::with_capacity(conns);
                for _ in 0..conns {
                    let mut s = tokio::net::TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    let received = received.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }));
                }
                let start = cpu_time("thread-self");
                for t in tasks {
                    t.await?;
                }
                Ok(cpu_time("thread-self").saturating_sub(start))
            })
        })
    };

    let mut sockets: Vec<TcpStream> = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        sockets.push(s);
    }
    let frame = vec![b'x'; bytes];
    // Writes due by a time follow from the rate exactly; they go out in bursts of about
    // a millisecond's worth (at least one).
    let burst = (rate / 1_000).max(1);
    let cpu0 = cpu_time("thread-self");
    let start = Instant::now();
    let mut written = 0u64;
    let mut late = Duration::ZERO;
    while written < total {
        let due = start + Duration::from_nanos(written * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            late = late.max(now - due);
        }
        for _ in 0..burst.min(total - written) {
            sockets[(written % conns as u64) as usize].write_all(&frame)?;
            written += 1;
        }
    }
    let server_cpu = cpu_time("thread-self").saturating_sub(cpu0);
    let elapsed = start.elapsed();
    drop(sockets);
    let client_cpu = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let got = received.load(Ordering::Relaxed);
    anyhow::ensure!(
        got == total * bytes as u64,
        "received {got} bytes of {}",
        total * bytes as u64
    );
    let per = |d: Duration| d.as_secs_f64() * 1e6 / total as f64;
    println!(
        "{total} writes in {:.2} s ({:.0}/s, at most {:.1} ms behind schedule), all read",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        late.as_secs_f64() * 1e3
    );
    println!(
        "server side: {:.2} µs of CPU per write; client side: {:.2} µs per frame read",
        per(server_cpu),
        per(client_cpu)
    );
    println!(
        "at 100,000 deliveries/s these writes and reads alone take {:.2} + {:.2} cores",
        per(server_cpu) / 10.0,
        per(client_cpu) / 10.0
    );
    Ok(())
}
