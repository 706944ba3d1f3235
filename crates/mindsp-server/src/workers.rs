//! Running jobs: the mailer e-mail leaves through and the worker that takes jobs from
//! the queue. `mindsp-server serve` runs a worker in the same process by default;
//! `mindsp-server worker` runs only this, for the scaled profile where HTTP nodes and
//! workers are scaled apart. An embedder can call [`start_worker`] the same way.
//!
//! The worker serves two queues: `default`, and `email` apart from it so a slow or
//! unreachable SMTP server never holds up other work. Jobs are leased: a worker that
//! dies loses its leases and its jobs run again elsewhere after at most the lease
//! length.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mindsp_core::jobs::{DEFAULT_QUEUE, JobQueue, NewJob};
use mindsp_core::mail::{Mailbox, Mailer};
use mindsp_core::notify::{NOTIFICATION_EMAIL_JOB, Notifier, OnlineUsers};
use mindsp_core::ports::Store;
use mindsp_core::training::{FMPA_REMINDER_JOB, Training};
use mindsp_queue::mail::templates::Templates;
use mindsp_queue::mail::{
    EMAIL_QUEUE, FileMailer, MailConfigError, SEND_EMAIL, SendEmail, SmtpConfig, SmtpMailer,
};
use mindsp_queue::notify::{
    DIGEST_SWEEP_JOB, DigestSweepHandler, NotificationEmailHandler, ReminderHandler,
};
use mindsp_queue::worker::{RetryPolicy, Schedule, Worker, WorkerConfig, WorkerHandle};

/// Most jobs one queue may run at once in one process (`--workers`).
pub const MAX_CONCURRENCY: usize = 256;
/// Longest accepted `From` header given in configuration, in bytes.
pub const MAX_FROM_LEN: usize = 320;

/// Where e-mail goes. `Debug` hides the SMTP URL, which may hold a password.
#[derive(Clone)]
pub enum MailTransport {
    /// An SMTP server, as a URL read by [`SmtpConfig::from_url`]. It may hold a
    /// password: never log it, log [`MailTransport::describe`].
    Smtp(String),
    /// One `.eml` file per e-mail in this directory (development, demos).
    Dir(PathBuf),
}

impl std::fmt::Debug for MailTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MailTransport::Smtp(_) => f.write_str("Smtp(<url hidden>)"),
            MailTransport::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
        }
    }
}

/// The mailer and what it needs.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// Where e-mail goes.
    pub transport: MailTransport,
    /// The sender of every e-mail.
    pub from: Mailbox,
}

/// A mailer ready to use, and a description of it that is safe to log.
pub struct BuiltMailer {
    /// The mailer.
    pub mailer: Arc<dyn Mailer>,
    /// For an SMTP mailer, the mailer itself, so a start-up check can reach the server.
    pub smtp: Option<SmtpMailer>,
    /// E.g. `SMTP 127.0.0.1:2525 (tls none)` or `.eml files in ./mail-outbox`; no
    /// password.
    pub description: String,
}

impl MailSettings {
    /// Builds the mailer. Errors never contain the SMTP password.
    pub fn build(&self) -> Result<BuiltMailer, MailConfigError> {
        match &self.transport {
            MailTransport::Smtp(url) => {
                let config = SmtpConfig::from_url(url, self.from.clone())?;
                let description = format!(
                    "SMTP {}:{} (tls {}{})",
                    config.host,
                    config.port,
                    config.tls.as_str(),
                    if config.credentials.is_some() {
                        ", with credentials"
                    } else {
                        ""
                    }
                );
                let smtp = SmtpMailer::new(config)?;
                Ok(BuiltMailer {
                    mailer: Arc::new(smtp.clone()),
                    smtp: Some(smtp),
                    description,
                })
            }
            MailTransport::Dir(dir) => Ok(BuiltMailer {
                mailer: Arc::new(FileMailer::new(dir, self.from.clone())?),
                smtp: None,
                description: format!(".eml files in {}", dir.display()),
            }),
        }
    }
}

/// Reads a sender as written in configuration: `Name <address>` or a bare `address`.
/// The address itself is checked when the mailer is built.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, MailConfigError> {
    let bad = |reason: &str| MailConfigError::Sender {
        address: s.chars().take(MAX_FROM_LEN).collect(),
        reason: reason.to_owned(),
    };
    let s = s.trim();
    if s.is_empty() || s.len() > MAX_FROM_LEN {
        return Err(bad(&format!("a sender has 1 to {MAX_FROM_LEN} bytes")));
    }
    match s.strip_suffix('>').and_then(|rest| rest.rsplit_once('<')) {
        Some((name, address)) => {
            let name = name.trim().trim_matches('"').trim();
            Ok(Mailbox {
                name: (!name.is_empty()).then(|| name.to_owned()),
                address: address.trim().to_owned(),
            })
        }
        None if s.contains(['<', '>']) => Err(bad("expected `Name <address>` or `address`")),
        None => Ok(Mailbox {
            name: None,
            address: s.to_owned(),
        }),
    }
}

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs of each queue (`default`, `email`) run at once, 1 to [`MAX_CONCURRENCY`].
    pub concurrency: usize,
    /// Lease length: a dead worker's jobs run again after at most this long.
    pub lease: Duration,
    /// Finished jobs older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
    /// Backoff between attempts of an e-mail job.
    pub email_retry: RetryPolicy,
    /// How long a user's oldest unread message waits before their digest e-mail.
    pub digest_delay: Duration,
    /// When the digest sweep runs (cron, with seconds, UTC); `None`: not in this worker.
    pub digest_schedule: Option<String>,
    /// The server's address as users reach it; e-mail links start with it.
    pub public_url: String,
}

