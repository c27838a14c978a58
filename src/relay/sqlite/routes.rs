//! Routes at rest: `(acquirer, MAC of requestId) → sealed Route` until `route_ttl`, and the
//! statements that tie callbacks to them inside the writer's transaction, so a route and
//! its callback can arrive in either order without a race.
//!
//! A route's sealed value is bound (associated data) to the MAC that keys its row, so a
//! value copied onto another requestId's row does not open. Only the acquirer's name and
//! the times are clear.

use rusqlite::{Connection, OptionalExtension, params};
use subtle::{Choice, ConstantTimeEq};

use super::super::{
    Envelope, Owner, RecordId, Route, RouteOutcome, State, StoreError, StoreResult,
};
use super::{FIELD_ENVELOPE, FIELD_ROUTE, Keyring, MAC_REQUEST, Mac, Macs, ms};

/// The `routes` table (schema version 2).
pub(super) const ROUTES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS routes (
  acquirer    TEXT NOT NULL,
  request_mac BLOB NOT NULL,
  key_id      TEXT NOT NULL,
  route       BLOB NOT NULL,
  created_ms  INTEGER NOT NULL,
  expires_ms  INTEGER NOT NULL,
  PRIMARY KEY (acquirer, request_mac)
);
CREATE INDEX IF NOT EXISTS routes_expires ON routes (expires_ms);
";

/// The sealed field's name for a route row (a record's own route uses `route`).
const FIELD_ROUTE_ROW: &str = "routes.route";
/// MAC purpose for comparing callers in constant time.
const MAC_CLIENT: &str = "client";

/// The binder of a route row's sealed value: the row's MAC, as a record id.
fn binder(mac: &Mac) -> RecordId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&mac[..16]);
    RecordId(id)
}

/// MACs of (acquirer, requestId) under every listed key, the sealing key's first.
pub(super) fn request_macs(keys: &Keyring, acquirer: &str, request_id: &str) -> Macs {
    keys.macs(MAC_REQUEST, &[acquirer.as_bytes(), request_id.as_bytes()])
}

/// Whether `client` is the route's caller, compared as MACs in constant time.
fn same_client(keys: &Keyring, route: &Route, client: &str) -> bool {
    let ours = keys.mac(MAC_CLIENT, &[route.client.as_bytes()]);
    let theirs = keys.mac(MAC_CLIENT, &[client.as_bytes()]);
    ours.ct_eq(&theirs).into()
}

/// Whether `owner` owns the route: its client is the route's caller, or both carry a
/// login and it is the route's. Both compared as MACs in constant time, whatever the
/// first gives.
fn owned_by(keys: &Keyring, route: &Route, owner: &Owner) -> bool {
    let mac = |text: &str| keys.mac(MAC_CLIENT, &[text.as_bytes()]);
    let client = mac(&route.client).ct_eq(&mac(&owner.client));
    let both = Choice::from(u8::from(route.login.is_some() && owner.login.is_some()));
    let login = mac(route.login.as_deref().unwrap_or_default())
        .ct_eq(&mac(owner.login.as_deref().unwrap_or_default()));
    (client | (both & login)).into()
}

/// The live route (expiring after `now`) for the request, under whichever listed key wrote it.
pub(super) fn live_route(
    conn: &Connection,
    keys: &Keyring,
    acquirer: &str,
    macs: &Macs,
    now: i64,
) -> StoreResult<Option<Route>> {
    for (key_id, mac) in macs {
        let sealed: Option<Vec<u8>> = conn
            .prepare_cached(
                "SELECT route FROM routes WHERE acquirer = ?1 AND request_mac = ?2
                   AND key_id = ?3 AND expires_ms > ?4",
            )?
            .query_row(params![acquirer, mac.as_slice(), key_id, now], |r| r.get(0))
            .optional()?;
        if let Some(sealed) = sealed {
            let id = binder(mac);
            let route = keys
                .open(id, acquirer, FIELD_ROUTE_ROW, &sealed)
                .and_then(|p| Route::decode(&p))
                .ok_or(StoreError::Unreadable(id))?;
            return Ok(Some(route));
        }
    }
    Ok(None)
}

