//! The request lifecycle, written once as stages over one per-request [`Ctx`]:
//!
//! 1. **route** ([`crate::route`]): `(method, path)` → endpoint, or 404/405; in managed
//!    mode the token exchange is no route at all;
//! 2. **authenticate** ([`crate::caller`]): bearer session token, API key or client
//!    certificate (401 without);
//! 3. **read body**: bounded by size (413) and time (408);
//! 4. **admit**: an in-flight permit, or 503 `overloaded` (taken after the body, so slow
//!    uploads cannot hold the processing budget);
//! 5. **check** ([`crate::request`]): what the endpoint needs (400/415/422);
//! 6. **branch limit** (429 + `Retry-After`, `RateLimit-Policy`, `RateLimit`); in
//!    pass-through, a session token Diia refused a moment ago is answered 401 before any
//!    budget, and one Diia has not accepted yet spends no branch's budget ([`crate::trust`]);
//! 7. **cache / coalesce / replay** ([`crate::cache_policy`] keys, [`crate::cache`]) or
//!    **forward**: the Diia budget (wait, then 503), Diia's back-off (503), the upstream
//!    call with its deadline (502/504), run by the request that leads the key and spawned
//!    to finish on its own if that request goes away mid-call ([`crate::detach`]);
//! 8. **respond** with Diia's status and body, `Cache-Status`, metrics, redacted access log.
//!
//! A refusal in stages 1–2 reads and throws away the request body first (bounded as a
//! 413's is), so that a client that writes its whole body before reading gets the answer
//! rather than a reset.
//!
//! Each stage is an `async fn` over `&mut Ctx` returning `Result<_, GatewayError>`;
//! [`Gateway::serve`] is the one place that turns an error into a response, counts and
//! logs it. Validation comes before the branch limit so that malformed traffic is refused
//! without spending a branch's budget, and the branch limit comes before the cache so that
//! one branch cannot hog the gateway even with cache hits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use http::{HeaderValue, Request};
use hyper::body::Body;

use crate::access::AccessLine;
use crate::answer::{Answer, AnswerClass, CallResult};
use crate::barcode::Barcode;
use crate::body::{ReadError, drain, read_all};
use crate::cache::{Fetched, Lifetimes, Lookup};
use crate::cache_policy::{Slot, Store, slot_for};
use crate::caller::{Caller, Gate, Scope, bearer_token};
use crate::error::{Fault, GatewayError};
use crate::gateway::Gateway;
use crate::head::RequestHead;
use crate::keys::CacheKey;
use crate::limit::Who;
use crate::metrics::RequestOutcome;
use crate::relay::Owner;
use crate::relay::desk::{DeskError, PullRequest, Recorded, RelayDesk};
use crate::request::{Checked, check};
use crate::route::{Endpoint, Route, route_for};
use crate::scaleout::Shape;
use crate::service::{HttpResponse, Reply};
use crate::settings::Hot;
use crate::trust::Standing;
use crate::upstream::UpstreamRequest;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request on its way through the stages.
pub struct Ctx {
    head: RequestHead,
    /// The client: the TCP peer, or the address a trusted proxy vouches for (resolved by
    /// the connection layer, [`crate::client`]).
    peer: SocketAddr,
    started: Instant,
    deadline: tokio::time::Instant,
    /// The settings this request runs on, start to end.
    hot: Arc<Hot>,
    route: Option<Route>,
    caller: Option<Caller>,
    record: AccessRecord,
}

impl Ctx {
    fn endpoint(&self) -> Result<Endpoint, GatewayError> {
        self.route
            .as_ref()
            .map(|route| route.endpoint)
            .ok_or(GatewayError::Internal)
    }
}

/// A request the stages answered (as opposed to one refused with a [`GatewayError`]).
struct Handled {
    response: Reply,
    outcome: RequestOutcome,
}

/// What the access log may say about a request: only labels and keyed fingerprints.
#[derive(Default)]
struct AccessRecord {
    endpoint: Option<Endpoint>,
    barcode: Option<Barcode>,
}

