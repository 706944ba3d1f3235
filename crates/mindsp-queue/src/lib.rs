//! MindSP durable job queue: backends for the [`JobQueue`] port of `mindsp-core`, the
//! worker runtime that runs handlers, and e-mail delivery through lettre.
//!
//! - `sqlite` (default feature), `postgres`: jobs in the same database as the messages,
//!   so a job can be enqueued in the transaction of the change that caused it.
//! - `redis` (feature): jobs in Redis through `fred`, moved by Lua scripts.
//! - [`worker`]: handlers per kind, leases renewed while they run, retries with
//!   backoff, repeating schedules, graceful shutdown.
//! - [`mail`]: SMTP and file-drop mailers, French templates, the `email.send` handler.

pub use mindsp_core::jobs::*;

pub mod mail;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod worker;
