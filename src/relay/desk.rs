//! The branch listener's side of the relay: the route a consent push records before it
//! leaves for Diia, and the pull endpoint that hands a package to the caller that asked.
//!
//! - **Route before push.** [`RelayDesk::record`] durably records `(acquirer, requestId) →
//!   (client, branch, target)` for every configured acquirer before the proxy forwards a
//!   `document-request` or `offer-request/dynamic`; a requestId routed to another client
//!   or branch is refused (409), so a second caller cannot divert someone else's package.
//! - **Target by branch.** The first target that lists the branch, else the acquirer's
//!   `default_target`, else a target serving `["*"]`; with none, the route is pull-only
//!   (target `""`) and the push worker holds the record for the pull side.
//! - **Pull answers only its caller.** [`RelayDesk::pull`] returns a package only to the
//!   client its route names, or to a caller whose session token this gateway issued for
//!   the login the route names (compared in constant time by the store); anyone else
//!   waits out the same long poll and gets the same 404 as for "nothing yet".
//! - **Any instance answers a pull** (`[scaleout]` on): the fleet's copies
//!   ([`FleetPulls`]) are looked up with the same owner check, rechecked every 500 ms while
//!   a pull waits, and the caller's oldest package, local or copied, is served (so a `GET`
//!   and a `DELETE` without `?id=` reaching different instances name the same one); an
//!   acknowledgement reaches the copy and the holding instance alike, and a local package
//!   acknowledged elsewhere is not served again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use percent_encoding::percent_decode_str;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use super::budget::ByteBudget;
use super::fleet::{Claim, FleetRoutes};
use super::fleet_pulls::FleetPulls;
use super::ingress::{ACTION_HEADER, TRACE_HEADER};
use super::settings::{Branches, RelayAcquirer, RelaySettings};
use super::{CallbackStore, Envelope, Owner, RecordId, Route, RouteOutcome, now_ms};
use crate::error::GatewayError;

/// The longest a pull may wait for its package (`?wait=` is capped to it).
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(60);
/// Long polls waiting at once; more are refused with 503 (each holds a connection only).
const MAX_PULL_WAITERS: usize = 4096;
/// How often a waiting pull looks at the store when no arrival woke it (a callback that
/// reached another instance, or an orphan routed later).
const PULL_RECHECK: Duration = Duration::from_millis(500);

/// Why the relay could not do what the branch asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeskError {
    /// The requestId is routed to another client or branch.
    Taken,
    /// The store failed, or too many pulls wait already.
    Unavailable,
}

/// What [`RelayDesk::record`] claimed in the fleet's Redis for one push (nothing without
/// `[scaleout]`): kept by a reservation, so a push Diia does not accept gives back its
/// fleet-wide claim as well as its local route ([`RelayDesk::release`]).
#[derive(Debug, Default)]
pub struct Recorded {
    claims: Vec<Claim>,
}

/// A package handed to the pull side.
#[derive(Debug)]
pub struct Pulled {
    /// The record (acknowledge it with its id).
    pub id: RecordId,
    /// The callback as Diia sent it.
    pub envelope: Envelope,
}

/// The `X-Relay-Record-Id` header: the record a pull returned (`DELETE …?id=` names it).
pub const RECORD_ID_HEADER: &str = "x-relay-record-id";