// The outer layer (`serve`, `reply`, `reply_to`: render, count, log), then the stages in
// the order `process` runs them.
impl Gateway {
    /// Answers one request as a response (for in-process callers: benchmarks, tests).
    pub async fn serve<B>(&self, request: Request<B>, peer: SocketAddr) -> HttpResponse
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        self.reply(request, peer).await.into_response()
    }

    /// Answers one request: the outer layer that renders, counts and logs. Generic over
    /// the body so benchmarks and tests can drive it without a socket. Diia's answers
    /// come back as [`Reply::Answer`], which the HTTP/1.1 loop writes from their
    /// pre-rendered bytes.
    pub async fn reply<B>(&self, request: Request<B>, peer: SocketAddr) -> Reply
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        self.reply_to(RequestHead::from_parts(parts), body, peer)
            .await
    }

    /// [`Gateway::reply`] for a head parsed at the edge (the HTTP/1.1 loop's, without a
    /// `HeaderMap`).
    pub async fn reply_to<B>(&self, head: RequestHead, body: B, peer: SocketAddr) -> Reply
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let hot = self.hot.load_full();
        let mut ctx = Ctx {
            head,
            peer,
            started,
            deadline: tokio::time::Instant::from_std(started + hot.request_deadline),
            hot,
            route: None,
            caller: None,
            record: AccessRecord::default(),
        };
        let result = self.process(&mut ctx, body).await;
        let (response, outcome, code) = match result {
            Ok(Handled { response, outcome }) => (response, outcome, None),
            Err(error) => {
                let fault = error.fault();
                if fault == Fault::Internal {
                    tracing::error!("internal error while answering a request");
                }
                (
                    Reply::Response(error.to_response()),
                    RequestOutcome::of_fault(fault),
                    Some(error.code()),
                )
            }
        };
        self.metrics.request(ctx.record.endpoint, outcome, code);
        if tracing::enabled!(target: "diia_gateway::access", tracing::Level::INFO) {
            let barcode = ctx
                .record
                .barcode
                .map(|barcode| self.keys.fingerprint(&barcode.as_u64().to_le_bytes()));
            let line = AccessLine {
                endpoint: ctx.record.endpoint.map_or("none", Endpoint::label),
                status: response.status().as_u16(),
                outcome: outcome.label(),
                code: code.unwrap_or("-"),
                micros: u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX),
                barcode,
                peer: ctx.peer.ip(),
            };
            self.log_access(&line);
        }
        response
    }

    fn log_access(&self, line: &AccessLine) {
        match self.access_log.get() {
            Some(log) => log.write(line),
            None => {
                let hex = line.barcode.map(|fingerprint| fingerprint.hex());
                let barcode = hex
                    .as_ref()
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .unwrap_or("-");
                tracing::info!(
                target: "diia_gateway::access",
                endpoint = line.endpoint,
                status = line.status,
                outcome = line.outcome,
                code = line.code,
                micros = line.micros,
                barcode,
                peer = %line.peer,
                );
            }
        }
    }

    async fn process<B>(&self, ctx: &mut Ctx, body: B) -> Result<Handled, GatewayError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        if let Err(refused) = self.route(ctx).and_then(|()| self.authenticate(ctx)) {
            // Refused before the body was read: read and throw it away first (bounded),
            // or a client that writes its whole body before reading gets a reset instead.
            drain(std::pin::pin!(body)).await;
            return Err(refused);
        }
        let body = self.read_body(ctx, body).await?;
        let endpoint = ctx.endpoint()?;
        if endpoint == Endpoint::RelayCallbacks {
            // The gateway's own endpoint: no Diia call, so no processing slot is held
            // while a long poll waits (the relay bounds its waiters).
            return Box::pin(self.relay_pull(ctx)).await;
        }
        let _permit = self.admit()?;
        // Field by field (not through `Ctx` methods): `checked` borrows the request parts
        // while the access record is written.
        let path_param = ctx
            .route
            .as_ref()
            .and_then(|route| route.param(ctx.head.uri.path()));
        let checked = check(endpoint, path_param, &ctx.head, &body)?;
        ctx.record.barcode = checked.barcode();
        let caller = ctx.caller.as_ref().ok_or(GatewayError::Internal)?;
        caller.may(&ctx.head.method, &checked)?;
        let acquirer = self.managed.as_ref().map_or(&b""[..], |m| m.identity());
        let credentials = ctx
            .head
            .authorization
            .as_ref()
            .map_or(&b""[..], HeaderValue::as_bytes);
        let slot = slot_for(
            &self.keys,
            endpoint,
            caller.identity(acquirer, &ctx.head),
            &checked,
            credentials,
        );
        // Where the caller's session token stands, looked up before any budget is spent:
        // a refused token spends none, an unverified one no branch's.
        let token = self.standing_before_limits(ctx, slot.as_ref());
        let verified = match token {
            Some((_, Standing::Refused)) => return Err(GatewayError::SessionTokenRefused),
            Some((_, Standing::Unverified)) => false,
            Some((_, Standing::Verified)) | None => true,
        };
        limit(&ctx.hot, client(caller, ctx.peer), &checked, verified)?;
        // Before a consent push can leave: the documents it brings go back to this caller.
        let reserved = match (self.relay.get(), checked.consent_push()) {
            (Some(desk), Some((branch, request_id))) => {
                let push = (branch, request_id);
                let owner = self.relay_owner(ctx)?;
                Box::pin(route_callback(desk, owner, push, verified)).await?
            }
            _ => None,
        };
        drop(checked);
        if let Some(reservation) = reserved {
            // A reserved route is settled by Diia's answer: boxed, a rare path.
            return Box::pin(self.push_reserved(ctx, slot, body, token, reservation)).await;
        }
        match slot {
            Some(slot) => self.cached(ctx, slot, body, token).await,
            // Forwarded calls are never hits: boxed, so the hit's state stays small.
            None => Box::pin(self.forward(ctx, body, token)).await,
        }
    }

    /// Stage 7 for a consent push whose route is a reservation (a caller Diia has not
    /// accepted yet): the push as usual, then the route kept or released by its answer.
    async fn push_reserved(
        &self,
        ctx: &mut Ctx,
        slot: Option<Slot>,
        body: Bytes,
        token: Option<(CacheKey, Standing)>,
        reservation: Box<Reservation>,
    ) -> Result<Handled, GatewayError> {
        let handled = match slot {
            Some(slot) => self.cached(ctx, slot, body, token).await,
            None => self.forward(ctx, body, token).await,
        };
        if let Some(desk) = self.relay.get() {
            let response = handled.as_ref().ok().map(|handled| &handled.response);
            reservation.settle(desk, response).await;
        }
        handled
    }

    /// Stage 1: which endpoint (404/405 otherwise).
    fn route(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let routed = route_for(self.auth_mode, &ctx.head.method, ctx.head.uri.path())?;
        ctx.record.endpoint = Some(routed.endpoint);
        ctx.route = Some(routed);
        Ok(())
    }

    /// Stage 2: who is calling.
    fn authenticate(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let hot = &ctx.hot;
        let gate = Gate::new(
            self.auth_mode,
            hot.api_keys.as_deref(),
            hot.client_certs.as_deref(),
        );
        let caller = gate.authenticate(ctx.endpoint()?, &ctx.head, hot.revoked_certs.as_deref())?;
        ctx.caller = Some(caller);
        Ok(())
    }

    /// Stage 3: the whole body, bounded by size and time. A body over the limit is still
    /// read and thrown away (up to [`crate::body::DRAIN_MAX_BYTES`] and
    /// [`crate::body::DRAIN_MAX_TIME`], as NGINX's lingering close does): a client that
    /// writes its whole body before reading, as most do, would otherwise see a connection
    /// reset instead of its 413.
    async fn read_body<B>(&self, ctx: &Ctx, body: B) -> Result<Bytes, GatewayError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let limit = ctx.hot.body_limit;
        let declared = ctx.head.content_length;
        let mut body = std::pin::pin!(body);
        if declared.is_some_and(|length| length > limit as u64) {
            drain(body.as_mut()).await;
            return Err(GatewayError::BodyTooLarge);
        }
        match tokio::time::timeout(ctx.hot.body_timeout, read_all(body.as_mut(), limit)).await {
            Err(_) => Err(GatewayError::BodyTimeout),
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(ReadError::TooLarge)) => {
                drain(body.as_mut()).await;
                Err(GatewayError::BodyTooLarge)
            }
            Ok(Err(ReadError::Broken)) => Err(GatewayError::BodyRead),
        }
    }

    /// Stage 4′, the relay's pull side instead of stages 4–8: `GET` hands the caller its
    /// package for the `requestId` in the path (waiting up to `?wait=`), `DELETE`
    /// acknowledges it (`?id=` names one record; without it, the oldest). Anyone but the
    /// caller that routed the request gets the same 404 as for "nothing yet".
    async fn relay_pull(&self, ctx: &Ctx) -> Result<Handled, GatewayError> {
        let desk = self.relay.get().ok_or(GatewayError::UnknownRoute)?;
        let owner = self
            .relay_owner(ctx)?
            .ok_or(GatewayError::CallbackNotFound)?;
        let encoded = ctx
            .route
            .as_ref()
            .and_then(|route| route.param(ctx.head.uri.path()))
            .ok_or(GatewayError::Internal)?;
        let mut pull = PullRequest::parse(encoded, ctx.head.uri.query())?;
        // A session token Diia has not accepted yet gets no long poll: junk tokens must not
        // take the waiting places of real branches (it is answered at once instead).
        if matches!(self.token_standing(ctx), Some((_, standing)) if standing != Standing::Verified)
        {
            pull.wait = Duration::ZERO;
        }
        let response = if ctx.head.method == http::Method::DELETE {
            match desk.acknowledge(&owner, &pull.request_id, pull.id).await {
                Ok(true) => crate::relay::desk::acknowledged(),
                Ok(false) => return Err(GatewayError::CallbackNotFound),
                Err(_) => return Err(GatewayError::RelayUnavailable),
            }
        } else {
            match desk.pull(&owner, &pull.request_id, pull.wait).await {
                Ok(Some(pulled)) => pulled.response(),
                Ok(None) => return Err(GatewayError::CallbackNotFound),
                Err(_) => return Err(GatewayError::RelayUnavailable),
            }
        };
        Ok(Handled {
            response: Reply::Response(response),
            outcome: RequestOutcome::Relayed,
        })
    }

    /// Stage 4: a processing slot. Under overload a fast 503 beats a queue that makes
    /// every request late (a barcode lives only 3 minutes).
    fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, GatewayError> {
        self.in_flight
            .try_acquire()
            .map_err(|_| GatewayError::Overloaded)
    }

    /// Pass-through: the caller's session token and its standing, for the budgets. A
    /// call whose answer is stored already skips the digest: the caller's token is part
    /// of the key, and only answers Diia gives a token it accepts are stored (a 401 never
    /// is), so the cache-hit path stays as cheap as before; `None` then, and for callers
    /// without a session token. A call under way does not count: its leader may hold a
    /// token nobody has judged yet.
    fn standing_before_limits(
        &self,
        ctx: &Ctx,
        slot: Option<&Slot>,
    ) -> Option<(CacheKey, Standing)> {
        if self.managed.is_some() || !matches!(ctx.caller, Some(Caller::Session)) {
            return None;
        }
        if slot.is_some_and(|slot| self.cache(slot.store).stores(slot.key)) {
            return None;
        }
        self.token_standing(ctx)
    }

    /// Stage 7a: answered from a cache, a call under way, or one new call.
    async fn cached(
        &self,
        ctx: &Ctx,
        slot: Slot,
        body: Bytes,
        token: Option<(CacheKey, Standing)>,
    ) -> Result<Handled, GatewayError> {
        let hot = &ctx.hot;
        let cache = self.cache(slot.store);
        let lifetimes = lifetimes(hot, slot.store);
        let policy = lifetimes.policy;
        let endpoint = ctx.endpoint()?;
        let login = slot.store == Store::SessionTokens;
        if login && !cache.holds(slot.key) {
            self.admit_login(hot, slot.key)?;
        }
        let (result, lookup) = cache
            .get_or_fetch(slot.key, slot.tag, lifetimes, ctx.deadline, || {
                let judged = self.judged(ctx, slot.key, login, token);
                let unverified = judged.is_some_and(|judged| judged.standing != Standing::Verified);
                // An unverified call takes no share: it must not count as a client of the
                // Diia budget (that would make the budget look contended).
                let share = if unverified { None } else { share_of(ctx) };
                let mut request = upstream_request(endpoint, &ctx.head, body);
                request.share.clone_from(&share);
                let call = self.fetch(ctx, request, judged);
                match &self.scaleout {
                    None => Either::Left(async move { Fetched::diia(call(None).await) }),
                    Some(fleet) => {
                        let shape = Shape {
                            policy,
                            budget: hot.fleet_budget(),
                            longest_call: lifetimes.longest_call,
                            sharing: slot.store == Store::Sharing,
                            share,
                            unverified,
                        };
                        let fleet = Arc::clone(fleet);
                        Either::Right(fleet.fetch(slot.key, slot.tag, shape, call))
                    }
                }
            })
            .await?;
        if lookup == Lookup::Hit
            && let Some(fleet) = &self.scaleout
        {
            fleet.note_near_hit();
        }
        // The token bookkeeping is rare (a login, a refused token): boxed, so its futures
        // do not grow every request's state (which is moved, whole, on each await).
        if let Ok(answer) = result.as_ref() {
            if login
                && matches!(lookup, Lookup::Miss { .. })
                && crate::trust::refuses_login(answer.status)
            {
                hot.limits.logins.fail(Who::Digest(slot.key));
            }
            match slot.store {
                Store::SessionTokens if answer.status == http::StatusCode::OK => {
                    Box::pin(self.remember_issued(ctx, answer, slot.key)).await;
                }
                Store::Answers | Store::Sharing
                    if answer.status == http::StatusCode::UNAUTHORIZED =>
                {
                    Box::pin(self.forget_refused(ctx, answer)).await;
                }
                Store::SessionTokens | Store::Answers | Store::Sharing => {}
            }
        }
        handled(&result, lookup, slot.store == Store::Sharing)
    }

    /// A login that has to reach Diia: only these credentials' own refusals count, so a
    /// login that works is never refused because others failed (and a cached one never
    /// gets here).
    fn admit_login(&self, hot: &Hot, key: CacheKey) -> Result<(), GatewayError> {
        if self.trust.login_standing(key) == Standing::Refused {
            return Err(GatewayError::CredentialsRefused);
        }
        hot.limits.logins.check(Who::Digest(key))?;
        Ok(())
    }

    /// Whose standing with Diia the leader's call settles: for a login, the login pair
    /// (acquirer token, credentials), which is the slot's `key`; otherwise the caller's
    /// session token, if any.
    fn judged(
        &self,
        ctx: &Ctx,
        key: CacheKey,
        login: bool,
        token: Option<(CacheKey, Standing)>,
    ) -> Option<Judged> {
        if login {
            let standing = self.trust.login_standing(key);
            return Some(Judged {
                key,
                standing,
                login: true,
            });
        }
        token
            .or_else(|| self.token_standing(ctx))
            .map(|(key, standing)| Judged {
                key,
                standing,
                login: false,
            })
    }

    /// Pass-through: notes which token-cache entry handed out this session token (a 200
    /// from the token exchange; the caller checks the status), and for which login (the
    /// acquirer token in the exchange's path), so the relay knows the token's login.
    async fn remember_issued(&self, ctx: &Ctx, answer: &Answer, slot: CacheKey) {
        #[derive(serde::Deserialize)]
        struct Issued {
            token: String,
        }
        if let Ok(issued) = serde_json::from_slice::<Issued>(&answer.body()) {
            let token = self
                .keys
                .key("issued")
                .part(issued.token.as_bytes())
                .finish();
            self.issued_tokens.insert(token, slot).await;
            let acquirer_token = ctx
                .route
                .as_ref()
                .and_then(|route| route.param(ctx.head.uri.path()))
                .unwrap_or_default();
            self.trust
                .issued(issued.token.as_bytes(), acquirer_token.as_bytes());
        }
    }

    /// Pass-through: Diia refused the caller's session token (401); if the gateway handed
    /// it out, drop it from the token cache so the next login gets a fresh one.
    async fn forget_refused(&self, ctx: &Ctx, answer: &Answer) {
        if answer.status != http::StatusCode::UNAUTHORIZED {
            return;
        }
        if !matches!(ctx.caller, Some(Caller::Session)) {
            return;
        }
        let token = bearer_token(&ctx.head).unwrap_or_default();
        let token = self.keys.key("issued").part(token).finish();
        if let Some(slot) = self.issued_tokens.remove(&token).await {
            tracing::info!(
                "Diia refused a session token the gateway handed out; dropped from the token cache"
            );
            self.session_tokens.forget_answer(slot);
        }
    }

    /// Stage 7b: forwarded as is, never cached.
    async fn forward(
        &self,
        ctx: &Ctx,
        body: Bytes,
        token: Option<(CacheKey, Standing)>,
    ) -> Result<Handled, GatewayError> {
        let request = upstream_request(ctx.endpoint()?, &ctx.head, body);
        let judged = token
            .or_else(|| self.token_standing(ctx))
            .map(|(key, standing)| Judged {
                key,
                standing,
                login: false,
            });
        let answer = tokio::time::timeout_at(ctx.deadline, self.fetch(ctx, request, judged)(None))
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)??;
        self.forget_refused(ctx, &answer).await;
        let outcome = match AnswerClass::of_status(answer.status) {
            AnswerClass::Failed => RequestOutcome::UpstreamError,
            AnswerClass::Ok
            | AnswerClass::Definitive
            | AnswerClass::Refused
            | AnswerClass::Throttled
            | AnswerClass::NoAnswer => RequestOutcome::Passthrough,
        };
        Ok(Handled {
            response: Reply::Answer {
                answer,
                cache_status: None,
            },
            outcome,
        })
    }

    /// Pass-through: the caller's session token (keyed digest) and where it stands with
    /// Diia; `None` for callers without one (token exchange, managed mode).
    fn token_standing(&self, ctx: &Ctx) -> Option<(CacheKey, Standing)> {
        if self.managed.is_some() || !matches!(ctx.caller, Some(Caller::Session)) {
            return None;
        }
        let token = self.trust.digest(bearer_token(&ctx.head).ok()?);
        Some((token, self.trust.standing(token)))
    }

    /// Who the relay knows this caller as: its relay client (session token, API key or
    /// certificate digest) and, for a pass-through session token this instance's token
    /// exchange handed out, the login it was handed out for (so the same SDK keeps its
    /// routes across a new login). `None` for the token exchange itself.
    fn relay_owner(&self, ctx: &Ctx) -> Result<Option<Owner>, GatewayError> {
        let caller = ctx.caller.as_ref().ok_or(GatewayError::Internal)?;
        let Some(client) = caller.relay_client(&ctx.head) else {
            return Ok(None);
        };
        let login = match caller {
            Caller::Session if self.managed.is_none() => bearer_token(&ctx.head)
                .ok()
                .and_then(|token| self.trust.login_of(token))
                .map(|login| login.relay_owner()),
            Caller::Session | Caller::Exchange | Caller::Branch { .. } => None,
        };
        Ok(Some(Owner { client, login }))
    }

    /// The leader's call, as an owned future that can run in its own task; given the
    /// budget wait already reserved (scale-out), if any. With the caller's session token
    /// or login pair (`judged`), one Diia refused a moment ago is answered 401 here, one it
    /// has not accepted yet spends the unverified budget, and Diia's answer is learnt from.
    fn fetch(
        &self,
        ctx: &Ctx,
        mut request: UpstreamRequest,
        judged: Option<Judged>,
    ) -> impl FnOnce(Option<Duration>) -> BoxFuture<'static, CallResult> + Send + 'static {
        if judged.is_some_and(|judged| judged.standing != Standing::Verified) {
            request.share = None;
            request.unverified = true;
        } else if request.share.is_none() {
            request.share = share_of(ctx);
        }
        let upstream = Arc::clone(&self.upstream);
        let managed = self.managed.clone();
        let hot = Arc::clone(&ctx.hot);
        let trust = judged.map(|judged| (Arc::clone(&self.trust), judged));
        move |prepaid| {
            request.prepaid = prepaid;
            Box::pin(async move {
                let result = match (managed, &trust) {
                    (_, Some((_, judged))) if judged.standing == Standing::Refused => {
                        Err(if judged.login {
                            GatewayError::CredentialsRefused
                        } else {
                            GatewayError::SessionTokenRefused
                        })
                    }
                    (Some(managed), _) => managed.call(&hot, &upstream, request).await,
                    (None, _) => upstream.call(&hot, request).await,
                };
                match &trust {
                    Some((trust, judged)) if judged.login => {
                        trust.settle_login(judged.key, &result);
                    }
                    Some((trust, judged)) => trust.settle(judged.key, &result),
                    None => {}
                }
                result
            })
        }
    }
}

