//! The WebSocket handshake (RFC 6455, section 4.2) and the socket under each connection.
//!
//! axum's `WebSocketUpgrade` builds its socket over hyper's upgraded connection as is, so
//! tungstenite's own write buffer is the only place frames gather before a write, and
//! that buffer keeps the capacity of the largest burst it ever held: every idle
//! connection kept 1.4-2 KiB after a burst of `presence` frames. Here tungstenite writes
//! each frame at once into [`Buffered`], which gathers them into one write to the socket
//! and hands its buffer back once the socket took it all. tungstenite still formats each
//! frame in a buffer of its own that keeps the size of the largest frame; the writer
//! bounds that by fragmenting long texts (`ws::MAX_FRAME`). `benches/RESULTS.md` has
//! the figures.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// A server-side WebSocket over an upgraded HTTP/1.1 connection.
pub(crate) type Socket = WebSocketStream<Buffered<TokioIo<Upgraded>>>;

/// A valid WebSocket upgrade request, not answered yet.
pub(crate) struct Upgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// The request is not a WebSocket upgrade (the handler answers it).
#[derive(Debug)]
pub(crate) struct NotWebSocket;

impl IntoResponse for NotWebSocket {
    fn into_response(self) -> Response {
        StatusCode::BAD_REQUEST.into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotWebSocket;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, NotWebSocket> {
        let h = &parts.headers;
        let ok = parts.method == Method::GET
            && has_token(h, header::CONNECTION, "upgrade")
            && has_token(h, header::UPGRADE, "websocket")
            && h.get(header::SEC_WEBSOCKET_VERSION)
                .is_some_and(|v| v.as_bytes() == b"13");
        let key = h.get(header::SEC_WEBSOCKET_KEY).filter(|_| ok);
        let Some(key) = key else {
            return Err(NotWebSocket);
        };
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header value");
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or(NotWebSocket)?;
        Ok(Self { accept, on_upgrade })
    }
}

/// Whether the comma-separated header `name` lists `token` (ignoring case).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Upgrade {
    /// Answers `101 Switching Protocols` and, once hyper hands the connection over,
    /// runs `callback` on the socket. `write_threshold`: bytes gathered before a write
    /// within a batch (see [`Buffered`]).
    pub(crate) fn on_upgrade<F, Fut>(
        self,
        config: WebSocketConfig,
        write_threshold: usize,
        callback: F,
    ) -> Response
    where
        F: FnOnce(Box<Socket>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            let io = Buffered::new(TokioIo::new(upgraded), write_threshold);
            // Boxed: a value moved into an async block or function keeps its place in
            // the future for the future's whole life, and the socket passes through two.
            let socket =
                Box::new(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await);
            callback(socket).await;
        });
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        response
    }
}

/// A write buffer under tungstenite that holds memory only while it holds bytes.
///
/// Writes are gathered until `threshold` bytes are waiting, then written out (the socket
/// must take them before more are accepted: the buffer stays under `threshold` plus one
/// write); a flush writes out the rest. Once the socket took everything, the buffer goes
/// back to its thread's spares ([`spare`]), so an idle connection keeps nothing and a busy
/// one does not allocate for each batch (freeing and allocating each time cost 2-3 % of
/// the server's CPU in `malloc`).
pub(crate) struct Buffered<S> {
    inner: S,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    written: usize,
    threshold: usize,
}

impl<S> Buffered<S> {
    pub(crate) fn new(inner: S, threshold: usize) -> Self {
        Self {
            inner,
            out: Vec::new(),
            written: 0,
            threshold,
        }
    }
}

impl<S: AsyncWrite + Unpin> Buffered<S> {
    /// Writes out everything buffered, then frees the buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        spare::give(std::mem::take(&mut self.out));
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Buffered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Buffered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.out.is_empty() && self.out.len() + buf.len() > self.threshold {
            ready!(self.poll_drain(cx))?;
        }
        if self.out.is_empty() && buf.len() > self.threshold {
            // Nothing to gather it with: straight to the socket.
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        if self.out.capacity() == 0 {
            self.out = spare::take();
        }
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Emptied write buffers, kept per thread for the next connection that writes there.
mod spare {
    use std::cell::RefCell;

    /// Capacity of a new buffer: a batch of a few frames without growing.
    const CAPACITY: usize = 4 * 1024;
    /// Larger buffers (grown by a large frame) are freed rather than kept.
    const LARGEST_KEPT: usize = 16 * 1024;
    /// Buffers kept per thread: enough for the connections that write at the same time.
    const KEPT: usize = 64;

    thread_local! {
        static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take() -> Vec<u8> {
        SPARE
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| Vec::with_capacity(CAPACITY))
    }

    pub(super) fn give(mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > LARGEST_KEPT {
            return;
        }
        buf.clear();
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < KEPT {
                spare.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the inner stream.
    struct Counting {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_gather_into_one_write_and_the_buffer_is_freed() {
        let mut b = Buffered::new(Counting { writes: Vec::new() }, 100);
        for _ in 0..3 {
            b.write_all(&[7; 30]).await.unwrap();
        }
        assert!(
            b.inner.writes.is_empty(),
            "nothing written before the flush"
        );
        b.flush().await.unwrap();
        assert_eq!(b.inner.writes, vec![vec![7; 90]]);
        assert_eq!(b.out.capacity(), 0, "an idle connection keeps no buffer");
        // Past the threshold, what was gathered goes out first.
        for _ in 0..4 {
            b.write_all(&[1; 30]).await.unwrap();
        }
        assert_eq!(b.inner.writes.len(), 2);
        assert_eq!(b.inner.writes[1], vec![1; 90]);
        b.flush().await.unwrap();
        assert_eq!(b.inner.writes[2], vec![1; 30]);
        // A write larger than the threshold is not copied.
        b.write_all(&[2; 500]).await.unwrap();
        assert_eq!(b.inner.writes[3].len(), 500);
        assert_eq!(b.out.capacity(), 0);
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        // A pipe that holds 64 bytes: writes wait for the reader.
        let (client, server) = tokio::io::duplex(64);
        let mut b = Buffered::new(server, 1000);
        let reading = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in sent.chunks(77) {
            b.write_all(chunk).await.unwrap();
        }
        b.shutdown().await.unwrap();
        drop(b);
        assert_eq!(reading.await.unwrap(), sent);
    }
}
