//! hyper's reading of a request head, and the check that the gateway's own loop
//! (`h1::recognise`) never reads the same bytes differently: the "mine or hyper's" seam is
//! where request smuggling would hide. Shared by `tests/h1_differential` and the fuzz
//! target `fuzz/fuzz_targets/h1_differential.rs`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diia_gateway::head::RequestHead;
use http::{Method, Request, Response};
use http_body_util::Empty;
use hyper::body::{Body, Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

/// How the request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (0: none declared, or zero).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What hyper made of the first request on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The method.
    pub method: Method,
    /// The request target, as the `Uri` renders it.
    pub target: String,
    /// The body's framing.
    pub framing: Framing,
}

/// Feeds `bytes` (then end of stream) to a hyper HTTP/1 server connection; `None` when
/// hyper refused the head (it answers 4xx) or never saw a whole one.
pub async fn hyper_reads(bytes: &[u8]) -> Option<Seen> {
    let (mut client, server) = tokio::io::duplex(bytes.len() + 64 * 1024);
    client.write_all(bytes).await.ok()?;
    client.shutdown().await.ok()?;
    let seen = Arc::new(Mutex::new(None));
    let first = Arc::clone(&seen);
    let service = service_fn(move |request: Request<Incoming>| {
        let framing = match request.body().size_hint().exact() {
            Some(length) => Framing::Length(length),
            None => Framing::Chunked,
        };
        if let Ok(mut first) = first.lock()
            && first.is_none()
        {
            *first = Some(Seen {
                method: request.method().clone(),
                target: request.uri().to_string(),
                framing,
            });
        }
        async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), service);
    // End of stream ends the connection; the bound only guards against a hang.
    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    seen.lock().ok()?.take()
}

/// What the loop made of the bytes, as hyper's reading of them.
fn ours(head: &RequestHead) -> Seen {
    Seen {
        method: head.method.clone(),
        target: head.uri.to_string(),
        framing: Framing::Length(head.content_length.unwrap_or(0)),
    }
}

/// The differential check: when the loop serves the bytes itself, hyper reads the same
/// method, target and framing; when the loop answers 400 itself, hyper refuses too.
/// Handing over (`None`) always agrees: hyper is then the one that reads the bytes.
pub fn agree(
    bytes: &[u8],
    recognised: Option<Option<RequestHead>>,
    hyper: Option<&Seen>,
) -> Result<(), String> {
    let shown = String::from_utf8_lossy(bytes);
    match (recognised, hyper) {
        (None, _) | (Some(None), None) => Ok(()),
        (Some(None), Some(seen)) => Err(format!(
            "the loop answers 400 to what hyper reads as {seen:?}: {shown:?}"
        )),
        (Some(Some(head)), None) => Err(format!(
            "the loop serves {:?} what hyper refuses: {shown:?}",
            ours(&head)
        )),
        (Some(Some(head)), Some(seen)) => {
            let mine = ours(&head);
            if &mine == seen {
                Ok(())
            } else {
                Err(format!(
                    "the loop reads {mine:?}, hyper {seen:?}: {shown:?}"
                ))
            }
        }
    }
}