/// Routes a consent push's documents back to its caller (its branch) before the push
/// leaves; `409 request_id_routed` when another caller or branch holds the requestId. For
/// a caller Diia has not accepted yet (`verified` false: a session token never seen
/// accepted) the route is a reservation: released again unless Diia accepts the push, so
/// junk tokens hold no requestId and leave no routes behind (their writes are bounded by
/// the pushes under way), while nobody can take the requestId while the push is in flight.
async fn route_callback(
    desk: &RelayDesk,
    owner: Option<Owner>,
    (branch, request_id): (&str, &str),
    verified: bool,
) -> Result<Option<Box<Reservation>>, GatewayError> {
    let Some(owner) = owner else {
        return Ok(None);
    };
    let recorded = desk
        .record(&owner, branch, request_id)
        .await
        .map_err(|error| match error {
            DeskError::Taken => GatewayError::RequestIdRouted,
            DeskError::Unavailable => GatewayError::RelayUnavailable,
        })?;
    if verified {
        return Ok(None);
    }
    Ok(Some(Box::new(Reservation {
        client: owner.client,
        request_id: request_id.to_owned(),
        recorded,
    })))
}

/// A route recorded for a caller Diia had not accepted yet, kept only if Diia accepts
/// the push: the local route and, with a fleet, the Redis claim made for it.
struct Reservation {
    client: String,
    request_id: String,
    recorded: Recorded,
}

