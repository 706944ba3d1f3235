//! A connection whose writes may not stall for ever, and which holds its place among the
//! node's connections while it lives: [`WriteDeadline`].
//!
//! A client that stops reading while its kernel still answers (a frozen app, or someone
//! doing it on purpose) leaves the server's writes waiting for room that never comes.
//! Nothing else ends such a connection: hyper reads the next request, and so starts its
//! header timeout, only once its answer is written out (a client that pipelines
//! requests and reads nothing holds its connection for good), and a WebSocket's writer
//! blocked in a write never reaches its idle or token-expiry checks. Every connection
//! [`crate::serve`] accepts goes through this wrapper, upgraded WebSockets included.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

/// Fails a write, flush or shutdown (`TimedOut`) once the socket has taken nothing for
/// `limit`: from the first write that found it full, through every later attempt, until
/// one makes progress. Reads are passed through untouched (an idle WebSocket reads
/// nothing for minutes, rightly).
pub(crate) struct WriteDeadline<T> {
    inner: T,
    /// The limit in milliseconds (every WebSocket holds one of these: kept small).
    limit_ms: u32,
    /// Armed by a write that found no room; boxed, so that a connection pays one pointer
    /// while its writes go through, which is nearly always.
    stalled: Option<Pin<Box<Sleep>>>,
    /// The connection's place among those the node serves at once
    /// (`ConnectionLimits::max_connections`), given back when the socket is dropped:
    /// after its WebSocket ends, for an upgraded one.
    _place: Option<OwnedSemaphorePermit>,
}

impl<T> WriteDeadline<T> {
    pub(crate) fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit_ms: u32::try_from(limit.as_millis()).unwrap_or(u32::MAX),
            stalled: None,
            _place: None,
        }
    }

    /// Holds `place` for as long as the socket lives.
    pub(crate) fn holding(mut self, place: OwnedSemaphorePermit) -> Self {
        self._place = Some(place);
        self
    }

    /// Passes on what the socket answered; when it had no room, fails once that has
    /// lasted `limit`.
    fn check<R>(
        &mut self,
        polled: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = Duration::from_millis(self.limit_ms.into());
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took nothing written to it within the write timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A pipe nobody reads: the write that finds it full fails after the limit; one
    /// that finds room (the other end read) goes through and starts the count again.
    #[tokio::test]
    async fn a_write_that_finds_no_room_fails_after_the_limit() {
        let (near, mut far) = tokio::io::duplex(1024);
        let limit = Duration::from_millis(200);
        let mut w = WriteDeadline::new(near, limit);
        w.write_all(&[1; 1024]).await.unwrap();
        let started = tokio::time::Instant::now();
        let e = w.write_all(&[2; 10]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit);
        // The other end reads: room again, and the stall is forgotten.
        let mut got = vec![0; 1024];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got)
            .await
            .unwrap();
        w.write_all(&[3; 512]).await.unwrap();
        w.flush().await.unwrap();
    }
}
