//! The hub: this node's live connections, indexed by tenant and user, each with a
//! bounded outbound queue.
//!
//! Delivery never waits: an envelope is pushed into the queue of every local connection
//! of every user of its audience, unless that queue is full. A queue that is full belongs to a
//! client that does not read; that connection is told to close with
//! [`CloseReason::TooSlow`] and nobody else is slowed down. Memory per connection is
//! therefore bounded by the queue capacity.
//!
//! Typing and presence are states, each replaced by the next, and a crowd of them can
//! come at once (a whole shift connecting fills every colleague's queue with presence).
//! They take only the free half of a queue: when a connection's queue is half full or
//! more they are skipped for it, never the cause of a close, and the connection is
//! marked ([`Connection::take_skipped`]) so that its client can be told to ask again.
//! Messages, read receipts, conversation changes and notifications are never skipped.
//!
//! Presence events can reach a node out of order: two nodes publish them (a user who
//! leaves one node as they reach another), and on one node the tasks of two connections
//! (a phone that drops and reconnects at once). Each carries its user's version
//! ([`mindsp_core::events::next_presence_version`]); the hub remembers the last version
//! it delivered per user and drops an older one, so that a late `offline` never
//! follows the `online` that came after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use mindsp_core::events::{Audience, Envelope, Event};
use mindsp_core::{TenantId, UserId};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::close;
use crate::queue::Queue;

/// Why the server closes a connection on its own initiative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue was full: the client does not read ([`close::TOO_SLOW`]).
    TooSlow,
    /// The account was deactivated ([`close::DEACTIVATED`]).
    Deactivated,
    /// The node is shutting down: reconnect, possibly elsewhere
    /// ([`close::SERVICE_RESTART`]).
    Shutdown,
    /// The user opened a connection beyond [`Hub::limit_per_user`]; this one was their
    /// oldest ([`close::SUPERSEDED`]).
    Superseded,
    /// The user's password changed ([`close::PASSWORD_CHANGED`]).
    PasswordChanged,
}

impl CloseReason {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::TooSlow => close::TOO_SLOW,
            CloseReason::Deactivated => close::DEACTIVATED,
            CloseReason::Shutdown => close::SERVICE_RESTART,
            CloseReason::Superseded => close::SUPERSEDED,
            CloseReason::PasswordChanged => close::PASSWORD_CHANGED,
        }
    }

    /// As kept in a mailbox (0 is none).
    fn to_u8(self) -> u8 {
        match self {
            CloseReason::TooSlow => 1,
            CloseReason::Deactivated => 2,
            CloseReason::Shutdown => 3,
            CloseReason::Superseded => 4,
            CloseReason::PasswordChanged => 5,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => CloseReason::TooSlow,
            2 => CloseReason::Deactivated,
            3 => CloseReason::Shutdown,
            4 => CloseReason::Superseded,
            5 => CloseReason::PasswordChanged,
            _ => return None,
        })
    }

    /// The close reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::TooSlow => "too slow: send buffer full",
            CloseReason::Deactivated => "account deactivated",
            CloseReason::Shutdown => "server restarting: reconnect",
            CloseReason::Superseded => "too many connections for this user: closed for a newer one",
            CloseReason::PasswordChanged => "password changed: log in again",
        }
    }
}

/// An envelope on its way to connections, with its client frame serialised once for
/// every recipient.
#[derive(Debug)]
pub struct Delivery {
    /// What is delivered.
    pub envelope: Envelope,
    frame: OnceLock<String>,
}

#[derive(Serialize)]
struct Frame<'a> {
    v: u8,
    #[serde(flatten)]
    event: &'a Event,
}

impl Delivery {
    /// Wraps an envelope.
    pub fn new(envelope: Envelope) -> Self {
        Self {
            envelope,
            frame: OnceLock::new(),
        }
    }

    /// The event as a protocol frame: `{"v":1,"type":...}`.
    pub fn frame(&self) -> &str {
        self.frame.get_or_init(|| event_frame(&self.envelope.event))
    }
}

/// An event as a protocol frame: `{"v":1,"type":...}`.
pub fn event_frame(event: &Event) -> String {
    serde_json::to_string(&Frame { v: 1, event }).unwrap_or_else(|e| {
        format!(r#"{{"v":1,"type":"error","code":"internal","message":"{e}"}}"#)
    })
}

/// The `type` of every event that goes from node to node: what [`Hub::events_lost`]
/// says may be missing.
pub const RELAYED_KINDS: &[&str] = &[
    "new_message",
    "message_read",
    "typing",
    "presence",
    "conversation_updated",
    "notification",
    "notifications_read",
    "notification_deleted",
];

/// One connection's queue, filled by the hub and emptied by the connection.
struct Mailbox {
    queue: Queue<Arc<Delivery>>,
    /// Set when a typing or presence event was skipped for this connection.
    skipped: AtomicBool,
    /// Set while an [`Event::EventsSkipped`] from [`Hub::events_lost`] waits in the
    /// queue: one is enough, however often events are lost before it is taken.
    lost: AtomicBool,
    /// The password the connection was opened (or last refreshed) for
    /// ([`Checked::password`]).
    password: AtomicI64,
    /// Why the hub asks the connection to close ([`CloseReason::to_u8`]; 0: it does
    /// not), and the writer's wake-up when it does (see [`CloseSignal`]).
    close: AtomicU8,
    closing: Notify,
}

/// What the server checked before registering a connection (see
/// [`Hub::register_checked`]).
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    /// When the account was found active.
    pub at: Instant,
    /// Which password its token was issued for: when that password was set, in
    /// milliseconds since the epoch (0 if never changed). A password change closes the
    /// connections opened for an older one, not those already opened with a token of
    /// the new one.
    pub password: i64,
}

