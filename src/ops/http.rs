//! Serving an axum router the way a server should behave: at most `max_connections` at
//! once (the rest wait in the listen backlog), a client gets 10 s to send a request's
//! headers and connections are closed after 60 s idle, and a failing `accept` (out of file
//! descriptors) backs off instead of spinning. The engine's status server and `mock-api`
//! both serve through this.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::backoff::Backoff;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may stay open without a request being read or answered.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The peer of a connection, for handlers that log it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Accept and serve connections until the task is aborted; over TLS when `tls` is given
/// (the handshake must finish within the header timeout).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let slot = match slots.clone().acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => return,
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!("accept failed: {e}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone().layer(axum::Extension(Peer(peer))));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let served = match acceptor {
                None => serve_connection(stream, service).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, service).await,
                        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                        Err(_) => Err("TLS handshake timed out".to_string()),
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!("connection from {peer} ended: {e}");
            }
            drop(slot);
        });
    }
}

/// One connection's requests, with the header and idle timeouts.
async fn serve_connection<S>(stream: S, service: TowerToHyperService<Router>) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = IdleTimeout::new(TokioIo::new(stream), IDLE_TIMEOUT);
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service)
        .await
        .map_err(|e| e.to_string())
}

/// An I/O stream that fails with `TimedOut` once nothing was read or written for `limit`.
struct IdleTimeout<T> {
    inner: T,
    limit: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<T> IdleTimeout<T> {
    fn new(inner: T, limit: Duration) -> Self {
        IdleTimeout {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// Progress restarts the clock; no progress past the deadline is an error.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if poll.is_ready() {
            let next = tokio::time::Instant::now() + self.limit;
            self.deadline.as_mut().reset(next);
            return poll;
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection idle for too long",
            )));
        }
        Poll::Pending
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for IdleTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.watch(cx, poll)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for IdleTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(max_connections: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "hi" }));
        tokio::spawn(serve(listener, app, max_connections, None));
        addr
    }

    async fn get_root(addr: SocketAddr, method: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("{method} / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn wrong_methods_get_405() {
        let addr = server(4).await;
        assert!(get_root(addr, "GET").await.starts_with("HTTP/1.1 200"));
        assert!(get_root(addr, "POST").await.starts_with("HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn half_sent_headers_are_cut_off_and_free_their_slot() {
        let addr = server(1).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost").await.unwrap();
        let started = std::time::Instant::now();
        // The only slot is taken: another client waits in the backlog, unserved until the
        // half-sent request is cut off at HEADER_READ_TIMEOUT.
        let mut waiting = tokio::spawn(get_root(addr, "GET"));
        let early =
            tokio::time::timeout(HEADER_READ_TIMEOUT - Duration::from_secs(1), &mut waiting).await;
        assert!(
            early.is_err(),
            "a second connection was served while the only slot was taken"
        );
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "a half-sent request kept its connection");
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_millis(100));
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting client was served once the slot was free")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
