//! Reminders for anything that starts at a given time: one job per (event, user, lead
//! time), keyed so that scheduling again *moves* the job instead of adding one. Moving
//! an event moves its reminders; cancelling it cancels them; a reminder whose moment
//! has passed is not scheduled. Training sessions are the first use; an embedder can
//! schedule reminders for their own events the same way.
//!
//! A reminder job runs at least once (the queue leases, and a dead worker's job runs
//! again), so its handler deduplicates what it produces, e.g. with a notification key.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{TenantId, UserId};
use crate::jobs::{JobQueue, NewJob, OnDuplicate, enqueue_in_or_defer};
use crate::ports::TenantTx;

/// Most lead times per event.
pub const MAX_OFFSETS: usize = 8;
/// Longest lead time: 30 days.
pub const MAX_OFFSET_MINUTES: i64 = 30 * 24 * 60;

/// The payload every reminder job carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reminder {
    /// The event, e.g. `fmpa:<session id>`.
    pub subject: String,
    /// Who is reminded.
    pub user_id: UserId,
    /// How long before the start, in minutes.
    pub offset_minutes: i64,
    /// The start the reminder was computed for: a handler that finds the event
    /// starting at another time knows the reminder is stale.
    pub start_at: DateTime<Utc>,
}

impl Reminder {
    /// The unique job key of this reminder.
    pub fn key(&self) -> String {
        reminder_key(&self.subject, self.user_id, self.offset_minutes)
    }
}

/// The unique job key of the reminder of `subject` for `user`, `offset` minutes before.
pub fn reminder_key(subject: &str, user: UserId, offset_minutes: i64) -> String {
    format!("reminder:{subject}:{user}:{offset_minutes}")
}

/// Checks lead times: 1 to [`MAX_OFFSETS`] distinct values, each 1 minute to 30 days.
/// Answers them sorted, largest first.
pub fn check_offsets(offsets: &[i64]) -> Result<Vec<i64>> {
    let mut o = offsets.to_vec();
    o.sort_unstable_by(|a, b| b.cmp(a));
    o.dedup();
    if o.len() > MAX_OFFSETS || o.iter().any(|m| *m < 1 || *m > MAX_OFFSET_MINUTES) {
        return Err(Error::invalid(
            "invalid_reminders",
            format!(
                "reminders are at most {MAX_OFFSETS} lead times of 1 minute to {MAX_OFFSET_MINUTES} minutes"
            ),
        ));
    }
    Ok(o)
}

/// Schedules reminders (one job of `job_kind` per user and lead time) in the caller's
/// unit of work (after it, for a queue that cannot join it: see
/// [`ScheduledReminders::after_commit`]): new ones are added, existing ones move to
/// the new start. Lead times
/// whose moment is already past are skipped, and the keys of those are returned so
/// the caller can cancel any older job holding them after the commit
/// ([`cancel_reminders`]).
#[allow(clippy::too_many_arguments)]
pub async fn schedule_reminders_in(
    queue: &dyn JobQueue,
    tx: &mut dyn TenantTx,
    job_kind: &str,
    subject: &str,
    users: &[UserId],
    start_at: DateTime<Utc>,
    offsets: &[i64],
    now: DateTime<Utc>,
) -> Result<ScheduledReminders> {
    let tenant = tx.tenant();
    let mut out = ScheduledReminders::default();
    let mut jobs = Vec::new();
    for user in users {
        for offset in offsets {
            let reminder = Reminder {
                subject: subject.to_owned(),
                user_id: *user,
                offset_minutes: *offset,
                start_at,
            };
            let at = start_at - TimeDelta::minutes(*offset);
            if at <= now {
                out.past.push(reminder);
                continue;
            }
            let job = NewJob::new(
                job_kind,
                serde_json::to_value(&reminder).map_err(|e| Error::Storage(e.to_string()))?,
            )
            .tenant(tenant)
            .run_at(at)
            .unique(reminder.key(), OnDuplicate::Replace);
            jobs.push(job);
        }
    }
    out.scheduled = jobs.len();
    enqueue_in_or_defer(queue, tx, jobs, &mut out.after_commit).await?;
    Ok(out)
}

/// What [`schedule_reminders_in`] did.
#[derive(Debug, Default)]
pub struct ScheduledReminders {
    /// Jobs stored or moved.
    pub scheduled: usize,
    /// Reminders whose moment has passed: cancel them after the commit.
    pub past: Vec<Reminder>,
    /// Jobs a queue that cannot join the transaction takes after the commit.
    pub after_commit: Vec<NewJob>,
}

/// Cancels the pending reminder jobs of `subject` for `users` at `offsets`. Answers
/// how many were cancelled. Not transactional: call it after the commit that made
/// them obsolete; a handler must still check that its reminder is current, since a
/// crash between the two leaves the job in place.
pub async fn cancel_reminders(
    queue: &dyn JobQueue,
    tenant: TenantId,
    subject: &str,
    users: &[UserId],
    offsets: &[i64],
) -> Result<usize> {
    let mut n = 0;
    for user in users {
        for offset in offsets {
            if queue
                .cancel_unique(Some(tenant), &reminder_key(subject, *user, *offset))
                .await?
            {
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_checked_and_sorted() {
        assert_eq!(check_offsets(&[60, 1440, 60]).unwrap(), vec![1440, 60]);
        assert!(check_offsets(&[0]).is_err());
        assert!(check_offsets(&[MAX_OFFSET_MINUTES + 1]).is_err());
        assert!(check_offsets(&(1..=9).collect::<Vec<_>>()).is_err());
        assert!(check_offsets(&[]).unwrap().is_empty());
    }

    #[test]
    fn keys_name_the_event_the_user_and_the_lead_time() {
        let u = UserId::new();
        assert_eq!(
            reminder_key("fmpa:abc", u, 60),
            format!("reminder:fmpa:abc:{u}:60")
        );
    }
}
