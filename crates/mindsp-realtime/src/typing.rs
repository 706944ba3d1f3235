//! Typing indicators of one connection: throttled relays and self-expiry.
//!
//! A `start` is relayed to the other members at most once per `throttle` per
//! conversation; a `start` in between only extends the indicator. An indicator that
//! is not refreshed within `ttl` expires, and the connection relays a `stop` itself,
//! so a client that vanishes mid-sentence does not leave "typing…" on screens.

use std::collections::HashMap;
use std::time::Duration;

use mindsp_core::{ConversationId, UserId};
use tokio::time::Instant;

/// What to do with a `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Relay it to the other members (and record them with [`Typing::relayed`]).
    Relay,
    /// Relayed recently: the indicator is only extended.
    Refresh,
    /// Too many conversations at once: ignore it.
    Refused,
}

struct Entry {
    relayed_at: Instant,
    expires: Instant,
    audience: Vec<UserId>,
}

/// The typing indicators one connection holds.
pub struct Typing {
    throttle: Duration,
    ttl: Duration,
    max: usize,
    active: HashMap<ConversationId, Entry>,
}

impl Typing {
    /// Relays at most one `start` per `throttle`; expires after `ttl` without a start;
    /// at most `max` conversations at once.
    pub fn new(throttle: Duration, ttl: Duration, max: usize) -> Self {
        Self {
            throttle,
            ttl,
            max,
            active: HashMap::new(),
        }
    }

    /// A `start` arrived at `now`.
    pub fn start(&mut self, conv: ConversationId, now: Instant) -> Start {
        let full = self.active.len() >= self.max;
        match self.active.get_mut(&conv) {
            Some(e) => {
                e.expires = now + self.ttl;
                if now.duration_since(e.relayed_at) >= self.throttle {
                    Start::Relay
                } else {
                    Start::Refresh
                }
            }
            None if full => Start::Refused,
            None => Start::Relay,
        }
    }

    /// Records that a `start` was relayed at `now` to `audience`.
    pub fn relayed(&mut self, conv: ConversationId, audience: Vec<UserId>, now: Instant) {
        self.active.insert(
            conv,
            Entry {
                relayed_at: now,
                expires: now + self.ttl,
                audience,
            },
        );
    }

    /// A `stop` arrived: the audience to tell, if a `start` had been relayed.
    pub fn stop(&mut self, conv: ConversationId) -> Option<Vec<UserId>> {
        self.active.remove(&conv).map(|e| e.audience)
    }

    /// When the next indicator expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.active.values().map(|e| e.expires).min()
    }

    /// Removes the indicators expired at `now`, with their audiences.
    pub fn expired(&mut self, now: Instant) -> Vec<(ConversationId, Vec<UserId>)> {
        let gone: Vec<ConversationId> = self
            .active
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(c, _)| *c)
            .collect();
        gone.into_iter()
            .filter_map(|c| self.active.remove(&c).map(|e| (c, e.audience)))
            .collect()
    }

    /// Removes every indicator (the connection closes), with their audiences.
    pub fn drain(&mut self) -> Vec<(ConversationId, Vec<UserId>)> {
        self.active.drain().map(|(c, e)| (c, e.audience)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_and_expires() {
        let mut t = Typing::new(Duration::from_secs(2), Duration::from_secs(5), 2);
        let c = ConversationId::new();
        let u = vec![UserId::new()];
        let t0 = Instant::now();
        assert_eq!(t.start(c, t0), Start::Relay);
        t.relayed(c, u.clone(), t0);
        assert_eq!(t.start(c, t0 + Duration::from_secs(1)), Start::Refresh);
        // Refreshed at 1 s: expires at 6 s, not 5.
        assert!(t.expired(t0 + Duration::from_millis(5500)).is_empty());
        assert_eq!(t.start(c, t0 + Duration::from_secs(3)), Start::Relay);
        t.relayed(c, u.clone(), t0 + Duration::from_secs(3));
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(8)));
        assert_eq!(t.expired(t0 + Duration::from_secs(8)), vec![(c, u.clone())]);
        assert_eq!(t.stop(c), None);
        // Bounded.
        let (c1, c2, c3) = (
            ConversationId::new(),
            ConversationId::new(),
            ConversationId::new(),
        );
        t.relayed(c1, u.clone(), t0);
        t.relayed(c2, u.clone(), t0);
        assert_eq!(t.start(c3, t0), Start::Refused);
        assert_eq!(t.stop(c1), Some(u));
        assert_eq!(t.drain().len(), 1);
    }
}
