//! Training sessions (FMPA: formation de maintien et de perfectionnement des acquis),
//! the reference server's scheduling domain: an officer organises a session, invites
//! firefighters, who answer present or absent; everyone invited is notified and
//! reminded before it starts ([`crate::reminders`]), once, even if it moves.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{SessionId, TenantId, UserId};
use crate::jobs::JobQueue;
use crate::model::{Role, now};
use crate::notify::{NewNotification, Notifier, Outbox, check_users, kind};
use crate::ports::{Store, TenantTx};
use crate::reminders::{Reminder, cancel_reminders, check_offsets, schedule_reminders_in};
use crate::service::Actor;

/// The job kind of a training-session reminder.
pub const FMPA_REMINDER_JOB: &str = "fmpa.reminder";

/// Scheduled, or cancelled (kept, so invitees see what happened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Will take place.
    Scheduled,
    /// Called off.
    Cancelled,
}

impl SessionStatus {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Scheduled => "scheduled",
            SessionStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "scheduled" => Ok(SessionStatus::Scheduled),
            "cancelled" => Ok(SessionStatus::Cancelled),
            _ => Err(Error::Storage(format!("unknown session status {s:?}"))),
        }
    }
}

/// An invitee's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attendance {
    /// Not answered yet.
    Pending,
    /// Will attend.
    Present,
    /// Will not attend.
    Absent,
}

impl Attendance {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Attendance::Pending => "pending",
            Attendance::Present => "present",
            Attendance::Absent => "absent",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(Attendance::Pending),
            "present" => Ok(Attendance::Present),
            "absent" => Ok(Attendance::Absent),
            _ => Err(Error::invalid(
                "invalid_response",
                "a response is present or absent",
            )),
        }
    }
}

/// A training session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSession {
    /// Identifier.
    pub id: SessionId,
    /// Title, e.g. « Manœuvre ARI en milieu enfumé ».
    pub title: String,
    /// Kind, a lowercase slug, e.g. `incendie`, `secours_routier`, `ari`.
    pub kind: String,
    /// Free text: programme, equipment to bring.
    pub description: String,
    /// Where, e.g. « Centre de secours de Vitrolles — plateau technique ».
    pub location: String,
    /// Start.
    pub start_at: DateTime<Utc>,
    /// End, after the start.
    pub end_at: DateTime<Utc>,
    /// The officer who organises it.
    pub organizer_id: UserId,
    /// Scheduled or cancelled.
    pub status: SessionStatus,
    /// Reminder lead times in minutes, largest first (default 1440 and 60).
    pub reminder_offsets: Vec<i64>,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A user invited to a session and their answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitee {
    /// The user.
    pub user_id: UserId,
    /// Their display name.
    pub display_name: String,
    /// Their answer.
    pub response: Attendance,
    /// When they answered.
    pub responded_at: Option<DateTime<Utc>>,
}

/// Which sessions to list: ordered by start, then id.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Starting at or after.
    pub from: Option<DateTime<Utc>>,
    /// Starting before.
    pub to: Option<DateTime<Utc>>,
    /// Only those this user is invited to or organises.
    pub involving: Option<UserId>,
    /// Cancelled ones too.
    pub include_cancelled: bool,
    /// After this (start, id), for the next page.
    pub after: Option<(DateTime<Utc>, SessionId)>,
}

/// A session to create.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    /// Title.
    pub title: String,
    /// Kind slug.
    pub kind: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Place.
    pub location: String,
    /// Start.
    pub start_at: DateTime<Utc>,
    /// End.
    pub end_at: DateTime<Utc>,
    /// Users to invite.
    #[serde(default)]
    pub invitees: Vec<UserId>,
    /// Reminder lead times in minutes; the configured default when absent.
    #[serde(default)]
    pub reminder_offsets: Option<Vec<i64>>,
}