impl Reservation {
    /// Keeps the route if Diia answered the push with a 2xx; releases it otherwise (also
    /// when the push failed with an error of ours).
    async fn settle(self, desk: &RelayDesk, response: Option<&Reply>) {
        let accepted = match response {
            Some(Reply::Answer { answer, .. }) => answer.status.is_success(),
            Some(Reply::Response(response)) => response.status().is_success(),
            None => false,
        };
        if !accepted {
            desk.release(&self.client, &self.request_id, self.recorded)
                .await;
        }
    }
}

/// How long a store's answers live under these settings (stale-if-error: answers only).
fn lifetimes(hot: &Hot, store: Store) -> Lifetimes {
    let (policy, stale_if_error) = match store {
        Store::Answers => (hot.answers, hot.stale_if_error),
        Store::Sharing => (hot.sharing, Duration::ZERO),
        Store::SessionTokens => (hot.session_tokens, Duration::ZERO),
    };
    Lifetimes {
        policy,
        stale_if_error,
        longest_call: hot.upstream.longest_call(),
    }
}

/// A session token or a login pair (keyed digest) and where it stands with Diia.
#[derive(Clone, Copy)]
struct Judged {
    key: CacheKey,
    standing: Standing,
    /// A login pair (acquirer token, credentials) rather than a session token.
    login: bool,
}

