//! The relay store's routes over a real SQLite file in a temp dir: a route and its callback
//! in either order, one requestId one caller (409 material), durability (reopen, `kill -9`,
//! a version 1 file), expiry, nothing in clear at rest, and the pull side's authorisation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use diia_gateway::relay::{
    CallbackStore, Envelope, Fsync, Ingest, Keyring, Owner, PutOutcome, RecordId, Retention, Route,
    RouteOutcome, SqliteStore, State,
};

const K1: &str = "k1 = 3f6c1d2e4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const K2: &str = "k2 = 9a0b1c2d3e4f5061728394a5b6c7d8e9f0e1d2c3b4a5968778695a4b3c2d1e0f";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, Keyring::parse(K1).unwrap(), Fsync::Always).unwrap()
}

fn route(client: &str, branch: &str) -> Route {
    Route {
        client: client.to_owned(),
        branch: branch.to_owned(),
        target: "TARGET-MARKER-backend".to_owned(),
        login: None,
    }
}

fn callback(request_id: &str, action: Option<&str>, body: &[u8]) -> Ingest {
    Ingest {
        acquirer: "acq".to_owned(),
        envelope: Envelope {
            request_id: request_id.to_owned(),
            action: action.map(str::to_owned),
            content_type: "multipart/form-data; boundary=x".to_owned(),
            body: Bytes::copy_from_slice(body),
        },
        route: None,
    }
}

fn stored(outcome: PutOutcome) -> (RecordId, State) {
    match outcome {
        PutOutcome::Stored(id, state) => (id, state),
        other => panic!("expected a new record, got {other:?}"),
    }
}

async fn record(store: &SqliteStore, request_id: &str, r: Route, now: u64) -> RouteOutcome {
    store
        .record_route("acq".into(), request_id.into(), r, TTL, now)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_callback_after_its_route_is_pending_with_that_route() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r = route("key:alice", "b-1");
    assert_eq!(
        record(&store, "req-1", r.clone(), 1_000).await,
        RouteOutcome::Recorded
    );
    // Ingress passes no route: the store finds it in the put's own transaction.
    let (id, state) = stored(
        store
            .put(callback("req-1", None, b"pkg"), 2_000)
            .await
            .unwrap(),
    );
    assert_eq!(state, State::Pending);
    let leased = store.lease_due(2_000, LEASE, 10).await.unwrap();
    assert_eq!((leased.len(), leased[0].id), (1, id));
    assert_eq!(leased[0].route, r);
    // Another acquirer's callback for the same requestId is not routed by it.
    let mut other = callback("req-1", None, b"pkg");
    other.acquirer = "acq2".into();
    assert_eq!(
        stored(store.put(other, 2_000).await.unwrap()).1,
        State::Orphan
    );
}

#[tokio::test]
async fn a_route_after_its_callback_turns_the_orphan_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (first, s1) = stored(
        store
            .put(callback("req-2", Some("a1"), b"one"), 1_000)
            .await
            .unwrap(),
    );
    let (second, s2) = stored(
        store
            .put(callback("req-2", Some("a2"), b"two"), 1_001)
            .await
            .unwrap(),
    );
    assert_eq!((s1, s2), (State::Orphan, State::Orphan));
    assert!(store.lease_due(5_000, LEASE, 10).await.unwrap().is_empty());
    let r = route("key:alice", "b-1");
    assert_eq!(
        record(&store, "req-2", r.clone(), 5_000).await,
        RouteOutcome::Recorded
    );
    let stats = store.stats(5_000).await.unwrap();
    assert_eq!(
        (stats.count(State::Orphan), stats.count(State::Pending)),
        (0, 2)
    );
    let mut leased: Vec<_> = store
        .lease_due(5_000, LEASE, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.id, l.route))
        .collect();
    leased.sort_by_key(|(id, _)| *id);
    let mut want = vec![(first, r.clone()), (second, r)];
    want.sort_by_key(|(id, _)| *id);
    assert_eq!(leased, want);
}