impl Checked {
    /// Checked just now, for a token of `password`.
    pub fn now(password: i64) -> Self {
        Self {
            at: Instant::now(),
            password,
        }
    }
}

/// What the hub remembers of an account whose connections it closed for good reason,
/// for connections checked before and registered after ([`Hub::register_checked`]).
#[derive(Debug, Clone, Copy)]
struct Revoked {
    /// When the entry was last written (kept [`REVOKED_KEPT`]).
    at: Instant,
    /// When the account was deactivated, if it was.
    deactivated: Option<Instant>,
    /// The newest password set ([`Checked::password`]): connections for an older one
    /// close.
    password: Option<i64>,
    /// When a password change of unknown mark (0: from a node before marks) closed
    /// every connection: those checked before close too.
    password_unknown: Option<Instant>,
}

/// A handle on a connection's password mark, for a token refreshed over the socket
/// ([`Connection::password`]).
#[derive(Clone)]
pub struct PasswordMark(Arc<Mailbox>);

impl PasswordMark {
    /// The connection now holds a token for this password.
    pub fn set(&self, password: i64) {
        self.0.password.store(password, Ordering::Relaxed);
    }
}

/// Slots a drained queue keeps rather than freeing (a busy connection would otherwise
/// allocate again at every event).
const KEPT_SLOTS: usize = 16;

/// The events queued for one connection, in delivery order.
pub struct Events {
    mailbox: Arc<Mailbox>,
}

/// [`Events::try_recv`] found no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

impl Events {
    /// The next event, waiting for one. Cancel-safe.
    pub async fn recv(&mut self) -> Arc<Delivery> {
        let d = self.mailbox.queue.pop().await;
        self.taken(d)
    }

    /// The next event, if one is queued.
    pub fn try_recv(&mut self) -> Result<Arc<Delivery>, Empty> {
        let d = self.mailbox.queue.try_pop().ok_or(Empty)?;
        Ok(self.taken(d))
    }

    /// Events lost after this one is taken need another notice.
    fn taken(&self, d: Arc<Delivery>) -> Arc<Delivery> {
        if matches!(d.envelope.event, Event::EventsSkipped { .. }) {
            self.mailbox.lost.store(false, Ordering::Relaxed);
        }
        d
    }

    /// Whether no event is queued.
    pub fn is_empty(&self) -> bool {
        self.mailbox.queue.is_empty()
    }

    /// Number of events queued.
    pub fn len(&self) -> usize {
        self.mailbox.queue.len()
    }
}

struct Slot {
    id: u64,
    mailbox: Arc<Mailbox>,
}

impl Slot {
    /// Not asked to close yet.
    fn is_open(&self) -> bool {
        self.mailbox.close.load(Ordering::SeqCst) == 0
    }

    /// Asks the connection to close; false if it was asked already.
    fn close(&self, reason: CloseReason) -> bool {
        // The first reason wins: a slow client being deactivated is still "too slow".
        let first = self
            .mailbox
            .close
            .compare_exchange(0, reason.to_u8(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if first {
            // A permit if the writer is not waiting yet: it cannot miss it.
            self.mailbox.closing.notify_one();
        }
        first
    }
}

/// A connection's close signal: why the hub asks it to close, if it does (the first
/// reason wins), and a wait for that. A flag and a wake-up in the connection's mailbox:
/// tokio's `watch` channel cost every connection an allocation of about 300 bytes.
#[derive(Clone)]
pub struct CloseSignal {
    mailbox: Arc<Mailbox>,
}

impl CloseSignal {
    /// Why the hub asked this connection to close, if it did.
    pub fn get(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.mailbox.close.load(Ordering::SeqCst))
    }

    /// Returns once the hub asked this connection to close (at once if it did). For one
    /// waiter at a time: the connection's writer.
    pub async fn asked(&self) {
        if self.get().is_some() {
            return;
        }
        self.mailbox.closing.notified().await;
    }
}

type Users = HashMap<UserId, Vec<Slot>>;

/// The live connections of this node.
pub struct Hub {
    tenants: RwLock<HashMap<TenantId, Users>>,
    next_id: AtomicU64,
    live: AtomicUsize,
    drained: Notify,
    closing: AtomicBool,
    capacity: usize,
    /// Most connections one user keeps on this node ([`Hub::limit_per_user`]).
    per_user: AtomicUsize,
    dropped: AtomicU64,
    skipped: AtomicU64,
    /// How many times [`Hub::events_lost`] was called.
    losses: watch::Sender<u64>,
    /// When each account's connections were last closed for good reason (deactivated,
    /// password changed), for [`Hub::register_checked`]; kept [`REVOKED_KEPT`].
    revoked: Mutex<HashMap<(TenantId, UserId), Revoked>>,
    /// The version of the last presence event delivered per user of the tenants with
    /// connections here (at most [`PRESENCE_KEPT`]).
    presence: Mutex<PresenceVersions>,
}

type PresenceVersions = HashMap<(TenantId, UserId), u64>;

/// Most users whose last presence version a hub remembers (about 90 MB then); when
/// full it starts over, and an event that arrives late just then may be delivered once.
const PRESENCE_KEPT: usize = 1_000_000;

/// How long [`Hub::register_checked`] remembers an account's connections were closed:
/// longer than any connection takes from its account check to its registration (the
/// upgrade, bounded by the server's write timeout).
const REVOKED_KEPT: Duration = Duration::from_secs(600);

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("connections", &self.connection_count())
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// One registered connection: its queue and its close signal. Dropping it removes it
/// from the hub.
pub struct Connection {
    /// Identifier, unique within this hub.
    pub id: u64,
    /// The user's tenant.
    pub tenant: TenantId,
    /// The user.
    pub user: UserId,
    /// Events to send to the client, in delivery order.
    pub events: Events,
    /// Set when the hub wants this connection closed.
    pub closed: CloseSignal,
    hub: Arc<Hub>,
}

impl Connection {
    /// Whether typing or presence events were skipped for this connection (its queue
    /// was half full) since the last call. Its writer tells the client once it has
    /// caught up, so that the client asks for presence again instead of trusting
    /// states it may have missed the end of.
    pub fn take_skipped(&self) -> bool {
        self.events.mailbox.skipped.swap(false, Ordering::Relaxed)
    }