impl Pulled {
    /// The package as Diia sent it: body and `Content-Type` byte for byte, the trace and
    /// action headers, and the record id to acknowledge.
    #[must_use]
    pub fn response(self) -> Response<Full<Bytes>> {
        let envelope = self.envelope;
        let mut response = Response::new(Full::new(envelope.body));
        let headers = response.headers_mut();
        // Stored values came through `HeaderValue` checks at ingress; one that no longer
        // converts is left out rather than failing the pull.
        let mut put = |name: header::HeaderName, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        };
        put(header::CONTENT_TYPE, &envelope.content_type);
        put(TRACE_HEADER.clone(), &envelope.request_id);
        if let Some(action) = &envelope.action {
            put(ACTION_HEADER.clone(), action);
        }
        put(
            header::HeaderName::from_static(RECORD_ID_HEADER),
            &self.id.to_string(),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The answer to an acknowledgement: `204 No Content`.
#[must_use]
pub fn acknowledged() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// A pull or acknowledgement as the path and query ask for it.
#[derive(Debug)]
pub struct PullRequest {
    /// The `requestId` (percent-decoded from the path).
    pub request_id: String,
    /// `?wait=`: how long a `GET` waits for the package (capped at [`MAX_PULL_WAIT`]).
    pub wait: Duration,
    /// `?id=`: the record a `DELETE` acknowledges.
    pub id: Option<RecordId>,
}

/// Longest `requestId` accepted (as the JSON bodies accept).
const MAX_REQUEST_ID: usize = 256;

impl PullRequest {
    /// From the path's id segment and the query; `422 invalid_relay_query` when the id is
    /// not UTF-8 or too long, `wait` is not a duration (`30s`, `500ms`, or seconds), or
    /// `id` is not 32 hex digits.
    pub fn parse(encoded_id: &str, query: Option<&str>) -> Result<Self, GatewayError> {
        let request_id = percent_decode_str(encoded_id)
            .decode_utf8()
            .map_err(|_| GatewayError::InvalidRelayQuery)?;
        if request_id.is_empty() || request_id.len() > MAX_REQUEST_ID {
            return Err(GatewayError::InvalidRelayQuery);
        }
        let mut pull = Self {
            request_id: request_id.into_owned(),
            wait: Duration::ZERO,
            id: None,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some(("wait", value)) => {
                    let wait = match value.parse::<u64>() {
                        Ok(seconds) => Duration::from_secs(seconds),
                        Err(_) => humantime::parse_duration(value)
                            .map_err(|_| GatewayError::InvalidRelayQuery)?,
                    };
                    pull.wait = wait.min(MAX_PULL_WAIT);
                }
                Some(("id", value)) => {
                    pull.id = Some(RecordId::parse(value).ok_or(GatewayError::InvalidRelayQuery)?);
                }
                _ => return Err(GatewayError::InvalidRelayQuery),
            }
        }
        Ok(pull)
    }
}

/// Routes and pulls over the relay's store.
pub struct RelayDesk {
    settings: Arc<RelaySettings>,
    store: Arc<dyn CallbackStore>,
    arrivals: Arc<Notify>,
    waiters: Semaphore,
    /// The fleet's copy of the routes (`[scaleout]` on).
    fleet: Option<Arc<FleetRoutes>>,
    /// The fleet's pull copies (`[scaleout]` on).
    pulls: Option<Arc<FleetPulls>>,
    /// Bytes of pull answers not yet sent (`max_in_flight_bytes`): each answer holds its
    /// own copy of a package until hyper has written it.
    answers: ByteBudget,
    /// Bytes of unsent answers per caller (its login when it has one, else its client):
    /// one caller holds at most [`CALLER_SHARE`] of the budget, so stalling its own
    /// answers cannot refuse everyone else's pulls.
    by_caller: Arc<Mutex<HashMap<String, usize>>>,
    caller_cap: usize,
}

/// The part of the pull answers' budget one caller may hold (one package always fits).
const CALLER_SHARE: usize = 8;

/// A package's bytes together with their share of the answers' budget: the share is
/// given back when the last handle on the bytes goes (hyper drops the body once written,
/// or with the connection at `send_timeout`).
struct Charged {
    body: Bytes,
    _share: OwnedSemaphorePermit,
    _caller: CallerShare,
}

/// A caller's bytes of one unsent answer, given back when dropped.
struct CallerShare {
    table: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
    bytes: usize,
}

impl Drop for CallerShare {
    fn drop(&mut self) {
        if let Ok(mut table) = self.table.lock()
            && let Some(held) = table.get_mut(&self.caller)
        {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                table.remove(&self.caller);
            }
        }
    }
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl RelayDesk {
    /// A desk over the relay's store and settings.
    #[must_use]
    pub fn new(settings: Arc<RelaySettings>, store: Arc<dyn CallbackStore>) -> Self {
        let caller_cap = (settings.max_in_flight_bytes / CALLER_SHARE).max(settings.max_body);
        Self {
            answers: ByteBudget::new(settings.max_in_flight_bytes),
            by_caller: Arc::new(Mutex::new(HashMap::new())),
            caller_cap,
            settings,
            store,
            arrivals: Arc::new(Notify::new()),
            waiters: Semaphore::new(MAX_PULL_WAITERS),
            fleet: None,
            pulls: None,
        }
    }

    /// Pulls and acknowledgements also reach the fleet's copies of packages held by other
    /// instances.
    #[must_use]
    pub fn with_fleet_pulls(mut self, pulls: Arc<FleetPulls>) -> Self {
        self.pulls = Some(pulls);
        self
    }

    /// Routes are also claimed fleet-wide in Redis before they are recorded locally.
    #[must_use]
    pub fn with_fleet(mut self, fleet: Arc<FleetRoutes>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Woken by ingress after each stored callback, so a waiting pull answers at once.
    #[must_use]
    pub fn arrivals(&self) -> Arc<Notify> {
        Arc::clone(&self.arrivals)
    }

    /// Where `branch`'s packages of `acquirer` go: a target's name, or `""` (pull only).
    #[must_use]
    pub fn target_for(&self, acquirer: &RelayAcquirer, branch: &str) -> String {
        let targets = &self.settings.targets;
        let listed = targets
            .iter()
            .find(|t| matches!(&t.branches, Branches::Listed(_)) && t.branches.serves(branch));
        if let Some(target) = listed {
            return target.name.clone();
        }
        if let Some(default) = &acquirer.default_target {
            return default.clone();
        }
        targets
            .iter()
            .find(|t| matches!(t.branches, Branches::All))
            .map_or_else(String::new, |t| t.name.clone())
    }

    /// Durably routes `request_id` to `client` and `branch` for every acquirer, before the
    /// push leaves. A retried push by the same client and branch is accepted again.
    ///
    /// With a fleet, the route is claimed in Redis first: a route held there for another
    /// client or branch refuses the push as a local one does, and a claim the local store
    /// then refuses is given back, so Redis and the store never name different owners
    /// because of this push. Redis unavailable: the local route alone counts. What the push
    /// claimed in Redis comes back in [`Recorded`], for [`RelayDesk::release`].
    ///
    /// The route names `owner`'s client and, when it has one, its login: a push retried
    /// under a new session token of the same login is the same owner.
    pub async fn record(
        &self,
        owner: &Owner,
        branch: &str,
        request_id: &str,
    ) -> Result<Recorded, DeskError> {
        let client = owner.client.as_str();
        let now = now_ms();
        let mut recorded = Recorded::default();
        for acquirer in &self.settings.acquirers {
            let route = Route {
                client: client.to_owned(),
                branch: branch.to_owned(),
                target: self.target_for(acquirer, branch),
                login: owner.login.clone(),
            };
            let claim = match &self.fleet {
                Some(fleet) => {
                    let ttl = self.settings.route_ttl;
                    match fleet.claim(&acquirer.name, request_id, &route, ttl).await {
                        Claim::Taken => {
                            // Fresh claims this push made for earlier acquirers go back.
                            for claim in recorded.claims {
                                fleet.release(claim).await;
                            }
                            return Err(DeskError::Taken);
                        }
                        claim => Some((fleet, claim)),
                    }
                }
                None => None,
            };
            let outcome = self
                .store
                .record_route(
                    acquirer.name.clone(),
                    request_id.to_owned(),
                    route,
                    self.settings.route_ttl,
                    now,
                )
                .await;
            let refused = match outcome {
                Ok(RouteOutcome::Recorded | RouteOutcome::Same) => None,
                Ok(RouteOutcome::Taken) => Some(DeskError::Taken),
                Err(error) => {
                    tracing::error!(acquirer = %acquirer.name, %error, "relay: route not recorded");
                    Some(DeskError::Unavailable)
                }
            };
            if let Some(refused) = refused {
                if let Some((fleet, claim)) = claim {
                    for claim in recorded.claims.into_iter().chain([claim]) {
                        fleet.release(claim).await;
                    }
                }
                return Err(refused);
            }
            if let Some((_, claim)) = claim {
                recorded.claims.push(claim);
            }
        }
        // A callback that arrived first (an orphan) is routed now: wake waiting pulls.
        self.arrivals.notify_waiters();
        Ok(recorded)
    }

    /// Gives up `client`'s route of `request_id` (recorded before a push that Diia did not
    /// accept), so a refused caller holds no requestId: the local route, and with a fleet
    /// what [`RelayDesk::record`] claimed or refreshed in Redis (`recorded`), deleted only
    /// while Redis still holds the value this push stored. Failures are logged: the route
    /// then expires after `route_ttl`.
    pub async fn release(&self, client: &str, request_id: &str, recorded: Recorded) {
        for acquirer in &self.settings.acquirers {
            let released = self
                .store
                .release_route(
                    acquirer.name.clone(),
                    request_id.to_owned(),
                    client.to_owned(),
                    now_ms(),
                )
                .await;
            if let Err(error) = released {
                tracing::warn!(acquirer = %acquirer.name, %error, "relay: a refused push's route was not released");
            }
        }
        if let Some(fleet) = &self.fleet {
            for claim in recorded.claims {
                fleet.give_back(claim).await;
            }
        }
    }

    /// The caller's oldest undelivered package for `request_id` (of a route `owner` owns:
    /// its client, or its login), waiting up to `wait` for one to arrive; `None` when
    /// there is none for this caller (or none yet).
    pub async fn pull(
        &self,
        owner: &Owner,
        request_id: &str,
        wait: Duration,
    ) -> Result<Option<Pulled>, DeskError> {
        // A package already there is answered without a waiting place.
        if let Some(found) = self.take(owner, request_id).await? {
            return self.charged(owner, found).map(Some);
        }
        if wait.is_zero() {
            return Ok(None);
        }
        let _waiting = self.wait_slot(wait)?;
        let deadline = tokio::time::Instant::now() + wait.min(MAX_PULL_WAIT);
        loop {
            // Registered before the look, so an arrival between the look and the wait
            // still wakes this pull.
            let arrived = self.arrivals.notified();
            let mut arrived = std::pin::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(found) = self.take(owner, request_id).await? {
                return self.charged(owner, found).map(Some);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let recheck = (now + PULL_RECHECK).min(deadline);
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep_until(recheck) => {}
            }
        }
    }

    /// The package with its body charged to the answers' budget until it is sent (one
    /// package always fits: its share is at most the whole budget); `Unavailable`
    /// (503 + `Retry-After`) while answers not yet sent hold the budget, or this caller's
    /// part of it, so a caller that pulls its package many times at once without reading
    /// holds neither a copy per answer nor everyone else's pulls.
    fn charged(&self, owner: &Owner, pulled: Pulled) -> Result<Pulled, DeskError> {
        let Pulled { id, mut envelope } = pulled;
        let caller = self.caller_share(owner, envelope.body.len()).ok_or_else(|| {
            tracing::warn!(record = %id, "relay: this caller's pull answers not yet sent hold its part of max_in_flight_bytes; answered 503");
            DeskError::Unavailable
        })?;
        let share = self.answers.try_take(envelope.body.len()).ok_or_else(|| {
            tracing::warn!(record = %id, "relay: pull answers not yet sent hold max_in_flight_bytes; answered 503");
            DeskError::Unavailable
        })?;
        envelope.body = Bytes::from_owner(Charged {
            body: envelope.body,
            _share: share,
            _caller: caller,
        });
        Ok(Pulled { id, envelope })
    }

    /// `bytes` more of `owner`'s unsent answers, unless that passes its cap.
    fn caller_share(&self, owner: &Owner, bytes: usize) -> Option<CallerShare> {
        let caller = owner.login.as_ref().unwrap_or(&owner.client).clone();
        let mut table = self.by_caller.lock().ok()?;
        let held = table.entry(caller.clone()).or_insert(0);
        if *held > 0 && held.saturating_add(bytes) > self.caller_cap {
            return None;
        }
        *held = held.saturating_add(bytes);
        drop(table);
        Some(CallerShare {
            table: Arc::clone(&self.by_caller),
            caller,
            bytes,
        })
    }

    /// A place among the waiting pulls (none needed for a pull that does not wait).
    fn wait_slot(&self, wait: Duration) -> Result<Option<SemaphorePermit<'_>>, DeskError> {
        if wait.is_zero() {
            return Ok(None);
        }
        self.waiters
            .try_acquire()
            .map(Some)
            .map_err(|_| DeskError::Unavailable)
    }

    /// The caller's oldest package of the request: per acquirer, this instance's oldest
    /// or, with a fleet, an older one among the copies other instances hold (a pull and an
    /// acknowledgement without `?id=` then name the same package whichever instance each
    /// reaches).
    async fn take(&self, owner: &Owner, request_id: &str) -> Result<Option<Pulled>, DeskError> {
        for acquirer in &self.settings.acquirers {
            let found = self
                .store
                .take_for(acquirer.name.clone(), request_id.to_owned(), owner.clone())
                .await
                .map_err(|error| {
                    tracing::error!(acquirer = %acquirer.name, %error, "relay: pull failed");
                    DeskError::Unavailable
                })?;
            let copy = match &self.pulls {
                Some(pulls) => pulls.find(&acquirer.name, request_id, owner).await,
                None => None,
            };
            if let Some((id, envelope)) = found {
                if let Some((copy_id, copy_received, copy_envelope)) = copy
                    && copy_id != id
                    && self.received_before(copy_received, copy_id, id).await
                {
                    self.served_from_fleet();
                    return Ok(Some(Pulled {
                        id: copy_id,
                        envelope: copy_envelope,
                    }));
                }
                if self
                    .settled_elsewhere(&acquirer.name, owner, request_id, id)
                    .await
                {
                    // Acknowledged through another instance: settled now; any other
                    // package of the request is found by the next look.
                    continue;
                }
                return Ok(Some(Pulled { id, envelope }));
            }
            if let Some((id, _, envelope)) = copy {
                self.served_from_fleet();
                return Ok(Some(Pulled { id, envelope }));
            }
        }
        Ok(None)
    }

    /// Whether a copy received at `received_ms` (record `copy`) came before local record
    /// `local` (the order the store serves in: arrival, then id).
    async fn received_before(&self, received_ms: u64, copy: RecordId, local: RecordId) -> bool {
        match self.store.fetch(local).await {
            Ok(Some(opened)) => (received_ms, copy) < (opened.meta.received_ms, local),
            _ => false,
        }
    }

    fn served_from_fleet(&self) {
        if let Some(pulls) = &self.pulls {
            pulls.served();
        }
    }

    /// With a fleet: whether local record `id` was acknowledged through another instance,
    /// in which case it is settled here now (so it is not served twice).
    async fn settled_elsewhere(
        &self,
        acquirer: &str,
        owner: &Owner,
        request_id: &str,
        id: RecordId,
    ) -> bool {
        let Some(pulls) = &self.pulls else {
            return false;
        };
        if !pulls.acked_elsewhere(id).await {
            return false;
        }
        let acked = self
            .store
            .ack_pulled(
                acquirer.to_owned(),
                request_id.to_owned(),
                owner.clone(),
                id,
                now_ms(),
            )
            .await;
        if let Err(error) = acked {
            tracing::warn!(%acquirer, %error, "relay: a package acknowledged elsewhere was not settled");
        }
        true
    }

    /// With a fleet, after a local acknowledgement: the record's copy removed. Without a
    /// local one: the caller's copy acknowledged in Redis (`Unavailable` when Redis did
    /// not answer, so the branch retries rather than taking a 404 for an answer).
    async fn acknowledge_in_fleet(
        &self,
        owner: &Owner,
        request_id: &str,
        id: RecordId,
        local: Option<&str>,
    ) -> Result<bool, DeskError> {
        let Some(pulls) = &self.pulls else {
            return Ok(false);
        };
        if let Some(acquirer) = local {
            pulls.forget(acquirer, request_id, id).await;
            return Ok(true);
        }
        let mut unanswered = false;
        for acquirer in &self.settings.acquirers {
            match pulls.ack(&acquirer.name, request_id, owner, Some(id)).await {
                Some(true) => {
                    tracing::info!(record = %id, acquirer = %acquirer.name, "relay: pulled package acknowledged through the fleet");
                    return Ok(true);
                }
                Some(false) => {}
                None => unanswered = true,
            }
        }
        if unanswered {
            return Err(DeskError::Unavailable);
        }
        Ok(false)
    }

    /// Acknowledges a pulled package: record `id`, or the caller's oldest for the request.
    /// `false` when there is no such undelivered package for this caller.
    pub async fn acknowledge(
        &self,
        owner: &Owner,
        request_id: &str,
        id: Option<RecordId>,
    ) -> Result<bool, DeskError> {
        let id = match id {
            Some(id) => id,
            None => match self.take(owner, request_id).await? {
                Some(pulled) => pulled.id,
                None => return Ok(false),
            },
        };
        for acquirer in &self.settings.acquirers {
            let acked = self
                .store
                .ack_pulled(
                    acquirer.name.clone(),
                    request_id.to_owned(),
                    owner.clone(),
                    id,
                    now_ms(),
                )
                .await
                .map_err(|error| {
                    tracing::error!(acquirer = %acquirer.name, %error, "relay: acknowledgement failed");
                    DeskError::Unavailable
                })?;
            if acked {
                tracing::info!(record = %id, acquirer = %acquirer.name, "relay: pulled package acknowledged");
                self.acknowledge_in_fleet(owner, request_id, id, Some(&acquirer.name))
                    .await?;
                return Ok(true);
            }
        }
        self.acknowledge_in_fleet(owner, request_id, id, None).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pull_requests_parse_or_are_refused() {
        let pull = PullRequest::parse("req%2F1", Some("wait=30s")).unwrap();
        assert_eq!(pull.request_id, "req/1");
        assert_eq!(pull.wait, Duration::from_secs(30));
        assert_eq!(
            PullRequest::parse("r", Some("wait=5")).unwrap().wait,
            Duration::from_secs(5)
        );
        assert_eq!(
            PullRequest::parse("r", Some("wait=1h")).unwrap().wait,
            MAX_PULL_WAIT
        );
        assert_eq!(PullRequest::parse("r", None).unwrap().wait, Duration::ZERO);
        let id = "00112233445566778899aabbccddeeff";
        let pull = PullRequest::parse("r", Some(&format!("id={id}"))).unwrap();
        assert_eq!(pull.id.unwrap().to_string(), id);
        for (path, query) in [
            ("%ff", None),
            ("r", Some("wait=soon")),
            ("r", Some("id=xyz")),
            ("r", Some("other=1")),
            ("r", Some("wait")),
        ] {
            assert!(
                matches!(
                    PullRequest::parse(path, query),
                    Err(GatewayError::InvalidRelayQuery)
                ),
                "{path} {query:?}"
            );
        }
        assert!(PullRequest::parse(&"a".repeat(257), None).is_err());
    }
}
