//! The mailer port. E-mail is only ever sent from a job, so an SMTP server that is
//! down means retries with backoff, never lost mail. Adapters (SMTP, file drop) live in
//! `mindsp-queue`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A recipient or sender: an address and an optional display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// Display name, e.g. "Sergent Martin".
    pub name: Option<String>,
    /// Address, e.g. `martin@sdis13.fr`.
    pub address: String,
}

/// A rendered e-mail with a plain-text part and, usually, an HTML part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    /// Recipient.
    pub to: Mailbox,
    /// Subject line (any Unicode; the adapter encodes it).
    pub subject: String,
    /// Plain-text body.
    pub text: String,
    /// HTML body, already escaped by the template that produced it.
    pub html: Option<String>,
    /// The left part of the `Message-ID` (before the `@` and the sender's domain):
    /// 1 to 64 ASCII letters, digits, `.`, `-` and `_`, no `.` first, last or twice in
    /// a row; the adapter refuses any other value for good. Sending the same e-mail
    /// again with the same value lets receivers recognise the duplicate. `None`: the
    /// adapter makes one; the e-mail job sets it from the job's id, so that every
    /// attempt of one job carries the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// Why an e-mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// Retrying cannot help: an invalid address, a message the server refuses for good.
    #[error("permanent mail failure: {0}")]
    Permanent(String),
    /// Retrying may help: server down, timeout, temporary refusal.
    #[error("temporary mail failure: {0}")]
    Transient(String),
}

/// Sends e-mail.
#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    /// Hands `email` to the transport; returns once it accepted it.
    async fn send(&self, email: &Email) -> Result<(), MailError>;
}
