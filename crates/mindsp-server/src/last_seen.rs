//! `last_seen` kept beyond this process. Presence holds it in memory (or in Redis, which
//! keeps nothing on disk either); the store keeps a copy, which the presence answer
//! falls back to (`api::members_presence`).
//!
//! Writes are gathered: a disconnection notes its time here, and one task writes what
//! was noted, a transaction per tenant, a moment later. A crowd of disconnections (a
//! proxy reloads, a station loses its network) therefore costs a few transactions, not
//! one each in front of the messages waiting for the SQLite writer, and the notes are
//! bounded ([`KEPT`]). At a shutdown, the users still connected are noted as seen then
//! and everything is written before the process ends ([`LastSeen::flush`]). With Redis,
//! the users a sweep finds offline (their node died) are noted by the process that
//! swept them ([`LastSeen::follow`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use mindsp_core::ports::Store;
use mindsp_core::{TenantId, UserId};
use tokio::sync::Notify;

/// Most users noted and not yet written; beyond, new notes are dropped (logged): the
/// store then keeps the time of an earlier disconnection of theirs.
const KEPT: usize = 100_000;

/// How long the writer waits for company after a first note.
const GATHER: Duration = Duration::from_millis(200);

/// How long a stopping process gives its last `last_seen` writes.
const LAST_WRITES: Duration = Duration::from_secs(3);

/// Noted `last_seen` times, written by a task of their own.
pub(crate) struct LastSeen {
    store: Arc<dyn Store>,
    noted: Mutex<Noted>,
    /// Shared with the writer task, which holds nothing else while it waits.
    wake: Arc<Notify>,
    /// Held through each [`LastSeen::flush`]: the last one, at a stop, waits for the
    /// writer's own to be committed, rather than find nothing left and let the process
    /// end under it.
    writing: tokio::sync::Mutex<()>,
}

/// Per tenant, each user's latest time; how many users in all; how many notes were
/// dropped since the last write (logged then, once, rather than one line each).
#[derive(Default)]
struct Noted {
    tenants: HashMap<TenantId, HashMap<UserId, DateTime<Utc>>>,
    users: usize,
    dropped: usize,
}