#[tokio::test]
async fn a_route_and_its_callback_racing_in_either_order_leave_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Queued together (a write is queued when called, not when awaited), so many land in
    // the same group commit: even requests route first, odd ones call back first.
    let mut racing = Vec::new();
    for i in 0..100 {
        let request = format!("race-{i}");
        let r = route("key:alice", "b-1");
        let (route, put) = if i % 2 == 0 {
            let route = store.record_route("acq".into(), request.clone(), r, TTL, 1_000);
            (route, store.put(callback(&request, None, b"pkg"), 1_000))
        } else {
            let put = store.put(callback(&request, None, b"pkg"), 1_000);
            (
                store.record_route("acq".into(), request, r, TTL, 1_000),
                put,
            )
        };
        racing.push(tokio::spawn(async move {
            (route.await.unwrap(), put.await.unwrap())
        }));
    }
    for r in racing {
        let (outcome, _) = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome, RouteOutcome::Recorded);
    }
    let stats = store.stats(1_000).await.unwrap();
    assert_eq!(
        (stats.count(State::Pending), stats.count(State::Orphan)),
        (100, 0)
    );
}

#[tokio::test]
async fn a_request_routed_for_another_client_or_branch_is_taken_and_a_retry_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r = route("key:alice", "b-1");
    assert_eq!(
        record(&store, "req-3", r.clone(), 1_000).await,
        RouteOutcome::Recorded
    );
    assert_eq!(
        record(&store, "req-3", route("key:mallory", "b-1"), 1_001).await,
        RouteOutcome::Taken
    );
    assert_eq!(
        record(&store, "req-3", route("key:alice", "b-2"), 1_002).await,
        RouteOutcome::Taken
    );
    assert_eq!(
        record(&store, "req-3", r.clone(), 1_003).await,
        RouteOutcome::Same
    );
    // The first route stands.
    let now = 1_004;
    let got = store
        .route("acq".into(), "req-3".into(), now)
        .await
        .unwrap();
    assert_eq!(got, Some(r.clone()));
    // The same requestId under another acquirer is its own.
    assert_eq!(
        store
            .record_route(
                "acq2".into(),
                "req-3".into(),
                route("key:bob", "b-9"),
                TTL,
                now
            )
            .await
            .unwrap(),
        RouteOutcome::Recorded
    );
    // A retry extends the route: the first TTL ran from 1_000, the retry's from 1_003.
    let ttl_ms = u64::try_from(TTL.as_millis()).unwrap();
    let at = 1_000 + ttl_ms + 1;
    assert_eq!(
        store.route("acq".into(), "req-3".into(), at).await.unwrap(),
        Some(r)
    );
}

