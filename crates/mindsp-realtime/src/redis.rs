//! The scaled profile: several nodes share one Redis (feature `redis`, through `fred`).
//!
//! # Fan-out: [`RedisBroker`]
//!
//! Every node publishes each envelope, as JSON, to **one** pub/sub channel,
//! `<prefix>events`, and one subscriber connection per node feeds the local [`Hub`] with
//! everything it receives, its own envelopes included. The publishing node does not
//! deliver locally as well, so each node's hub sees each envelope once (outages aside:
//! see below).
//!
//! One channel rather than one per tenant: behind a load balancer every node holds
//! users of every active tenant, so per-tenant channels would save no traffic, and
//! subscribing to a tenant's channel when its first local user connects would race with
//! that user's first events. The hub drops envelopes of tenants it has no connection of
//! with one map lookup.
//!
//! Pub/sub is at-most-once. `fred` reconnects by itself (the subscriber pings now and
//! then, so that a connection dropped silently by the network is noticed too) and the
//! broker subscribes again after each reconnection (retrying until Redis accepts); what
//! was published in
//! between is lost for this node. So once subscribed again, and whenever the subscriber
//! fell so far behind that it dropped envelopes (once the rest is delivered, or within
//! a second if it stays behind), the node
//! tells every local connection that events may be missing ([`Hub::events_lost`]: an
//! `events_skipped` frame naming every kind), and clients catch up: `resume` for
//! messages, a reload over HTTP for read markers, conversations and notifications, a
//! `presence` query (which reads Redis), typing indicators cleared. Meanwhile a message
//! is not lost either: in a conversation where the connection has a cursor, the next
//! message arrives with a `seq` beyond it and the connection reads the missing ones
//! from the store first (`mindsp-server`'s `ws` module). A deactivation among the lost
//! events is caught by the server, which then checks the accounts of the users
//! connected to the node.
//!
//! Nothing waits for Redis to come back: every command gives up after
//! [`RedisConfig::command_timeout`], and publishes and presence scripts (reads
//! included) at once while the client is reconnecting, or after a command timed out
//! until Redis answers a probe on `<prefix>probe` (a publish is awaited before the
//! sender's acknowledgement, presence before a connection's first frame: a Redis that
//! hangs must not cost each of them the timeout). Presence that cannot be read is
//! [`PresenceUnavailable`], not everyone offline. An envelope that
//! cannot be published is delivered to this node's own connections, so that people on
//! one node keep talking live through an outage; and once the node publishes again
//! (its publishing connection is back, Redis answered the probe, or a publish goes
//! through), it first publishes `events_lost` instead of an envelope, so that every
//! node tells its connections to catch up, even those whose subscription held.

//! # Presence: [`RedisPresence`]
//!
//! Each node counts its connections per (tenant, user) in memory and writes to Redis
//! only the transitions 0 → 1 and 1 → 0 of those counts. Keys (all under the prefix, so
//! a prefix with a hash tag such as the default `{mindsp}:rt:` keeps them in one
//! Redis Cluster slot):
//!
//! - `nodes`: sorted set, node id → time of its last heartbeat (Redis server time, ms);
//! - `n:<node>`: set of `<tenant>:<user>` with a connection on that node;
//! - `u:<tenant>:<user>`: hash, node id → 1 for each node where the user is connected;
//! - `seen:<tenant>`: hash, user → `last_seen` (ms);
//! - `v:<tenant>`: hash, user → the version of their last presence change, carried by
//!   its event (see [`mindsp_core::events::next_presence_version`]; the scripts give it,
//!   on Redis's clock, so versions stay ordered whichever node publishes);
//! - `sweep`, `sweep:resumed`: when some node last swept, and when sweeping last
//!   resumed after a gap longer than `window` (nothing is swept for a window after).
//!
//! A user is online while `u:<tenant>:<user>` names a node. Every node heartbeats every
//! `heartbeat` and, at the same pace, sweeps: a Lua script takes the nodes whose last
//! heartbeat is older than `window`, removes each from `nodes` and its users' hashes,
//! and returns the users left with no node. The script is atomic and removes the dead
//! node first, so exactly one surviving node publishes each `offline` event (with
//! `last_seen` = the dead node's last heartbeat), and tells its
//! [`crate::presence::OfflineSink`] (the server keeps that `last_seen` in the store). A
//! killed node's users therefore turn offline within `window` plus one `heartbeat` (a
//! window more when sweeping resumes after a gap: Redis away or restarted). All times are Redis's clock, so the
//! nodes' clocks need not agree; every node of a deployment must use the same `window`.
//! A node that stops cleanly ([`Presence::leaving`], at SIGTERM) stops its heartbeats
//! and writes no disconnection: it is swept like a dead one, and whoever reconnected to
//! another node meanwhile stays online without an event. Once it will publish nothing
//! more ([`Presence::stopped`]) it marks itself in `left`, unless something could not
//! be published or it was swept already (its stop outlasted the window); sweeping a
//! node without that mark (it died,
//! and may have held events it could not publish) makes the sweeper publish
//! `events_lost`, so that every node's clients catch up. Heartbeats run on a task of
//! their own, so that a long turn of the other periodic work (announcing thousands of
//! users again) cannot get a live node swept; a node never sweeps itself. With a single server node,
//! its users are swept by the next process of the deployment that runs presence on
//! the same Redis: the node when it starts again (under a new node id), or a `worker`
//! given the Redis URL.
//!
//! A node that finds itself missing from `nodes` at a heartbeat (it was swept after a
//! long pause or a partition, or Redis lost its data) announces its local users again.
//! Every [`RedisConfig::resync`] (5 minutes), and at the first heartbeat after its
//! publishing connection was made again, a node also compares `n:<node>` with the
//! connections it holds and writes the difference (with the presence events it
//! implies): a command of a dropped connection that reached Redis after newer ones
//! cannot leave anyone online, or offline, for good.
//! A disconnection that could not be written (Redis away) is written at the next
//! heartbeats (at most 100 per heartbeat), unless the user connected here again, and
//! the whole tenant is told that the user is offline then, as after a sweep.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface, HeartbeatInterface, PubsubInterface};
use fred::types::config::{Config, ReconnectPolicy, UnresponsiveConfig};
use fred::types::{Builder, Value};
use mindsp_core::events::{Audience, Envelope, Event, PresenceStatus};
use mindsp_core::{TenantId, UserId};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::hub::Hub;
use crate::presence::{OfflineSink, Presence, PresenceUnavailable, UserPresence};

pub use fred::error::Error as RedisError;

/// The default key and channel prefix: a hash tag, so every key lands in one slot of a
/// Redis Cluster.
pub const DEFAULT_PREFIX: &str = "{mindsp}:rt:";

/// Settings of the Redis real-time stack.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://...`.
    pub url: String,
    /// Prefix of the channel and of every key; the same on every node of a deployment.
    pub prefix: String,
    /// How often a node refreshes its heartbeat and sweeps dead nodes.
    pub heartbeat: Duration,
    /// A node silent this long is dead: its users turn offline. Same on every node;
    /// longer than `heartbeat` (two or three heartbeats).
    pub window: Duration,
    /// Longest wait for one Redis command. A publish is awaited after the commit, before
    /// the sender's acknowledgement: without a bound, a Redis that stops answering
    /// would hold every send (and every connection's opening) until it came back.
    pub command_timeout: Duration,
    /// How often a node rewrites its own presence in Redis from the connections it
    /// holds (and at the first heartbeat after its publishing connection was made
    /// again): whatever drifted, such as a command of a dropped connection that
    /// reached Redis after newer ones, is put right within this long.
    pub resync: Duration,
}

