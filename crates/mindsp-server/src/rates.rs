//! How many requests that may change something (`POST`, `PUT`, `PATCH`, `DELETE`) one
//! user sends to this node: a token bucket per user, taken by the [`Authenticated`]
//! extractor, so that a client stuck in a loop, or a stolen token, cannot flood a
//! department's conversations or the database through the REST API as the socket's own
//! limit stops it on a WebSocket. Beyond: 429 `rate_limited` with `Retry-After`.
//! Reads are not counted (they change nothing, and a page loads many at once).
//!
//! [`Authenticated`]: crate::auth::Authenticated

use std::collections::HashMap;
use std::sync::Mutex;

use mindsp_core::{TenantId, UserId};
use mindsp_realtime::limit::TokenBucket;
use tokio::time::Instant;

use crate::error::ApiError;

/// Requests per second and burst for one user's writes on one node.
#[derive(Debug, Clone, Copy)]
pub struct WriteRate {
    /// Requests per second, on average.
    pub per_sec: u32,
    /// Requests in a burst.
    pub burst: u32,
}

impl Default for WriteRate {
    /// 20 per second, bursts of 40: as the socket's commands.
    fn default() -> Self {
        Self {
            per_sec: 20,
            burst: 40,
        }
    }
}

/// Most users whose bucket is kept: beyond, the full ones (idle for a while) are
/// dropped, and if none is, every bucket starts full again.
const KEPT: usize = 100_000;

/// Each user's bucket on this node.
pub(crate) struct WriteRates {
    rate: WriteRate,
    buckets: Mutex<HashMap<(TenantId, UserId), TokenBucket>>,
}

impl WriteRates {
    pub(crate) fn new(rate: WriteRate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one write of `user`; 429 `rate_limited` when they have none left.
    pub(crate) fn take(&self, tenant: TenantId, user: UserId) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= KEPT && !buckets.contains_key(&(tenant, user)) {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= KEPT {
                buckets.clear();
            }
        }
        let bucket = buckets
            .entry((tenant, user))
            .or_insert_with(|| TokenBucket::new(self.rate.per_sec, self.rate.burst));
        if bucket.take(now) {
            return Ok(());
        }
        let wait = bucket.wait().as_secs_f64().ceil().max(1.0) as u64;
        Err(ApiError::http(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "more than {} changes per second: slow down, and retry after the delay given",
                self.rate.per_sec
            ),
        )
        .retry_after(wait))
    }
}