/// Removes the request's live route if it names `client`: a route recorded before a push
/// that Diia did not accept. `false` when there is none, or it names someone else.
pub(super) fn release_route(
    conn: &Connection,
    keys: &Keyring,
    acquirer: &str,
    macs: &Macs,
    client: &str,
    now: i64,
) -> StoreResult<bool> {
    let Some(route) = live_route(conn, keys, acquirer, macs, now)? else {
        return Ok(false);
    };
    if !same_client(keys, &route, client) {
        return Ok(false);
    }
    let mut removed = 0;
    for (_, mac) in macs {
        removed += conn
            .prepare_cached("DELETE FROM routes WHERE acquirer = ?1 AND request_mac = ?2")?
            .execute(params![acquirer, mac.as_slice()])?;
    }
    Ok(removed > 0)
}

/// Records a route unless a live one exists; a new route also routes the request's orphans.
pub(super) fn record_route(
    conn: &Connection,
    keys: &Keyring,
    acquirer: &str,
    macs: &Macs,
    route: &Route,
    created: i64,
    expires: i64,
) -> StoreResult<RouteOutcome> {
    if let Some(found) = live_route(conn, keys, acquirer, macs, created)? {
        // The same branch, and the same client or login (a push retried after the caller
        // logged in again): the first route is kept.
        if !found.same_owner(route) {
            return Ok(RouteOutcome::Taken);
        }
        // A retried push: the callback may come later than the first push's TTL.
        for (_, mac) in macs {
            conn.execute(
                "UPDATE routes SET expires_ms = MAX(expires_ms, ?1)
                 WHERE acquirer = ?2 AND request_mac = ?3",
                params![expires, acquirer, mac.as_slice()],
            )?;
        }
        return Ok(RouteOutcome::Same);
    }
    // Expired rows for this request (under any key) give way.
    for (_, mac) in macs {
        conn.execute(
            "DELETE FROM routes WHERE acquirer = ?1 AND request_mac = ?2",
            params![acquirer, mac.as_slice()],
        )?;
    }
    let (key_id, mac) = macs.first().ok_or(StoreError::Seal)?;
    let plain = route.encode().ok_or(StoreError::Seal)?;
    let sealed = keys
        .seal(binder(mac), acquirer, FIELD_ROUTE_ROW, &plain)
        .ok_or(StoreError::Seal)?;
    conn.execute(
        "INSERT INTO routes (acquirer, request_mac, key_id, route, created_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![acquirer, mac.as_slice(), key_id, sealed, created, expires],
    )?;
    route_orphans(conn, keys, acquirer, macs, route, created)?;
    Ok(RouteOutcome::Recorded)
}

/// Turns the request's orphans into `pending` records carrying `route`, due now.
pub(super) fn route_orphans(
    conn: &Connection,
    keys: &Keyring,
    acquirer: &str,
    macs: &Macs,
    route: &Route,
    now: i64,
) -> StoreResult<Vec<RecordId>> {
    let plain = route.encode().ok_or(StoreError::Seal)?;
    let mut routed = Vec::new();
    for (key_id, mac) in macs {
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM records WHERE acquirer = ?1 AND request_mac = ?2
               AND key_id = ?3 AND state = ?4",
        )?;
        let ids = stmt
            .query_map(
                params![acquirer, mac.as_slice(), key_id, State::Orphan.code()],
                |r| r.get::<_, Vec<u8>>(0),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        for id in ids {
            let id = RecordId(id.try_into().unwrap_or([0; 16]));
            let sealed = keys
                .seal(id, acquirer, FIELD_ROUTE, &plain)
                .ok_or(StoreError::Seal)?;
            conn.execute(
                "UPDATE records SET state = ?1, route = ?2, due_ms = ?3, updated_ms = ?3
                 WHERE id = ?4",
                params![State::Pending.code(), sealed, now, id.0.as_slice()],
            )?;
            routed.push(id);
        }
    }
    Ok(routed)
}

/// A routed, undelivered record of the request, as stored.
struct Candidate {
    id: RecordId,
    received_ms: i64,
    envelope: Vec<u8>,
    route: Vec<u8>,
}