impl RedisConfig {
    /// Defaults for `url`: [`DEFAULT_PREFIX`], a 3 s heartbeat, a 10 s window, a 1 s
    /// command timeout and a resync every 5 minutes.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            heartbeat: Duration::from_secs(3),
            window: Duration::from_secs(10),
            command_timeout: Duration::from_secs(1),
            resync: Duration::from_secs(5 * 60),
        }
    }
}

/// Envelopes queued between `fred`'s reader and the hub feeder before the oldest are
/// dropped (and recovered by gap filling).
const SUBSCRIBER_BUFFER: usize = 16 * 1024;

fn builder(config: &RedisConfig) -> Result<Builder, RedisError> {
    let mut builder = Builder::from_config(Config::from_url(&config.url)?);
    let timeout = config.command_timeout;
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            // fred closes and reconnects a connection whose latest command has gone
            // unanswered this long (a partition, a hung Redis), so that commands fail at
            // once meanwhile rather than each after the timeout. It does not see a
            // connection that is only read from (the subscriber: it pings, see
            // `RedisBroker::connect`), nor one written to more often than that (the
            // publishing connection: after a timeout, `Writes` probes it and makes it
            // again itself).
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(timeout * 3),
                interval: timeout,
            };
        })
        .with_performance_config(|p| {
            p.broadcast_channel_capacity = SUBSCRIBER_BUFFER;
            p.default_command_timeout = timeout;
        })
        // Forever, backing off up to 2 s: a node without Redis cannot fan out.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    Ok(builder)
}

/// Fan-out through one Redis pub/sub channel; see the [module documentation](self).
pub struct RedisBroker {
    hub: Arc<Hub>,
    subscriber: SubscriberClient,
    writes: Arc<Writes>,
    tasks: Vec<JoinHandle<()>>,
    /// Set by [`Broker::close`]: the connections are ended already.
    closed: AtomicBool,
}

/// The longest a lagging subscriber waits for its queue to empty before the connections
/// are told that envelopes were dropped; doubled, up to [`LAG_NOTICE_MAX`], while it
/// stays behind.
const LAG_NOTICE: Duration = Duration::from_secs(1);
const LAG_NOTICE_MAX: Duration = Duration::from_secs(30);

/// Published on the channel instead of an envelope: "events published by a node did not
/// go out". Every node then tells its connections to catch up.
const UNSENT: &str = "events_lost";

/// Delivers what the subscription brings to `hub`. When the subscriber fell behind and
/// dropped envelopes, the connections are told once the rest is delivered (a notice
/// before the envelopes still queued would have clients catch up from a state not
/// delivered yet), or after [`LAG_NOTICE`] if it stays behind, then at doubling
/// intervals while it does (each notice makes every client catch up: under steady
/// overload, one a second would add to it).
async fn feed(
    mut messages: broadcast::Receiver<fred::types::Message>,
    channel: String,
    hub: Arc<Hub>,
) {
    // Since when envelopes were dropped and the connections not told yet.
    let mut lost: Option<std::time::Instant> = None;
    let mut wait = LAG_NOTICE;
    loop {
        match messages.recv().await {
            Ok(m) if *m.channel == *channel => {
                let payload = m.value.as_bytes().unwrap_or_default();
                if payload == UNSENT.as_bytes() {
                    tracing::info!(
                        "another node could not publish; local clients are told to catch up"
                    );
                    hub.events_lost();
                } else if let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) {
                    hub.deliver(envelope);
                } else {
                    tracing::warn!(channel = %channel, "ignoring a message that is not an envelope");
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    dropped = n,
                    "real-time subscriber fell behind and dropped envelopes; local clients \
                     will be told to catch up"
                );
                lost.get_or_insert_with(std::time::Instant::now);
            }
            Err(RecvError::Closed) => return,
        }
        let Some(since) = lost else { continue };
        if messages.is_empty() {
            hub.events_lost();
            lost = None;
            wait = LAG_NOTICE;
        } else if since.elapsed() >= wait {
            hub.events_lost();
            lost = None;
            wait = (wait * 2).min(LAG_NOTICE_MAX);
        }
    }
}

/// Waits for the next event of a `fred` notification channel; false once it is closed.
async fn next_event<T: Clone>(rx: &mut broadcast::Receiver<T>) -> bool {
    !matches!(rx.recv().await, Err(RecvError::Closed))
}