    /// A handle to say that this connection now holds a token for another password (a
    /// token refreshed over the socket after a password change): a late
    /// [`Hub::password_changed`] for that password no longer closes it.
    pub fn password(&self) -> PasswordMark {
        PasswordMark(self.events.mailbox.clone())
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("user", &self.user)
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.hub.remove(self.tenant, self.user, self.id);
    }
}

impl Hub {
    /// An empty hub whose connections each queue at most `capacity` events (at least
    /// 2: typing and presence may take half, never all).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            tenants: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            drained: Notify::new(),
            closing: AtomicBool::new(false),
            capacity: capacity.max(2),
            per_user: AtomicUsize::new(usize::MAX),
            dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            losses: watch::Sender::new(0),
            revoked: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
        })
    }

    /// Lets each user keep at most `n` (at least 1) connections on this node: registering
    /// one more asks their oldest to close ([`CloseReason::Superseded`]). A phone that
    /// lost its signal leaves connections that live until they are found idle; closing
    /// the oldest, not refusing the newest, lets its owner back in at once. No limit
    /// until this is called.
    pub fn limit_per_user(&self, n: usize) {
        self.per_user.store(n.max(1), Ordering::Relaxed);
    }

    /// Registers a connection of `user`. Returns it and whether it is the user's first
    /// on this node; `None` once [`Hub::shutdown`] was called. Beyond
    /// [`Hub::limit_per_user`], the user's oldest connection not yet closing is asked to
    /// close; it stays registered (and counted) until it is gone.
    pub fn register(
        self: &Arc<Self>,
        tenant: TenantId,
        user: UserId,
    ) -> Option<(Connection, bool)> {
        self.register_checked(tenant, user, None)
    }

    /// [`Hub::register`] for a connection whose account was found active, with a token
    /// for a given password, as `checked` says: if the account was deactivated since,
    /// or its password changed (neither of which could see this connection yet), it is
    /// registered already asked to close, for that reason.
    pub fn register_checked(
        self: &Arc<Self>,
        tenant: TenantId,
        user: UserId,
        checked: Option<Checked>,
    ) -> Option<(Connection, bool)> {
        let mailbox = Arc::new(Mailbox {
            queue: Queue::new(KEPT_SLOTS),
            skipped: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            password: AtomicI64::new(checked.map_or(0, |c| c.password)),
            close: AtomicU8::new(0),
            closing: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
            // Checked under the lock, so shutdown() sees every registered connection.
            if self.closing.load(Ordering::SeqCst) {
                return None;
            }
            let slots = tenants.entry(tenant).or_default().entry(user).or_default();
            let limit = self.per_user.load(Ordering::Relaxed);
            if slots.iter().filter(|s| s.is_open()).count() >= limit
                && let Some(oldest) = slots.iter().find(|s| s.is_open())
            {
                oldest.close(CloseReason::Superseded);
            }
            let slot = Slot {
                id,
                mailbox: mailbox.clone(),
            };
            if let Some(checked) = checked {
                let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(r) = revoked
                    .get(&(tenant, user))
                    .filter(|r| r.at.elapsed() < REVOKED_KEPT)
                {
                    if r.deactivated.is_some_and(|at| at >= checked.at) {
                        slot.close(CloseReason::Deactivated);
                    } else if r.password.is_some_and(|p| p > checked.password)
                        || r.password_unknown.is_some_and(|at| at >= checked.at)
                    {
                        slot.close(CloseReason::PasswordChanged);
                    }
                }
            }
            slots.push(slot);
            self.live.fetch_add(1, Ordering::SeqCst);
            slots.len() == 1
        };
        Some((
            Connection {
                id,
                tenant,
                user,
                closed: CloseSignal {
                    mailbox: mailbox.clone(),
                },
                events: Events { mailbox },
                hub: self.clone(),
            },
            first,
        ))
    }

    /// Removes a connection; true when it was the user's last one on this node.
    fn remove(&self, tenant: TenantId, user: UserId, id: u64) -> bool {
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        let Some(users) = tenants.get_mut(&tenant) else {
            return false;
        };
        let Some(slots) = users.get_mut(&user) else {
            return false;
        };
        let before = slots.len();
        slots.retain(|s| s.id != id);
        let removed = slots.len() < before;
        let last = slots.is_empty();
        if last {
            users.remove(&user);
            if users.is_empty() {
                tenants.remove(&tenant);
            }
        }
        drop(tenants);
        if removed && self.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
        removed && last
    }

    /// Number of local connections of `user`.
    pub fn connections_of(&self, tenant: TenantId, user: UserId) -> usize {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        tenants
            .get(&tenant)
            .and_then(|u| u.get(&user))
            .map_or(0, Vec::len)
    }

    /// Number of live connections on this node.
    pub fn connection_count(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Connections cut so far because their queue was full.
    pub fn slow_disconnects(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Typing and presence events skipped so far for connections whose queue was at
    /// least half full.
    pub fn skipped_ephemeral(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Queues an envelope for every local connection of its audience; never waits.
    /// [`Event::AccountDeactivated`] and [`Event::PasswordChanged`] are not queued: they
    /// close the user's connections. Typing and presence are skipped for a connection
    /// whose queue is half full.
    pub fn deliver(&self, envelope: Envelope) {
        match envelope.event {
            Event::AccountDeactivated { user_id } => {
                return self.close_user(envelope.tenant, user_id, CloseReason::Deactivated);
            }
            Event::PasswordChanged { user_id, password } => {
                return self.password_changed(envelope.tenant, user_id, password);
            }
            _ => {}
        }
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        let Some(users) = tenants.get(&envelope.tenant) else {
            return;
        };
        // Held until the event is queued: two presence events of one user, delivered
        // at once by two tasks, cannot pass the check in one order and be queued in the
        // other.
        let _presence_order = match envelope.event {
            Event::Presence {
                user_id, version, ..
            } => match self.presence_is_newer(envelope.tenant, user_id, version) {
                Some(order) => Some(order),
                None => return,
            },
            _ => None,
        };
        let ephemeral = matches!(
            envelope.event,
            Event::Typing { .. } | Event::Presence { .. }
        );
        let delivery = Arc::new(Delivery::new(envelope));
        let push = |slots: &Vec<Slot>| {
            for slot in slots {
                let queue = &slot.mailbox.queue;
                if ephemeral {
                    // Only into the free half: at least half full (len * 2 ≥ capacity)
                    // refuses.
                    // Marked under the queue's lock: a writer that empties the
                    // queue afterwards sees the mark, and tells its client.
                    let mark = || slot.mailbox.skipped.store(true, Ordering::Relaxed);
                    let limit = self.capacity.div_ceil(2);
                    if queue.try_push_or(delivery.clone(), limit, mark).is_err() {
                        self.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                } else if queue.try_push(delivery.clone(), self.capacity).is_err() {
                    self.too_slow(slot);
                }
            }
        };
        match &delivery.envelope.audience {
            Audience::Users(list) => {
                for user in list {
                    if let Some(slots) = users.get(user) {
                        push(slots);
                    }
                }
            }
            Audience::Tenant => users.values().for_each(push),
        }
    }

    /// Tells every local connection that events may have been lost on their way to this
    /// node (its link to the other nodes broke, see `redis`): each is sent an
    /// [`Event::EventsSkipped`] naming every kind of event that goes between nodes, in
    /// its queue after what was delivered before, so that its client catches up. A
    /// connection whose previous notice is still queued gets no second one.
    /// Watchers of [`Hub::losses`] hear of each call (the server checks that the
    /// connected accounts are still active: a deactivation may be among the lost).
    pub fn events_lost(&self) {
        self.losses.send_modify(|n| *n += 1);
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        let events: Vec<String> = RELAYED_KINDS.iter().map(|k| (*k).to_owned()).collect();
        for (tenant, users) in tenants.iter() {
            let delivery = Arc::new(Delivery::new(Envelope {
                tenant: *tenant,
                audience: Audience::Tenant,
                event: Event::EventsSkipped {
                    events: events.clone(),
                },
            }));
            for slot in users.values().flatten() {
                if slot.mailbox.lost.swap(true, Ordering::Relaxed) {
                    continue;
                }
                if slot
                    .mailbox
                    .queue
                    .try_push(delivery.clone(), self.capacity)
                    .is_err()
                {
                    self.too_slow(slot);
                }
            }
        }
    }

    /// Closes a connection whose queue is full: its client does not read.
    fn too_slow(&self, slot: &Slot) {
        if slot.close(CloseReason::TooSlow) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Changes with every call of [`Hub::events_lost`].
    pub fn losses(&self) -> watch::Receiver<u64> {
        self.losses.subscribe()
    }

    /// The users with a connection on this node, by tenant.
    pub fn local_users(&self) -> Vec<(TenantId, Vec<UserId>)> {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        tenants
            .iter()
            .map(|(t, users)| (*t, users.keys().copied().collect()))
            .collect()
    }

    /// Whether a presence event of `user` with `version` is newer than the last one
    /// delivered (and then remembers it): the lock on the versions, to hold until the
    /// event is queued, or `None` when it is stale. Version 0 (from a node that gives
    /// none) is always delivered.
    fn presence_is_newer(
        &self,
        tenant: TenantId,
        user: UserId,
        version: u64,
    ) -> Option<std::sync::MutexGuard<'_, PresenceVersions>> {
        let mut seen = self.presence.lock().unwrap_or_else(|e| e.into_inner());
        if version == 0 {
            return Some(seen);
        }
        match seen.get_mut(&(tenant, user)) {
            Some(last) if *last >= version => return None,
            Some(last) => *last = version,
            None => {
                if seen.len() >= PRESENCE_KEPT {
                    // Its memory too.
                    *seen = HashMap::new();
                }
                seen.insert((tenant, user), version);
            }
        }
        Some(seen)
    }

    /// Asks every local connection of `user` to close. For a deactivation, connections
    /// of theirs checked before now and registered later are closed too
    /// ([`Hub::register_checked`]). A password change closes only the connections
    /// opened for an older password: see [`Hub::password_changed`].
    pub fn close_user(&self, tenant: TenantId, user: UserId, reason: CloseReason) {
        match reason {
            CloseReason::Deactivated => {
                let now = Instant::now();
                self.revoke(tenant, user, |r| r.deactivated = Some(now));
            }
            CloseReason::PasswordChanged => return self.password_changed(tenant, user, 0),
            _ => {}
        }
        self.close_where(tenant, user, reason, |_| true);
    }

    /// `user`'s password is now the one set at `password` ([`Checked::password`]):
    /// their local connections opened (or last refreshed) for an older one close with
    /// [`CloseReason::PasswordChanged`], now or when they register
    /// ([`Hub::register_checked`]). A client that already reconnected with a token of
    /// the new password keeps that connection, however late this comes. 0 (a node
    /// from before password marks) closes them all, and those checked before now that
    /// register later.
    pub fn password_changed(&self, tenant: TenantId, user: UserId, password: i64) {
        if password == 0 {
            let now = Instant::now();
            self.revoke(tenant, user, |r| r.password_unknown = Some(now));
            return self.close_where(tenant, user, CloseReason::PasswordChanged, |_| true);
        }
        self.revoke(tenant, user, |r| {
            r.password = Some(r.password.map_or(password, |p| p.max(password)));
        });
        self.close_where(tenant, user, CloseReason::PasswordChanged, |m| {
            m.password.load(Ordering::Relaxed) < password
        });
    }

    fn revoke(&self, tenant: TenantId, user: UserId, change: impl FnOnce(&mut Revoked)) {
        let now = Instant::now();
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked.retain(|_, r| now.duration_since(r.at) < REVOKED_KEPT);
        let r = revoked.entry((tenant, user)).or_insert(Revoked {
            at: now,
            deactivated: None,
            password: None,
            password_unknown: None,
        });
        r.at = now;
        change(r);
    }

    fn close_where(
        &self,
        tenant: TenantId,
        user: UserId,
        reason: CloseReason,
        which: impl Fn(&Mailbox) -> bool,
    ) {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = tenants.get(&tenant).and_then(|u| u.get(&user)) {
            slots.iter().filter(|s| which(&s.mailbox)).for_each(|s| {
                s.close(reason);
            });
        }
    }

    /// Refuses new connections and asks every live one to close with
    /// [`CloseReason::Shutdown`].
    pub fn shutdown(&self) {
        let tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        self.closing.store(true, Ordering::SeqCst);
        for slots in tenants.values().flat_map(HashMap::values) {
            slots.iter().for_each(|s| {
                s.close(CloseReason::Shutdown);
            });
        }
    }

    /// Whether [`Hub::shutdown`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Waits until no connection is left, at most `limit`. True when none is left.
    pub async fn drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.drained.notified();
                if self.connection_count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mindsp_core::ConversationId;
    use mindsp_core::events::{PresenceStatus, TypingState};
    use serde_json::json;

    fn typing(tenant: TenantId, to: Vec<UserId>) -> Envelope {
        Envelope::to_users(
            tenant,
            to,
            Event::Typing {
                conversation_id: ConversationId::new(),
                user_id: UserId::new(),
                state: TypingState::Start,
            },
        )
    }

    /// Every connection of every tenant is told, once while its notice waits, again
    /// for losses after it was taken.
    #[test]
    fn lost_events_are_told_once_per_notice_taken() {
        let hub = Hub::new(8);
        let (t1, t2) = (TenantId::new(), TenantId::new());
        let (mut a, _) = hub.register(t1, UserId::new()).unwrap();
        let (mut b, _) = hub.register(t2, UserId::new()).unwrap();
        let told = |c: &mut Connection| match c.events.try_recv().map(|d| d.frame().to_owned()) {
            Ok(f) => f.starts_with(r#"{"v":1,"type":"events_skipped","events":["new_message""#),
            Err(Empty) => false,
        };
        hub.events_lost();
        hub.deliver(typing(t1, vec![a.user]));
        hub.events_lost();
        assert_eq!(
            a.events.len(),
            2,
            "the notice, then typing; no second notice"
        );
        assert!(told(&mut a));
        assert!(a.events.try_recv().is_ok());
        assert!(told(&mut b));
        assert!(b.events.is_empty());
        hub.events_lost();
        assert!(
            told(&mut a),
            "losses after the notice was taken are told again"
        );
        assert!(told(&mut b));
        assert_eq!(*hub.losses().borrow(), 3);
    }

    /// The kind of `event` if it goes from node to node and clients can miss it, after
    /// its place among the variants. The match is exhaustive on purpose: a new kind of
    /// event does not compile here until it is classified and numbered. Raise
    /// [`VARIANTS`] with it (nothing checks that you did): the test below then fails
    /// until `one_of_each` has a sample of it, and checks that [`RELAYED_KINDS`] lists
    /// it if relayed.
    fn classify(event: &Event) -> (usize, Option<&'static str>) {
        match event {
            Event::NewMessage { .. } => (0, Some("new_message")),
            Event::MessageRead { .. } => (1, Some("message_read")),
            Event::Typing { .. } => (2, Some("typing")),
            Event::Presence { .. } => (3, Some("presence")),
            Event::ConversationUpdated { .. } => (4, Some("conversation_updated")),
            Event::Notification { .. } => (5, Some("notification")),
            Event::NotificationsRead { .. } => (6, Some("notifications_read")),
            Event::NotificationDeleted { .. } => (7, Some("notification_deleted")),
            // The notice itself, and closes that are never frames.
            Event::EventsSkipped { .. } => (8, None),
            Event::AccountDeactivated { .. } => (9, None),
            Event::PasswordChanged { .. } => (10, None),
        }
    }

    /// How many variants [`Event`] has (numbered by `classify`).
    const VARIANTS: usize = 11;

    fn relayed_kind(event: &Event) -> Option<&'static str> {
        classify(event).1
    }

    /// One event of every kind, from the frames clients receive.
    fn one_of_each() -> Vec<Event> {
        let (id, at) = (uuid::Uuid::nil(), "2026-12-06T12:00:00.000Z");
        [
            json!({"type": "new_message", "conversation_id": id, "message": {"id": id,
                "conversation_id": id, "sender_id": id, "seq": 1, "content": "x",
                "created_at": at}}),
            json!({"type": "message_read", "conversation_id": id, "user_id": id, "seq": 1}),
            json!({"type": "typing", "conversation_id": id, "user_id": id, "state": "start"}),
            json!({"type": "presence", "user_id": id, "status": "online"}),
            json!({"type": "conversation_updated", "conversation_id": id, "kind": "group",
                "name": null, "members": []}),
            json!({"type": "notification", "unread": 1, "notification": {"id": id,
                "user_id": id, "kind": "k", "title": "t", "body": "b", "link": null,
                "data": {}, "created_at": at, "read_at": null}}),
            json!({"type": "notifications_read", "ids": [], "all": true, "unread": 0}),
            json!({"type": "notification_deleted", "id": id, "unread": 0}),
            json!({"type": "events_skipped", "events": []}),
            json!({"type": "account_deactivated", "user_id": id}),
            json!({"type": "password_changed", "user_id": id}),
        ]
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("an event"))
        .collect()
    }

    /// Every event that goes between nodes and reaches clients is listed in
    /// [`RELAYED_KINDS`] under its frame's `type`, and nothing else is.
    #[test]
    fn relayed_kinds_are_exactly_the_relayed_frames() {
        let events = one_of_each();
        let mut places: Vec<usize> = events.iter().map(|e| classify(e).0).collect();
        places.sort_unstable();
        assert_eq!(
            places,
            (0..VARIANTS).collect::<Vec<_>>(),
            "one sample of every variant of Event, numbered 0..VARIANTS"
        );
        let mut kinds: Vec<&str> = events.iter().filter_map(relayed_kind).collect();
        for (event, kind) in events
            .iter()
            .filter_map(|e| relayed_kind(e).map(|k| (e, k)))
        {
            let frame = event_frame(event);
            assert!(frame.contains(&format!(r#""type":"{kind}""#)), "{frame}");
        }
        kinds.sort_unstable();
        let mut listed = RELAYED_KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(kinds, listed);
    }

    /// A notice taken by the waiting `recv` clears the mark too.
    #[tokio::test]
    async fn a_notice_taken_by_recv_lets_the_next_loss_through() {
        let hub = Hub::new(8);
        let (mut a, _) = hub.register(TenantId::new(), UserId::new()).unwrap();
        hub.events_lost();
        let d = a.events.recv().await;
        assert!(matches!(d.envelope.event, Event::EventsSkipped { .. }));
        hub.events_lost();
        assert_eq!(a.events.len(), 1, "told again");
    }

    #[tokio::test]
    async fn delivers_to_the_audience_of_the_tenant_only() {
        let hub = Hub::new(8);
        let (t1, t2) = (TenantId::new(), TenantId::new());
        let (a, b) = (UserId::new(), UserId::new());
        let (mut a1, first) = hub.register(t1, a).unwrap();
        assert!(first);
        let (mut a2, first) = hub.register(t1, a).unwrap();
        assert!(!first);
        let (mut b1, _) = hub.register(t1, b).unwrap();
        // Same user id in another tenant: never reached by t1's envelopes.
        let (mut other, _) = hub.register(t2, a).unwrap();
        hub.deliver(typing(t1, vec![a]));
        assert!(a1.events.try_recv().is_ok());
        assert!(a2.events.try_recv().is_ok());
        assert!(b1.events.try_recv().is_err());
        assert!(other.events.try_recv().is_err());
        hub.deliver(Envelope {
            tenant: t1,
            audience: Audience::Tenant,
            event: Event::Presence {
                user_id: a,
                status: PresenceStatus::Online,
                last_seen: None,
                version: 1,
            },
        });
        let d = b1.events.try_recv().unwrap();
        assert!(
            d.frame().starts_with(r#"{"v":1,"type":"presence""#),
            "{}",
            d.frame()
        );
        assert!(other.events.try_recv().is_err());
        assert_eq!(hub.connection_count(), 4);
        drop(a1);
        assert_eq!(hub.connections_of(t1, a), 1);
    }

    fn read_receipt(tenant: TenantId, to: Vec<UserId>) -> Envelope {
        Envelope::to_users(
            tenant,
            to,
            Event::MessageRead {
                conversation_id: ConversationId::new(),
                user_id: UserId::new(),
                seq: 1,
                unread: None,
            },
        )
    }

    fn presence(tenant: TenantId) -> Envelope {
        Envelope {
            tenant,
            audience: Audience::Tenant,
            event: Event::Presence {
                user_id: UserId::new(),
                status: PresenceStatus::Online,
                last_seen: None,
                version: 1,
            },
        }
    }

    /// A user's presence events that arrive out of order: the stale one is dropped,
    /// per user and tenant; version 0 (no order known) always goes through.
    #[tokio::test]
    async fn a_stale_presence_event_is_dropped() {
        let hub = Hub::new(16);
        let (t, other_tenant) = (TenantId::new(), TenantId::new());
        let (watcher, user, colleague) = (UserId::new(), UserId::new(), UserId::new());
        let (mut w, _) = hub.register(t, watcher).unwrap();
        let (mut o, _) = hub.register(other_tenant, watcher).unwrap();
        let event = |tenant, user_id, status, version| Envelope {
            tenant,
            audience: Audience::Tenant,
            event: Event::Presence {
                user_id,
                status,
                last_seen: None,
                version,
            },
        };
        let got = |c: &mut Connection| {
            let mut out = Vec::new();
            while let Ok(d) = c.events.try_recv() {
                if let Event::Presence {
                    user_id,
                    status,
                    version,
                    ..
                } = d.envelope.event
                {
                    out.push((user_id, status, version));
                }
            }
            out
        };
        use PresenceStatus::{Offline, Online};
        hub.deliver(event(t, user, Online, 10));
        // Its offline (9) was published before, but arrives after.
        hub.deliver(event(t, user, Offline, 9));
        hub.deliver(event(t, user, Online, 10));
        // Another user's, and the same user id in another tenant, are their own.
        hub.deliver(event(t, colleague, Offline, 5));
        hub.deliver(event(other_tenant, user, Offline, 9));
        hub.deliver(event(t, user, Offline, 11));
        hub.deliver(event(t, user, Online, 0));
        assert_eq!(
            got(&mut w),
            vec![
                (user, Online, 10),
                (colleague, Offline, 5),
                (user, Offline, 11),
                (user, Online, 0)
            ]
        );
        assert_eq!(got(&mut o), vec![(user, Offline, 9)]);
    }

    /// The versions remembered are bounded: at [`PRESENCE_KEPT`] users the hub starts
    /// over, so its memory does not grow with every user ever announced.
    #[test]
    fn remembered_presence_versions_start_over_when_full() {
        let hub = Hub::new(16);
        let t = TenantId::new();
        let first = UserId::new();
        assert!(hub.presence_is_newer(t, first, 10).is_some());
        for _ in 1..PRESENCE_KEPT {
            assert!(hub.presence_is_newer(t, UserId::new(), 1).is_some());
        }
        let len = || hub.presence.lock().unwrap().len();
        assert_eq!(len(), PRESENCE_KEPT);
        // Still remembered: its stale event is dropped.
        assert!(hub.presence_is_newer(t, first, 9).is_none());
        // One more user: the hub starts over with that one alone.
        let last = UserId::new();
        assert!(hub.presence_is_newer(t, last, 1).is_some());
        assert_eq!(len(), 1);
        assert!(hub.presence_is_newer(t, last, 1).is_none());
        // What was forgotten goes through once (the documented price of the cap).
        assert!(hub.presence_is_newer(t, first, 9).is_some());
    }

    #[tokio::test]
    async fn a_full_queue_closes_that_connection_only() {
        let hub = Hub::new(2);
        let t = TenantId::new();
        let (slow, fast) = (UserId::new(), UserId::new());
        let (s, _) = hub.register(t, slow).unwrap();
        let (mut f, _) = hub.register(t, fast).unwrap();
        for _ in 0..5 {
            hub.deliver(read_receipt(t, vec![slow, fast]));
            while f.events.try_recv().is_ok() {}
        }
        assert_eq!(s.closed.get(), Some(CloseReason::TooSlow));
        assert_eq!(f.closed.get(), None);
        assert_eq!(hub.slow_disconnects(), 1);
    }

    /// A storm of presence and typing (a shift connecting at once) fills at most half of
    /// a queue and never closes the connection; what must arrive still does.
    #[tokio::test]
    async fn typing_and_presence_take_only_the_free_half_of_a_queue() {
        let hub = Hub::new(8);
        let t = TenantId::new();
        let u = UserId::new();
        let (c, _) = hub.register(t, u).unwrap();
        for _ in 0..100 {
            hub.deliver(presence(t));
            hub.deliver(typing(t, vec![u]));
        }
        assert_eq!(c.closed.get(), None);
        assert_eq!(c.events.len(), 4, "the first half of the queue, no more");
        assert_eq!(hub.skipped_ephemeral(), 196);
        assert!(c.take_skipped(), "the connection knows it missed some");
        assert!(!c.take_skipped(), "and is told once");
        for _ in 0..4 {
            hub.deliver(read_receipt(t, vec![u]));
        }
        assert_eq!(c.closed.get(), None, "receipts fill the rest");
        assert_eq!(c.events.len(), 8);
        hub.deliver(read_receipt(t, vec![u]));
        assert_eq!(c.closed.get(), Some(CloseReason::TooSlow));
        assert_eq!(hub.slow_disconnects(), 1);
    }

    #[tokio::test]
    async fn deactivation_password_change_and_shutdown_close_connections() {
        let hub = Hub::new(4);
        let t = TenantId::new();
        let (u, v, w) = (UserId::new(), UserId::new(), UserId::new());
        let (c, _) = hub.register(t, u).unwrap();
        let (d, _) = hub.register(t, v).unwrap();
        let (e1, _) = hub.register(t, w).unwrap();
        let (e2, _) = hub.register(t, w).unwrap();
        hub.deliver(Envelope::to_users(
            t,
            vec![u],
            Event::AccountDeactivated { user_id: u },
        ));
        assert_eq!(c.closed.get(), Some(CloseReason::Deactivated));
        assert_eq!(d.closed.get(), None);
        hub.deliver(Envelope::to_users(
            t,
            vec![w],
            Event::PasswordChanged {
                user_id: w,
                password: 0,
            },
        ));
        for e in [&e1, &e2] {
            assert_eq!(e.closed.get(), Some(CloseReason::PasswordChanged));
            assert!(e.events.is_empty(), "a close, not an event");
        }
        assert_eq!(d.closed.get(), None);
        hub.shutdown();
        assert_eq!(d.closed.get(), Some(CloseReason::Shutdown));
        assert!(hub.register(t, u).is_none());
        drop((c, d, e1, e2));
        assert!(hub.drained(Duration::from_secs(1)).await);
    }

    /// A connection whose account was checked before a deactivation but registered
    /// after is closed at once; one checked after, and other users' and other
    /// tenants', are not.
    #[test]
    fn a_connection_checked_before_a_deactivation_is_closed_when_registered() {
        let hub = Hub::new(4);
        let (t, other_tenant) = (TenantId::new(), TenantId::new());
        let (u, v) = (UserId::new(), UserId::new());
        let before = Checked::now(0);
        hub.close_user(t, u, CloseReason::Deactivated);
        hub.close_user(t, v, CloseReason::TooSlow);
        let after = Checked::now(0);
        let (late, _) = hub.register_checked(t, u, Some(before)).unwrap();
        assert_eq!(late.closed.get(), Some(CloseReason::Deactivated));
        for (tenant, user, checked) in [(t, u, after), (t, v, before), (other_tenant, u, before)] {
            let (c, _) = hub.register_checked(tenant, user, Some(checked)).unwrap();
            assert_eq!(c.closed.get(), None);
        }
    }

    /// A password change closes the connections opened for an older password, live or
    /// registered later, whenever they were checked; not those opened (or refreshed)
    /// with a token of the new one, however late the change arrives.
    #[test]
    fn a_password_change_closes_the_connections_of_older_passwords_only() {
        let hub = Hub::new(4);
        let (t, other_tenant) = (TenantId::new(), TenantId::new());
        let (u, v) = (UserId::new(), UserId::new());
        let (old, new) = (1_000, 2_000);
        let (stale, _) = hub.register_checked(t, u, Some(Checked::now(old))).unwrap();
        let (refreshed, _) = hub.register_checked(t, u, Some(Checked::now(old))).unwrap();
        refreshed.password().set(new);
        let (current, _) = hub.register_checked(t, u, Some(Checked::now(new))).unwrap();
        let (other, _) = hub.register_checked(t, v, Some(Checked::now(old))).unwrap();
        let (elsewhere, _) = hub
            .register_checked(other_tenant, u, Some(Checked::now(old)))
            .unwrap();
        let checked_before = Checked::now(old);
        hub.deliver(Envelope::to_users(
            t,
            vec![u],
            Event::PasswordChanged {
                user_id: u,
                password: new,
            },
        ));
        assert_eq!(stale.closed.get(), Some(CloseReason::PasswordChanged));
        for c in [&refreshed, &current, &other, &elsewhere] {
            assert_eq!(c.closed.get(), None);
        }
        // Registered after the change: by the password its token is for.
        let (late, _) = hub.register_checked(t, u, Some(checked_before)).unwrap();
        assert_eq!(late.closed.get(), Some(CloseReason::PasswordChanged));
        let (fresh, _) = hub.register_checked(t, u, Some(Checked::now(new))).unwrap();
        assert_eq!(fresh.closed.get(), None);
        // An older change arriving late closes nothing more.
        hub.password_changed(t, u, old);
        assert_eq!(fresh.closed.get(), None);
        let (fresh2, _) = hub.register_checked(t, u, Some(Checked::now(new))).unwrap();
        assert_eq!(fresh2.closed.get(), None);
        // A change of unknown password (from a node before marks) closes every live
        // connection and those checked before it, not those checked after.
        let checked_before = Checked::now(new);
        hub.password_changed(t, u, 0);
        assert_eq!(fresh.closed.get(), Some(CloseReason::PasswordChanged));
        let (late, _) = hub.register_checked(t, u, Some(checked_before)).unwrap();
        assert_eq!(late.closed.get(), Some(CloseReason::PasswordChanged));
        let (after, _) = hub.register_checked(t, u, Some(Checked::now(new))).unwrap();
        assert_eq!(after.closed.get(), None);
    }

    #[test]
    fn a_connection_beyond_the_limit_per_user_closes_the_oldest() {
        let hub = Hub::new(4);
        hub.limit_per_user(2);
        let t = TenantId::new();
        let (u, v) = (UserId::new(), UserId::new());
        let (a, first) = hub.register(t, u).unwrap();
        assert!(first);
        let (b, _) = hub.register(t, u).unwrap();
        let (other, _) = hub.register(t, v).unwrap();
        assert_eq!(a.closed.get(), None, "two are allowed");
        let (c, first) = hub.register(t, u).unwrap();
        assert!(!first);
        assert_eq!(a.closed.get(), Some(CloseReason::Superseded));
        assert_eq!(CloseReason::Superseded.code(), close::SUPERSEDED);
        assert_eq!((b.closed.get(), c.closed.get()), (None, None));
        assert_eq!(other.closed.get(), None, "other users are not counted");
        // The closing one still counts until it is gone, but is not closed twice: the
        // next one supersedes the oldest still open.
        assert_eq!(hub.connections_of(t, u), 3);
        let (d, _) = hub.register(t, u).unwrap();
        assert_eq!(b.closed.get(), Some(CloseReason::Superseded));
        assert_eq!((c.closed.get(), d.closed.get()), (None, None));
        drop((a, b));
        assert_eq!(hub.connections_of(t, u), 2);
        // Events still reach the open ones.
        hub.deliver(read_receipt(t, vec![u]));
        assert_eq!((c.events.len(), d.events.len()), (1, 1));
    }
}
