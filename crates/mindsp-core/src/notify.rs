//! Notifications: what a user is told outside a conversation (an invitation to a
//! training session, a reminder, a mention, a message from the administration), the
//! preferences that decide on which channel, and the [`Notifier`] service.
//!
//! A notification is stored per recipient, in the same unit of work as the change that
//! caused it ([`Notifier::notify_in`]); its e-mail, when the recipient's preferences ask
//! for one, is a job enqueued in that same unit of work where the queue can join it.
//! After the commit, [`Notifier::deliver`] pushes it with the new unread count to every
//! live connection of the recipient.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::{Envelope, Event, Publisher};
use crate::ids::{NotificationId, TenantId, UserId};
use crate::jobs::{JobQueue, NewJob, OnDuplicate, enqueue_in_or_defer};
use crate::model::now;
use crate::ports::{Store, TenantTx};
use crate::service::{Actor, page_size, require_admin};

/// Built-in notification types. Embedders add their own through
/// [`NotifyConfig::extra_kinds`].
pub mod kind {
    /// Invited to a training session.
    pub const FMPA_INVITATION: &str = "FMPA_INVITATION";
    /// A training session is coming.
    pub const FMPA_REMINDER: &str = "FMPA_REMINDER";
    /// A training session moved or changed place.
    pub const FMPA_UPDATED: &str = "FMPA_UPDATED";
    /// A training session was cancelled.
    pub const FMPA_CANCELLED: &str = "FMPA_CANCELLED";
    /// Messages arrived while away (the unread digest e-mail follows this type).
    pub const NEW_MESSAGE: &str = "NEW_MESSAGE";
    /// Someone mentioned the user in a message.
    pub const MENTION: &str = "MENTION";
    /// A message from the administration.
    pub const SYSTEM: &str = "SYSTEM";
    /// Every built-in type.
    pub const BUILTIN: [&str; 7] = [
        FMPA_INVITATION,
        FMPA_REMINDER,
        FMPA_UPDATED,
        FMPA_CANCELLED,
        NEW_MESSAGE,
        MENTION,
        SYSTEM,
    ];
}

/// Longest deduplication key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// The job kind that e-mails one notification.
pub const NOTIFICATION_EMAIL_JOB: &str = "notification.email";

/// A channel a notification can travel on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Stored, listed under the bell and pushed to live connections.
    InApp,
    /// An e-mail.
    Email,
}

/// One notification of one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Identifier; time-ordered, so it is also the pagination cursor.
    pub id: NotificationId,
    /// The recipient.
    pub user_id: UserId,
    /// Its type, e.g. `FMPA_INVITATION`.
    pub kind: String,
    /// Short title.
    pub title: String,
    /// Text, plain.
    pub body: String,
    /// Where a client leads the user, e.g. `/fmpa/0190...`.
    pub link: Option<String>,
    /// Structured data for clients (ids, dates), a JSON object.
    pub data: serde_json::Value,
    /// Deduplication key: a recipient holds at most one notification per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When the user read it.
    pub read_at: Option<DateTime<Utc>>,
}

/// A notification to create, for one or many users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewNotification {
    /// Its type: a built-in one (see [`kind`]) or one the embedder registered.
    pub kind: String,
    /// Short title.
    pub title: String,
    /// Text, plain.
    pub body: String,
    /// Where a client leads the user.
    #[serde(default)]
    pub link: Option<String>,
    /// Structured data, a JSON object (or null).
    #[serde(default)]
    pub data: serde_json::Value,
    /// Deduplication key, the same for every recipient: creating it again for a user
    /// who already holds this key stores, pushes and e-mails nothing.
    #[serde(default)]
    pub key: Option<String>,
    /// Urgent: its e-mail does not wait for the end of quiet hours.
    #[serde(default)]
    pub urgent: bool,
}

impl NewNotification {
    /// A notification of `kind` with a title and a body.
    pub fn new(kind: &str, title: impl Into<String>, body: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            title: title.into(),
            body: body.into(),
            link: None,
            data: serde_json::Value::Null,
            key: None,
            urgent: false,
        }
    }

    /// Sets the link.
    pub fn link(mut self, link: impl Into<String>) -> Self {
        self.link = Some(link.into());
        self
    }

    /// Sets the structured data.
    pub fn data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }

    /// Sets the deduplication key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Marks it urgent.
    pub fn urgent(mut self) -> Self {
        self.urgent = true;
        self
    }
}

/// A page of notifications, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationPage {
    /// The notifications.
    pub items: Vec<Notification>,
    /// The user's unread count now.
    pub unread: i64,
    /// Cursor for the next (older) page, when there may be one.
    pub next_before: Option<NotificationId>,
}

// ---- preferences -------------------------------------------------------------------

/// Channel switches for one type. `None` inherits (tenant default, then built-in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelPrefs {
    /// In-app (stored and pushed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_app: Option<bool>,
    /// E-mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<bool>,
}

/// A daily window during which e-mail waits, in a time zone. It may span midnight
/// (`22:00`–`07:00`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Start, `HH:MM`.
    pub start: String,
    /// End, `HH:MM`.
    pub end: String,
    /// IANA time zone; Europe/Paris when absent.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
}