/// Subscribes to `channel` again after a reconnection, retrying (backing off to 2 s)
/// until Redis accepts: the clients are told to catch up only from a live subscription.
async fn resubscribe(subscriber: &SubscriberClient, channel: &str) {
    let mut wait = Duration::from_millis(50);
    while let Err(e) = subscriber.subscribe(channel).await {
        tracing::warn!(error = %e, "cannot subscribe to Redis again; retrying");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Unanswered probes in a row after which the publishing connection is made again (see
/// [`Writes::probe`]).
const PROBES_BEFORE_RECONNECT: u32 = 3;

/// This node's writes to Redis: its publishing connection (shared with presence), and
/// what went wrong with it.
///
/// - **Unsent envelopes.** What could not be published never reached the other nodes:
///   once publishing works again, they are told ([`UNSENT`] on the channel).
/// - **A Redis that does not answer.** A command can time out on a connection fred
///   still counts as up (a Redis that hangs or is paused, a partition not noticed yet).
///   fred's own check for unresponsive connections does not see that under steady
///   traffic (each write restarts it), so every publish, and so every send's
///   acknowledgement, would wait the whole [`RedisConfig::command_timeout`]. After a
///   timeout, publishes and presence scripts (reads included) fail at once instead (the
///   breaker is open) and a probe, a publish on `<prefix>probe` that nobody reads,
///   retries until Redis answers.
pub(crate) struct Writes {
    client: Client,
    channel: String,
    probe_channel: String,
    /// Something could not be published since the other nodes were last told.
    unsent: AtomicBool,
    /// The breaker: a command timed out and no probe has been answered since.
    stalled: AtomicBool,
    /// The period of the probes: the command timeout.
    every: Duration,
    /// Presence resyncs at its next heartbeat ([`RedisPresence`]'s `resync`). Set here
    /// at each reconnection (commands of the old connection may still reach Redis,
    /// after newer ones), and by a resync that has more to do or could not read Redis.
    resync_due: AtomicBool,
}

impl Writes {
    fn new(client: Client, config: &RedisConfig) -> Arc<Self> {
        Arc::new(Self {
            client,
            channel: format!("{}events", config.prefix),
            probe_channel: format!("{}probe", config.prefix),
            unsent: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            every: config.command_timeout,
            resync_due: AtomicBool::new(false),
        })
    }

    /// Why a write should not be sent now (it would wait for the timeout): `None` when it
    /// may go.
    fn refused(&self) -> Option<RedisError> {
        if !self.client.is_connected() {
            Some(not_connected())
        } else if self.stalled.load(Ordering::SeqCst) {
            Some(RedisError::new(
                fred::error::ErrorKind::IO,
                "Redis did not answer in time; writes wait until it does",
            ))
        } else {
            None
        }
    }

    /// Notes the outcome of a write: a timeout opens the breaker (and starts the probe
    /// if it was closed).
    fn outcome<T>(self: &Arc<Self>, r: Result<T, RedisError>) -> Result<T, RedisError> {
        if let Err(e) = &r
            && *e.kind() == fred::error::ErrorKind::Timeout
            && !self.stalled.swap(true, Ordering::SeqCst)
        {
            tracing::warn!("a Redis command timed out; writes fail at once until Redis answers");
            tokio::spawn(Self::probe(Arc::downgrade(self)));
        }
        r
    }

    /// Publishes on the probe channel until Redis answers (any reply, an error reply
    /// included: a Redis that refuses the probe channel still answers), then tells the
    /// other nodes of what did not go out meanwhile and closes the breaker, in that
    /// order, so that the notice leaves before the envelopes that follow it. Ends early
    /// with the broker and the presence that hold `this`.
    ///
    /// A probe every command timeout. fred's own check would close a connection that
    /// the network dropped without a word (no reply for three timeouts since the last
    /// write), but each probe is a write that starts its count again: after
    /// [`PROBES_BEFORE_RECONNECT`] unanswered probes in a row, the probe makes the
    /// connection again itself.
    async fn probe(this: std::sync::Weak<Self>) {
        let mut unanswered = 0;
        while let Some(w) = this.upgrade() {
            let next = tokio::time::Instant::now() + w.every;
            let probe = w.client.publish::<i64, _, _>(w.probe_channel.as_str(), "");
            let answered = match probe.await {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind(),
                    fred::error::ErrorKind::Timeout
                        | fred::error::ErrorKind::IO
                        | fred::error::ErrorKind::Canceled
                ),
            };
            // Closed only once the other nodes are told, if they had to be: a notice
            // that timed out means Redis is not answering after all. (Publishes refused
            // meanwhile mark more to tell: the next publish tells it.)
            if answered && w.announce(true).await {
                w.stalled.store(false, Ordering::SeqCst);
                tracing::info!("Redis answers again; writes resume");
                return;
            }
            unanswered += 1;
            if unanswered % PROBES_BEFORE_RECONNECT == 0 && w.client.is_connected() {
                tracing::warn!("Redis has not answered for a while; connecting again");
                let client = w.client.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.force_reconnection().await {
                        tracing::warn!(error = %e, "cannot connect to Redis again");
                    }
                });
            }
            drop(w);
            tokio::time::sleep_until(next).await;
        }
    }

    /// Tells every node, if something could not be published since they were last told.
    /// Unless `wait`, only when a write may go: a publish must not wait for a
    /// reconnection. False when there was something to tell and it did not go out.
    async fn announce(self: &Arc<Self>, wait: bool) -> bool {
        // A load first: every publish comes through here, and a swap would write.
        if !self.unsent.load(Ordering::SeqCst) || !self.unsent.swap(false, Ordering::SeqCst) {
            return true;
        }
        let told = (wait || self.refused().is_none())
            && self
                .outcome(
                    self.client
                        .publish::<i64, _, _>(self.channel.as_str(), UNSENT)
                        .await,
                )
                .is_ok();
        if told {
            tracing::info!("told every node that some events could not be published");
        } else {
            self.unsent.store(true, Ordering::SeqCst);
        }
        told
    }

    /// Publishes `payload` on the channel, or fails at once when it would wait (see
    /// [`Self::refused`]). On failure the other nodes are told later.
    async fn publish(self: &Arc<Self>, payload: String) -> Result<(), RedisError> {
        let _ = self.announce(false).await;
        let sent = match self.refused() {
            None => self.outcome(
                self.client
                    .publish::<i64, _, _>(self.channel.as_str(), payload)
                    .await,
            ),
            Some(e) => Err(e),
        };
        if let Err(e) = &sent {
            // Once per outage in the log, not once per publish.
            if self.unsent.swap(true, Ordering::SeqCst) {
                tracing::debug!(error = %e, "cannot publish to Redis; delivered on this node only");
            } else {
                tracing::warn!(error = %e, "cannot publish to Redis; events are delivered on this node only until it can");
            }
            // The probe may have closed the breaker (and found nothing to tell) since
            // this publish was refused: then nobody else would tell the other nodes
            // before this node's next publish.
            if self.refused().is_none() {
                let this = self.clone();
                tokio::spawn(async move { this.announce(false).await });
            }
        }
        sent.map(drop)
    }

    /// Runs a presence script, unless it would wait (see [`Self::refused`]).
    async fn eval(
        self: &Arc<Self>,
        body: &str,
        key: &str,
        args: Vec<Value>,
    ) -> Result<Value, RedisError> {
        if let Some(e) = self.refused() {
            return Err(e);
        }
        // Never sent twice: a script under way when its connection closes fails rather
        // than run again on the next one, as fred does for other commands. The presence
        // scripts are not idempotent: a second run of a disconnection would find nothing
        // to do and answer that nobody went offline. A failure is handled as one that
        // may have run. (fred's `LuaInterface` has no per-command options: `EVAL` by hand.)
        let once = fred::types::config::Options {
            max_attempts: Some(1),
            ..Default::default()
        };
        let mut argv: Vec<Value> = Vec::with_capacity(args.len() + 3);
        argv.extend([script(body).into(), 1.into(), key.into()]);
        argv.extend(args);
        let ran = self
            .client
            .with_options(&once)
            .custom(fred::cmd!("EVAL"), argv)
            .await;
        self.outcome(ran)
    }
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("channel", &self.writes.channel)
            .finish()
    }
}

impl RedisBroker {
    /// Connects a publishing and a subscribing connection and starts feeding `hub`.
    /// Returns once the subscription is active.
    pub async fn connect(hub: Arc<Hub>, config: &RedisConfig) -> Result<Self, RedisError> {
        let builder = builder(config)?;
        let client = builder.build()?;
        client.init().await?;
        let subscriber = builder.build_subscriber_client()?;
        subscriber.init().await?;
        let channel = format!("{}events", config.prefix);
        // Before subscribing, so that nothing published after the subscription is
        // missed, and a reconnection right after it is seen.
        let messages = subscriber.message_rx();
        let mut reconnected = subscriber.reconnect_rx();
        let feeder = tokio::spawn(feed(messages, channel.clone(), hub.clone()));
        subscriber.subscribe(channel.as_str()).await?;
        // Whatever was published while the subscriber was away never reaches this node:
        // once subscribed again, every local client is told to catch up.
        let resubscriber = {
            let (subscriber, channel, hub) = (subscriber.clone(), channel.clone(), hub.clone());
            tokio::spawn(async move {
                while next_event(&mut reconnected).await {
                    resubscribe(&subscriber, &channel).await;
                    tracing::info!(
                        "real-time subscriber reconnected to Redis; local clients are told \
                         to catch up"
                    );
                    hub.events_lost();
                }
            })
        };
        // What this node could not publish never reached the others: once its
        // publishing connection is back, every node is told (the next publish tells
        // them too, if it comes first).
        let writes = Writes::new(client.clone(), config);
        let announcer = {
            let mut reconnected = client.reconnect_rx();
            let writes = writes.clone();
            tokio::spawn(async move {
                while next_event(&mut reconnected).await {
                    writes.resync_due.store(true, Ordering::SeqCst);
                    // fred tells of the reconnection just before it counts as connected:
                    // the announcement waits for it (at most the command timeout).
                    let _ = writes.announce(true).await;
                }
            })
        };
        // The subscriber only reads: a connection that died without a word (a NAT or
        // firewall dropping it while idle) would look like a quiet channel forever. A
        // ping now and then, left unanswered, makes fred's unresponsive check close and
        // reconnect it (then the clients catch up, above). Sent less often than that
        // check's limit, which each write restarts.
        let pinger = {
            let subscriber = subscriber.clone();
            let every = config.command_timeout * 4;
            tokio::spawn(async move {
                let _ = subscriber.enable_heartbeat(every, false).await;
            })
        };
        Ok(Self {
            hub,
            subscriber,
            writes,
            tasks: vec![feeder, resubscriber, announcer, pinger],
            closed: AtomicBool::new(false),
        })
    }

