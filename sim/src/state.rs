//! Diia's semantics as the simulator plays them: acquirers, session tokens, barcodes, branches.
//!
//! Plain data behind short `std::sync::Mutex` sections (never held across `.await`):
//! the simulator is a test double, not a hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::SimConfig;
use crate::barcode::Code;
use crate::callback::CallbackCounters;
use crate::route::Endpoint;

/// One issued barcode.
#[derive(Debug, Clone)]
struct BarcodeRecord {
    expires_at: Instant,
    expires_unix_ms: u128,
    used: bool,
    document_valid: bool,
    sharing_request: Option<String>,
}

/// Why a barcode cannot be used, with Diia's status and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarcodeRefusal {
    /// 400 "This code has been used already!"
    Used,
    /// 400 "Code has been expired!"
    Expired {
        /// Expiry time in Unix milliseconds, for `data.expirationDate`.
        expired_unix_ms: u128,
    },
    /// 404 "No record with presented code!"
    NotFound,
}

/// A Diia-like error answer: status, name, message, optional `data` JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimError {
    /// HTTP status and `code`.
    pub status: u16,
    /// Diia `name`.
    pub name: &'static str,
    /// Diia `message`.
    pub message: &'static str,
    /// Diia `data`, already JSON.
    pub data: String,
}

impl SimError {
    /// An error with empty `data`.
    pub fn new(status: u16, name: &'static str, message: &'static str) -> Self {
        Self {
            status,
            name,
            message,
            data: "{}".to_owned(),
        }
    }

    /// The JSON body Diia would send.
    pub fn body(&self) -> String {
        format!(
            r#"{{"name":"{}","message":"{}","code":{},"type":"operated","data":{}}}"#,
            self.name, self.message, self.status, self.data
        )
    }
}