/// The request's routed, undelivered records (pending or delivering), oldest first.
fn candidates(conn: &Connection, acquirer: &str, macs: &Macs) -> StoreResult<Vec<Candidate>> {
    let mut out = Vec::new();
    for (key_id, mac) in macs {
        let mut stmt = conn.prepare_cached(
            "SELECT id, received_ms, envelope, route FROM records
             WHERE acquirer = ?1 AND request_mac = ?2 AND key_id = ?3 AND state IN (?4, ?5)
               AND envelope IS NOT NULL AND route IS NOT NULL",
        )?;
        let rows = stmt.query_map(
            params![
                acquirer,
                mac.as_slice(),
                key_id,
                State::Pending.code(),
                State::Delivering.code()
            ],
            |r| {
                let id: Vec<u8> = r.get(0)?;
                Ok(Candidate {
                    id: RecordId(id.try_into().unwrap_or([0; 16])),
                    received_ms: r.get(1)?,
                    envelope: r.get(2)?,
                    route: r.get(3)?,
                })
            },
        )?;
        for row in rows {
            out.push(row?);
        }
    }
    out.sort_by_key(|c| (c.received_ms, c.id));
    Ok(out)
}

/// The oldest routed, undelivered record of the request whose route `owner` owns.
pub(super) fn take_for(
    conn: &Connection,
    keys: &Keyring,
    acquirer: &str,
    macs: &Macs,
    owner: &Owner,
) -> StoreResult<Option<(RecordId, Envelope)>> {
    for c in candidates(conn, acquirer, macs)? {
        let route = keys
            .open(c.id, acquirer, FIELD_ROUTE, &c.route)
            .and_then(|p| Route::decode(&p))
            .ok_or(StoreError::Unreadable(c.id))?;
        if !owned_by(keys, &route, owner) {
            continue;
        }
        let envelope = keys
            .open(c.id, acquirer, FIELD_ENVELOPE, &c.envelope)
            .and_then(|p| Envelope::decode(&p))
            .ok_or(StoreError::Unreadable(c.id))?;
        return Ok(Some((c.id, envelope)));
    }
    Ok(None)
}

/// Marks a pulled record delivered (a tombstone), if it is the request's and `owner`'s.
pub(super) fn ack_pulled(
    conn: &Connection,
    keys: &Keyring,
    acquirer: &str,
    macs: &Macs,
    owner: &Owner,
    id: RecordId,
    now: i64,
) -> StoreResult<bool> {
    let Some(c) = candidates(conn, acquirer, macs)?
        .into_iter()
        .find(|c| c.id == id)
    else {
        return Ok(false);
    };
    let route = keys
        .open(c.id, acquirer, FIELD_ROUTE, &c.route)
        .and_then(|p| Route::decode(&p))
        .ok_or(StoreError::Unreadable(c.id))?;
    if !owned_by(keys, &route, owner) {
        return Ok(false);
    }
    let changed = conn.execute(
        "UPDATE records SET state = ?1, updated_ms = ?2, due_ms = ?2, lease = NULL,
           request = NULL, envelope = NULL, route = NULL
         WHERE id = ?3 AND state IN (?4, ?5)",
        params![
            State::Delivered.code(),
            now,
            id.0.as_slice(),
            State::Pending.code(),
            State::Delivering.code()
        ],
    )?;
    Ok(changed == 1)
}

/// Deletes the request's routes (erase).
pub(super) fn erase_routes(conn: &Connection, acquirer: &str, macs: &Macs) -> StoreResult<()> {
    for (_, mac) in macs {
        conn.execute(
            "DELETE FROM routes WHERE acquirer = ?1 AND request_mac = ?2",
            params![acquirer, mac.as_slice()],
        )?;
    }
    Ok(())
}

/// Deletes routes expired at `now`; returns how many.
pub(super) fn purge_routes(conn: &Connection, now: i64) -> StoreResult<u64> {
    Ok(conn.execute("DELETE FROM routes WHERE expires_ms <= ?1", params![now])? as u64)
}

/// `ms` for a TTL added to `now`, saturating.
pub(super) fn expiry(now_ms: u64, ttl: std::time::Duration) -> i64 {
    ms(now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)))
}