    /// The channel envelopes go through.
    pub fn channel(&self) -> &str {
        &self.writes.channel
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let (c, s) = (self.writes.client.clone(), self.subscriber.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = s.quit().await;
                let _ = c.quit().await;
            });
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.tasks.iter().for_each(JoinHandle::abort);
        // Bounded: a Redis that does not answer does not hold the process's end.
        let quit = async {
            let _ = self.subscriber.quit().await;
            let _ = self.writes.client.quit().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), quit).await;
    }

    async fn publish(&self, envelope: Envelope) {
        let payload = match serde_json::to_string(&envelope) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise an envelope");
                return;
            }
        };
        if self.writes.publish(payload).await.is_err() {
            // This node's own connections get it anyway; the other nodes are told that
            // something did not go out once publishing works again. A publish that timed
            // out may still go through later: a message then arrives twice here, and
            // connections drop the second by its `seq`.
            self.hub.deliver(envelope);
        }
    }
}

// ---- presence -------------------------------------------------------------------------

/// Redis server time in ms, in every script; and `bump`, which gives a user's presence
/// change its version (`next_presence_version`'s rule on Redis's clock, kept in
/// `v:<tenant>`), and `version`, which reads the last one.
const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function version(p, tenant, user)
  return tonumber(redis.call('HGET', p .. 'v:' .. tenant, user) or '0')
end
local function bump(p, tenant, user)
  local v = math.max(now, version(p, tenant, user) + 1)
  redis.call('HSET', p .. 'v:' .. tenant, user, string.format('%.0f', v))
  return v
end
";

/// KEYS[1] nodes; ARGV prefix, node, tenant, user, late. Returns {became online, node
/// was missing from `nodes`, the version of the change (0 when not online now)}. With
/// `late` = 1 (a connection written again after a failed try, which may have run
/// without its answer reaching the node), also answers online, with the version of
/// the user's last change, when this node is the only one holding them.
const CONNECT: &str = r"
local p, node, tu, late = ARGV[1], ARGV[2], ARGV[3] .. ':' .. ARGV[4], ARGV[5]
local missing = 0
if not redis.call('ZSCORE', KEYS[1], node) then
  redis.call('ZADD', KEYS[1], now, node)
  missing = 1
end
local ukey = p .. 'u:' .. tu
local added = redis.call('HSET', ukey, node, '1')
redis.call('SADD', p .. 'n:' .. node, tu)
local online, v = 0, 0
if redis.call('HLEN', ukey) == 1 then
  if added == 1 then
    online = 1
    v = bump(p, ARGV[3], ARGV[4])
  elseif late == '1' then
    online = 1
    v = version(p, ARGV[3], ARGV[4])
    if v == 0 then v = bump(p, ARGV[3], ARGV[4]) end
  end
end
return {online, missing, v}
";

/// KEYS[1] nodes; ARGV prefix, node, tenant, user, late. Returns {last_seen (ms),
/// version} when this call left the user offline everywhere, else {-1, 0}. With `late`
/// = 1 (a disconnection written after a failed try, which may have run after all: a
/// command that timed out can still reach Redis), returns their `last_seen` and the
/// version of their last change whenever they have no node left.
const DISCONNECT: &str = r"
local p, node, tenant, user, late = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tu = tenant .. ':' .. user
local ukey = p .. 'u:' .. tu
local removed = redis.call('HDEL', ukey, node)
redis.call('SREM', p .. 'n:' .. node, tu)
if redis.call('HLEN', ukey) > 0 then return {-1, 0} end
if removed == 1 then
  redis.call('HSET', p .. 'seen:' .. tenant, user, now)
  return {now, bump(p, tenant, user)}
end
if late == '1' then
  local v = version(p, tenant, user)
  if v == 0 then v = bump(p, tenant, user) end
  return {tonumber(redis.call('HGET', p .. 'seen:' .. tenant, user) or now), v}
end
return {-1, 0}
";

/// KEYS[1] nodes; ARGV prefix, node, cursor. One page of `n:<node>`: {next cursor,
/// members}.
const SCAN_NODE: &str = r"
return redis.call('SSCAN', ARGV[1] .. 'n:' .. ARGV[2], ARGV[3], 'COUNT', 1000)
";

/// KEYS[1] nodes; ARGV node. Returns 1 when the node was missing.
const HEARTBEAT: &str = r"
local missing = 0
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then missing = 1 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return missing
";

/// KEYS[1] nodes; ARGV prefix, window ms, most nodes per sweep, the sweeping node
/// (never swept by itself), the longest pause between sweeps that is not a gap (ms). Returns how many of the dead nodes had not left cleanly
/// (`left`), then a flat list tenant, user, last_seen, version of the users the dead
/// nodes left offline. Sweeps nothing for a window after sweeping resumes from a gap
/// (`<prefix>sweep`, `<prefix>sweep:resumed`: Redis times; see [`Shared::gap`]).
const SWEEP: &str = r"
local p, window, limit, me = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local gap = tonumber(ARGV[5])
-- After a gap in sweeping (Redis was away or restarted: nobody swept for longer than
-- sweeps normally take), heartbeats are old by that much, the live nodes' too: nothing
-- is swept until a window has passed since, for them to beat again.
local skey = p .. 'sweep'
local swept_at = tonumber(redis.call('GET', skey) or '0')
redis.call('SET', skey, now)
if now - swept_at > gap then
  redis.call('SET', skey .. ':resumed', now)
  return {'0'}
end
if now - tonumber(redis.call('GET', skey .. ':resumed') or '0') < window then
  return {'0'}
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window, 'LIMIT', 0, limit)
local out, unclean = {'0'}, 0
for _, node in ipairs(dead) do
  if node ~= me then
    if redis.call('SREM', p .. 'left', node) == 0 then unclean = unclean + 1 end
    local last = redis.call('ZSCORE', KEYS[1], node)
    redis.call('ZREM', KEYS[1], node)
    local nkey = p .. 'n:' .. node
    for _, tu in ipairs(redis.call('SMEMBERS', nkey)) do
      local ukey = p .. 'u:' .. tu
      if redis.call('HDEL', ukey, node) == 1 and redis.call('HLEN', ukey) == 0 then
        local sep = string.find(tu, ':', 1, true)
        local tenant, user = string.sub(tu, 1, sep - 1), string.sub(tu, sep + 1)
        redis.call('HSET', p .. 'seen:' .. tenant, user, last)
        table.insert(out, tenant)
        table.insert(out, user)
        table.insert(out, last)
        table.insert(out, string.format('%.0f', bump(p, tenant, user)))
      end
    end
    redis.call('DEL', nkey)
  end
