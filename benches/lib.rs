//! MindSP benchmarks. Each `[[bench]]` is a plain binary (no harness) printing its
//! figures; `RESULTS.md` records them with the command that produced them.