#[tokio::test]
async fn routes_survive_reopening_key_rotation_and_a_version_1_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (orphan, _) = stored(store.put(callback("req-o", None, b"o"), 10).await.unwrap());
    assert_eq!(
        record(&store, "req-4", route("key:alice", "b-1"), 10).await,
        RouteOutcome::Recorded
    );
    drop(store);
    // A version 1 file: records only, no routes table.
    {
        let conn = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
        conn.execute_batch("DROP TABLE routes; PRAGMA user_version=1;")
            .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store.route("acq".into(), "req-4".into(), 20).await.unwrap(),
        None
    );
    assert_eq!(
        store.fetch(orphan).await.unwrap().unwrap().meta.state,
        State::Orphan,
        "a version 1 file keeps its records"
    );
    assert_eq!(
        record(&store, "req-o", route("key:alice", "b-1"), 20).await,
        RouteOutcome::Recorded
    );
    assert_eq!(
        record(&store, "req-4", route("key:alice", "b-1"), 20).await,
        RouteOutcome::Recorded
    );
    let conn = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
    drop(store);

    // Reopened under a new first key, the old one still listed: the route is still found,
    // and still refuses another caller.
    let rotated = SqliteStore::open(
        dir.path(),
        Keyring::parse(&format!("{K2}\n{K1}")).unwrap(),
        Fsync::Always,
    )
    .unwrap();
    assert_eq!(
        rotated
            .route("acq".into(), "req-4".into(), 30)
            .await
            .unwrap(),
        Some(route("key:alice", "b-1"))
    );
    assert_eq!(
        rotated
            .record_route("acq".into(), "req-4".into(), route("key:x", "b-1"), TTL, 30)
            .await
            .unwrap(),
        RouteOutcome::Taken
    );
    let (id, state) = stored(
        rotated
            .put(callback("req-4", None, b"late"), 40)
            .await
            .unwrap(),
    );
    assert_eq!(state, State::Pending);
    let opened = rotated.fetch(id).await.unwrap().unwrap();
    assert_eq!(opened.route, Some(route("key:alice", "b-1")));
    drop(rotated);
    // Without the key that wrote it, the route is not found.
    let other = SqliteStore::open(dir.path(), Keyring::parse(K2).unwrap(), Fsync::Always).unwrap();
    assert_eq!(
        other.route("acq".into(), "req-4".into(), 30).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn expired_routes_are_not_returned_route_nothing_and_are_purged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ttl = Duration::from_secs(10);
    let route_at = |id: &'static str, now| {
        store.record_route("acq".into(), id.into(), route("key:alice", "b-1"), ttl, now)
    };
    assert_eq!(route_at("req-5", 0).await.unwrap(), RouteOutcome::Recorded);
    assert_eq!(
        route_at("req-6", 5_000).await.unwrap(),
        RouteOutcome::Recorded
    );
    assert!(
        store
            .route("acq".into(), "req-5".into(), 9_999)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .route("acq".into(), "req-5".into(), 10_000)
            .await
            .unwrap()
            .is_none()
    );
    // A callback after its route expired is an orphan.
    let (_, state) = stored(
        store
            .put(callback("req-5", None, b"p"), 10_000)
            .await
            .unwrap(),
    );
    assert_eq!(state, State::Orphan);
    // An expired route gives way to another caller.
    assert_eq!(
        store
            .record_route(
                "acq".into(),
                "req-5".into(),
                route("key:bob", "b-2"),
                ttl,
                10_500
            )
            .await
            .unwrap(),
        RouteOutcome::Recorded
    );
    assert_eq!(
        store
            .route("acq".into(), "req-5".into(), 10_600)
            .await
            .unwrap(),
        Some(route("key:bob", "b-2"))
    );
    let retention = Retention {
        tombstone_ttl: Duration::from_secs(1),
        dead_retention: Duration::from_secs(1),
        orphan_retention: Duration::from_secs(1_000),
    };
    let purged = store.purge_expired(15_000, retention).await.unwrap();
    assert_eq!(purged.routes, 1, "req-6 expired at 15_000");
    let purged = store.purge_expired(20_500, retention).await.unwrap();
    assert_eq!(purged.routes, 1, "req-5's second route expired at 20_500");
    let conn = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM routes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn erase_removes_the_route_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(
        record(&store, "req-e", route("key:alice", "b-1"), 0).await,
        RouteOutcome::Recorded
    );
    stored(store.put(callback("req-e", None, b"p"), 1).await.unwrap());
    assert_eq!(store.erase(None, "req-e".into()).await.unwrap(), 1);
    assert!(
        store
            .route("acq".into(), "req-e".into(), 2)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        record(&store, "req-e", route("key:bob", "b-2"), 3).await,
        RouteOutcome::Recorded
    );
}

/// Every byte of the database, its WAL and its shared-memory index.
fn files_at_rest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["relay.db", "relay.db-wal", "relay.db-shm"]
        .iter()
        .filter_map(|name| Some((name.to_string(), std::fs::read(dir.join(name)).ok()?)))
        .collect()
}

