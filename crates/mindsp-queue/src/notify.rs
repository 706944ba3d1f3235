//! Job handlers of the notification service: the e-mail of one notification, the
//! training-session reminder, and the sweep that sends unread-message digests.
//!
//! Each runs at least once: the e-mail handler may send twice after a crash between
//! sending and acknowledging (SMTP has no idempotency), the reminder handler stores
//! its notification under a key so a second run adds nothing, and the sweep moves each
//! user's digest mark in the same transaction as the digest's job.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use mindsp_core::Error;
use mindsp_core::jobs::Job;
use mindsp_core::mail::{Mailbox, Mailer};
use mindsp_core::notify::{NotificationEmail, Notifier, OnlineUsers, kind};
use mindsp_core::ports::Store;
use mindsp_core::reminders::Reminder;
use mindsp_core::training::Training;
use serde::Deserialize;

use crate::mail::templates::{
    DigestConversation, DigestExcerpt, Templates, TrainingSession, UnreadDigest,
};
use crate::worker::{Handler, JobError};

/// The repeating job that sends unread-message digests.
pub const DIGEST_SWEEP_JOB: &str = "notification.digest_sweep";

fn storage(e: Error) -> JobError {
    match e {
        Error::Storage(m) => JobError::Retry(m),
        other => JobError::Permanent(other.to_string()),
    }
}

/// Renders and sends the e-mail of a notification
/// ([`mindsp_core::notify::NOTIFICATION_EMAIL_JOB`]). The recipient's address is read
/// when the job runs; a user deactivated meanwhile gets nothing.
pub struct NotificationEmailHandler {
    store: Arc<dyn Store>,
    mailer: Arc<dyn Mailer>,
    templates: Templates,
    base_url: String,
}

impl NotificationEmailHandler {
    /// Sends through `mailer`; links in e-mails are `base_url` followed by the
    /// notification's link (e.g. `https://mindsp.sdis13.fr` + `/fmpa/…`).
    pub fn new(
        store: Arc<dyn Store>,
        mailer: Arc<dyn Mailer>,
        templates: Templates,
        base_url: impl Into<String>,
    ) -> Self {
        Self {
            store,
            mailer,
            templates,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
        }
    }

    fn url(&self, link: Option<&str>) -> String {
        match link {
            Some(l) if l.starts_with('/') => format!("{}{l}", self.base_url),
            Some(l) => l.to_owned(),
            None => self.base_url.clone(),
        }
    }
}

/// What notifications about a training session carry (see
/// [`mindsp_core::training::session_data`]).
#[derive(Deserialize)]
struct SessionData {
    title: String,
    kind: String,
    location: String,
    start_at: DateTime<Utc>,
    end_at: DateTime<Utc>,
    organizer_id: mindsp_core::UserId,
    #[serde(default)]
    cancel_reason: Option<String>,
    #[serde(default)]
    offset_minutes: Option<i64>,
}

#[derive(Deserialize)]
struct DigestData {
    digest: Vec<DigestConv>,
}

#[derive(Deserialize)]
struct DigestConv {
    title: String,
    unread: i64,
    messages: Vec<DigestMsg>,
}

#[derive(Deserialize)]
struct DigestMsg {
    author: String,
    text: String,
    sent_at: DateTime<Utc>,
}