/// The calling client's share of the Diia budget, when shares are enforced.
fn share_of(ctx: &Ctx) -> Option<Arc<crate::limit::Share>> {
    let (shares, caller) = (ctx.hot.limits.diia_shares.as_ref()?, ctx.caller.as_ref()?);
    Some(Arc::new(shares.share(client(caller, ctx.peer))))
}

/// Who a client is for its budgets: its managed-mode per-branch key or certificate's
/// branch, else its acquirer-wide certificate's name, else its address (whoever sits
/// behind one NAT shares the client budget, never a branch's).
fn client(caller: &Caller, peer: SocketAddr) -> Who<'_> {
    match caller {
        Caller::Branch { scope, certificate } => match (scope.as_ref(), certificate) {
            (Scope::Branch(name), _) => Who::Key(name),
            (Scope::Acquirer, Some(name)) => Who::Key(name),
            (Scope::Acquirer, None) => Who::Address(peer.ip()),
        },
        Caller::Session | Caller::Exchange => Who::Address(peer.ip()),
    }
}

/// Stage 6: the budgets this request spends. Every request but a login spends its
/// client's budget, then its class's: scans and branch calls per branch, status polls per
/// client and `requestId`, lists per client. A login is checked only against the
/// refusals of its own acquirer token and credentials, only when it has to reach Diia,
/// and spends that budget only when Diia refuses it (see [`Gateway::cached`]): a cached
/// login, or one whose credentials work, is never refused. A call with a session token
/// Diia has not accepted yet (`verified` false) spends its client's budget and, at the
/// call, `limits.unverified`, but never a branch's: anyone can name any branch.
fn limit(
    hot: &Hot,
    client: Who<'_>,
    checked: &Checked<'_>,
    verified: bool,
) -> Result<(), GatewayError> {
    let limits = &hot.limits;
    if matches!(checked, Checked::TokenExchange { .. }) {
        return Ok(());
    }
    limits.clients.check(client)?;
    match checked {
        // Per `requestId`: one request's polling never refuses another's.
        Checked::Status { request_id, .. } => {
            limits.polls.check_tagged(client, request_id.as_bytes())
        }
        Checked::OfferStatus { request_id } => limits
            .polls
            .check_tagged(client, request_id.unwrap_or_default().as_bytes()),
        Checked::Identification { .. } | Checked::Sharing { .. } | Checked::Forward { .. }
            if !verified =>
        {
            Ok(())
        }
        Checked::Identification { .. } | Checked::Sharing { .. } | Checked::Forward { .. } => {
            let who = checked.branch().map_or(client, Who::Branch);
            limits.branches.check(who)
        }
        Checked::TokenExchange { .. } => Ok(()),
    }
}