end
out[1] = tostring(unclean)
return out
";

/// ARGV the `left` key, this node, the `nodes` key: it stops cleanly, with nothing left
/// unpublished. Marked only while it is still in `nodes`: a node already swept (its
/// stop outlasted the window) would keep the mark for good. 1 if marked.
const LEFT: &str = r"
if redis.call('ZSCORE', ARGV[3], ARGV[2]) then
  redis.call('SADD', ARGV[1], ARGV[2])
  return 1
end
return 0
";

/// KEYS[1] nodes; ARGV prefix, tenant, users... Returns per user {online, last_seen or
/// '', version}.
const QUERY: &str = r"
local p, tenant = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local online = redis.call('HLEN', p .. 'u:' .. tenant .. ':' .. ARGV[i])
  table.insert(out, online > 0 and 1 or 0)
  table.insert(out, redis.call('HGET', p .. 'seen:' .. tenant, ARGV[i]) or '')
  table.insert(out, version(p, tenant, ARGV[i]))
end
return out
";

/// Most disconnections missed by Redis one heartbeat writes (the next takes the rest),
/// so that the heartbeat itself stays on time.
const OFFLINE_PER_TICK: usize = 100;

/// Most users one heartbeat's resync writes (the next heartbeats write the rest).
const RESYNC_PER_TICK: usize = 100;

/// Users of dead nodes whose presence a sweep reads again at once before telling their
/// tenant they are offline.
const SWEEP_RECHECK: usize = 100;

/// Most dead nodes one sweep handles (the next sweep takes the rest).
const SWEEP_LIMIT: i64 = 16;

/// The error of a command not sent because the client is reconnecting.
fn not_connected() -> RedisError {
    RedisError::new(fred::error::ErrorKind::IO, "not connected to Redis")
}

fn script(body: &str) -> String {
    format!("{NOW}{body}")
}

fn millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// A presence version a script returned (0, "order unknown", when missing).
fn version(v: Option<i64>) -> u64 {
    v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

type Slot = Arc<tokio::sync::Mutex<u32>>;

struct Shared {
    /// The broker's writes: a presence script fails at once when a publish would.
    writes: Arc<Writes>,
    broker: Arc<dyn Broker>,
    prefix: String,
    nodes_key: String,
    node: String,
    window: Duration,
    /// A pause between two sweeps longer than this (the window less a heartbeat) means
    /// nobody could sweep (Redis away), long enough for a live node's heartbeat, a
    /// heartbeat old when the pause began, to pass the window: sweeping waits a window
    /// more then (see [`SWEEP`]). Sweeps normally come every heartbeat or so.
    gap: Duration,
    /// This node's connection counts. A count changes, and its transition is written
    /// to Redis, under the slot's lock: transitions of one user stay in order.
    local: Mutex<HashMap<(TenantId, UserId), Slot>>,
    /// Set when a script found this node missing from `nodes`: announce every local
    /// user again at the next heartbeat.
    reannounce: AtomicBool,
    /// Users whose last disconnection could not be written to Redis: written at the
    /// next heartbeats, unless they connected here again meanwhile, and written late
    /// (any failure may come after the command reached Redis).
    offline_unwritten: Mutex<std::collections::HashSet<(TenantId, UserId)>>,
    /// Users whose connection failed to be written (it may have run all the same): the
    /// announcement that writes it again says they are online even if Redis has them
    /// already.
    online_unwritten: Mutex<std::collections::HashSet<(TenantId, UserId)>>,
    /// Set by [`Presence::leaving`]: no more heartbeats.
    leaving: watch::Sender<bool>,
    /// Heartbeats between two resyncs ([`RedisConfig::resync`]).
    resync_every: u64,
    /// Heartbeats so far.
    ticks: std::sync::atomic::AtomicU64,
    /// Told of the offline events this node publishes by itself ([`Presence::on_offline`];
    /// the last one set).
    offline_sink: std::sync::RwLock<Option<OfflineSink>>,
}

/// Presence shared by every node through Redis; see the [module documentation](self).
pub struct RedisPresence {
    shared: Arc<Shared>,
    /// The heartbeats, and the rest of the periodic work; awaited by
    /// [`Presence::stopped`].
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// How long [`Presence::stopped`] waits for a sweep under way to publish what it
/// removed (one event per user) before it gives up on it (and the node's stop counts
/// as unclean, so that every node's clients catch up).
const STOP_WAIT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("node", &self.shared.node)
            .finish()
    }
}

impl RedisPresence {
    /// Registers this node (a fresh id), then heartbeats and sweeps every
    /// `config.heartbeat` until dropped; writes through `broker`'s connection, and
    /// publishes through `broker` the offline events of dead nodes' users.
    pub async fn start(broker: Arc<RedisBroker>, config: &RedisConfig) -> Result<Self, RedisError> {
        let shared = Arc::new(Shared {
            writes: broker.writes.clone(),
            broker,
            prefix: config.prefix.clone(),
            nodes_key: format!("{}nodes", config.prefix),
            node: uuid::Uuid::new_v4().simple().to_string(),
            window: config.window,
            gap: config
                .window
                .saturating_sub(config.heartbeat)
                .max(config.heartbeat),
            local: Mutex::new(HashMap::new()),
            reannounce: AtomicBool::new(false),
            offline_unwritten: Mutex::new(std::collections::HashSet::new()),
            online_unwritten: Mutex::new(std::collections::HashSet::new()),
            leaving: watch::Sender::new(false),
            resync_every: (config.resync.as_millis()
                / config.heartbeat.max(Duration::from_millis(100)).as_millis())
            .clamp(1, u128::from(u32::MAX)) as u64,
            ticks: std::sync::atomic::AtomicU64::new(0),
            offline_sink: std::sync::RwLock::new(None),
        });
        shared.heartbeat().await?;
        let every = config.heartbeat.max(Duration::from_millis(100));
        type Work = fn(Arc<Shared>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
        let periodic = |work: Work| {
            let shared = shared.clone();
            let mut leaving = shared.leaving.subscribe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    // Stopped only between ticks: a sweep in progress publishes the
                    // offline events of what it removed.
                    tokio::select! {
                        biased;
                        _ = leaving.changed() => return,
                        _ = tick.tick() => work(shared.clone()).await,
                    }
                }
            })
        };
        let tasks = vec![
            periodic(|s| Box::pin(async move { s.beat().await })),
            periodic(|s| Box::pin(async move { s.tick().await })),
        ];
        tracing::info!(node = %shared.node, "presence node registered in Redis");
        Ok(Self {
            shared,
            tasks: Mutex::new(tasks),
        })
    }

    /// This node's id in Redis.
    pub fn node(&self) -> &str {
        &self.shared.node
    }
}

impl Drop for RedisPresence {
    fn drop(&mut self) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .for_each(JoinHandle::abort);
    }
}

impl Shared {
    async fn eval(&self, body: &str, args: Vec<Value>) -> Result<Value, RedisError> {
        self.writes.eval(body, &self.nodes_key, args).await
    }