#[async_trait]
impl Handler for NotificationEmailHandler {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        let n = NotificationEmail::deserialize(&job.payload)
            .map_err(|e| JobError::Permanent(format!("unreadable payload: {e}")))?;
        let tenant = job
            .tenant
            .ok_or_else(|| JobError::Permanent("a notification e-mail names its tenant".into()))?;
        let mut tx = self.store.read(tenant).await.map_err(storage)?;
        let Some(user) = tx.user(n.user_id).await.map_err(storage)? else {
            return Ok(());
        };
        if !user.active {
            return Ok(());
        }
        let to = Mailbox {
            name: Some(user.display_name.clone()),
            address: user.email.clone(),
        };
        let url = self.url(n.link.as_deref());
        let rendered = match n.kind.as_str() {
            kind::FMPA_INVITATION | kind::FMPA_REMINDER | kind::FMPA_CANCELLED => {
                let d = SessionData::deserialize(&n.data)
                    .map_err(|e| JobError::Permanent(format!("unreadable session: {e}")))?;
                let organiser = tx
                    .user(d.organizer_id)
                    .await
                    .map_err(storage)?
                    .map(|u| u.display_name)
                    .unwrap_or_default();
                let session = TrainingSession {
                    title: d.title,
                    kind: d.kind.replace('_', " "),
                    starts_at: d.start_at,
                    ends_at: d.end_at,
                    location: d.location,
                    organiser,
                    url,
                };
                match n.kind.as_str() {
                    kind::FMPA_INVITATION => self.templates.invitation(&to, &session),
                    kind::FMPA_REMINDER => self.templates.reminder(
                        &to,
                        &session,
                        TimeDelta::minutes(d.offset_minutes.unwrap_or(0)),
                    ),
                    _ => self
                        .templates
                        .cancellation(&to, &session, d.cancel_reason.as_deref()),
                }
            }
            kind::NEW_MESSAGE if n.data.get("digest").is_some() => {
                let d = DigestData::deserialize(&n.data)
                    .map_err(|e| JobError::Permanent(format!("unreadable digest: {e}")))?;
                let digest = UnreadDigest {
                    conversations: d
                        .digest
                        .into_iter()
                        .map(|c| DigestConversation {
                            title: c.title,
                            unread: u32::try_from(c.unread.max(0)).unwrap_or(u32::MAX),
                            excerpts: c
                                .messages
                                .into_iter()
                                .map(|m| DigestExcerpt {
                                    author: m.author,
                                    sent_at: m.sent_at,
                                    text: m.text,
                                })
                                .collect(),
                        })
                        .collect(),
                    url,
                };
                self.templates.unread_digest(&to, &digest)
            }
            _ => self.templates.notification(&to, &n.title, &n.body, &url),
        }
        .map_err(|e| JobError::Permanent(e.to_string()))?;
        drop(tx);
        crate::mail::send_for_job(self.mailer.as_ref(), job, rendered).await
    }
}

/// Runs training-session reminders ([`mindsp_core::training::FMPA_REMINDER_JOB`]).
pub struct ReminderHandler {
    training: Training,
}

impl ReminderHandler {
    /// Reminders through `training`.
    pub fn new(training: Training) -> Self {
        Self { training }
    }
}

#[async_trait]
impl Handler for ReminderHandler {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        let r = Reminder::deserialize(&job.payload)
            .map_err(|e| JobError::Permanent(format!("unreadable payload: {e}")))?;
        let tenant = job
            .tenant
            .ok_or_else(|| JobError::Permanent("a reminder names its tenant".into()))?;
        self.training
            .deliver_reminder(tenant, &r)
            .await
            .map(|_| ())
            .map_err(storage)
    }
}

/// Runs [`DIGEST_SWEEP_JOB`]: [`Notifier::digest_sweep`] with a delay.
pub struct DigestSweepHandler {
    notifier: Notifier,
    online: Arc<dyn OnlineUsers>,
    delay: Duration,
}

impl DigestSweepHandler {
    /// Sends digests to users whose oldest unread message is `delay` old.
    pub fn new(notifier: Notifier, online: Arc<dyn OnlineUsers>, delay: Duration) -> Self {
        Self {
            notifier,
            online,
            delay,
        }
    }
}

#[async_trait]
impl Handler for DigestSweepHandler {
    async fn run(&self, _job: &Job) -> Result<(), JobError> {
        let delay = TimeDelta::from_std(self.delay).unwrap_or(TimeDelta::MAX);
        let n = self
            .notifier
            .digest_sweep(self.online.as_ref(), delay)
            .await
            .map_err(storage)?;
        if n > 0 {
            tracing::info!(digests = n, "unread-message digests enqueued");
        }
        Ok(())
    }
}