fn default_time_zone() -> String {
    "Europe/Paris".to_owned()
}

/// Stored preferences: of a user, or a tenant's defaults for its users.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationPrefs {
    /// Per type.
    #[serde(default)]
    pub types: BTreeMap<String, ChannelPrefs>,
    /// Quiet hours; `None` inherits the tenant's, which default to none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
}

impl NotificationPrefs {
    /// Reads preferences sent by a client, refusing any field this version does not
    /// know (`invalid_body`), so a typo is an error rather than a setting silently
    /// ignored. Stored preferences are read leniently instead (plain `Deserialize`), so
    /// rows written by a later version with more fields stay readable.
    pub fn from_client(value: serde_json::Value) -> Result<Self> {
        fn only(v: &serde_json::Value, allowed: &[&str], at: &str) -> Result<()> {
            if let Some(o) = v.as_object()
                && let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str()))
            {
                return Err(Error::invalid(
                    "invalid_body",
                    format!("unknown field {:?} in {at}", clip(k, 64)),
                ));
            }
            Ok(())
        }
        only(&value, &["types", "quiet_hours"], "preferences")?;
        if let Some(types) = value.get("types").and_then(|t| t.as_object()) {
            for (k, v) in types {
                only(v, &["in_app", "email"], &format!("types.{}", clip(k, 64)))?;
            }
        }
        if let Some(q) = value.get("quiet_hours") {
            only(q, &["start", "end", "time_zone"], "quiet_hours")?;
        }
        serde_json::from_value(value)
            .map_err(|e| Error::invalid("invalid_body", format!("invalid preferences: {e}")))
    }
}

/// Preferences in force for one user: every known type resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectivePrefs {
    /// Per type, both channels decided.
    pub types: BTreeMap<String, EffectiveChannels>,
    /// Quiet hours in force.
    pub quiet_hours: Option<QuietHours>,
}

/// Both channels of one type, decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveChannels {
    /// In-app.
    pub in_app: bool,
    /// E-mail.
    pub email: bool,
}

impl QuietHours {
    fn parse(&self) -> Result<(NaiveTime, NaiveTime, Tz)> {
        let time = |s: &str| {
            NaiveTime::parse_from_str(s, "%H:%M").map_err(|_| {
                Error::invalid(
                    "invalid_quiet_hours",
                    format!("quiet hours are HH:MM, got {s:?}"),
                )
            })
        };
        let tz: Tz = self.time_zone.parse().map_err(|_| {
            Error::invalid(
                "invalid_quiet_hours",
                format!("unknown time zone {:?}", self.time_zone),
            )
        })?;
        let (start, end) = (time(&self.start)?, time(&self.end)?);
        if start == end {
            return Err(Error::invalid(
                "invalid_quiet_hours",
                "quiet hours must not start and end at the same time",
            ));
        }
        Ok((start, end, tz))
    }

    /// When an e-mail due at `at` may leave: `at` itself outside quiet hours, else
    /// the end of the window.
    pub fn release(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        let Ok((start, end, tz)) = self.parse() else {
            return at;
        };
        let local = at.with_timezone(&tz);
        let t = local.time();
        let inside = if start < end {
            t >= start && t < end
        } else {
            t >= start || t < end
        };
        if !inside {
            return at;
        }
        let mut day = local.date_naive();
        if start > end && t >= start {
            day = day.succ_opt().unwrap_or(day);
        }
        // A window ending in a gap (daylight saving) ends at the first valid instant.
        let naive = day.and_time(end);
        match tz.from_local_datetime(&naive) {
            chrono::LocalResult::Single(d) | chrono::LocalResult::Ambiguous(d, _) => {
                d.with_timezone(&Utc)
            }
            chrono::LocalResult::None => tz
                .from_local_datetime(&(naive + chrono::TimeDelta::hours(1)))
                .earliest()
                .map(|d| d.with_timezone(&Utc))
                .unwrap_or(at),
        }
    }
}

// ---- service -----------------------------------------------------------------------