#[tokio::test]
async fn nothing_of_a_route_is_in_clear_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for i in 0..20 {
        let r = route(&format!("CLIENT-MARKER-{i}"), &format!("BRANCH-MARKER-{i}"));
        let request = format!("REQ-MARKER-{i}");
        assert_eq!(
            record(&store, &request, r, 1_000).await,
            RouteOutcome::Recorded
        );
    }
    let files = files_at_rest(dir.path());
    let db = &files.iter().find(|(n, _)| n == "relay.db").unwrap().1;
    let wal = &files.iter().find(|(n, _)| n == "relay.db-wal").unwrap().1;
    assert!(
        wal.len() > 4096,
        "the routes must be in the WAL for the scan to mean anything"
    );
    assert!(
        db.windows(3).any(|w| w == b"acq") || wal.windows(3).any(|w| w == b"acq"),
        "the scan must see the clear acquirer name (else it proves nothing)"
    );
    for marker in [
        &b"REQ-MARKER"[..],
        b"CLIENT-MARKER",
        b"BRANCH-MARKER",
        b"TARGET-MARKER",
    ] {
        for (name, bytes) in &files {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "{} readable in {name}",
                String::from_utf8_lossy(marker)
            );
        }
    }
}

#[tokio::test]
async fn only_the_routes_client_takes_and_acknowledges_a_pulled_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(
        record(&store, "req-7", route("key:alice", "b-1"), 0).await,
        RouteOutcome::Recorded
    );
    let (first, _) = stored(
        store
            .put(callback("req-7", Some("a1"), b"first"), 1)
            .await
            .unwrap(),
    );
    let (second, _) = stored(
        store
            .put(callback("req-7", Some("a2"), b"second"), 2)
            .await
            .unwrap(),
    );
    let take =
        |client: &str, request: &str| store.take_for("acq".into(), request.into(), client.into());
    // Another caller, a caller whose name is a prefix, another acquirer: nothing.
    assert!(take("key:mallory", "req-7").await.unwrap().is_none());
    assert!(take("key:alic", "req-7").await.unwrap().is_none());
    assert!(
        store
            .take_for("acq2".into(), "req-7".into(), "key:alice".into())
            .await
            .unwrap()
            .is_none()
    );
    assert!(take("key:alice", "req-unknown").await.unwrap().is_none());
    // The route's caller gets the oldest, byte for byte.
    let (id, envelope) = take("key:alice", "req-7").await.unwrap().unwrap();
    assert_eq!((id, envelope.body.as_ref()), (first, &b"first"[..]));
    // Taking changes nothing; only the acknowledgement settles, and only the caller's.
    assert_eq!(take("key:alice", "req-7").await.unwrap().unwrap().0, first);
    let ack =
        |client: &str, id| store.ack_pulled("acq".into(), "req-7".into(), client.into(), id, 10);
    assert!(!ack("key:mallory", first).await.unwrap());
    assert!(
        !store
            .ack_pulled(
                "acq".into(),
                "req-other".into(),
                "key:alice".into(),
                first,
                10
            )
            .await
            .unwrap(),
        "an id acknowledged under another requestId changes nothing"
    );
    assert!(ack("key:alice", first).await.unwrap());
    assert!(!ack("key:alice", first).await.unwrap());
    let tomb = store.fetch(first).await.unwrap().unwrap();
    assert_eq!(tomb.meta.state, State::Delivered);
    assert!(tomb.envelope.is_none() && tomb.route.is_none());
    let (id, envelope) = take("key:alice", "req-7").await.unwrap().unwrap();
    assert_eq!((id, envelope.body.as_ref()), (second, &b"second"[..]));
    assert!(ack("key:alice", second).await.unwrap());
    assert!(take("key:alice", "req-7").await.unwrap().is_none());
    // An orphan is nobody's to pull.
    stored(store.put(callback("req-8", None, b"o"), 3).await.unwrap());
    assert!(take("key:alice", "req-8").await.unwrap().is_none());
}

