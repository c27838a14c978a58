//! The rows behind `put`, `lease_due` and `settle`: sealing a callback before it reaches
//! the writer, and the statements the writer runs for it.

use rusqlite::{Connection, OptionalExtension, params};

use super::super::{
    Envelope, Ingest, LeaseToken, Leased, PutOutcome, RecordId, RecordMeta, Route, Settle, State,
    StoreError, StoreResult,
};
use super::routes::{live_route, request_macs};
use super::{
    FIELD_ENVELOPE, FIELD_REQUEST, FIELD_ROUTE, Keyring, MAC_BODY, MAC_DEDUP, MAC_REQUEST, Mac,
    Macs, ms, small, unms,
};

pub(super) fn meta(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordMeta> {
    let id: Vec<u8> = row.get(0)?;
    let state: i64 = row.get(2)?;
    Ok(RecordMeta {
        id: RecordId(id.try_into().unwrap_or([0; 16])),
        acquirer: row.get(1)?,
        state: State::from_code(state).unwrap_or(State::Dead),
        size: unms(row.get(3)?),
        received_ms: unms(row.get(4)?),
        updated_ms: unms(row.get(5)?),
        due_ms: unms(row.get(6)?),
        attempts: small(row.get(7)?),
        duplicates: small(row.get(8)?),
        conflicts: small(row.get(9)?),
        key_id: row.get(10)?,
    })
}

pub(super) fn random_lease() -> StoreResult<i64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|_| StoreError::Seal)?;
    Ok(i64::from_be_bytes(b))
}

/// What a put carries to the writer: everything sealed or MACed already.
pub(super) struct Sealed {
    id: RecordId,
    acquirer: String,
    key_id: String,
    dedup: Vec<(String, Mac)>,
    body: Vec<(String, Mac)>,
    request_mac: Mac,
    /// MAC(acquirer, requestId) under every listed key: the route lookup of an unrouted put.
    request_macs: Macs,
    size: i64,
    request: Vec<u8>,
    envelope: Vec<u8>,
    route: Option<Vec<u8>>,
}

pub(super) fn seal_ingest(keys: &Keyring, ingest: &Ingest) -> StoreResult<Sealed> {
    let id = RecordId::random().ok_or(StoreError::Seal)?;
    let acq = ingest.acquirer.as_str();
    let env = &ingest.envelope;
    let request_id = env.request_id.as_bytes();
    // `None` and `Some("")` must not collide: a leading flag byte.
    let action: Vec<u8> = match &env.action {
        Some(a) => [&[1u8][..], a.as_bytes()].concat(),
        None => vec![0u8],
    };
    let plain = env.encode().ok_or(StoreError::Seal)?;
    let envelope = keys
        .seal(id, acq, FIELD_ENVELOPE, &plain)
        .ok_or(StoreError::Seal)?;
    let request = keys
        .seal(id, acq, FIELD_REQUEST, request_id)
        .ok_or(StoreError::Seal)?;
    let route = match &ingest.route {
        Some(route) => Some(
            keys.seal(
                id,
                acq,
                FIELD_ROUTE,
                &route.encode().ok_or(StoreError::Seal)?,
            )
            .ok_or(StoreError::Seal)?,
        ),
        None => None,
    };
    Ok(Sealed {
        id,
        acquirer: ingest.acquirer.clone(),
        key_id: keys.current_id().to_owned(),
        dedup: keys.macs(MAC_DEDUP, &[acq.as_bytes(), request_id, &action]),
        body: keys.macs(MAC_BODY, &[env.content_type.as_bytes(), &env.body]),
        request_mac: keys.mac(MAC_REQUEST, &[acq.as_bytes(), request_id]),
        request_macs: request_macs(keys, acq, &env.request_id),
        size: i64::try_from(env.body.len()).unwrap_or(i64::MAX),
        request,
        envelope,
        route,
    })
}

/// Stores a sealed callback unless it is a duplicate. Unrouted, it takes the live route of
/// its request if one is recorded (in this transaction: no race with `record_route`).
pub(super) fn put_sealed(
    conn: &Connection,
    keys: &Keyring,
    s: &Sealed,
    now: i64,
) -> StoreResult<PutOutcome> {
    for (key_id, dedup) in &s.dedup {
        let found: Option<(Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT id, body_mac FROM records WHERE acquirer = ?1 AND dedup = ?2 AND key_id = ?3",
                params![s.acquirer, dedup.as_slice(), key_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((id, body_mac)) = found else {
            continue;
        };
        let id = RecordId(id.try_into().unwrap_or([0; 16]));
        let same = s
            .body
            .iter()
            .any(|(k, m)| k == key_id && m.as_slice() == body_mac.as_slice());
        let column = if same { "duplicates" } else { "conflicts" };
        conn.execute(
            &format!("UPDATE records SET {column} = {column} + 1 WHERE id = ?1"),
            params![id.0.as_slice()],
        )?;
        return Ok(if same {
            PutOutcome::Duplicate(id)
        } else {
            PutOutcome::Conflict(id)
        });
    }
    let resolved = match &s.route {
        Some(_) => None,
        None => match live_route(conn, keys, &s.acquirer, &s.request_macs, now)? {
            Some(route) => Some(
                keys.seal(
                    s.id,
                    &s.acquirer,
                    FIELD_ROUTE,
                    &route.encode().ok_or(StoreError::Seal)?,
                )
                .ok_or(StoreError::Seal)?,
            ),
            None => None,
        },
    };
    let route = s.route.as_ref().or(resolved.as_ref());
    let state = if route.is_some() {
        State::Pending
    } else {
        State::Orphan
    };
    let dedup = s.dedup.first().map(|(_, m)| *m).ok_or(StoreError::Seal)?;
    let body = s.body.first().map(|(_, m)| *m).ok_or(StoreError::Seal)?;
    conn.execute(
        "INSERT INTO records (id, acquirer, key_id, dedup, request_mac, body_mac, size, state,
           received_ms, updated_ms, due_ms, attempts, lease, duplicates, conflicts,
           request, envelope, route)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9, 0, NULL, 0, 0, ?10, ?11, ?12)",
        params![
            s.id.0.as_slice(),
            s.acquirer,
            s.key_id,
            dedup.as_slice(),
            s.request_mac.as_slice(),
            body.as_slice(),
            s.size,
            state.code(),
            now,
            s.request,
            s.envelope,
            route,
        ],
    )?;
    Ok(PutOutcome::Stored(s.id, state))
}