/// Configuration of the [`Notifier`].
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Types added by the embedder, beside [`kind::BUILTIN`].
    pub extra_kinds: Vec<String>,
    /// Types whose e-mail ignores quiet hours, beside notifications marked urgent.
    pub urgent_kinds: Vec<String>,
    /// Built-in default of the e-mail channel per type (in-app defaults to on). Types
    /// not named default to e-mail off.
    pub email_by_default: Vec<String>,
    /// The queue e-mail jobs wait in.
    pub email_queue: String,
    /// Attempts of an e-mail job before it ends dead.
    pub email_max_attempts: u32,
    /// Longest title, in characters (`invalid_notification`).
    pub max_title_chars: usize,
    /// Longest body, in characters (`invalid_notification`).
    pub max_body_chars: usize,
    /// Longest link, in bytes (`invalid_notification`).
    pub max_link_len: usize,
    /// Largest `data`, serialised, in bytes (`invalid_notification`).
    pub max_data_bytes: usize,
    /// Most recipients of one call (`too_many_recipients`).
    pub max_recipients: usize,
    /// Largest page (`invalid_limit`) and the page size when the client does not say.
    pub max_page_size: u32,
    /// Default page size.
    pub default_page_size: u32,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            extra_kinds: Vec::new(),
            // A reminder or a cancellation held until 07:00 may come after the session.
            urgent_kinds: vec![
                kind::FMPA_REMINDER.to_owned(),
                kind::FMPA_CANCELLED.to_owned(),
            ],
            email_by_default: [
                kind::FMPA_INVITATION,
                kind::FMPA_REMINDER,
                kind::FMPA_UPDATED,
                kind::FMPA_CANCELLED,
                kind::NEW_MESSAGE,
                kind::MENTION,
                kind::SYSTEM,
            ]
            .map(str::to_owned)
            .to_vec(),
            email_queue: "email".to_owned(),
            email_max_attempts: 8,
            max_title_chars: 200,
            max_body_chars: 2_000,
            max_link_len: 500,
            max_data_bytes: 8 * 1024,
            max_recipients: 20_000,
            max_page_size: 100,
            default_page_size: 30,
        }
    }
}

/// The payload of a [`NOTIFICATION_EMAIL_JOB`]: everything the e-mail says, so it can
/// be rendered even when the in-app copy is off or was deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationEmail {
    /// The recipient; the job looks up their address when it runs.
    pub user_id: UserId,
    /// The in-app notification, when one was stored.
    pub notification_id: Option<NotificationId>,
    /// Type.
    pub kind: String,
    /// Title (the subject).
    pub title: String,
    /// Text.
    pub body: String,
    /// Link.
    pub link: Option<String>,
    /// Structured data (templates of known types read it).
    pub data: serde_json::Value,
}

/// Notifications stored by [`Notifier::notify_in`], waiting for the commit to be
/// pushed by [`Notifier::deliver`].
#[derive(Debug, Default)]
#[must_use = "deliver it after the commit"]
pub struct Outbox {
    tenant: Option<TenantId>,
    stored: Vec<Notification>,
    emails: usize,
    jobs_after_commit: Vec<NewJob>,
}

impl Outbox {
    /// The notifications stored (deduplicated ones are absent).
    pub fn stored(&self) -> &[Notification] {
        &self.stored
    }

    /// How many e-mail jobs were enqueued (or will be, after the commit).
    pub fn emails(&self) -> usize {
        self.emails
    }

    /// Jobs to enqueue after the commit, for a queue that cannot join the transaction.
    pub fn defer_jobs(&mut self, tenant: TenantId, jobs: Vec<NewJob>) {
        self.tenant.get_or_insert(tenant);
        self.jobs_after_commit.extend(jobs);
    }

    /// Adds another outbox of the same tenant to this one.
    pub fn merge(&mut self, other: Outbox) {
        if self.tenant.is_none() {
            self.tenant = other.tenant;
        }
        self.stored.extend(other.stored);
        self.emails += other.emails;
        self.jobs_after_commit.extend(other.jobs_after_commit);
    }
}

/// The notification service.
#[derive(Clone)]
pub struct Notifier {
    store: Arc<dyn Store>,
    publisher: Option<Arc<dyn Publisher>>,
    queue: Option<Arc<dyn JobQueue>>,
    config: Arc<NotifyConfig>,
}

impl Notifier {
    /// A notifier over a store; without a publisher nothing is pushed, without a queue
    /// no e-mail is sent.
    pub fn new(store: Arc<dyn Store>, config: NotifyConfig) -> Self {
        Self {
            store,
            publisher: None,
            queue: None,
            config: Arc::new(config),
        }
    }

