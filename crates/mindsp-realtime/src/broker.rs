//! Fan-out between nodes. A [`Broker`] takes an envelope published on any node and
//! hands it to the [`Hub`](crate::hub::Hub) of every node, this one included.
//!
//! Each adapter is built with the local hub it feeds: [`InProcessBroker`] calls
//! [`Hub::deliver`](crate::hub::Hub::deliver) directly; the Redis adapter (feature
//! `redis`, `crate::redis::RedisBroker`) publishes to its channel and feeds the hub
//! from its subscription only.

use std::sync::Arc;

use async_trait::async_trait;
use mindsp_core::events::{Envelope, Publisher};

#[cfg(feature = "in-process")]
use crate::hub::Hub;

/// Fan-out of envelopes to the hubs of every node.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Sends `envelope` to every node's hub. Errors are logged, never returned: the
    /// change is committed already and clients recover by resuming.
    async fn publish(&self, envelope: Envelope);
    /// Nothing more will be published ([`crate::Realtime::stopped`]): a broker with
    /// connections of its own ends them now, while the runtime still runs. Does nothing
    /// by default.
    async fn close(&self) {}
}

/// One node: envelopes go straight into the local hub.
#[cfg(feature = "in-process")]
#[derive(Debug, Clone)]
pub struct InProcessBroker {
    hub: Arc<Hub>,
}

#[cfg(feature = "in-process")]
impl InProcessBroker {
    /// A broker feeding `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[cfg(feature = "in-process")]
#[async_trait]
impl Broker for InProcessBroker {
    async fn publish(&self, envelope: Envelope) {
        self.hub.deliver(envelope);
    }
}

/// A broker seen as core's [`Publisher`] port, for [`mindsp_core::Messaging`].
#[derive(Clone)]
pub struct BrokerPublisher(pub Arc<dyn Broker>);

#[async_trait]
impl Publisher for BrokerPublisher {
    async fn publish(&self, envelope: Envelope) {
        self.0.publish(envelope).await;
    }
}
