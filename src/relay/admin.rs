//! The relay's admin endpoints, served on the admin listener (never on the relay's or the
//! branches' ports): list records by state, redeliver a dead record, purge one, erase a
//! requestId's records (right to erasure).
//!
//! Invariant kept here: **admin sees metadata only.** A listing carries [`RecordMeta`]'s
//! fields and nothing sealed: no payload, requestId, route or MAC reaches a response or a
//! log line. Erasure takes the requestId in the body (not the URL, so it stays out of
//! access logs) and logs only the acquirer and the count.
//!
//! | request | answer |
//! |---|---|
//! | `GET /relay/records?state=S&after=ID&limit=N` | `200 {"records":[…],"next":ID\|null}` |
//! | `POST /relay/records/{id}/redeliver` | `200 {"redelivered":ID}`; `409` not dead; `404` unknown |
//! | `DELETE /relay/records/{id}` | `200 {"purged":ID}`; `404` unknown |
//! | `POST /relay/erase` `{"requestId":"…","acquirer":"…"?}` | `200 {"erased":n}` |
//!
//! In a fleet, purge and erase also reach the pull-only copies in Redis
//! ([`FleetPulls`]): each is removed and marked acknowledged, so the instance holding its
//! record settles it too. When Redis does not answer, the local part is done and the
//! answer is `503 fleet_unavailable` (the operator retries; both are idempotent).
//!
//! Every refusal is JSON `{"error":code,"message":text}` with the status [`AdminError`]
//! picks: bad input 400, unknown record or path 404, wrong method 405, not dead 409,
//! store or fleet failure 503.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use serde::{Deserialize, Serialize};

use super::fleet_pulls::FleetPulls;
use super::metrics::{RelayMetrics, StoreOp};
use super::{CallbackStore, RecordId, RecordMeta, State, StoreError, now_ms};

/// Records a listing returns when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// The most records one listing may ask for.
pub const MAX_LIMIT: usize = 1000;
/// Largest erase body read (a requestId is at most 256 bytes; the rest is JSON).
const MAX_BODY: usize = 4096;
/// Time a client has to send an erase body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest requestId accepted (as the ingress keeps them).
const MAX_REQUEST_ID: usize = 256;

/// Why an admin request under `/relay/` was refused; the one place their statuses and
/// codes are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminError {
    /// `[callback_relay]` is off: there is no store to look at.
    RelayOff,
    /// No such endpoint under `/relay/`.
    NoEndpoint,
    /// The endpoint exists, not with this method.
    MethodNotAllowed,
    /// `state` missing or not one of the five.
    BadState,
    /// `after` is not a record id (32 hex digits).
    BadAfter,
    /// `limit` not a number from 1 to [`MAX_LIMIT`].
    BadLimit,
    /// A query parameter the listing does not know, or one given twice.
    BadQuery,
    /// The path's record id is not 32 hex digits.
    BadId,
    /// The erase body is not `{"requestId": "…", "acquirer": "…"?}` (or too large, or slow).
    BadBody,
    /// No record has this id.
    UnknownRecord,
    /// Redeliver asked for a record that is not dead.
    NotDead,
    /// The store failed; nothing was changed by this request.
    Store,
    /// Purged or erased here, but Redis did not answer for the fleet's pull copies.
    FleetUnavailable,
}