    /// Pushes through `publisher`.
    pub fn with_publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// Enqueues e-mail jobs in `queue`.
    pub fn with_queue(mut self, queue: Arc<dyn JobQueue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &NotifyConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The job queue, if any.
    pub fn queue(&self) -> Option<&Arc<dyn JobQueue>> {
        self.queue.as_ref()
    }

    /// Whether `kind` is a known type.
    pub fn is_known_kind(&self, k: &str) -> bool {
        kind::BUILTIN.contains(&k) || self.config.extra_kinds.iter().any(|e| e == k)
    }

    fn known_kinds(&self) -> impl Iterator<Item = &str> {
        kind::BUILTIN
            .iter()
            .copied()
            .chain(self.config.extra_kinds.iter().map(String::as_str))
    }

    /// `unknown_notification_type` unless `k` is a known type.
    fn check_kind(&self, k: &str) -> Result<()> {
        if self.is_known_kind(k) {
            return Ok(());
        }
        Err(Error::invalid(
            "unknown_notification_type",
            format!("unknown notification type {:?}", clip(k, 64)),
        ))
    }

    /// Checks a notification before anything is written.
    pub fn validate(&self, new: &NewNotification) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("invalid_notification", m));
        self.check_kind(&new.kind)?;
        let title = new.title.trim();
        if title.is_empty() || title.chars().count() > self.config.max_title_chars {
            return bad(format!(
                "a title has 1 to {} characters",
                self.config.max_title_chars
            ));
        }
        if new.body.chars().count() > self.config.max_body_chars {
            return bad(format!(
                "a body has at most {} characters",
                self.config.max_body_chars
            ));
        }
        for (what, v, max) in [
            ("link", &new.link, self.config.max_link_len),
            ("key", &new.key, MAX_KEY_LEN),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > max)
            {
                return bad(format!("a {what} has 1 to {max} bytes"));
            }
        }
        if !(new.data.is_object() || new.data.is_null()) {
            return bad("data must be a JSON object".to_owned());
        }
        if serde_json::to_vec(&new.data).map_or(usize::MAX, |v| v.len())
            > self.config.max_data_bytes
        {
            return bad(format!(
                "data is limited to {} bytes",
                self.config.max_data_bytes
            ));
        }
        Ok(())
    }

    /// Stores `new` for each of `users` inside `tx`, as their preferences allow, and
    /// enqueues the e-mails they ask for in the same unit of work (after it, for a
    /// queue that cannot join it). Recipients must be users of the tenant; those who
    /// already hold the notification's key get nothing. Deliver the outbox after the
    /// commit.
    pub async fn notify_in(
        &self,
        tx: &mut dyn TenantTx,
        users: &[UserId],
        new: &NewNotification,
    ) -> Result<Outbox> {
        self.validate(new)?;
        if users.len() > self.config.max_recipients {
            return Err(Error::invalid(
                "too_many_recipients",
                format!(
                    "one notification reaches at most {} users",
                    self.config.max_recipients
                ),
            ));
        }
        let mut recipients: Vec<UserId> = users.to_vec();
        recipients.sort();
        recipients.dedup();
        let tenant = tx.tenant();
        let prefs = self.effective_prefs_in(tx, &recipients).await?;
        let created_at = now();
        let data = if new.data.is_null() {
            serde_json::json!({})
        } else {
            new.data.clone()
        };
        let mut rows = Vec::new();
        let mut email_only = Vec::new();
        for user in &recipients {
            let p = prefs.get(user).and_then(|p| p.types.get(&new.kind));
            let channels = p.copied().unwrap_or(EffectiveChannels {
                in_app: true,
                email: false,
            });
            if channels.in_app {
                rows.push(Notification {
                    id: NotificationId::new(),
                    user_id: *user,
                    kind: new.kind.clone(),
                    title: new.title.trim().to_owned(),
                    body: new.body.clone(),
                    link: new.link.clone(),
                    data: data.clone(),
                    key: new.key.clone(),
                    created_at,
                    read_at: None,
                });
            } else if channels.email {
                email_only.push(*user);
            }
        }
        let inserted: HashSet<NotificationId> =
            tx.insert_notifications(&rows).await?.into_iter().collect();
        let stored: Vec<Notification> = rows
            .into_iter()
            .filter(|n| inserted.contains(&n.id))
            .collect();
        // Those whose in-app copy is off are deduplicated by the e-mail job's key.
        let mut emails: Vec<(UserId, Option<NotificationId>)> = Vec::new();
        for n in &stored {
            if prefs
                .get(&n.user_id)
                .and_then(|p| p.types.get(&n.kind))
                .is_some_and(|c| c.email)
            {
                emails.push((n.user_id, Some(n.id)));
            }
        }
        emails.extend(email_only.into_iter().map(|u| (u, None)));
        let mut outbox = Outbox {
            tenant: Some(tenant),
            stored,
            emails: 0,
            jobs_after_commit: Vec::new(),
        };
        let Some(queue) = &self.queue else {
            return Ok(outbox);
        };
        let urgent = new.urgent || self.config.urgent_kinds.contains(&new.kind);
        let mut jobs = Vec::with_capacity(emails.len());
        for (user, notification_id) in emails {
            let payload = NotificationEmail {
                user_id: user,
                notification_id,
                kind: new.kind.clone(),
                title: new.title.trim().to_owned(),
                body: new.body.clone(),
                link: new.link.clone(),
                data: data.clone(),
            };
            let quiet = prefs.get(&user).and_then(|p| p.quiet_hours.as_ref());
            let mut job =
                self.email_job(tenant, &payload, quiet.filter(|_| !urgent), created_at)?;
            if let Some(key) = &new.key {
                job = job.unique(format!("notification:{user}:{key}"), OnDuplicate::Keep);
            }
            jobs.push(job);
        }
        outbox.emails = jobs.len();
        enqueue_in_or_defer(queue.as_ref(), tx, jobs, &mut outbox.jobs_after_commit).await?;
        Ok(outbox)
    }

    /// After the commit of the unit of work [`Notifier::notify_in`] wrote in: pushes
    /// each stored notification with the recipient's unread count, and enqueues the
    /// e-mails a non-transactional queue could not take earlier.
    pub async fn deliver(&self, outbox: Outbox) {
        let Some(tenant) = outbox.tenant else {
            return;
        };
        if let Some(queue) = &self.queue
            && !outbox.jobs_after_commit.is_empty()
            && let Err(e) = queue.enqueue_batch(&outbox.jobs_after_commit).await
        {
            tracing::error!(error = %e, count = outbox.jobs_after_commit.len(),
                "notification e-mails or reminders not enqueued after the commit");
        }
        let Some(publisher) = &self.publisher else {
            return;
        };
        if outbox.stored.is_empty() {
            return;
        }
        let users: Vec<UserId> = outbox.stored.iter().map(|n| n.user_id).collect();
        let counts = match self.unread_counts(tenant, &users).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "notifications committed but not pushed");
                return;
            }
        };
        for n in outbox.stored {
            let unread = counts.get(&n.user_id).copied().unwrap_or(0);
            publisher
                .publish(Envelope::to_users(
                    tenant,
                    vec![n.user_id],
                    Event::Notification {
                        notification: n,
                        unread,
                    },
                ))
                .await;
        }
    }

    async fn unread_counts(
        &self,
        tenant: TenantId,
        users: &[UserId],
    ) -> Result<HashMap<UserId, i64>> {
        let mut tx = self.store.read(tenant).await?;
        Ok(tx
            .notification_unread_counts(users)
            .await?
            .into_iter()
            .collect())
    }

    /// Creates a notification for `users` of `tenant` in a unit of work of its own,
    /// then pushes it. Recipients who are not active users of the tenant make it fail
    /// with `unknown_users`, and nothing is written.
    pub async fn notify(
        &self,
        tenant: TenantId,
        users: &[UserId],
        new: &NewNotification,
    ) -> Result<Vec<Notification>> {
        self.validate(new)?;
        let mut tx = self.store.begin(tenant).await?;
        check_users(tx.as_mut(), users).await?;
        let outbox = self.notify_in(tx.as_mut(), users, new).await?;
        tx.commit().await?;
        let stored = outbox.stored.clone();
        self.deliver(outbox).await;
        Ok(stored)
    }

    /// A tenant administrator notifies users of their tenant, or every active user
    /// when `users` is `None` (a `SYSTEM` message, say).
    pub async fn broadcast(
        &self,
        actor: &Actor,
        users: Option<&[UserId]>,
        new: &NewNotification,
    ) -> Result<usize> {
        require_admin(actor)?;
        self.validate(new)?;
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let recipients = match users {
            Some(u) => {
                check_users(tx.as_mut(), u).await?;
                u.to_vec()
            }
            None => tx.active_user_ids().await?,
        };
        let outbox = self.notify_in(tx.as_mut(), &recipients, new).await?;
        tx.commit().await?;
        let n = outbox.stored.len();
        self.deliver(outbox).await;
        Ok(n)
    }

    fn page_size(&self, limit: Option<u32>) -> Result<u32> {
        page_size(
            limit,
            self.config.default_page_size,
            self.config.max_page_size,
        )
    }

    /// The actor's notifications, newest first, older than `before`.
    pub async fn list(
        &self,
        actor: &Actor,
        before: Option<NotificationId>,
        unread_only: bool,
        limit: Option<u32>,
    ) -> Result<NotificationPage> {
        let limit = self.page_size(limit)?;
        let mut tx = self.store.read(actor.tenant_id).await?;
        let items = tx
            .notifications(actor.user_id, before, unread_only, limit)
            .await?;
        let unread = unread_of(tx.as_mut(), actor.user_id).await?;
        let next_before = (items.len() as u32 == limit)
            .then(|| items.last().map(|n| n.id))
            .flatten();
        Ok(NotificationPage {
            items,
            unread,
            next_before,
        })
    }

    /// The actor's unread count.
    pub async fn unread_count(&self, actor: &Actor) -> Result<i64> {
        let mut tx = self.store.read(actor.tenant_id).await?;
        unread_of(tx.as_mut(), actor.user_id).await
    }

    /// Marks one of the actor's notifications read; another user's answers
    /// `NotFound`. Every device of the actor learns the new count. Answers the
    /// notification and the unread count after.
    pub async fn mark_read(
        &self,
        actor: &Actor,
        id: NotificationId,
    ) -> Result<(Notification, i64)> {
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let changed = tx
            .mark_notifications_read(actor.user_id, Some(&[id]), now())
            .await?;
        let n = tx
            .notification(actor.user_id, id)
            .await?
            .ok_or(Error::NotFound("notification"))?;
        let unread = unread_of(tx.as_mut(), actor.user_id).await?;
        tx.commit().await?;
        if changed > 0 {
            self.push_read(actor, vec![id], false, unread).await;
        }
        Ok((n, unread))
    }

    /// Marks all of the actor's notifications read; answers how many changed and the
    /// count after (0).
    pub async fn mark_all_read(&self, actor: &Actor) -> Result<(u64, i64)> {
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let changed = tx
            .mark_notifications_read(actor.user_id, None, now())
            .await?;
        let unread = unread_of(tx.as_mut(), actor.user_id).await?;
        tx.commit().await?;
        if changed > 0 {
            self.push_read(actor, Vec::new(), true, unread).await;
        }
        Ok((changed, unread))
    }

    /// Deletes one of the actor's notifications; another user's answers `NotFound`.
    /// Answers the unread count after.
    pub async fn delete(&self, actor: &Actor, id: NotificationId) -> Result<i64> {
        let mut tx = self.store.begin(actor.tenant_id).await?;
        if !tx.delete_notification(actor.user_id, id).await? {
            return Err(Error::NotFound("notification"));
        }
        let unread = unread_of(tx.as_mut(), actor.user_id).await?;
        tx.commit().await?;
        if let Some(p) = &self.publisher {
            p.publish(Envelope::to_users(
                actor.tenant_id,
                vec![actor.user_id],
                Event::NotificationDeleted { id, unread },
            ))
            .await;
        }
        Ok(unread)
    }

    async fn push_read(&self, actor: &Actor, ids: Vec<NotificationId>, all: bool, unread: i64) {
        if let Some(p) = &self.publisher {
            p.publish(Envelope::to_users(
                actor.tenant_id,
                vec![actor.user_id],
                Event::NotificationsRead { ids, all, unread },
            ))
            .await;
        }
    }

    // ---- preferences -------------------------------------------------------------

    /// Resolves the preferences of `users`: built-in defaults, then the tenant's, then
    /// each user's own.
    pub async fn effective_prefs_in(
        &self,
        tx: &mut dyn TenantTx,
        users: &[UserId],
    ) -> Result<HashMap<UserId, EffectivePrefs>> {
        let tenant = tx.tenant_notification_prefs().await?.unwrap_or_default();
        let base = self.resolve(&NotificationPrefs::default(), &tenant);
        let own: HashMap<UserId, NotificationPrefs> = tx
            .user_notification_prefs(users)
            .await?
            .into_iter()
            .collect();
        Ok(users
            .iter()
            .map(|u| {
                let p = match own.get(u) {
                    Some(p) => self.resolve(&tenant, p),
                    None => base.clone(),
                };
                (*u, p)
            })
            .collect())
    }

    fn resolve(&self, tenant: &NotificationPrefs, user: &NotificationPrefs) -> EffectivePrefs {
        let types = self
            .known_kinds()
            .map(|k| {
                let builtin_email = self.config.email_by_default.iter().any(|e| e == k);
                let t = tenant.types.get(k).copied().unwrap_or_default();
                let u = user.types.get(k).copied().unwrap_or_default();
                (
                    k.to_owned(),
                    EffectiveChannels {
                        in_app: u.in_app.or(t.in_app).unwrap_or(true),
                        email: u.email.or(t.email).unwrap_or(builtin_email),
                    },
                )
            })
            .collect();
        EffectivePrefs {
            types,
            quiet_hours: user
                .quiet_hours
                .clone()
                .or_else(|| tenant.quiet_hours.clone()),
        }
    }

    /// Checks stored preferences: known types only, valid quiet hours.
    pub fn validate_prefs(&self, prefs: &NotificationPrefs) -> Result<()> {
        for k in prefs.types.keys() {
            self.check_kind(k)?;
        }
        if let Some(q) = &prefs.quiet_hours {
            q.parse()?;
        }
        Ok(())
    }

    /// The actor's own stored preferences and those in force.
    pub async fn preferences(&self, actor: &Actor) -> Result<(NotificationPrefs, EffectivePrefs)> {
        let mut tx = self.store.read(actor.tenant_id).await?;
        let own = tx
            .user_notification_prefs(&[actor.user_id])
            .await?
            .into_iter()
            .next()
            .map(|(_, p)| p)
            .unwrap_or_default();
        let effective = self
            .effective_prefs_in(tx.as_mut(), &[actor.user_id])
            .await?
            .remove(&actor.user_id)
            .unwrap_or_else(|| self.resolve(&NotificationPrefs::default(), &own));
        Ok((own, effective))
    }

    /// Replaces the actor's own preferences.
    pub async fn set_preferences(
        &self,
        actor: &Actor,
        prefs: &NotificationPrefs,
    ) -> Result<(NotificationPrefs, EffectivePrefs)> {
        self.validate_prefs(prefs)?;
        let mut tx = self.store.begin(actor.tenant_id).await?;
        tx.set_user_notification_prefs(actor.user_id, prefs).await?;
        tx.commit().await?;
        self.preferences(actor).await
    }

    /// The tenant's defaults; administrators only, like every `/api/admin` route.
    pub async fn tenant_defaults(&self, actor: &Actor) -> Result<NotificationPrefs> {
        require_admin(actor)?;
        let mut tx = self.store.read(actor.tenant_id).await?;
        Ok(tx.tenant_notification_prefs().await?.unwrap_or_default())
    }

    /// Replaces the tenant's defaults; administrators only.
    pub async fn set_tenant_defaults(
        &self,
        actor: &Actor,
        prefs: &NotificationPrefs,
    ) -> Result<NotificationPrefs> {
        require_admin(actor)?;
        self.validate_prefs(prefs)?;
        let mut tx = self.store.begin(actor.tenant_id).await?;
        tx.set_tenant_notification_prefs(prefs).await?;
        tx.commit().await?;
        Ok(prefs.clone())
    }
}

