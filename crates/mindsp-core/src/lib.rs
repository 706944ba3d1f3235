//! MindSP core: the domain of fire-service messaging, with no I/O of its own.
//!
//! - [`ids`]: typed identifiers.
//! - [`model`]: entities and value types.
//! - [`error`]: the one error enum, with stable codes.
//! - [`ports`]: the storage traits adapters implement, scoped by tenant.
//! - [`service`]: the rules (membership, roles, limits) on top of the ports.
//! - [`jobs`]: the durable job queue port.
//! - [`mail`]: the mailer port.
//! - [`events`]: real-time events and the [`events::Publisher`] port.
//! - [`notify`]: notifications, preferences and the [`notify::Notifier`] service.
//! - [`reminders`]: reminder jobs keyed per event, user and lead time.
//! - [`training`]: training sessions (FMPA), the reference scheduling domain.

pub mod error;
pub mod events;
pub mod ids;
pub mod jobs;
pub mod mail;
pub mod model;
pub mod notify;
pub mod ports;
pub mod reminders;
pub mod service;
pub mod training;

pub use error::{Error, Result};
pub use ids::{ConversationId, JobId, MessageId, NotificationId, SessionId, TenantId, UserId};
pub use service::{Actor, Limits, Messaging};
