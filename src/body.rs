//! Request bodies read whole within a bound, or read and thrown away (lingering close).

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;

/// How much of an oversized body is read and discarded before the 413 (lingering close).
pub const DRAIN_MAX_BYTES: usize = 8 * 1024 * 1024;
/// How long an oversized body is read and discarded at most before the 413.
pub const DRAIN_MAX_TIME: Duration = Duration::from_secs(2);

/// Why a body could not be read whole.
pub(crate) enum ReadError {
    /// Longer than the limit.
    TooLarge,
    /// The connection failed mid-body.
    Broken,
}

/// The whole body as one `Bytes`, at most `limit` bytes. A body that arrives in one frame
/// (the usual case for a small JSON request) is passed on without a copy or an
/// allocation, which `http_body_util::Collected` (a frame list) cannot do; trailers are
/// ignored.
pub(crate) async fn read_all<B>(mut body: Pin<&mut B>, limit: usize) -> Result<Bytes, ReadError>
where
    B: Body<Data = Bytes>,
{
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut length = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ReadError::Broken)?.into_data() else {
            continue;
        };
        length = length.saturating_add(data.len());
        if length > limit {
            return Err(ReadError::TooLarge);
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut buffer = bytes::BytesMut::with_capacity(head.len() + data.len());
                buffer.extend_from_slice(head);
                buffer.extend_from_slice(&data);
                joined = Some(buffer);
            }
            (Some(_), Some(buffer)) => buffer.extend_from_slice(&data),
        }
    }
    Ok(joined
        .map(bytes::BytesMut::freeze)
        .or(first)
        .unwrap_or_default())
}

/// Reads and discards what is left of a body, within [`DRAIN_MAX_BYTES`] and
/// [`DRAIN_MAX_TIME`].
pub(crate) async fn drain<B: Body<Data = Bytes>>(mut body: Pin<&mut B>) {
    let discard = async {
        let mut discarded = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                discarded = discarded.saturating_add(data.len());
                if discarded > DRAIN_MAX_BYTES {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, discard).await;
}