/// Changes to a session; absent fields stay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionPatch {
    /// New title.
    pub title: Option<String>,
    /// New kind.
    pub kind: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New place.
    pub location: Option<String>,
    /// New start.
    pub start_at: Option<DateTime<Utc>>,
    /// New end.
    pub end_at: Option<DateTime<Utc>>,
    /// Users to invite as well.
    #[serde(default)]
    pub invite: Vec<UserId>,
    /// Users to invite no longer.
    #[serde(default)]
    pub uninvite: Vec<UserId>,
    /// New reminder lead times.
    pub reminder_offsets: Option<Vec<i64>>,
}

/// Limits and defaults of the training service.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    /// Reminder lead times when a session names none (minutes).
    pub default_offsets: Vec<i64>,
    /// Most invitees of one session (`too_many_invitees`).
    pub max_invitees: usize,
    /// Longest title or location, in characters.
    pub max_title_chars: usize,
    /// Longest description, in characters.
    pub max_description_chars: usize,
    /// Longest session, in hours.
    pub max_duration_hours: i64,
    /// Largest page of sessions.
    pub max_page_size: u32,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            default_offsets: vec![24 * 60, 60],
            max_invitees: 1_000,
            max_title_chars: 200,
            max_description_chars: 4_000,
            max_duration_hours: 24 * 7,
            max_page_size: 100,
        }
    }
}

/// A session with its invitees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionDetails {
    /// The session.
    #[serde(flatten)]
    pub session: TrainingSession,
    /// Its invitees.
    pub invitees: Vec<Invitee>,
}

/// The training-session service.
#[derive(Clone)]
pub struct Training {
    store: Arc<dyn Store>,
    notifier: Notifier,
    queue: Option<Arc<dyn JobQueue>>,
    config: Arc<TrainingConfig>,
}

fn subject(id: SessionId) -> String {
    format!("fmpa:{id}")
}

/// `t` to the millisecond, the precision every backend stores: the start a reminder
/// carries must compare equal to the start read back.
fn to_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

impl Training {
    /// The service; reminders need `queue`.
    pub fn new(
        store: Arc<dyn Store>,
        notifier: Notifier,
        queue: Option<Arc<dyn JobQueue>>,
        config: TrainingConfig,
    ) -> Self {
        Self {
            store,
            notifier,
            queue,
            config: Arc::new(config),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    fn check_text(&self, what: &str, s: &str, max: usize, empty_ok: bool) -> Result<String> {
        let t = s.trim();
        if (!empty_ok && t.is_empty()) || t.chars().count() > max {
            return Err(Error::invalid(
                "invalid_session",
                format!(
                    "{what} has {} to {max} characters",
                    if empty_ok { 0 } else { 1 }
                ),
            ));
        }
        Ok(t.to_owned())
    }

    fn check_kind(&self, k: &str) -> Result<String> {
        let k = k.trim();
        if k.is_empty()
            || k.len() > 40
            || !k
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::invalid(
                "invalid_session",
                "kind is a slug of 1 to 40 lowercase letters, digits and _",
            ));
        }
        Ok(k.to_owned())
    }