impl AdminError {
    /// The status sent.
    #[must_use]
    pub const fn status(self) -> StatusCode {
        match self {
            Self::RelayOff | Self::NoEndpoint | Self::UnknownRecord => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadState
            | Self::BadAfter
            | Self::BadLimit
            | Self::BadQuery
            | Self::BadId
            | Self::BadBody => StatusCode::BAD_REQUEST,
            Self::NotDead => StatusCode::CONFLICT,
            Self::Store | Self::FleetUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable code in the body.
    #[must_use]
    pub const fn code(self) -> &'static str {
        match self {
            Self::RelayOff => "relay_off",
            Self::NoEndpoint => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadState => "bad_state",
            Self::BadAfter => "bad_after",
            Self::BadLimit => "bad_limit",
            Self::BadQuery => "bad_query",
            Self::BadId => "bad_id",
            Self::BadBody => "bad_body",
            Self::UnknownRecord => "record_not_found",
            Self::NotDead => "not_dead",
            Self::Store => "store_unavailable",
            Self::FleetUnavailable => "fleet_unavailable",
        }
    }

    /// What to do about it, for a person reading the body.
    #[must_use]
    pub const fn message(self) -> &'static str {
        match self {
            Self::RelayOff => "the callback relay is off ([callback_relay] enabled = false)",
            Self::NoEndpoint => {
                "no such relay endpoint: /relay/records, /relay/records/{id}, /relay/records/{id}/redeliver, /relay/erase"
            }
            Self::MethodNotAllowed => {
                "method not allowed here: GET /relay/records, POST …/redeliver, DELETE /relay/records/{id}, POST /relay/erase"
            }
            Self::BadState => "state must be one of pending, delivering, delivered, dead, orphan",
            Self::BadAfter => "after must be a record id (32 hex digits), the previous page's next",
            Self::BadLimit => "limit must be a number from 1 to 1000",
            Self::BadQuery => "only state, after and limit are accepted, each at most once",
            Self::BadId => "a record id is 32 hex digits",
            Self::BadBody => {
                "the body must be JSON {\"requestId\": \"…\", \"acquirer\": \"…\"} (acquirer optional), at most 4 KiB"
            }
            Self::UnknownRecord => "no record has this id",
            Self::NotDead => "only a dead record can be redelivered",
            Self::Store => "the relay store failed; nothing was changed, try again",
            Self::FleetUnavailable => {
                "done on this instance, but Redis did not answer for the fleet's pull copies: try again"
            }
        }
    }

    /// The JSON body.
    #[must_use]
    pub fn body(self) -> String {
        serde_json::json!({"error": self.code(), "message": self.message()}).to_string()
    }
}

/// A parsed admin request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    List {
        state: State,
        after: Option<RecordId>,
        limit: usize,
    },
    Redeliver(RecordId),
    Purge(RecordId),
    Erase,
}

/// Whether a path belongs to the relay's admin surface (so the admin listener hands it
/// here, and answers `relay_off` for it while the relay is off).
#[must_use]
pub fn is_relay_path(path: &str) -> bool {
    path == "/relay" || path.starts_with("/relay/")
}

/// Answers one request under `/relay/`: `(status, JSON body)`. Store failures are counted
/// (`relay_store_errors_total{op="admin"}`) and logged here.
pub async fn answer<B>(
    store: &dyn CallbackStore,
    pulls: Option<&FleetPulls>,
    metrics: &RelayMetrics,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: B,
) -> (StatusCode, String)
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let result = match parse(method, path, query) {
        Ok(command) => run(store, pulls, command, body).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(body) => (StatusCode::OK, body),
        Err(error) => {
            if error == AdminError::Store {
                metrics.store_failed(StoreOp::Admin);
            }
            (error.status(), error.body())
        }
    }
}

fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Command, AdminError> {
    let rest = path.strip_prefix("/relay").ok_or(AdminError::NoEndpoint)?;
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    match (segments.as_slice(), method) {
        (["records"], &Method::GET) => list_query(query.unwrap_or("")),
        (["records", id, "redeliver"], &Method::POST) => Ok(Command::Redeliver(record_id(id)?)),
        (["records", id], &Method::DELETE) => Ok(Command::Purge(record_id(id)?)),
        (["erase"], &Method::POST) => Ok(Command::Erase),
        (["records"] | ["records", _, "redeliver"] | ["records", _] | ["erase"], _) => {
            Err(AdminError::MethodNotAllowed)
        }
        _ => Err(AdminError::NoEndpoint),
    }
}

fn record_id(text: &str) -> Result<RecordId, AdminError> {
    if text.len() != 32 {
        return Err(AdminError::BadId);
    }
    RecordId::parse(text).ok_or(AdminError::BadId)
}

fn parse_state(text: &str) -> Option<State> {
    State::ALL.into_iter().find(|state| state.as_str() == text)
}

