//! MindSP benchmarks. Each `[[bench]]` is a plain binary (no harness) printing its
//! figures; `RESULTS.md` records them with the command that produced them.

use std::time::Duration;

/// CPU time (user + system) of a process or thread, from `/proc/<pid>/stat`: `pid` may
/// be a number, `self` or `thread-self`.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((ticks(14) + ticks(15)) as f64 / clock_ticks())
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, read once).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