/// A leased row before opening.
pub(super) struct RawLease {
    pub(super) id: RecordId,
    pub(super) acquirer: String,
    pub(super) attempts: u32,
    pub(super) received_ms: u64,
    pub(super) lease: LeaseToken,
    pub(super) envelope: Option<Vec<u8>>,
    pub(super) route: Option<Vec<u8>>,
}

pub(super) fn lease_rows(
    conn: &Connection,
    now: i64,
    until: i64,
    limit: i64,
) -> StoreResult<Vec<RawLease>> {
    conn.execute(
        "UPDATE records SET state = ?1, lease = NULL WHERE state = ?2 AND due_ms <= ?3",
        params![State::Pending.code(), State::Delivering.code(), now],
    )?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, acquirer, attempts, received_ms, envelope, route FROM records
         WHERE state = ?1 AND due_ms <= ?2 ORDER BY due_ms LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![State::Pending.code(), now, limit], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok(RawLease {
                id: RecordId(id.try_into().unwrap_or([0; 16])),
                acquirer: r.get(1)?,
                attempts: small(r.get(2)?).saturating_add(1),
                received_ms: unms(r.get(3)?),
                lease: LeaseToken(0),
                envelope: r.get(4)?,
                route: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut leased = Vec::with_capacity(rows.len());
    for mut row in rows {
        row.lease = LeaseToken(random_lease()?);
        conn.execute(
            "UPDATE records SET state = ?1, due_ms = ?2, attempts = attempts + 1, lease = ?3,
               updated_ms = ?4 WHERE id = ?5",
            params![
                State::Delivering.code(),
                until,
                row.lease.0,
                now,
                row.id.0.as_slice()
            ],
        )?;
        leased.push(row);
    }
    Ok(leased)
}

pub(super) fn open_lease(keys: &Keyring, raw: RawLease) -> Result<Leased, RecordId> {
    let id = raw.id;
    let envelope = raw
        .envelope
        .and_then(|e| keys.open(id, &raw.acquirer, FIELD_ENVELOPE, &e))
        .and_then(|p| Envelope::decode(&p))
        .ok_or(id)?;
    let route = raw
        .route
        .and_then(|r| keys.open(id, &raw.acquirer, FIELD_ROUTE, &r))
        .and_then(|p| Route::decode(&p))
        .ok_or(id)?;
    Ok(Leased {
        id,
        acquirer: raw.acquirer,
        attempts: raw.attempts,
        received_ms: raw.received_ms,
        lease: raw.lease,
        envelope,
        route,
    })
}

pub(super) fn settle_row(
    conn: &Connection,
    id: RecordId,
    lease: LeaseToken,
    outcome: Settle,
    now: i64,
) -> StoreResult<bool> {
    let changed = match outcome {
        Settle::Delivered => conn.execute(
            "UPDATE records SET state = ?1, updated_ms = ?2, due_ms = ?2, lease = NULL,
               request = NULL, envelope = NULL, route = NULL
             WHERE id = ?3 AND state = ?4 AND lease = ?5",
            params![
                State::Delivered.code(),
                now,
                id.0.as_slice(),
                State::Delivering.code(),
                lease.0
            ],
        )?,
        Settle::RetryAt(due) => conn.execute(
            "UPDATE records SET state = ?1, updated_ms = ?2, due_ms = ?3, lease = NULL
             WHERE id = ?4 AND state = ?5 AND lease = ?6",
            params![
                State::Pending.code(),
                now,
                ms(due),
                id.0.as_slice(),
                State::Delivering.code(),
                lease.0
            ],
        )?,
        Settle::Dead => conn.execute(
            "UPDATE records SET state = ?1, updated_ms = ?2, due_ms = ?2, lease = NULL
             WHERE id = ?3 AND state = ?4 AND lease = ?5",
            params![
                State::Dead.code(),
                now,
                id.0.as_slice(),
                State::Delivering.code(),
                lease.0
            ],
        )?,
    };
    Ok(changed == 1)
}