/// `state=S&after=ID&limit=N`: `state` required, the others optional; nothing else.
fn list_query(query: &str) -> Result<Command, AdminError> {
    let (mut state, mut after, mut limit) = (None, None, None);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "state" if state.is_none() => {
                state = Some(parse_state(value).ok_or(AdminError::BadState)?);
            }
            "after" if after.is_none() => {
                if value.len() != 32 {
                    return Err(AdminError::BadAfter);
                }
                after = Some(RecordId::parse(value).ok_or(AdminError::BadAfter)?);
            }
            "limit" if limit.is_none() => {
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or(AdminError::BadLimit)?;
                limit = Some(n);
            }
            _ => return Err(AdminError::BadQuery),
        }
    }
    Ok(Command::List {
        state: state.ok_or(AdminError::BadState)?,
        after,
        limit: limit.unwrap_or(DEFAULT_LIMIT),
    })
}

/// One record in a listing: [`RecordMeta`], ids as hex, the state as its label.
#[derive(Serialize)]
struct RecordView<'a> {
    id: String,
    acquirer: &'a str,
    state: &'static str,
    size: u64,
    received_ms: u64,
    updated_ms: u64,
    due_ms: u64,
    attempts: u32,
    duplicates: u32,
    conflicts: u32,
    key_id: &'a str,
}

impl<'a> From<&'a RecordMeta> for RecordView<'a> {
    fn from(meta: &'a RecordMeta) -> Self {
        Self {
            id: meta.id.to_string(),
            acquirer: &meta.acquirer,
            state: meta.state.as_str(),
            size: meta.size,
            received_ms: meta.received_ms,
            updated_ms: meta.updated_ms,
            due_ms: meta.due_ms,
            attempts: meta.attempts,
            duplicates: meta.duplicates,
            conflicts: meta.conflicts,
            key_id: &meta.key_id,
        }
    }
}

#[derive(Serialize)]
struct Listing<'a> {
    records: Vec<RecordView<'a>>,
    /// The `after` of the next page; `null` when this page was the last.
    next: Option<String>,
}

/// The erase body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EraseBody {
    #[serde(rename = "requestId")]
    request_id: String,
    #[serde(default)]
    acquirer: Option<String>,
}

fn store_failed(what: &'static str, error: &StoreError) -> AdminError {
    tracing::error!(%error, what, "relay admin: store call failed; answered 503");
    AdminError::Store
}

async fn run<B>(
    store: &dyn CallbackStore,
    pulls: Option<&FleetPulls>,
    command: Command,
    body: B,
) -> Result<String, AdminError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match command {
        Command::List {
            state,
            after,
            limit,
        } => {
            let records = store
                .list(state, after, limit)
                .await
                .map_err(|e| store_failed("list", &e))?;
            let next = (records.len() == limit)
                .then(|| records.last().map(|meta| meta.id.to_string()))
                .flatten();
            let listing = Listing {
                records: records.iter().map(RecordView::from).collect(),
                next,
            };
            serde_json::to_string(&listing).map_err(|_| AdminError::Store)
        }
        Command::Redeliver(id) => {
            if store
                .redeliver(id, now_ms())
                .await
                .map_err(|e| store_failed("redeliver", &e))?
            {
                tracing::info!(record = %id, "relay admin: dead record back to pending");
                return Ok(serde_json::json!({"redelivered": id.to_string()}).to_string());
            }
            // Not redelivered: unknown (404) or in another state (409). A record that no
            // longer opens still exists, so it is a 409 too.
            match store.fetch(id).await {
                Ok(None) => Err(AdminError::UnknownRecord),
                Ok(Some(_)) | Err(StoreError::Unreadable(_)) => Err(AdminError::NotDead),
                Err(error) => Err(store_failed("fetch", &error)),
            }
        }
        Command::Purge(id) => {
            // What names its fleet copy, read before the record goes (a record that no
            // longer opens has none this instance could name).
            let copy =
                match pulls {
                    Some(_) => store.fetch(id).await.ok().flatten().and_then(|opened| {
                        Some((opened.meta.acquirer, opened.envelope?.request_id))
                    }),
                    None => None,
                };
            if !store
                .purge(id)
                .await
                .map_err(|e| store_failed("purge", &e))?
            {
                return Err(AdminError::UnknownRecord);
            }
            tracing::info!(record = %id, "relay admin: record purged");
            if let (Some(pulls), Some((acquirer, request_id))) = (pulls, copy)
                && !pulls.forget(&acquirer, &request_id, id).await
            {
                return Err(AdminError::FleetUnavailable);
            }
            Ok(serde_json::json!({"purged": id.to_string()}).to_string())
        }
        Command::Erase => {
            let erase = erase_body(body).await?;
            let (acquirer, request_id) = (erase.acquirer.clone(), erase.request_id.clone());
            let erased = store
                .erase(erase.acquirer, erase.request_id)
                .await
                .map_err(|e| store_failed("erase", &e))?;
            tracing::info!(
                acquirer = acquirer.as_deref().unwrap_or("*"),
                erased,
                "relay admin: records erased for a requestId"
            );
            if let Some(pulls) = pulls
                && !pulls.erase(acquirer.as_deref(), &request_id).await
            {
                return Err(AdminError::FleetUnavailable);
            }
            Ok(serde_json::json!({ "erased": erased }).to_string())
        }
    }
}