    fn check_times(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<()> {
        if end <= start {
            return Err(Error::invalid(
                "invalid_dates",
                "a session ends after it starts",
            ));
        }
        if start <= at {
            return Err(Error::invalid(
                "invalid_dates",
                "a session starts in the future",
            ));
        }
        if end - start > chrono::TimeDelta::hours(self.config.max_duration_hours) {
            return Err(Error::invalid(
                "invalid_dates",
                format!(
                    "a session lasts at most {} hours",
                    self.config.max_duration_hours
                ),
            ));
        }
        Ok(())
    }

    fn check_invitees(&self, count: usize) -> Result<()> {
        if count > self.config.max_invitees {
            return Err(Error::invalid(
                "too_many_invitees",
                format!(
                    "a session has at most {} invitees",
                    self.config.max_invitees
                ),
            ));
        }
        Ok(())
    }

    fn notification(
        &self,
        k: &str,
        session: &TrainingSession,
        title: String,
        body: String,
    ) -> NewNotification {
        let c = self.notifier.config();
        NewNotification::new(
            k,
            clip(&title, c.max_title_chars),
            clip(&body, c.max_body_chars),
        )
        .link(format!("/fmpa/{}", session.id))
        .data(session_data(session))
    }

    /// Creates a session, invites, notifies and schedules reminders, all in one unit
    /// of work. Officers and administrators only.
    pub async fn create(&self, actor: &Actor, new: NewSession) -> Result<SessionDetails> {
        if actor.role == Role::Member {
            return Err(Error::forbidden(
                "only officers and administrators organise training sessions",
            ));
        }
        let at = now();
        let title = self.check_text("title", &new.title, self.config.max_title_chars, false)?;
        let location = self.check_text(
            "location",
            &new.location,
            self.config.max_title_chars,
            false,
        )?;
        let description = self.check_text(
            "description",
            &new.description,
            self.config.max_description_chars,
            true,
        )?;
        let kind_slug = self.check_kind(&new.kind)?;
        let (start_at, end_at) = (to_ms(new.start_at), to_ms(new.end_at));
        self.check_times(start_at, end_at, at)?;
        let offsets = check_offsets(
            new.reminder_offsets
                .as_deref()
                .unwrap_or(&self.config.default_offsets),
        )?;
        let mut invitees = new.invitees.clone();
        invitees.sort();
        invitees.dedup();
        self.check_invitees(invitees.len())?;
        let session = TrainingSession {
            id: SessionId::new(),
            title,
            kind: kind_slug,
            description,
            location,
            start_at,
            end_at,
            organizer_id: actor.user_id,
            status: SessionStatus::Scheduled,
            reminder_offsets: offsets,
            cancel_reason: None,
            created_at: at,
            updated_at: at,
        };
        let mut tx = self.store.begin(actor.tenant_id).await?;
        check_users(tx.as_mut(), &invitees).await?;
        tx.insert_session(&session).await?;
        tx.add_invitees(session.id, &invitees).await?;
        let outbox = self.invite_in(tx.as_mut(), &session, &invitees, at).await?;
        let details = SessionDetails {
            invitees: tx.invitees(session.id).await?,
            session,
        };
        tx.commit().await?;
        self.notifier.deliver(outbox).await;
        Ok(details)
    }

    async fn invite_in(
        &self,
        tx: &mut dyn TenantTx,
        session: &TrainingSession,
        users: &[UserId],
        at: DateTime<Utc>,
    ) -> Result<Outbox> {
        if users.is_empty() {
            return Ok(Outbox::default());
        }
        let n = self.notification(
            kind::FMPA_INVITATION,
            session,
            format!("Invitation : {}", session.title),
            format!(
                "Vous êtes convoqué(e) à la formation « {} » ({}).",
                session.title, session.location
            ),
        );
        let mut outbox = self.notifier.notify_in(tx, users, &n).await?;
        self.schedule_in(tx, session, users, at, &mut outbox)
            .await?;
        Ok(outbox)
    }

    async fn schedule_in(
        &self,
        tx: &mut dyn TenantTx,
        session: &TrainingSession,
        users: &[UserId],
        at: DateTime<Utc>,
        outbox: &mut Outbox,
    ) -> Result<Vec<Reminder>> {
        let Some(queue) = &self.queue else {
            return Ok(Vec::new());
        };
        let scheduled = schedule_reminders_in(
            queue.as_ref(),
            tx,
            FMPA_REMINDER_JOB,
            &subject(session.id),
            users,
            session.start_at,
            &session.reminder_offsets,
            at,
        )
        .await?;
        outbox.defer_jobs(tx.tenant(), scheduled.after_commit);
        Ok(scheduled.past)
    }

    async fn editable(
        &self,
        tx: &mut dyn TenantTx,
        actor: &Actor,
        id: SessionId,
    ) -> Result<TrainingSession> {
        let s = tx
            .lock_session(id, true)
            .await?
            .ok_or(Error::NotFound("session"))?;
        if s.organizer_id != actor.user_id && actor.role != Role::Admin {
            return Err(Error::forbidden(
                "only the organiser or an administrator changes a session",
            ));
        }
        if s.status == SessionStatus::Cancelled {
            return Err(Error::conflict(
                "session_cancelled",
                "this session is cancelled",
            ));
        }
        Ok(s)
    }

    /// Changes a session. Moving it moves its reminders and tells the invitees
    /// (`FMPA_UPDATED`); new invitees are invited, removed ones lose their reminders.
    pub async fn update(
        &self,
        actor: &Actor,
        id: SessionId,
        patch: SessionPatch,
    ) -> Result<SessionDetails> {
        let at = now();
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let old = self.editable(tx.as_mut(), actor, id).await?;
        let mut s = old.clone();
        if let Some(t) = &patch.title {
            s.title = self.check_text("title", t, self.config.max_title_chars, false)?;
        }
        if let Some(l) = &patch.location {
            s.location = self.check_text("location", l, self.config.max_title_chars, false)?;
        }
        if let Some(d) = &patch.description {
            s.description =
                self.check_text("description", d, self.config.max_description_chars, true)?;
        }
        if let Some(k) = &patch.kind {
            s.kind = self.check_kind(k)?;
        }
        s.start_at = patch.start_at.map_or(s.start_at, to_ms);
        s.end_at = patch.end_at.map_or(s.end_at, to_ms);
        let moved = s.start_at != old.start_at || s.end_at != old.end_at;
        if moved {
            self.check_times(s.start_at, s.end_at, at)?;
        }
        if let Some(o) = &patch.reminder_offsets {
            s.reminder_offsets = check_offsets(o)?;
        }
        let mut invite = patch.invite.clone();
        invite.sort();
        invite.dedup();
        let uninvite: HashSet<UserId> = patch.uninvite.iter().copied().collect();
        if invite.iter().any(|u| uninvite.contains(u)) {
            return Err(Error::invalid(
                "invalid_session",
                "a user cannot be invited and uninvited at once",
            ));
        }
        check_users(tx.as_mut(), &invite).await?;
        let before: Vec<UserId> = tx
            .invitees(id)
            .await?
            .into_iter()
            .map(|i| i.user_id)
            .collect();
        let remaining = before.iter().filter(|u| !uninvite.contains(u)).count();
        let newly: Vec<UserId> = invite
            .iter()
            .copied()
            .filter(|u| !before.contains(u))
            .collect();
        self.check_invitees(remaining + newly.len())?;
        s.updated_at = at;
        tx.update_session(&s).await?;
        let removed = if uninvite.is_empty() {
            Vec::new()
        } else {
            let u: Vec<UserId> = uninvite.iter().copied().collect();
            tx.remove_invitees(id, &u).await?
        };
        tx.add_invitees(id, &newly).await?;
        let kept: Vec<UserId> = before
            .iter()
            .copied()
            .filter(|u| !uninvite.contains(u))
            .collect();
        let mut outbox = Outbox::default();
        let offsets_changed = s.reminder_offsets != old.reminder_offsets;
        let mut past = Vec::new();
        if moved || s.location != old.location {
            let n = self.notification(
                kind::FMPA_UPDATED,
                &s,
                format!("Formation modifiée : {}", s.title),
                format!(
                    "La formation « {} » a changé : le {} ({}).",
                    s.title,
                    s.start_at
                        .with_timezone(&chrono_tz::Europe::Paris)
                        .format("%d/%m/%Y à %H:%M"),
                    s.location
                ),
            );
            outbox.merge(self.notifier.notify_in(tx.as_mut(), &kept, &n).await?);
        }
        if moved || offsets_changed {
            past = self
                .schedule_in(tx.as_mut(), &s, &kept, at, &mut outbox)
                .await?;
        }
        outbox.merge(self.invite_in(tx.as_mut(), &s, &newly, at).await?);
        let details = SessionDetails {
            invitees: tx.invitees(id).await?,
            session: s.clone(),
        };
        tx.commit().await?;
        if let Some(queue) = &self.queue {
            let subj = subject(id);
            let mut cancel = Vec::new();
            for r in &past {
                cancel.push((r.user_id, r.offset_minutes));
            }
            if offsets_changed {
                let dropped: Vec<i64> = old
                    .reminder_offsets
                    .iter()
                    .copied()
                    .filter(|o| !s.reminder_offsets.contains(o))
                    .collect();
                for u in &kept {
                    for o in &dropped {
                        cancel.push((*u, *o));
                    }
                }
            }
            for u in &removed {
                for o in &old.reminder_offsets {
                    cancel.push((*u, *o));
                }
            }
            for (u, o) in cancel {
                if let Err(e) =
                    cancel_reminders(queue.as_ref(), actor.tenant_id, &subj, &[u], &[o]).await
                {
                    tracing::warn!(error = %e, session = %id,
                        "obsolete reminder not cancelled; its handler will skip it");
                }
            }
        }
        self.notifier.deliver(outbox).await;
        Ok(details)
    }

    /// Cancels a session: invitees get `FMPA_CANCELLED` and their reminders go.
    pub async fn cancel(
        &self,
        actor: &Actor,
        id: SessionId,
        reason: Option<String>,
    ) -> Result<SessionDetails> {
        let reason = match reason {
            Some(r) => Some(self.check_text("reason", &r, self.config.max_title_chars, false)?),
            None => None,
        };
        let at = now();
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let mut s = self.editable(tx.as_mut(), actor, id).await?;
        s.status = SessionStatus::Cancelled;
        s.cancel_reason = reason.clone();
        s.updated_at = at;
        tx.update_session(&s).await?;
        let invitees = tx.invitees(id).await?;
        let users: Vec<UserId> = invitees.iter().map(|i| i.user_id).collect();
        let n = self.notification(
            kind::FMPA_CANCELLED,
            &s,
            format!("Formation annulée : {}", s.title),
            match &reason {
                Some(r) => format!("La formation « {} » est annulée : {r}", s.title),
                None => format!("La formation « {} » est annulée.", s.title),
            },
        );
        let outbox = self.notifier.notify_in(tx.as_mut(), &users, &n).await?;
        tx.commit().await?;
        if let Some(queue) = &self.queue
            && let Err(e) = cancel_reminders(
                queue.as_ref(),
                actor.tenant_id,
                &subject(id),
                &users,
                &s.reminder_offsets,
            )
            .await
        {
            tracing::warn!(error = %e, session = %id,
                "reminders of a cancelled session not cancelled; their handler will skip them");
        }
        self.notifier.deliver(outbox).await;
        Ok(SessionDetails {
            session: s,
            invitees,
        })
    }

    /// A session of the actor's tenant with its invitees.
    pub async fn get(&self, actor: &Actor, id: SessionId) -> Result<SessionDetails> {
        let mut tx = self.store.read(actor.tenant_id).await?;
        let session = tx.session(id).await?.ok_or(Error::NotFound("session"))?;
        let invitees = tx.invitees(id).await?;
        Ok(SessionDetails { session, invitees })
    }

    /// The page size for a requested `limit` (50 by default, at most
    /// `max_page_size`); `invalid_limit` outside.
    pub fn page_size(&self, limit: Option<u32>) -> Result<u32> {
        crate::service::page_size(limit, 50, self.config.max_page_size)
    }

    /// Sessions of the actor's tenant, by start.
    pub async fn list(
        &self,
        actor: &Actor,
        filter: SessionFilter,
        limit: Option<u32>,
    ) -> Result<Vec<TrainingSession>> {
        let limit = self.page_size(limit)?;
        let mut tx = self.store.read(actor.tenant_id).await?;
        tx.list_sessions(&filter, limit).await
    }

    /// The actor answers an invitation.
    pub async fn respond(
        &self,
        actor: &Actor,
        id: SessionId,
        response: Attendance,
    ) -> Result<SessionDetails> {
        if response == Attendance::Pending {
            return Err(Error::invalid(
                "invalid_response",
                "a response is present or absent",
            ));
        }
        let mut tx = self.store.begin(actor.tenant_id).await?;
        let session = tx
            .lock_session(id, false)
            .await?
            .ok_or(Error::NotFound("session"))?;
        if session.status == SessionStatus::Cancelled {
            return Err(Error::conflict(
                "session_cancelled",
                "this session is cancelled",
            ));
        }
        if !tx.set_response(id, actor.user_id, response, now()).await? {
            return Err(Error::forbidden("you are not invited to this session"));
        }
        let invitees = tx.invitees(id).await?;
        tx.commit().await?;
        Ok(SessionDetails { session, invitees })
    }

    /// Runs a reminder job: notifies the user (`FMPA_REMINDER`) unless the reminder is
    /// stale (session cancelled or moved, user no longer invited or absent). The
    /// notification is keyed per session and lead time, so a job that runs twice
    /// notifies once. Answers whether a notification was stored.
    pub async fn deliver_reminder(&self, tenant: TenantId, reminder: &Reminder) -> Result<bool> {
        let Some(id) = reminder
            .subject
            .strip_prefix("fmpa:")
            .and_then(|s| s.parse::<SessionId>().ok())
        else {
            return Err(Error::invalid(
                "invalid_reminder",
                "not a training-session reminder",
            ));
        };
        let mut tx = self.store.begin(tenant).await?;
        let Some(s) = tx.lock_session(id, false).await? else {
            return Ok(false);
        };
        // Late (a worker was down): a reminder after the start helps nobody.
        if s.status != SessionStatus::Scheduled
            || s.start_at <= now()
            || s.start_at != reminder.start_at
            || !s.reminder_offsets.contains(&reminder.offset_minutes)
        {
            return Ok(false);
        }
        let invited = tx
            .invitees(id)
            .await?
            .into_iter()
            .find(|i| i.user_id == reminder.user_id);
        if invited.is_none_or(|i| i.response == Attendance::Absent) {
            return Ok(false);
        }
        let lead = if reminder.offset_minutes % (24 * 60) == 0 {
            let d = reminder.offset_minutes / (24 * 60);
            if d == 1 {
                "demain".to_owned()
            } else {
                format!("dans {d} jours")
            }
        } else if reminder.offset_minutes % 60 == 0 {
            format!("dans {} h", reminder.offset_minutes / 60)
        } else {
            format!("dans {} min", reminder.offset_minutes)
        };
        let mut data = session_data(&s);
        data["offset_minutes"] = reminder.offset_minutes.into();
        // Keyed by the start too: after a move, the reminder for the new date is a new
        // one, while a job that runs twice for the same date notifies once.
        let n = self
            .notification(
                kind::FMPA_REMINDER,
                &s,
                format!("Rappel : {}", s.title),
                format!(
                    "La formation « {} » commence {lead} ({}).",
                    s.title, s.location
                ),
            )
            .data(data)
            .key(format!(
                "fmpa-reminder:{}:{}:{}",
                s.id,
                s.start_at.timestamp_millis(),
                reminder.offset_minutes
            ));
        let outbox = self
            .notifier
            .notify_in(tx.as_mut(), &[reminder.user_id], &n)
            .await?;
        tx.commit().await?;
        let stored = !outbox.stored().is_empty();
        self.notifier.deliver(outbox).await;
        Ok(stored)
    }
}

/// `s` cut to `max` characters, with an ellipsis when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Most characters of the description a notification's `data` carries.
const DATA_DESCRIPTION_CHARS: usize = 500;

/// What notifications about a session carry in `data` (and e-mail templates read).
pub fn session_data(s: &TrainingSession) -> serde_json::Value {
    serde_json::json!({
        "session_id": s.id,
        "title": s.title,
        "kind": s.kind,
        "location": s.location,
        "description": clip(&s.description, DATA_DESCRIPTION_CHARS),
        "start_at": s.start_at,
        "end_at": s.end_at,
        "organizer_id": s.organizer_id,
        "status": s.status,
        "cancel_reason": s.cancel_reason,
    })
}