    fn ids(&self, tenant: TenantId, user: UserId) -> Vec<Value> {
        vec![
            self.prefix.as_str().into(),
            self.node.as_str().into(),
            tenant.to_string().into(),
            user.to_string().into(),
        ]
    }

    /// Writes a 0 → 1 transition; the version of the change when the user came online
    /// everywhere.
    async fn connect(
        &self,
        tenant: TenantId,
        user: UserId,
        late: bool,
    ) -> Result<Option<u64>, RedisError> {
        let mut args = self.ids(tenant, user);
        args.push(if late { "1" } else { "0" }.into());
        let v = self.eval(CONNECT, args).await?;
        let v: Vec<i64> = v.convert()?;
        if v.get(1) == Some(&1) {
            self.reannounce.store(true, Ordering::SeqCst);
        }
        Ok((v.first() == Some(&1)).then(|| version(v.get(2).copied())))
    }

    async fn heartbeat(&self) -> Result<bool, RedisError> {
        let v: i64 = self
            .eval(HEARTBEAT, vec![self.node.as_str().into()])
            .await?
            .convert()?;
        Ok(v == 1)
    }

    async fn publish_presence(
        &self,
        tenant: TenantId,
        user: UserId,
        status: PresenceStatus,
        last_seen: Option<DateTime<Utc>>,
        version: u64,
    ) {
        // Every offline event published here is one this node found by itself (a
        // sweep, a late write): `disconnected` hands its own back to the caller.
        if let (PresenceStatus::Offline, Some(seen)) = (status, last_seen) {
            let sink = self
                .offline_sink
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(sink) = sink {
                sink(tenant, user, seen);
            }
        }
        self.broker
            .publish(Envelope {
                tenant,
                audience: Audience::Tenant,
                event: Event::Presence {
                    user_id: user,
                    status,
                    last_seen,
                    version,
                },
            })
            .await;
    }

    /// One heartbeat, on a task of its own: however long the work of [`Self::tick`]
    /// takes (announcing thousands of users again after Redis lost its data), the node
    /// stays alive in Redis.
    async fn beat(&self) {
        match self.heartbeat().await {
            Ok(true) => {
                tracing::warn!(node = %self.node, "this node was missing from Redis presence; announcing its users again");
                self.reannounce.store(true, Ordering::SeqCst);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "presence heartbeat failed"),
        }
    }

    async fn tick(&self) {
        if self.reannounce.swap(false, Ordering::SeqCst) {
            self.announce_all().await;
        }
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        if self.writes.resync_due.swap(false, Ordering::SeqCst)
            || tick.is_multiple_of(self.resync_every)
        {
            self.resync().await;
        }
        self.write_offline().await;
        // Not even tried while writes are refused (Redis away): only a sweep that was
        // sent may have run.
        if self.writes.refused().is_some() {
            return;
        }
        if let Err(e) = self.sweep().await {
            // It may have run without its answer reaching here: users it removed would
            // be told offline by nobody. Every node's clients catch up instead.
            tracing::warn!(error = %e, "presence sweep failed; clients are told to catch up");
            self.writes.unsent.store(true, Ordering::SeqCst);
            let _ = self.writes.announce(false).await;
        }
    }

    async fn announce_all(&self) {
        let slots: Vec<_> = {
            let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            local.iter().map(|(k, s)| (*k, s.clone())).collect()
        };
        for ((tenant, user), slot) in slots {
            let n = slot.lock().await;
            if *n == 0 {
                continue;
            }
            if let Err(e) = self.rewrite_connection(tenant, user).await {
                // The next heartbeat starts over; the others would wait as long.
                tracing::warn!(error = %e, "cannot announce a user's presence");
                self.reannounce.store(true, Ordering::SeqCst);
                return;
            }
        }
    }

    /// Writes that `user`, connected here, is on this node (again: a connection that
    /// could not be written, or that Redis lost), and tells the tenant when that brought
    /// them online. Called under the user's slot lock, with a count above 0.
    async fn rewrite_connection(&self, tenant: TenantId, user: UserId) -> Result<(), RedisError> {
        let late = self.online_unwritten(tenant, user, None);
        let online = self.connect(tenant, user, late).await?;
        self.online_unwritten(tenant, user, Some(false));
        // As in `connected`: an older unwritten disconnection no longer holds.
        self.unwritten_done(tenant, user);
        if let Some(version) = online {
            self.publish_presence(tenant, user, PresenceStatus::Online, None, version)
                .await;
        }
        Ok(())
    }

    /// [`Self::write_disconnection`], and tells the tenant when that left the user
    /// offline. Called under the user's slot lock, with a count of 0.
    async fn rewrite_disconnection(
        &self,
        tenant: TenantId,
        user: UserId,
        late: bool,
    ) -> Result<(), ()> {
        if let Some((seen, version)) = self.write_disconnection(tenant, user, late).await? {
            self.publish_presence(tenant, user, PresenceStatus::Offline, Some(seen), version)
                .await;
        }
        Ok(())
    }