/// Reads and checks the erase body (bounded in size and time).
async fn erase_body<B>(body: B) -> Result<EraseBody, AdminError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let read = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await;
    let Ok(Ok(collected)) = read else {
        return Err(AdminError::BadBody);
    };
    let mut erase: EraseBody =
        serde_json::from_slice(&collected.to_bytes()).map_err(|_| AdminError::BadBody)?;
    // Trimmed as the ingress trims the header it came in.
    erase.request_id = erase.request_id.trim().to_owned();
    if erase.request_id.is_empty() || erase.request_id.len() > MAX_REQUEST_ID {
        return Err(AdminError::BadBody);
    }
    if let Some(acquirer) = &erase.acquirer
        && acquirer.trim().is_empty()
    {
        return Err(AdminError::BadBody);
    }
    Ok(erase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_queries_parse_strictly() {
        let id = "00112233445566778899aabbccddeeff";
        assert_eq!(
            list_query(&format!("state=dead&after={id}&limit=5")),
            Ok(Command::List {
                state: State::Dead,
                after: RecordId::parse(id),
                limit: 5
            })
        );
        assert_eq!(
            list_query("state=orphan"),
            Ok(Command::List {
                state: State::Orphan,
                after: None,
                limit: DEFAULT_LIMIT
            })
        );
        for (query, error) in [
            ("", AdminError::BadState),
            ("state=gone", AdminError::BadState),
            ("state=dead&limit=0", AdminError::BadLimit),
            ("state=dead&limit=1001", AdminError::BadLimit),
            ("state=dead&limit=x", AdminError::BadLimit),
            ("state=dead&after=xyz", AdminError::BadAfter),
            ("state=dead&state=dead", AdminError::BadQuery),
            ("state=dead&payload=1", AdminError::BadQuery),
        ] {
            assert_eq!(list_query(query), Err(error), "{query}");
        }
    }

    #[test]
    fn paths_pick_the_command_or_the_refusal() {
        let id = "00112233445566778899aabbccddeeff";
        let parsed = |method: Method, path: &str| parse(&method, path, None);
        assert_eq!(
            parsed(Method::POST, &format!("/relay/records/{id}/redeliver")),
            Ok(Command::Redeliver(RecordId::parse(id).unwrap()))
        );
        assert_eq!(
            parsed(Method::DELETE, &format!("/relay/records/{id}")),
            Ok(Command::Purge(RecordId::parse(id).unwrap()))
        );
        assert_eq!(
            parsed(Method::DELETE, "/relay/records/nothex"),
            Err(AdminError::BadId)
        );
        assert_eq!(
            parsed(Method::GET, "/relay/erase"),
            Err(AdminError::MethodNotAllowed)
        );
        assert_eq!(
            parsed(Method::GET, "/relay/other"),
            Err(AdminError::NoEndpoint)
        );
    }
}