fn upstream_request(endpoint: Endpoint, head: &RequestHead, body: Bytes) -> UpstreamRequest {
    UpstreamRequest {
        endpoint,
        method: head.method.clone(),
        path_and_query: head
            .uri
            .path_and_query()
            .map_or_else(|| head.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        authorization: head.authorization.clone(),
        trace_id: head.trace_id.clone(),
        content_type: head.content_type.clone(),
        body,
        share: None,
        prepaid: None,
        unverified: false,
    }
}

/// Turns a cache-layer result into a handled request with `Cache-Status`.
fn handled(result: &CallResult, lookup: Lookup, sharing: bool) -> Result<Handled, GatewayError> {
    let answer = match result {
        Ok(answer) => answer,
        Err(error) => return Err(error.clone()),
    };
    let Some(status) = lookup.cache_status(sharing) else {
        return Err(GatewayError::SharingAlreadyRequested);
    };
    let outcome = match lookup {
        Lookup::Hit | Lookup::RemoteHit if sharing => RequestOutcome::Replayed,
        Lookup::Hit | Lookup::RemoteHit => RequestOutcome::Hit,
        Lookup::Miss { .. } => RequestOutcome::Miss,
        Lookup::Coalesced | Lookup::RemoteCoalesced => RequestOutcome::Coalesced,
        Lookup::Stale => RequestOutcome::Stale,
        Lookup::TagMismatch => return Err(GatewayError::SharingAlreadyRequested),
    };
    let outcome = match (AnswerClass::of_status(answer.status), outcome) {
        (AnswerClass::Failed, RequestOutcome::Miss) => RequestOutcome::UpstreamError,
        (_, outcome) => outcome,
    };
    Ok(Handled {
        response: Reply::Answer {
            answer: answer.clone(),
            cache_status: Some(status),
        },
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::service::{Handler, RequestBody};
    use crate::settings::Settings;

    /// A request's future is built, and copied whole, for every request: a hit pays for
    /// every byte of it. Rare paths (waiting on a call, forwarding, token bookkeeping) are
    /// boxed to keep it small; this pins that (it was 2,896 bytes before the cache's
    /// waiting path was boxed and the handler borrowed).
    #[tokio::test]
    async fn the_request_future_stays_small() {
        let mut config = crate::config::FileConfig::default();
        config.upstream.base_url = "http://127.0.0.1:9".to_owned();
        let settings = Settings::build(&config).expect("settings");
        let gateway = Arc::new(Gateway::build(&settings).expect("gateway"));
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let body = RequestBody::whole(Bytes::new());
        let request = gateway.handle(RequestHead::default(), body, peer);
        let size = std::mem::size_of_val(&request);
        assert!(size <= 2_048, "a request's future grew to {size} bytes");
    }
}