/// Who is connected right now, for the unread digest (only users who stay offline
/// get one). The real-time layer implements it.
#[async_trait::async_trait]
pub trait OnlineUsers: Send + Sync + 'static {
    /// Those of `users` with at least one live connection; `None` when that cannot be
    /// known now (shared presence whose store is away).
    async fn online_among(&self, tenant: TenantId, users: &[UserId]) -> Option<Vec<UserId>>;
}

/// Nobody is ever online: for a worker without real time.
#[derive(Debug, Clone, Copy, Default)]
pub struct NobodyOnline;

#[async_trait::async_trait]
impl OnlineUsers for NobodyOnline {
    async fn online_among(&self, _tenant: TenantId, _users: &[UserId]) -> Option<Vec<UserId>> {
        Some(Vec::new())
    }
}

/// Most users one sweep of one tenant e-mails a digest to; the next sweep takes the
/// rest.
pub const DIGEST_BATCH: u32 = 500;
/// Conversations and messages per conversation a digest names.
pub const DIGEST_CONVERSATIONS: u32 = 10;
/// Latest unread messages quoted per conversation.
pub const DIGEST_MESSAGES: u32 = 3;

impl Notifier {
    /// One pass of the unread-message digest, over every tenant: each user whose
    /// oldest unread message is at least `delay` old, who has had activity since their
    /// last digest and who is not online, gets one e-mail (type `NEW_MESSAGE`, as their
    /// preferences and quiet hours allow) summarising what they have not read; then
    /// their digest mark moves to now, so the same messages are not sent twice. A user
    /// who read everything before the delay is not a candidate; one connected at the
    /// time of the sweep has their mark moved too (what they could read is not
    /// e-mailed later). A tenant whose presence cannot be read now is left to the next
    /// sweep. The digest lists the conversations with activity since the
    /// last mark, each with all its unread messages counted. Answers how many
    /// digests were enqueued. Run it every minute or so, on one node at a time (a
    /// repeating job).
    pub async fn digest_sweep(
        &self,
        online: &dyn OnlineUsers,
        delay: chrono::TimeDelta,
    ) -> Result<usize> {
        let Some(queue) = &self.queue else {
            return Ok(0);
        };
        let mut sent = 0;
        let mut waiting = 0;
        for tenant in self.store.tenant_ids().await? {
            let at = now();
            // Everything is read first, in a read unit of work: on SQLite a write unit
            // would hold up every sender meanwhile. The writes are the marks and jobs.
            let mut r = self.store.read(tenant).await?;
            let candidates = r.digest_candidates(at - delay, DIGEST_BATCH).await?;
            if candidates.is_empty() {
                continue;
            }
            // Unknown: not now. E-mailing everyone would reach people reading live, and
            // move their marks; the next sweep tries again.
            let Some(here) = online.online_among(tenant, &candidates).await else {
                waiting += 1;
                continue;
            };
            let here: HashSet<UserId> = here.into_iter().collect();
            let away: Vec<UserId> = candidates
                .iter()
                .copied()
                .filter(|u| !here.contains(u))
                .collect();
            let prefs = self.effective_prefs_in(r.as_mut(), &away).await?;
            let mut jobs = Vec::new();
            for user in &away {
                let p = prefs.get(user);
                if !p
                    .and_then(|p| p.types.get(kind::NEW_MESSAGE))
                    .is_some_and(|c| c.email)
                {
                    continue;
                }
                let entries = r
                    .unread_digest(*user, DIGEST_CONVERSATIONS, DIGEST_MESSAGES)
                    .await?;
                if entries.is_empty() {
                    continue;
                }
                let payload = digest_email(*user, &entries);
                let quiet = p.and_then(|p| p.quiet_hours.as_ref());
                jobs.push(self.email_job(tenant, &payload, quiet, at)?);
            }
            drop(r);
            let mut tx = self.store.begin(tenant).await?;
            // Connected now, they can read what arrived: it is not e-mailed later. This
            // also keeps them from filling every batch while they stay online.
            for user in &candidates {
                tx.set_digest_sent(*user, at).await?;
            }
            sent += jobs.len();
            let mut after_commit = Vec::new();
            enqueue_in_or_defer(queue.as_ref(), tx.as_mut(), jobs, &mut after_commit).await?;
            tx.commit().await?;
            if !after_commit.is_empty() {
                queue.enqueue_batch(&after_commit).await?;
            }
        }
        if waiting > 0 {
            tracing::warn!(
                departments = waiting,
                "presence unknown: these departments' unread digests wait for the next sweep"
            );
        }
        Ok(sent)
    }
}

