//! The connection's byte stream: the TCP socket with its send deadline, and the bytes read
//! before a hand-over read again first.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::service::Io;

/// What one connection's parts share.
#[derive(Default)]
pub(crate) struct ConnectionState {
    /// A first request head arrived (the `header_read_timeout` from accept is over).
    pub(crate) first_request: AtomicBool,
    /// Drop the connection with a reset, not a close ([`Socket`]).
    pub(crate) reset: AtomicBool,
}

/// The connection's TCP socket, carrying the send deadline every protocol shares: a write,
/// flush or shutdown that makes no progress for `send_timeout` fails with `TimedOut` (a
/// reader that stopped reading while the kernel's buffers are full). A connection that
/// ends that way, or that the stream watchdog cuts off, is reset when dropped instead of
/// closed (`SO_LINGER` 0, as NGINX's `reset_timedout_connection`): its unsent bytes are
/// thrown away at once, not retried by the kernel for minutes to a peer that never reads.
///
/// The timer is armed only when a write cannot go out at once (none on the usual path).
pub(crate) struct Socket {
    stream: TcpStream,
    send_timeout: Duration,
    /// Runs while a write is pending; kept for the next stall once allocated.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    state: Arc<ConnectionState>,
}

impl Socket {
    pub(crate) fn new(
        stream: TcpStream,
        send_timeout: Duration,
        state: Arc<ConnectionState>,
    ) -> Self {
        Self {
            stream,
            send_timeout,
            stall: None,
            armed: false,
            state,
        }
    }

    /// Passes a write-side poll through, timing how long it stays pending.
    pub(crate) fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            self.armed = true;
            let deadline = tokio::time::Instant::now() + self.send_timeout;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let expired = self
            .stall
            .as_mut()
            .is_some_and(|stall| stall.as_mut().poll(cx).is_ready());
        if !expired {
            return Poll::Pending;
        }
        self.armed = false;
        self.state.reset.store(true, Ordering::Relaxed);
        tracing::debug!("no write progress for send_timeout; the connection is reset");
        Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.state.reset.load(Ordering::Relaxed) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub(crate) struct Rewind {
    read: BytesMut,
    io: Box<dyn Io>,
}

impl Rewind {
    pub(crate) fn new(read: BytesMut, io: Box<dyn Io>) -> Self {
        Self { read, io }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