impl Default for WorkerSettings {
    /// Four jobs per queue, the queue crate's lease and retention, default backoff.
    fn default() -> Self {
        let config = WorkerConfig::default();
        Self {
            concurrency: 4,
            lease: config.lease,
            retention: config.retention,
            email_retry: RetryPolicy::default(),
            digest_delay: Duration::from_secs(15 * 60),
            digest_schedule: Some("0 * * * * *".to_owned()),
            public_url: "http://127.0.0.1:8080".to_owned(),
        }
    }
}

/// The services the notification jobs need: e-mails of notifications, training
/// reminders and the unread digest.
#[derive(Clone)]
pub struct NotifyServices {
    /// The store users and sessions are read from.
    pub store: Arc<dyn Store>,
    /// The notification service.
    pub notifier: Notifier,
    /// The training-session service.
    pub training: Training,
    /// Who is connected (only those who are not get a digest).
    pub online: Arc<dyn OnlineUsers>,
}

/// Starts a worker on the current runtime: `default` and `email` queues, the
/// `email.send` handler over `mailer`, and with `services` the notification e-mails,
/// training reminders and the unread-digest sweep. Stop it with
/// [`WorkerHandle::shutdown`].
pub fn start_worker(
    queue: Arc<dyn JobQueue>,
    mailer: Arc<dyn Mailer>,
    settings: &WorkerSettings,
    services: Option<NotifyServices>,
) -> anyhow::Result<WorkerHandle> {
    let concurrency = settings.concurrency.clamp(1, MAX_CONCURRENCY);
    let config = WorkerConfig {
        queues: vec![
            (DEFAULT_QUEUE.to_owned(), concurrency),
            (EMAIL_QUEUE.to_owned(), concurrency),
        ],
        concurrency,
        lease: settings.lease,
        retention: settings.retention,
        ..WorkerConfig::default()
    };
    let mut builder = Worker::builder(queue, config).handle_with(
        SEND_EMAIL,
        Arc::new(SendEmail::new(mailer.clone())),
        settings.email_retry,
    );
    if let Some(s) = services {
        builder = builder
            .handle_with(
                NOTIFICATION_EMAIL_JOB,
                Arc::new(NotificationEmailHandler::new(
                    s.store,
                    mailer,
                    Templates::default(),
                    settings.public_url.clone(),
                )),
                settings.email_retry,
            )
            .handle(
                FMPA_REMINDER_JOB,
                Arc::new(ReminderHandler::new(s.training)),
            )
            .handle(
                DIGEST_SWEEP_JOB,
                Arc::new(DigestSweepHandler::new(
                    s.notifier,
                    s.online,
                    settings.digest_delay,
                )),
            );
        if let Some(expr) = &settings.digest_schedule {
            let schedule = Schedule::parse(expr)
                .map_err(|e| anyhow::anyhow!("invalid digest schedule: {e}"))?;
            builder = builder.repeat(
                DIGEST_SWEEP_JOB,
                schedule,
                NewJob::new(DIGEST_SWEEP_JOB, serde_json::json!({})).max_attempts(1),
            );
        }
    }
    Ok(builder.start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_parse_with_or_without_a_name() {
        let m = parse_mailbox("MindSP <no-reply@localhost>").unwrap();
        assert_eq!(m.name.as_deref(), Some("MindSP"));
        assert_eq!(m.address, "no-reply@localhost");
        let m = parse_mailbox("\"SDIS 13 — MindSP\" <ne-pas-repondre@sdis13.fr>").unwrap();
        assert_eq!(m.name.as_deref(), Some("SDIS 13 — MindSP"));
        let m = parse_mailbox(" mindsp@sdis83.fr ").unwrap();
        assert_eq!((m.name, m.address.as_str()), (None, "mindsp@sdis83.fr"));
        assert!(parse_mailbox("").is_err());
        assert!(parse_mailbox("MindSP <no-reply@localhost").is_err());
        assert!(parse_mailbox(&"x".repeat(MAX_FROM_LEN + 1)).is_err());
        // The default sender is one lettre accepts.
        let settings = MailSettings {
            transport: MailTransport::Dir(std::env::temp_dir()),
            from: parse_mailbox("MindSP <no-reply@localhost>").unwrap(),
        };
        assert!(settings.build().is_ok());
        let bad = MailSettings {
            transport: MailTransport::Dir(std::env::temp_dir()),
            from: parse_mailbox("not an address").unwrap(),
        };
        assert!(bad.build().is_err());
    }

    #[test]
    fn smtp_description_hides_the_password() {
        let settings = MailSettings {
            transport: MailTransport::Smtp(
                "smtp://user:s3cr3t-pa55@mail.sdis13.fr:587?tls=starttls".into(),
            ),
            from: parse_mailbox("MindSP <no-reply@sdis13.fr>").unwrap(),
        };
        let built = settings.build().unwrap();
        assert_eq!(
            built.description,
            "SMTP mail.sdis13.fr:587 (tls starttls, with credentials)"
        );
        assert!(!format!("{:?}", built.smtp).contains("s3cr3t"));
        let err = MailSettings {
            transport: MailTransport::Smtp("smtp://user:s3cr3t-pa55@host?bad=1".into()),
            ..settings
        }
        .build()
        .err()
        .unwrap();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
}