impl Notifier {
    /// The job e-mailing `payload`, held until `quiet` hours end when given.
    fn email_job(
        &self,
        tenant: TenantId,
        payload: &NotificationEmail,
        quiet: Option<&QuietHours>,
        at: DateTime<Utc>,
    ) -> Result<NewJob> {
        let mut job = NewJob::new(
            NOTIFICATION_EMAIL_JOB,
            serde_json::to_value(payload).map_err(|e| Error::Storage(e.to_string()))?,
        )
        .queue(self.config.email_queue.clone())
        .max_attempts(self.config.email_max_attempts)
        .tenant(tenant);
        if let Some(release) = quiet.map(|q| q.release(at)).filter(|r| *r > at) {
            job = job.run_at(release);
        }
        Ok(job)
    }
}

/// The e-mail of an unread digest (type `NEW_MESSAGE`; templates read `data.digest`).
fn digest_email(user: UserId, entries: &[crate::ports::DigestEntry]) -> NotificationEmail {
    let total: i64 = entries.iter().map(|e| e.unread).sum();
    let conversations: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let messages: Vec<serde_json::Value> = e
                .messages
                .iter()
                .map(|(who, text, at)| {
                    serde_json::json!({"author": who, "text": text, "sent_at": at})
                })
                .collect();
            serde_json::json!({
                "conversation_id": e.conversation_id,
                "title": e.title,
                "unread": e.unread,
                "messages": messages,
            })
        })
        .collect();
    NotificationEmail {
        user_id: user,
        notification_id: None,
        kind: kind::NEW_MESSAGE.to_owned(),
        title: format!("{total} message(s) non lu(s)"),
        body: String::new(),
        link: Some("/".to_owned()),
        data: serde_json::json!({ "digest": conversations }),
    }
}