impl From<BarcodeRefusal> for SimError {
    fn from(refusal: BarcodeRefusal) -> Self {
        match refusal {
            BarcodeRefusal::Used => {
                Self::new(400, "BadRequestError", "This code has been used already!")
            }
            BarcodeRefusal::Expired { expired_unix_ms } => Self {
                data: format!(
                    r#"{{"now":{},"expirationDate":{expired_unix_ms}}}"#,
                    unix_ms()
                ),
                ..Self::new(400, "BadRequestError", "Code has been expired!")
            },
            BarcodeRefusal::NotFound => {
                Self::new(404, "NotFoundError", "No record with presented code!")
            }
        }
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Everything the simulator remembers.
#[derive(Debug)]
pub struct SimState {
    config: SimConfig,
    sessions: Mutex<HashMap<String, Instant>>,
    barcodes: Mutex<HashMap<Code, BarcodeRecord>>,
    branches: Mutex<HashMap<String, String>>,
    offers: Mutex<Vec<(String, String, String)>>,
    next_id: AtomicU64,
    counters: [AtomicU64; Endpoint::ALL.len()],
    pushes: AtomicU64,
    unrouted: AtomicU64,
    connections: AtomicU64,
    callbacks: Arc<CallbackCounters>,
}

impl SimState {
    /// Fresh state for a config.
    pub fn new(config: SimConfig) -> Self {
        Self {
            config,
            sessions: Mutex::default(),
            barcodes: Mutex::default(),
            branches: Mutex::default(),
            offers: Mutex::default(),
            next_id: AtomicU64::new(1),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            pushes: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            callbacks: Arc::default(),
        }
    }

    /// The callback counters (shared with the callback sender).
    pub(crate) fn callback_counters(&self) -> Arc<CallbackCounters> {
        Arc::clone(&self.callbacks)
    }

    /// Counts one request to an endpoint (or to no endpoint).
    pub fn count(&self, endpoint: Option<Endpoint>) {
        match endpoint {
            Some(endpoint) => self.counters[endpoint.slot()].fetch_add(1, Ordering::Relaxed),
            None => self.unrouted.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Counts one accepted connection (how many a client's pools opened).
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections accepted since start (or the last reset).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requests seen by an endpoint since start (or the last reset).
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.counters[endpoint.slot()].load(Ordering::Relaxed)
    }

    /// The stats JSON served at `GET /sim/stats`.
    pub fn stats_json(&self) -> String {
        let mut total = 0;
        let per_endpoint: Vec<String> = Endpoint::ALL
            .iter()
            .map(|&endpoint| {
                let n = self.requests(endpoint);
                total += n;
                format!(r#""{}":{n}"#, endpoint.label())
            })
            .collect();
        format!(
            r#"{{"requests":{{{}}},"total":{total},"unrouted":{},"pushes":{},"connections":{},{}}}"#,
            per_endpoint.join(","),
            self.unrouted.load(Ordering::Relaxed),
            self.pushes.load(Ordering::Relaxed),
            self.connections(),
            self.callbacks.json_members()
        )
    }

    /// Zeroes the counters.
    pub fn reset_counters(&self) {
        for counter in &self.counters {
            counter.store(0, Ordering::Relaxed);
        }
        self.pushes.store(0, Ordering::Relaxed);
        self.unrouted.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.callbacks.reset();
    }

    fn fresh_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:016x}", n, fastrand::u64(..))
    }

    /// `GET /api/v1/auth/acquirer/{token}`: a JWT-shaped session token with `exp`.
    pub fn exchange_token(
        &self,
        acquirer_token: &str,
        authorization: Option<&[u8]>,
    ) -> Result<String, SimError> {
        let Some(acquirer) = self
            .config
            .acquirers
            .iter()
            .find(|a| a.token == acquirer_token)
        else {
            return Err(SimError::new(
                401,
                "UnauthorizedError",
                "Acquirer not found by the provided token",
            ));
        };
        // `Basic <auth acquirer token>` (official PHP, Java, .NET) or, as Diia's official
        // Python SDK sends it, `Bearer <acquirer token>`; both log in at Diia.
        if let Some(expected) = &acquirer.auth_token {
            let basic = authorization.and_then(|h| h.strip_prefix(b"Basic "));
            let bearer = authorization.and_then(|h| h.strip_prefix(b"Bearer "));
            if basic != Some(expected.as_bytes()) && bearer != Some(acquirer.token.as_bytes()) {
                return Err(SimError::new(401, "UnauthorizedError", "Not authorized"));
            }
        }
        let lifetime = self.config.session_ttl;
        let exp = SystemTime::now()
            .checked_add(lifetime)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"_id":"{}","sessionType":"acquirer","exp":{exp},"jti":"{}"}}"#,
            acquirer.token.len(),
            self.fresh_id()
        ));
        let signature = URL_SAFE_NO_PAD.encode(self.fresh_id());
        let token = format!("{header}.{payload}.{signature}");
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, expires| *expires > Instant::now());
        sessions.insert(token.clone(), Instant::now() + lifetime);
        Ok(token)
    }

    /// Invalidates every session token (a Diia-side revocation or restart).
    pub fn revoke_sessions(&self) {
        lock(&self.sessions).clear();
    }

    /// Checks `Authorization: Bearer <session token>` like Diia's gateway.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<(), SimError> {
        let Some(header) = authorization else {
            return Err(SimError::new(401, "UnauthorizedError", "Empty token"));
        };
        let token = header
            .get(7..)
            .filter(|_| header.len() > 7 && header[..7].eq_ignore_ascii_case(b"bearer "))
            .and_then(|t| std::str::from_utf8(t).ok())
            .ok_or_else(|| SimError::new(401, "UnauthorizedError", "Invalid token"))?;
        match lock(&self.sessions).get(token) {
            Some(expires) if *expires > Instant::now() => Ok(()),
            _ => Err(SimError::new(401, "UnauthorizedError", "Not authorized")),
        }
    }

    /// Issues a barcode as the Diia app does when a user taps "share" or "verify".
    pub fn issue_barcode(&self, document_valid: bool) -> Code {
        let mut barcodes = lock(&self.barcodes);
        loop {
            let base = fastrand::u64(100_000_000_000..=999_999_999_999);
            let Some(barcode) = Code::issue(base) else {
                continue;
            };
            if barcodes.contains_key(&barcode) {
                continue;
            }
            barcodes.insert(barcode, self.fresh_record(document_valid));
            return barcode;
        }
    }

    fn fresh_record(&self, document_valid: bool) -> BarcodeRecord {
        BarcodeRecord {
            expires_at: Instant::now() + self.config.barcode_ttl,
            expires_unix_ms: unix_ms() + self.config.barcode_ttl.as_millis(),
            used: false,
            document_valid,
            sharing_request: None,
        }
    }

    /// Uses a barcode once; `sharing_request` records the requestId of a push.
    fn use_barcode(
        &self,
        barcode: Code,
        sharing_request: Option<&str>,
    ) -> Result<bool, BarcodeRefusal> {
        let mut barcodes = lock(&self.barcodes);
        if self.config.auto_issue && !barcodes.contains_key(&barcode) {
            barcodes.insert(barcode, self.fresh_record(true));
        }
        let record = barcodes.get_mut(&barcode).ok_or(BarcodeRefusal::NotFound)?;
        if record.used {
            return Err(BarcodeRefusal::Used);
        }
        if record.expires_at <= Instant::now() {
            return Err(BarcodeRefusal::Expired {
                expired_unix_ms: record.expires_unix_ms,
            });
        }
        record.used = true;
        record.sharing_request = sharing_request.map(str::to_owned);
        Ok(record.document_valid)
    }

    /// `document-identification`: `{"success": bool}` or a barcode refusal.
    pub fn identify(&self, barcode: Code) -> Result<bool, SimError> {
        self.use_barcode(barcode, None).map_err(SimError::from)
    }

    /// `document-request` by barcode: pushes a consent request to the phone.
    pub fn share_barcode(&self, barcode: Code, request_id: &str) -> Result<(), SimError> {
        self.use_barcode(barcode, Some(request_id))
            .map_err(SimError::from)?;
        self.pushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `document-request` by QR code: the simulator accepts any non-empty code once per call.
    pub fn share_qrcode(&self) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
    }

    /// `document-request/status`.
    pub fn sharing_status(
        &self,
        barcode: Code,
        request_id: &str,
    ) -> Result<&'static str, SimError> {
        let barcodes = lock(&self.barcodes);
        match barcodes.get(&barcode) {
            Some(record) if record.sharing_request.as_deref() == Some(request_id) => {
                Ok("processing")
            }
            _ => Err(SimError::new(
                404,
                "NotFoundError",
                "Document request not found",
            )),
        }
    }

    /// `POST branch`: stores the body, answers the new id.
    pub fn create_branch(&self, body: String) -> String {
        let id = self.fresh_id();
        lock(&self.branches).insert(id.clone(), body);
        id
    }

    /// `PUT branch/{id}`.
    pub fn update_branch(&self, id: &str, body: String) -> Result<(), SimError> {
        match lock(&self.branches).get_mut(id) {
            Some(stored) => {
                *stored = body;
                Ok(())
            }
            None => Err(SimError::new(404, "NotFoundError", "Branch not found")),
        }
    }

    /// `GET branch/{id}`: the stored body with `_id`.
    pub fn branch(&self, id: &str) -> Result<String, SimError> {
        lock(&self.branches)
            .get(id)
            .map(|body| with_id(body, id))
            .ok_or_else(|| SimError::new(404, "NotFoundError", "Branch not found"))
    }

    /// `DELETE branch/{id}`.
    pub fn delete_branch(&self, id: &str) -> Result<(), SimError> {
        lock(&self.branches)
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| SimError::new(404, "NotFoundError", "Branch not found"))
    }

    /// `GET branches`.
    pub fn branches_json(&self) -> String {
        let branches = lock(&self.branches);
        let items: Vec<String> = branches
            .iter()
            .map(|(id, body)| with_id(body, id))
            .collect();
        format!(
            r#"{{"total":{},"branches":[{}]}}"#,
            items.len(),
            items.join(",")
        )
    }

    /// `POST branch/{id}/offer`.
    pub fn create_offer(&self, branch_id: &str, body: String) -> Result<String, SimError> {
        if !lock(&self.branches).contains_key(branch_id) {
            return Err(SimError::new(404, "NotFoundError", "Branch not found"));
        }
        let id = self.fresh_id();
        lock(&self.offers).push((branch_id.to_owned(), id.clone(), body));
        Ok(id)
    }

    /// `GET branch/{id}/offers`.
    pub fn offers_json(&self, branch_id: &str) -> String {
        let offers = lock(&self.offers);
        let items: Vec<String> = offers
            .iter()
            .filter(|(branch, _, _)| branch == branch_id)
            .map(|(_, id, body)| with_id(body, id))
            .collect();
        format!(
            r#"{{"total":{},"offers":[{}]}}"#,
            items.len(),
            items.join(",")
        )
    }

    /// `DELETE branch/{id}/offer/{offerId}`.
    pub fn delete_offer(&self, branch_id: &str, offer_id: &str) -> Result<(), SimError> {
        let mut offers = lock(&self.offers);
        let before = offers.len();
        offers.retain(|(branch, id, _)| !(branch == branch_id && id == offer_id));
        if offers.len() == before {
            return Err(SimError::new(404, "NotFoundError", "Offer not found"));
        }
        Ok(())
    }

    /// `offer-request/dynamic`: a deep link.
    pub fn deeplink(&self, branch_id: &str, request_id: &str) -> String {
        let encoded = STANDARD.encode(request_id);
        format!(
            "https://diia.app/acquirers/offer-request/dynamic/{}/{branch_id}/{encoded}",
            self.fresh_id()
        )
    }
}

impl SimState {
    /// The config this state was built with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }
}

fn with_id(body: &str, id: &str) -> String {
    let trimmed = body.trim();
    match trimmed.strip_prefix('{') {
        Some(rest) if rest.trim_start().starts_with('}') => format!(r#"{{"_id":"{id}"}}"#),
        Some(rest) => format!(r#"{{"_id":"{id}",{rest}"#),
        None => format!(r#"{{"_id":"{id}"}}"#),
    }
}

/// Locks, recovering from poisoning: a panicked test thread must not wedge the simulator.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