    /// Puts this node's presence in Redis right from the connections it holds: users
    /// Redis has on this node but who have no connection here are disconnected (and the
    /// tenant told when that leaves them offline), users with a connection here whom
    /// Redis lacks are connected (and announced when that brings them online). Usually
    /// nothing differs, and only the users that differ are looked at. At most
    /// [`RESYNC_PER_TICK`] are written per heartbeat (the rest at the next ones), and a
    /// user whose write fails is left to the usual retries (the next announcement, the
    /// unwritten disconnections). Tried again at the next heartbeat if Redis was away.
    async fn resync(&self) {
        let mut in_redis = std::collections::HashSet::new();
        let mut cursor = "0".to_owned();
        loop {
            let page = self
                .eval(
                    SCAN_NODE,
                    vec![
                        self.prefix.as_str().into(),
                        self.node.as_str().into(),
                        cursor.as_str().into(),
                    ],
                )
                .await
                .and_then(|v| v.convert::<(String, Vec<String>)>());
            let (next, members) = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "presence resync cannot read this node's users in Redis");
                    // Redis away: again at the next heartbeat; anything else waits for
                    // the next resync rather than fail at every heartbeat.
                    if matches!(
                        e.kind(),
                        fred::error::ErrorKind::IO | fred::error::ErrorKind::Timeout
                    ) {
                        self.writes.resync_due.store(true, Ordering::SeqCst);
                    }
                    return;
                }
            };
            in_redis.extend(members.iter().filter_map(|tu| {
                let (t, u) = tu.split_once(':')?;
                Some((TenantId(t.parse().ok()?), UserId(u.parse().ok()?)))
            }));
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let differ: Vec<(TenantId, UserId)> = {
            let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            let held: std::collections::HashSet<_> = local.keys().copied().collect();
            in_redis.symmetric_difference(&held).copied().collect()
        };
        let mut written = 0;
        for (tenant, user) in differ {
            if written == RESYNC_PER_TICK {
                self.writes.resync_due.store(true, Ordering::SeqCst);
                break;
            }
            let slot = self.slot(tenant, user);
            let n = slot.lock().await;
            // Checked again under the lock: the user may have come or gone since.
            let in_redis = in_redis.contains(&(tenant, user));
            if *n > 0 && !in_redis {
                written += 1;
                if self.rewrite_connection(tenant, user).await.is_err() {
                    self.reannounce.store(true, Ordering::SeqCst);
                }
            } else if *n == 0 && in_redis {
                written += 1;
                let late = self.unwritten_late(tenant, user);
                // On failure, kept for the next heartbeats (`write_offline`).
                let _ = self.rewrite_disconnection(tenant, user, late).await;
            }
            drop(n);
            self.forget(tenant, user, slot);
        }
        if written > 0 {
            // Info, not a warning: a user who connected or left between the scan and
            // this check counts too, and is only written again.
            tracing::info!(node = %self.node, users = written, "presence resync wrote users whose presence in Redis differed from this node's connections");
        }
    }

    /// Writes the disconnections that could not be written when they happened (their
    /// users still show online), at most [`OFFLINE_PER_TICK`] per heartbeat, and tells
    /// the tenant of those who are offline now. A user connected here again meanwhile
    /// is left as they are: their entry goes once that connection is written (here if
    /// no announcement is pending, else by the announcement).
    async fn write_offline(&self) {
        let pending: Vec<(TenantId, UserId)> = {
            let unwritten = self
                .offline_unwritten
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            unwritten.iter().take(OFFLINE_PER_TICK).copied().collect()
        };
        for (tenant, user) in pending {
            let slot = self.slot(tenant, user);
            let n = slot.lock().await;
            let written = if *n > 0 {
                // Connected here again: done once that connection is written (by the
                // announcement, which runs first at a heartbeat); until then the
                // user's next disconnection must know that an earlier one may still
                // run.
                if !self.reannounce.load(Ordering::SeqCst) {
                    self.unwritten_done(tenant, user);
                }
                Ok(())
            } else {
                // Its failed try may have run: written late.
                self.rewrite_disconnection(tenant, user, true).await
            };
            drop(n);
            self.forget(tenant, user, slot);
            if written.is_err() {
                return;
            }
        }
    }

    /// Writes the 1 → 0 transition of `user` on this node (`late`: see [`DISCONNECT`]);
    /// `last_seen` and the change's version when they are offline everywhere now.
    /// Either way the user's
    /// disconnection is written or kept for the next heartbeats ([`Self::write_offline`]).
    /// Called under the user's slot lock.
    async fn write_disconnection(
        &self,
        tenant: TenantId,
        user: UserId,
        late: bool,
    ) -> Result<Option<(DateTime<Utc>, u64)>, ()> {
        let mut args = self.ids(tenant, user);
        args.push(if late { "1" } else { "0" }.into());
        match self.eval(DISCONNECT, args).await {
            Ok(v) => {
                // Any older unwritten disconnection is written by this one.
                self.unwritten_done(tenant, user);
                let v = v.convert::<Vec<i64>>().unwrap_or_default();
                Ok(v.first()
                    .filter(|ms| **ms >= 0)
                    .and_then(|ms| millis(*ms))
                    .map(|seen| (seen, version(v.get(1).copied()))))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a disconnection in Redis; will retry");
                // It may have reached Redis all the same (a timeout, a connection that
                // closed before the answer): the retry says so, so that it still
                // answers that the user is offline.
                self.offline_unwritten
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((tenant, user));
                Err(())
            }
        }
    }

    /// Whether a disconnection of `user` failed to be written (it may have reached
    /// Redis after all).
    fn unwritten_late(&self, tenant: TenantId, user: UserId) -> bool {
        self.offline_unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(tenant, user))
    }

    /// Whether a failed write of `user`'s connection may have run; `set` marks or
    /// clears that first.
    fn online_unwritten(&self, tenant: TenantId, user: UserId, set: Option<bool>) -> bool {
        let mut unwritten = self
            .online_unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match set {
            Some(true) => unwritten.insert((tenant, user)),
            Some(false) => unwritten.remove(&(tenant, user)),
            None => unwritten.contains(&(tenant, user)),
        }
    }

    /// Nothing is left to write of `user`'s disconnections on this node.
    fn unwritten_done(&self, tenant: TenantId, user: UserId) {
        self.offline_unwritten
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(tenant, user));
    }

    /// The presence of `users` of `tenant`, as Redis has it now.
    async fn read_presence(
        &self,
        tenant: TenantId,
        users: &[UserId],
    ) -> Result<Vec<UserPresence>, RedisError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<Value> = vec![self.prefix.as_str().into(), tenant.to_string().into()];
        args.extend(users.iter().map(|u| Value::from(u.to_string())));
        let out = self.eval(QUERY, args).await?.convert::<Vec<Value>>()?;
        Ok(users
            .iter()
            .zip(out.chunks_exact(3))
            .map(|(u, pair)| {
                let online = pair[0].as_i64() == Some(1);
                UserPresence {
                    user_id: *u,
                    status: if online {
                        PresenceStatus::Online
                    } else {
                        PresenceStatus::Offline
                    },
                    last_seen: if online {
                        None
                    } else {
                        pair[1]
                            .as_str()
                            .and_then(|s| s.parse::<i64>().ok())
                            .and_then(millis)
                    },
                    version: version(pair[2].as_i64()),
                }
            })
            .collect())
    }

    async fn sweep(&self) -> Result<(), RedisError> {
        let window = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let out = self
            .eval(
                SWEEP,
                vec![
                    self.prefix.as_str().into(),
                    window.into(),
                    SWEEP_LIMIT.into(),
                    self.node.as_str().into(),
                    i64::try_from(self.gap.as_millis())
                        .unwrap_or(i64::MAX)
                        .into(),
                ],
            )
            .await?;
        let out: Vec<String> = out.convert()?;
        let Some((unclean, out)) = out.split_first() else {
            return Ok(());
        };
        if unclean != "0" {
            // A node that died may have held events it could not publish (its link to
            // Redis broke first): every node's clients are told to catch up.
            tracing::info!(
                nodes = %unclean,
                "swept nodes that did not stop cleanly: clients are told to catch up"
            );
            self.writes.unsent.store(true, Ordering::SeqCst);
            let _ = self.writes.announce(false).await;
        }
        // Per tenant, the users left offline, when they were last seen, and the version
        // of that change.
        type Gone = Vec<(UserId, Option<DateTime<Utc>>, u64)>;
        let mut gone: HashMap<TenantId, Gone> = HashMap::new();
        for chunk in out.chunks_exact(4) {
            let (Ok(tenant), Ok(user)) = (chunk[0].parse::<TenantId>(), chunk[1].parse::<UserId>())
            else {
                continue;
            };
            let seen = chunk[2].parse::<i64>().ok().and_then(millis);
            let v = version(chunk[3].parse::<i64>().ok());
            gone.entry(tenant).or_default().push((user, seen, v));
        }
        // The events go out one by one, and a user may reconnect to another node
        // meanwhile (which tells the tenant they are online): each batch is read again
        // just before, so that a late `offline` does not follow their `online`.
        for (tenant, users) in gone {
            for batch in users.chunks(SWEEP_RECHECK) {
                let ids: Vec<UserId> = batch.iter().map(|(u, _, _)| *u).collect();
                let now = self.read_presence(tenant, &ids).await.ok();
                for (i, (user, seen, version)) in batch.iter().enumerate() {
                    let back = now
                        .as_ref()
                        .and_then(|p| p.get(i))
                        .is_some_and(|p| p.status == PresenceStatus::Online);
                    if back {
                        continue;
                    }
                    tracing::debug!(%user, "user of a dead node is offline");
                    self.publish_presence(tenant, *user, PresenceStatus::Offline, *seen, *version)
                        .await;
                }
            }
        }
        Ok(())
    }

    fn slot(&self, tenant: TenantId, user: UserId) -> Slot {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        local.entry((tenant, user)).or_default().clone()
    }

    /// Forgets a slot nobody uses and whose count is zero.
    fn forget(&self, tenant: TenantId, user: UserId, slot: Slot) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        // The map and `slot` hold the only references: nobody else can reach it.
        if Arc::strong_count(&slot) == 2 && slot.try_lock().is_ok_and(|n| *n == 0) {
            local.remove(&(tenant, user));
        }
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connected(&self, tenant: TenantId, user: UserId) -> Option<u64> {
        let s = &self.shared;
        let slot = s.slot(tenant, user);
        let mut n = slot.lock().await;
        *n += 1;
        if *n > 1 {
            return None;
        }
        match s.connect(tenant, user, false).await {
            Ok(online) => {
                // Back before a disconnection missed by Redis was written: it no longer
                // holds. Kept while the connection is not written either: an earlier
                // try of it may still run, and the next disconnection must know.
                s.unwritten_done(tenant, user);
                online
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record presence in Redis; will retry at the next heartbeat");
                s.online_unwritten(tenant, user, Some(true));
                s.reannounce.store(true, Ordering::SeqCst);
                None
            }
        }
    }

    async fn disconnected(&self, tenant: TenantId, user: UserId) -> Option<(DateTime<Utc>, u64)> {
        let s = &self.shared;
        let slot = {
            let local = s.local.lock().unwrap_or_else(|e| e.into_inner());
            local.get(&(tenant, user))?.clone()
        };
        let seen = {
            let mut n = slot.lock().await;
            if *n == 0 {
                return None;
            }
            *n -= 1;
            if *n > 0 {
                return None;
            }
            // Nothing left to announce of their connection.
            s.online_unwritten(tenant, user, Some(false));
            // On failure, written at the next heartbeats; meanwhile the user still
            // shows online. Late if an earlier disconnection that failed is still
            // unwritten: it may have run after all, and taken away what this one would
            // have found.
            let late = s.unwritten_late(tenant, user);
            s.write_disconnection(tenant, user, late)
                .await
                .unwrap_or_default()
        };
        s.forget(tenant, user, slot);
        seen
    }

    /// Stops the heartbeats: the other nodes sweep this one after the window, and the
    /// users it held turn offline then unless they reconnected to another node.
    async fn leaving(&self) {
        if self
            .shared
            .leaving
            .send_if_modified(|l| !std::mem::replace(l, true))
        {
            tracing::info!(node = %self.shared.node, "presence left to the other nodes' sweep");
        }
    }

    /// Stops the periodic work, after a sweep under way has published what it removed
    /// (nobody else would: the dead node is gone from Redis), within [`STOP_WAIT`]; then
    /// marks this node in `left`, unless something could not be published: then the
    /// sweep tells every node's clients to catch up, as for a node that died.
    async fn stopped(&self) {
        let s = &self.shared;
        // Already done at the shutdown, as a rule; the tasks end at their next turn.
        self.leaving().await;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let ended = tokio::time::timeout(STOP_WAIT, async {
            let mut all_ok = true;
            for task in tasks {
                all_ok &= task.await.is_ok();
            }
            all_ok
        })
        .await;
        if ended != Ok(true) {
            // A sweep cut short may have removed users whose offline events were never
            // published: the stop must not count as clean.
            tracing::warn!("presence work still running (or failed) at the stop; abandoned");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            s.writes.unsent.store(true, Ordering::SeqCst);
        }
        if s.writes.unsent.load(Ordering::SeqCst) {
            return;
        }
        let left = format!("{}left", s.prefix);
        match s
            .eval(
                LEFT,
                vec![
                    left.into(),
                    s.node.as_str().into(),
                    s.nodes_key.as_str().into(),
                ],
            )
            .await
            .and_then(|v| v.convert::<i64>())
        {
            Ok(1) => {}
            // Its stop outlasted the window: the others swept it already, as a node
            // that died (their clients catch up). A mark now would stay for good.
            Ok(_) => {
                tracing::info!(node = %s.node, "swept before it could mark itself as stopped cleanly")
            }
            Err(e) => tracing::warn!(error = %e, "cannot mark this node as stopped cleanly"),
        }
    }

    fn on_offline(&self, sink: OfflineSink) {
        *self
            .shared
            .offline_sink
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    async fn query(
        &self,
        tenant: TenantId,
        users: &[UserId],
    ) -> Result<Vec<UserPresence>, PresenceUnavailable> {
        self.shared.read_presence(tenant, users).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot read presence from Redis");
            PresenceUnavailable(e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mindsp_core::events::TypingState;
    use mindsp_core::{ConversationId, TenantId, UserId};

    fn message(channel: &str, payload: String) -> fred::types::Message {
        fred::types::Message {
            channel: channel.into(),
            value: Value::from(payload),
            kind: fred::types::MessageKind::Message,
            server: fred::types::config::Server::new("127.0.0.1", 6379),
        }
    }

    /// A subscriber that fell behind tells its connections after delivering what it
    /// still holds, not before (they would catch up from a state not delivered yet);
    /// and the `events_lost` marker of another node tells them too.
    #[tokio::test]
    async fn a_lagging_subscriber_tells_after_what_it_still_holds() {
        let hub = Hub::new(64);
        let (tenant, user) = (TenantId::new(), UserId::new());
        let (mut conn, _) = hub.register(tenant, user).unwrap();
        let typing = |state| {
            serde_json::to_string(&Envelope::to_users(
                tenant,
                vec![user],
                Event::Typing {
                    conversation_id: ConversationId::new(),
                    user_id: UserId::new(),
                    state,
                },
            ))
            .unwrap()
        };
        // Room for two: of five sent before the feeder reads, three are dropped.
        let (tx, rx) = broadcast::channel(2);
        for _ in 0..4 {
            tx.send(message("ch", typing(TypingState::Start))).unwrap();
        }
        tx.send(message("ch", typing(TypingState::Stop))).unwrap();
        drop(tx);
        feed(rx, "ch".into(), hub.clone()).await;
        let kinds: Vec<&'static str> = std::iter::from_fn(|| conn.events.try_recv().ok())
            .map(|d| match d.envelope.event {
                Event::Typing {
                    state: TypingState::Start,
                    ..
                } => "start",
                Event::Typing { .. } => "stop",
                Event::EventsSkipped { .. } => "events_skipped",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["start", "stop", "events_skipped"]);

        let (tx, rx) = broadcast::channel(2);
        tx.send(message("ch", UNSENT.to_owned())).unwrap();
        tx.send(message("other", typing(TypingState::Start)))
            .unwrap();
        drop(tx);
        feed(rx, "ch".into(), hub.clone()).await;
        let d = conn.events.try_recv().expect("told");
        assert!(matches!(d.envelope.event, Event::EventsSkipped { .. }));
        assert!(
            conn.events.is_empty(),
            "another channel's message is not delivered"
        );
    }
}