/// The child half of `a_route_that_returned_survives_kill_9`: records routes, says so after
/// each returned, and waits to be killed. Does nothing unless the parent set the env var.
#[tokio::test]
async fn child_records_routes_then_waits_to_be_killed() {
    let Ok(dir) = std::env::var("RELAY_ROUTES_KILL_CHILD_DIR") else {
        return;
    };
    let store = open(Path::new(&dir));
    for i in 0.. {
        let request = format!("req-{i}");
        let outcome = record(&store, &request, route("key:alice", &format!("b-{i}")), 1).await;
        assert_eq!(outcome, RouteOutcome::Recorded);
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ROUTED {i}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn a_route_that_returned_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_records_routes_then_waits_to_be_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RELAY_ROUTES_KILL_CHILD_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.strip_prefix("ROUTED ")
                && tx.send(i.parse::<u64>().unwrap()).is_err()
            {
                break;
            }
        }
    });
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 50 {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(i) => acknowledged.push(i),
            Err(e) => {
                let _ = child.kill();
                panic!("child stopped routing: {e}");
            }
        }
    }
    // SIGKILL while the child is still writing.
    child.kill().unwrap();
    child.wait().unwrap();
    acknowledged.extend(rx.try_iter());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(dir.path());
        for i in &acknowledged {
            let got = store
                .route("acq".into(), format!("req-{i}"), 2)
                .await
                .unwrap();
            assert_eq!(
                got,
                Some(route("key:alice", &format!("b-{i}"))),
                "route {i} acknowledged, then lost"
            );
        }
    });
}

/// A route recorded with a login (a session token this gateway issued) is also owned by a
/// later session token of the same login: it takes and acknowledges the package, and its
/// retried push is the same owner. Another login, or a caller without one, is not.
#[tokio::test]
async fn a_route_with_a_login_is_owned_by_a_new_token_of_that_login_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let with_login = |client: &str, login: Option<&str>| Route {
        login: login.map(str::to_owned),
        ..route(client, "b-1")
    };
    let owner = |client: &str, login: Option<&str>| Owner {
        client: client.to_owned(),
        login: login.map(str::to_owned),
    };
    assert_eq!(
        record(
            &store,
            "req-9",
            with_login("session:t1", Some("login:a")),
            0
        )
        .await,
        RouteOutcome::Recorded
    );
    // A retried push under the new token of the same login, same branch: the same owner.
    assert_eq!(
        record(
            &store,
            "req-9",
            with_login("session:t2", Some("login:a")),
            1
        )
        .await,
        RouteOutcome::Same
    );
    for other in [
        with_login("session:t3", Some("login:b")),
        with_login("session:t3", None),
        Route {
            branch: "b-2".into(),
            ..with_login("session:t2", Some("login:a"))
        },
    ] {
        assert_eq!(record(&store, "req-9", other, 2).await, RouteOutcome::Taken);
    }
    let (id, _) = stored(
        store
            .put(callback("req-9", None, b"package"), 3)
            .await
            .unwrap(),
    );
    let take = |asker: Owner| store.take_for("acq".into(), "req-9".into(), asker);
    assert!(
        take(owner("session:t3", Some("login:b")))
            .await
            .unwrap()
            .is_none()
    );
    assert!(take(owner("session:t2", None)).await.unwrap().is_none());
    assert_eq!(
        take(owner("session:t2", Some("login:a")))
            .await
            .unwrap()
            .unwrap()
            .0,
        id
    );
    assert_eq!(
        take(owner("session:t1", None)).await.unwrap().unwrap().0,
        id
    );
    let ack = |asker: Owner| store.ack_pulled("acq".into(), "req-9".into(), asker, id, 10);
    assert!(!ack(owner("session:t3", Some("login:b"))).await.unwrap());
    assert!(ack(owner("session:t2", Some("login:a"))).await.unwrap());
}