impl LastSeen {
    /// Starts the writer (within a tokio runtime; without one, only [`Self::flush`]
    /// writes). It ends with the last reference.
    pub(crate) fn start(store: Arc<dyn Store>) -> Arc<Self> {
        let this = Arc::new(Self {
            store,
            noted: Mutex::new(Noted::default()),
            wake: Arc::new(Notify::new()),
            writing: tokio::sync::Mutex::new(()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(Self::write_loop(this.wake.clone(), Arc::downgrade(&this)));
        }
        this
    }

    /// Waits for a note (or for the end: see `Drop`), gathers for a moment, writes.
    async fn write_loop(wake: Arc<Notify>, this: Weak<Self>) {
        loop {
            wake.notified().await;
            tokio::time::sleep(GATHER).await;
            let Some(this) = this.upgrade() else { return };
            this.flush().await;
        }
    }

    /// [`Self::start`], and told by `realtime` of the users its presence turns offline
    /// by itself: with Redis, those of a dead node this process swept, and
    /// disconnections written late (Redis was away). The others are noted by the
    /// socket that closes. Every process that runs Redis presence (a `worker` too) may
    /// sweep, so each keeps what it finds.
    pub(crate) fn follow(store: Arc<dyn Store>, realtime: &mindsp_realtime::Realtime) -> Arc<Self> {
        let this = Self::start(store);
        let seen = Arc::downgrade(&this);
        realtime.on_offline(Arc::new(move |tenant, user, at| {
            if let Some(seen) = seen.upgrade() {
                seen.note(tenant, user, at);
            }
        }));
        this
    }

    /// `user` was last connected at `at`.
    pub(crate) fn note(&self, tenant: TenantId, user: UserId, at: DateTime<Utc>) {
        {
            let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
            let Noted {
                tenants,
                users,
                dropped,
            } = &mut *noted;
            match tenants.get_mut(&tenant).and_then(|of| of.get_mut(&user)) {
                Some(t) => *t = (*t).max(at),
                None if *users >= KEPT => {
                    *dropped += 1;
                    return;
                }
                None => {
                    tenants.entry(tenant).or_default().insert(user, at);
                    *users += 1;
                }
            }
        }
        self.wake.notify_one();
    }

    /// Writes what was noted, a transaction per tenant. A tenant whose write fails is
    /// logged and dropped (its users' next disconnections write again).
    pub(crate) async fn flush(&self) {
        let _writing = self.writing.lock().await;
        let noted = std::mem::take(&mut *self.noted.lock().unwrap_or_else(|e| e.into_inner()));
        if noted.dropped > 0 {
            tracing::warn!(
                dropped = noted.dropped,
                "too many last_seen waiting to be written: some were dropped (those users keep an earlier one)"
            );
        }
        for (tenant, users) in noted.tenants {
            let seen: Vec<(UserId, DateTime<Utc>)> = users.into_iter().collect();
            let write = async {
                let mut tx = self.store.begin(tenant).await?;
                tx.record_last_seen(&seen).await?;
                tx.commit().await
            };
            if let Err(e) = write.await {
                tracing::warn!(error = %e, %tenant, users = seen.len(), "cannot keep last_seen in the store");
            }
        }
    }

    /// [`Self::flush`] at a stop, given at most [`LAST_WRITES`]: a store that is away
    /// does not hold the process's end (those users keep an earlier `last_seen`).
    pub(crate) async fn flush_at_stop(&self) {
        if tokio::time::timeout(LAST_WRITES, self.flush())
            .await
            .is_err()
        {
            tracing::warn!("last_seen not written within {LAST_WRITES:?} at the stop; left");
        }
    }
}

impl Drop for LastSeen {
    /// Wakes the writer so that it sees the end.
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At most [`KEPT`] users wait to be written: a note beyond is dropped, while those
    /// already waiting still move forward; once written, there is room again.
    #[tokio::test(flavor = "current_thread")]
    async fn the_notes_waiting_are_bounded() {
        let store = mindsp_store::open("sqlite::memory:").await.unwrap();
        let tenant = store.create_tenant("sdis13", "SDIS 13").await.unwrap().id;
        let seen = LastSeen::start(store);
        let at = mindsp_core::model::now();
        let first = UserId::new();
        seen.note(tenant, first, at);
        // No await until the checks: the writer task cannot run meanwhile.
        for _ in 1..KEPT {
            seen.note(tenant, UserId::new(), at);
        }
        let waiting = |s: &LastSeen| {
            let n = s.noted.lock().unwrap();
            (n.users, n.tenants.values().map(HashMap::len).sum::<usize>())
        };
        assert_eq!(waiting(&seen), (KEPT, KEPT));
        let dropped = UserId::new();
        seen.note(tenant, dropped, at);
        // Nor does a tenant of its own start a list.
        seen.note(TenantId::new(), UserId::new(), at);
        assert_eq!(waiting(&seen), (KEPT, KEPT));
        assert_eq!(seen.noted.lock().unwrap().tenants.len(), 1);
        assert_eq!(seen.noted.lock().unwrap().dropped, 2);
        let later = at + chrono::Duration::seconds(5);
        seen.note(tenant, first, later);
        assert_eq!(seen.noted.lock().unwrap().tenants[&tenant][&first], later);
        assert!(!seen.noted.lock().unwrap().tenants[&tenant].contains_key(&dropped));

        seen.flush().await;
        assert_eq!(waiting(&seen), (0, 0));
        assert_eq!(seen.noted.lock().unwrap().dropped, 0);
        seen.note(tenant, dropped, at);
        assert_eq!(waiting(&seen), (1, 1));
    }

    /// A store on a file of its own, a tenant and a user of it, and a connection that
    /// can take the database's write lock.
    async fn on_a_file() -> (
        Arc<dyn Store>,
        TenantId,
        UserId,
        sqlx::SqliteConnection,
        std::path::PathBuf,
    ) {
        use sqlx::Connection;
        let dir = std::env::temp_dir().join(format!("mindsp-last-seen-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("t.db").display());
        let store = mindsp_store::open(&url).await.unwrap();
        let tenant = store.create_tenant("sdis13", "SDIS 13").await.unwrap().id;
        let mut tx = store.begin(tenant).await.unwrap();
        let user = tx
            .insert_user(&mindsp_core::model::NewUser {
                email: "alice@sdis13.fr".into(),
                display_name: "Alice".into(),
                role: mindsp_core::model::Role::Member,
                password_hash: "not-a-real-hash".into(),
            })
            .await
            .unwrap()
            .id;
        tx.commit().await.unwrap();
        let db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        (store, tenant, user, db, dir)
    }

    async fn stored(
        store: &Arc<dyn Store>,
        tenant: TenantId,
        user: UserId,
    ) -> Option<DateTime<Utc>> {
        let mut tx = store.read(tenant).await.unwrap();
        let seen = tx.last_seen_among(&[user]).await.unwrap();
        seen.first().map(|(_, at)| *at)
    }

    /// A flush that finds nothing noted while another is still committing (the
    /// writer's, when the process stops) returns only once that one has committed: the
    /// process does not end under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_waits_for_the_one_under_way() {
        let (store, tenant, user, mut db, dir) = on_a_file().await;
        let seen = LastSeen::start(store.clone());
        let at = mindsp_core::model::now();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut db)
            .await
            .unwrap();
        seen.note(tenant, user, at);
        // The writer takes the note after its gather, then waits for the lock.
        while seen.noted.lock().unwrap().users > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            sqlx::query("COMMIT").execute(&mut db).await.unwrap();
        });
        seen.flush().await;
        assert_eq!(stored(&store, tenant, user).await, Some(at));
        release.await.unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The flush at a stop gives up after [`LAST_WRITES`] when the store cannot take
    /// the write (the lock is held for good here): the stop goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_flush_at_a_stop_is_bounded() {
        let (store, tenant, user, mut db, dir) = on_a_file().await;
        let seen = LastSeen::start(store);
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut db)
            .await
            .unwrap();
        seen.note(tenant, user, mindsp_core::model::now());
        // The store alone would wait 10 s for the lock (SQLite's busy timeout).
        let stop = tokio::time::timeout(LAST_WRITES * 2, seen.flush_at_stop()).await;
        assert!(stop.is_ok(), "the stop waited for the store");
        sqlx::query("ROLLBACK").execute(&mut db).await.unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