async fn unread_of(tx: &mut dyn TenantTx, user: UserId) -> Result<i64> {
    Ok(tx
        .notification_unread_counts(&[user])
        .await?
        .into_iter()
        .next()
        .map_or(0, |(_, n)| n))
}

/// Fails with `unknown_users` (naming them) unless every one of `users` is an active
/// user of the tenant.
pub async fn check_users(tx: &mut dyn TenantTx, users: &[UserId]) -> Result<()> {
    let mut wanted = users.to_vec();
    wanted.sort();
    wanted.dedup();
    let found: HashSet<UserId> = tx.active_users_among(&wanted).await?.into_iter().collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|u| !found.contains(u))
        .take(10)
        .map(|u| u.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(
            "unknown_users",
            format!(
                "not active users of this department: {}",
                missing.join(", ")
            ),
        ))
    }
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(start: &str, end: &str) -> QuietHours {
        QuietHours {
            start: start.into(),
            end: end.into(),
            time_zone: "Europe/Paris".into(),
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn quiet_hours_across_midnight_release_at_their_end() {
        let night = q("22:00", "07:00");
        // 23:30 in Paris (winter, UTC+1) waits until 07:00 the next day.
        assert_eq!(
            night.release(utc("2026-12-01T22:30:00Z")),
            utc("2026-12-02T06:00:00Z")
        );
        // 05:00 in Paris waits until 07:00 the same day.
        assert_eq!(
            night.release(utc("2026-12-02T04:00:00Z")),
            utc("2026-12-02T06:00:00Z")
        );
        // 12:00 is outside: it leaves at once.
        let noon = utc("2026-12-02T11:00:00Z");
        assert_eq!(night.release(noon), noon);
        // Summer time (UTC+2).
        assert_eq!(
            night.release(utc("2026-07-01T21:00:00Z")),
            utc("2026-07-02T05:00:00Z")
        );
    }

    #[test]
    fn quiet_hours_within_a_day() {
        let lunch = q("12:00", "14:00");
        assert_eq!(
            lunch.release(utc("2026-12-02T11:30:00Z")),
            utc("2026-12-02T13:00:00Z")
        );
        let before = utc("2026-12-02T10:59:00Z");
        assert_eq!(lunch.release(before), before);
    }

    #[test]
    fn invalid_quiet_hours_are_refused() {
        assert!(q("25:00", "07:00").parse().is_err());
        assert!(q("07:00", "07:00").parse().is_err());
        let mut bad_tz = q("22:00", "07:00");
        bad_tz.time_zone = "Mars/Olympus".into();
        assert!(bad_tz.parse().is_err());
    }

    #[test]
    fn unknown_fields_are_refused_from_clients_but_read_from_storage() {
        let client = |s: &str| NotificationPrefs::from_client(serde_json::from_str(s).unwrap());
        for bad in [
            r#"{"types":{"MENTION":{"sms":true}}}"#,
            r#"{"colour":"red"}"#,
            r#"{"quiet_hours":{"start":"22:00","end":"07:00","days":[1]}}"#,
            r#"{"types":{"MENTION":{"email":"yes"}}}"#,
        ] {
            assert_eq!(client(bad).unwrap_err().code(), "invalid_body", "{bad}");
        }
        let ok = client(r#"{"types":{"MENTION":{"email":false}}}"#).unwrap();
        assert_eq!(ok.types["MENTION"].email, Some(false));
        // A row written by a later version, with a field this one does not know.
        let stored: NotificationPrefs = serde_json::from_str(
            r#"{"types":{"MENTION":{"email":false,"push":true}},"digest":"daily"}"#,
        )
        .unwrap();
        assert_eq!(stored.types["MENTION"].email, Some(false));
    }
}
