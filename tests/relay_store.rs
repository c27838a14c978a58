//! The callback relay's store over a real SQLite file in a temp dir: durability (reopen,
//! `kill -9`), group commit, nothing in clear at rest, duplicates, leases and retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use diia_gateway::relay::{
    CallbackStore, Envelope, Fsync, Ingest, Keyring, PutOutcome, Retention, Route, Settle,
    SqliteStore, State,
};

const K1: &str = "k1 = 3f6c1d2e4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const K2: &str = "k2 = 9a0b1c2d3e4f5061728394a5b6c7d8e9f0e1d2c3b4a5968778695a4b3c2d1e0f";
const LEASE: Duration = Duration::from_secs(30);

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, Keyring::parse(K1).unwrap(), Fsync::Always).unwrap()
}

fn envelope(request_id: &str, action: Option<&str>, body: &[u8]) -> Envelope {
    Envelope {
        request_id: request_id.to_owned(),
        action: action.map(str::to_owned),
        content_type: "multipart/form-data; boundary=BOUNDARY-MARKER-d41d".to_owned(),
        body: Bytes::copy_from_slice(body),
    }
}

fn route(branch: &str) -> Route {
    Route {
        client: "CLIENT-MARKER-key-17".to_owned(),
        branch: branch.to_owned(),
        target: "branch-backend".to_owned(),
        login: None,
    }
}

fn ingest(request_id: &str, body: &[u8], routed: bool) -> Ingest {
    Ingest {
        acquirer: "acq".to_owned(),
        envelope: envelope(request_id, None, body),
        route: routed.then(|| route("BRANCH-MARKER-0042")),
    }
}

fn stored(outcome: PutOutcome) -> diia_gateway::relay::RecordId {
    match outcome {
        PutOutcome::Stored(id, _) => id,
        other => panic!("expected a new record, got {other:?}"),
    }
}

/// Every byte of the database, its WAL and its shared-memory index.
fn files_at_rest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["relay.db", "relay.db-wal", "relay.db-shm"]
        .iter()
        .filter_map(|name| Some((name.to_string(), std::fs::read(dir.join(name)).ok()?)))
        .collect()
}

fn assert_absent(dir: &Path, needle: &[u8], what: &str) {
    for (name, bytes) in files_at_rest(dir) {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{what} readable in {name}"
        );
    }
}

#[tokio::test]
async fn group_commit_answers_each_waiter_after_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // All queued before the first is awaited: the writer takes them in a few groups.
    let puts: Vec<_> = (0..64)
        .map(|i| store.put(ingest(&format!("req-{i}"), b"payload", true), 1_000))
        .collect();
    let mut handles = Vec::new();
    for put in puts {
        let path = store.path().to_owned();
        handles.push(tokio::spawn(async move {
            let id = stored(put.await.unwrap());
            // Answered means committed: another connection sees the row at once.
            let conn = rusqlite::Connection::open(&path).unwrap();
            let n: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM records WHERE id = ?1",
                    [id.0.as_slice()],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 1, "waiter answered before its record was committed");
        }));
    }
    for h in handles {
        tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .unwrap()
            .unwrap();
    }
    let stats = store.writer_stats();
    assert_eq!(stats.writes(), 64);
    assert!(
        stats.commits() < 64,
        "no group commit: {} commits for 64 writes",
        stats.commits()
    );
    assert_eq!(store.stats(1_000).await.unwrap().count(State::Pending), 64);
}

#[tokio::test]
async fn a_record_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = stored(
        store
            .put(ingest("req-1", b"the package", true), 5)
            .await
            .unwrap(),
    );
    #[cfg(unix)]
    {
        // Only this process's user may read what is stored (the directory is created 0700).
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("relay.db")), 0o600);
        assert_eq!(mode(&dir.path().join("relay.db-wal")), 0o600);
        let fresh = dir.path().join("data");
        drop(open(&fresh));
        assert_eq!(mode(&fresh), 0o700);
    }
    drop(store);
    let store = open(dir.path());
    let opened = store.fetch(id).await.unwrap().unwrap();
    assert_eq!(opened.meta.state, State::Pending);
    assert_eq!(opened.meta.received_ms, 5);
    assert_eq!(
        opened.envelope.unwrap(),
        envelope("req-1", None, b"the package")
    );
    assert_eq!(opened.route.unwrap(), route("BRANCH-MARKER-0042"));
    // The wrong keys do not open it.
    drop(store);
    let other = SqliteStore::open(dir.path(), Keyring::parse(K2).unwrap(), Fsync::Always).unwrap();
    assert!(other.fetch(id).await.is_err());
}

/// The child half of `put_that_returned_survives_kill_9`: puts records, says so after each
/// `put` returned, and waits to be killed. Does nothing unless the parent set the env var.
#[tokio::test]
async fn child_puts_then_waits_to_be_killed() {
    let Ok(dir) = std::env::var("RELAY_STORE_KILL_CHILD_DIR") else {
        return;
    };
    let store = open(Path::new(&dir));
    for i in 0.. {
        let id = stored(
            store
                .put(ingest(&format!("req-{i}"), &[7u8; 200 * 1024], true), 1)
                .await
                .unwrap(),
        );
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "PUT {id}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn put_that_returned_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_puts_then_waits_to_be_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RELAY_STORE_KILL_CHILD_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix("PUT ")
                && tx.send(id.to_owned()).is_err()
            {
                break;
            }
        }
    });
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 25 {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(id) => acknowledged.push(id),
            Err(e) => {
                let _ = child.kill();
                panic!("child stopped putting: {e}");
            }
        }
    }
    // SIGKILL while the child is still writing.
    child.kill().unwrap();
    child.wait().unwrap();
    // Whatever the reader had already seen was acknowledged too.
    acknowledged.extend(rx.try_iter());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(dir.path());
        for id in &acknowledged {
            let id = diia_gateway::relay::RecordId::parse(id).unwrap();
            let opened = store.fetch(id).await.unwrap();
            let opened = opened.unwrap_or_else(|| panic!("record {id} acknowledged, then lost"));
            assert_eq!(opened.envelope.unwrap().body.len(), 200 * 1024);
        }
    });
}

#[tokio::test]
async fn nothing_in_clear_at_rest_and_nothing_left_after_delivery_or_erase() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let payload = b"PAYLOAD-MARKER-0123456789abcdef".repeat(200 * 1024 / 31);
    let mut routed = ingest("REQ-MARKER-routed-7f3a", &payload, true);
    routed.envelope.action = Some("ACTION-MARKER-hashedFilesSigning".to_owned());
    let delivered = stored(store.put(routed, 1_000).await.unwrap());
    let erased = stored(
        store
            .put(ingest("REQ-MARKER-orphan-9c1e", &payload, false), 1_000)
            .await
            .unwrap(),
    );
    let kept = stored(
        store
            .put(ingest("REQ-MARKER-kept-5b2d", &payload, true), 1_000)
            .await
            .unwrap(),
    );
    for marker in [
        &b"REQ-MARKER"[..],
        b"BRANCH-MARKER",
        b"CLIENT-MARKER",
        b"ACTION-MARKER",
        b"BOUNDARY-MARKER",
        b"PAYLOAD-MARKER",
        b"multipart/form-data",
    ] {
        assert_absent(dir.path(), marker, &String::from_utf8_lossy(marker));
    }

    // The sealed payloads as stored: after delivery or erase and a checkpoint, gone too.
    let sealed = |id: diia_gateway::relay::RecordId| -> Vec<u8> {
        let conn = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
        let blob: Vec<u8> = conn
            .query_row(
                "SELECT envelope FROM records WHERE id = ?1",
                [id.0.as_slice()],
                |r| r.get(0),
            )
            .unwrap();
        blob[blob.len() / 2..blob.len() / 2 + 64].to_vec()
    };
    let (sealed_delivered, sealed_erased, sealed_kept) =
        (sealed(delivered), sealed(erased), sealed(kept));

    let leased = store.lease_due(1_000, LEASE, 10).await.unwrap();
    let lease = leased.iter().find(|l| l.id == delivered).unwrap();
    assert_eq!(lease.envelope.body.as_ref(), payload.as_slice());
    assert!(
        store
            .settle(delivered, lease.lease, Settle::Delivered, 2_000)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .erase(Some("acq".into()), "REQ-MARKER-orphan-9c1e".into())
            .await
            .unwrap(),
        1
    );
    assert!(store.checkpoint().await.unwrap());

    assert_absent(
        dir.path(),
        &sealed_delivered,
        "delivered payload's sealed bytes",
    );
    assert_absent(dir.path(), &sealed_erased, "erased payload's sealed bytes");
    let db = std::fs::read(dir.path().join("relay.db")).unwrap();
    assert!(
        db.windows(64).any(|w| w == sealed_kept.as_slice()),
        "the scan must see a kept record's sealed bytes (else it proves nothing)"
    );
    // A tombstone is left: metadata only.
    let tomb = store.fetch(delivered).await.unwrap().unwrap();
    assert_eq!(tomb.meta.state, State::Delivered);
    assert!(tomb.envelope.is_none() && tomb.route.is_none());
    assert!(store.fetch(erased).await.unwrap().is_none());
}

#[tokio::test]
async fn same_request_and_action_is_a_duplicate_or_a_conflict_across_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let first = stored(store.put(ingest("req-1", b"bytes", true), 1).await.unwrap());
    assert_eq!(
        store.put(ingest("req-1", b"bytes", true), 2).await.unwrap(),
        PutOutcome::Duplicate(first)
    );
    assert_eq!(
        store.put(ingest("req-1", b"other", true), 3).await.unwrap(),
        PutOutcome::Conflict(first)
    );
    // Another action, or another acquirer: a record of its own.
    let mut with_action = ingest("req-1", b"bytes", true);
    with_action.envelope.action = Some(String::new());
    stored(store.put(with_action, 4).await.unwrap());
    let mut other_acquirer = ingest("req-1", b"bytes", true);
    other_acquirer.acquirer = "acq2".into();
    stored(store.put(other_acquirer, 5).await.unwrap());

    // A new key first, the old one still listed: the old record is still found.
    drop(store);
    let rotated = SqliteStore::open(
        dir.path(),
        Keyring::parse(&format!("{K2}\n{K1}")).unwrap(),
        Fsync::Always,
    )
    .unwrap();
    assert_eq!(
        rotated
            .put(ingest("req-1", b"bytes", true), 6)
            .await
            .unwrap(),
        PutOutcome::Duplicate(first)
    );
    let meta = rotated.fetch(first).await.unwrap().unwrap().meta;
    assert_eq!((meta.duplicates, meta.conflicts), (2, 1));
    assert_eq!(meta.key_id, "k1");
    let new = stored(rotated.put(ingest("req-2", b"b", true), 7).await.unwrap());
    assert_eq!(rotated.fetch(new).await.unwrap().unwrap().meta.key_id, "k2");
    let by_key = rotated.count_by_key().await.unwrap();
    assert!(by_key.contains(&("k1".to_owned(), 3)) && by_key.contains(&("k2".to_owned(), 1)));
}

#[tokio::test]
async fn an_expired_lease_returns_the_record_to_pending_with_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = stored(store.put(ingest("req-1", b"p", true), 1_000).await.unwrap());
    let first = store.lease_due(1_000, LEASE, 10).await.unwrap();
    assert_eq!((first.len(), first[0].id, first[0].attempts), (1, id, 1));
    assert!(store.lease_due(20_000, LEASE, 10).await.unwrap().is_empty());
    assert_eq!(
        store.stats(20_000).await.unwrap().count(State::Delivering),
        1
    );

    // Lease expired (the worker died): the same record, the same webhook-id, again.
    let second = store.lease_due(31_000, LEASE, 10).await.unwrap();
    assert_eq!((second.len(), second[0].id, second[0].attempts), (1, id, 2));
    assert_eq!(first[0].id.webhook_id(), second[0].id.webhook_id());
    // The dead worker's late settle changes nothing.
    assert!(
        !store
            .settle(id, first[0].lease, Settle::Delivered, 32_000)
            .await
            .unwrap()
    );
    // A failure reschedules it.
    assert!(
        store
            .settle(id, second[0].lease, Settle::RetryAt(90_000), 32_000)
            .await
            .unwrap()
    );
    assert!(store.lease_due(89_999, LEASE, 10).await.unwrap().is_empty());
    let third = store.lease_due(90_000, LEASE, 10).await.unwrap();
    assert_eq!(third[0].attempts, 3);
    // Dead, then redelivered by admin.
    assert!(
        store
            .settle(id, third[0].lease, Settle::Dead, 91_000)
            .await
            .unwrap()
    );
    assert_eq!(store.list(State::Dead, None, 10).await.unwrap()[0].id, id);
    assert!(store.redeliver(id, 92_000).await.unwrap());
    assert!(!store.redeliver(id, 92_000).await.unwrap());
    let fourth = store.lease_due(92_000, LEASE, 10).await.unwrap();
    assert_eq!((fourth[0].id, fourth[0].attempts), (id, 1));
}

#[tokio::test]
async fn an_orphan_is_never_leased_until_routed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = stored(
        store
            .put(ingest("req-o", b"p", false), 1_000)
            .await
            .unwrap(),
    );
    assert_eq!(
        store
            .put(ingest("req-o", b"p", false), 1_001)
            .await
            .unwrap(),
        PutOutcome::Duplicate(id)
    );
    assert!(
        store
            .lease_due(10_000_000, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let orphans = store.orphans(None, 10).await.unwrap().found;
    assert_eq!(
        (orphans[0].id, orphans[0].request_id.as_str()),
        (id, "req-o")
    );
    // A route for another acquirer's requestId routes nothing here.
    assert!(
        store
            .route_orphans("acq2".into(), "req-o".into(), route("b1"), 2_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .route_orphans("acq".into(), "req-o".into(), route("b1"), 2_000)
            .await
            .unwrap(),
        vec![id]
    );
    let leased = store.lease_due(2_000, LEASE, 10).await.unwrap();
    assert_eq!((leased[0].id, leased[0].route.branch.as_str()), (id, "b1"));
}

/// Orphans page in record order: each page starts after the last one's end, every orphan
/// is seen once per pass however many wait (the sweep once saw only the oldest 512), and
/// the page that reaches the newest says so (`next` is `None`), so a sweep wraps.
#[tokio::test]
async fn orphans_page_through_in_record_order_and_the_last_page_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let puts = (0..25u64).map(|n| {
        // Pairs share a receive time: the id orders them.
        let ingest = ingest(&format!("req-page-{n}"), b"p", false);
        store.put(ingest, 1_000 + n / 2)
    });
    for put in futures_util::future::join_all(puts).await {
        stored(put.unwrap());
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = store.orphans(after, 10).await.unwrap();
        pages += 1;
        assert!(page.found.len() <= 10);
        seen.extend(
            page.found
                .iter()
                .map(|o| (o.cursor(), o.request_id.clone())),
        );
        match page.next {
            Some(next) => {
                assert_eq!(Some(next), page.found.last().map(|o| o.cursor()));
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    let cursors: Vec<_> = seen.iter().map(|(cursor, _)| *cursor).collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "not in record order"
    );
    let mut ids: Vec<_> = seen.iter().map(|(_, id)| id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 25, "an orphan seen twice or never");
    // The newest is on the last page, and a full last page still ends the pass.
    assert_eq!(seen.last().unwrap().1, "req-page-24".to_owned());
    let all = store.orphans(None, 25).await.unwrap();
    assert_eq!(all.found.len(), 25);
    let after_all = store.orphans(all.next, 25).await.unwrap();
    assert!(after_all.found.is_empty() && after_all.next.is_none());
}

#[tokio::test]
async fn retention_purges_tombstones_dead_and_orphans_on_their_own_clocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let delivered = stored(store.put(ingest("d", b"p", true), 0).await.unwrap());
    let dead = stored(store.put(ingest("x", b"p", true), 0).await.unwrap());
    let orphan = stored(store.put(ingest("o", b"p", false), 0).await.unwrap());
    let pending = stored(store.put(ingest("p", b"p", true), 50_000).await.unwrap());
    for l in store.lease_due(0, LEASE, 10).await.unwrap() {
        let outcome = if l.id == delivered {
            Settle::Delivered
        } else {
            Settle::Dead
        };
        assert!(store.settle(l.id, l.lease, outcome, 1_000).await.unwrap());
    }
    let stats = store.stats(60_000).await.unwrap();
    assert_eq!(stats.counts, [1, 0, 1, 1, 1]);
    assert_eq!(stats.oldest_pending, Some(Duration::from_secs(10)));

    let retention = Retention {
        tombstone_ttl: Duration::from_secs(10),
        dead_retention: Duration::from_secs(100),
        orphan_retention: Duration::from_secs(1_000),
    };
    let purged = store.purge_expired(10_999, retention).await.unwrap();
    assert_eq!((purged.delivered, purged.dead, purged.orphan), (0, 0, 0));
    let purged = store.purge_expired(11_000, retention).await.unwrap();
    assert_eq!((purged.delivered, purged.dead, purged.orphan), (1, 0, 0));
    let purged = store.purge_expired(101_000, retention).await.unwrap();
    assert_eq!((purged.delivered, purged.dead, purged.orphan), (0, 1, 0));
    let purged = store.purge_expired(1_000_000, retention).await.unwrap();
    assert_eq!((purged.delivered, purged.dead, purged.orphan), (0, 0, 1));
    for id in [delivered, dead, orphan] {
        assert!(store.fetch(id).await.unwrap().is_none());
    }
    // Pending records are never purged by retention; admin purge removes one.
    assert!(store.fetch(pending).await.unwrap().is_some());
    assert!(store.purge(pending).await.unwrap());
    assert!(!store.purge(pending).await.unwrap());
    assert_eq!(store.stats(0).await.unwrap().counts, [0; 5]);
}

#[tokio::test]
async fn a_full_store_refuses_one_write_and_keeps_the_rest_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(
        dir.path(),
        Keyring::parse(K1).unwrap(),
        diia_gateway::relay::Options {
            fsync: Fsync::Always,
            max_db_bytes: Some(512 * 1024),
        },
    )
    .unwrap();
    // Queued together: a small write, one too large for the limit, another small one.
    let before = store.put(ingest("small-1", b"p", true), 1);
    let too_big = store.put(ingest("big", &vec![1u8; 1024 * 1024], true), 1);
    let after = store.put(ingest("small-2", b"p", true), 1);
    let bounded = |f| tokio::time::timeout(Duration::from_secs(30), f);
    let before = stored(bounded(before).await.unwrap().unwrap());
    let refused = bounded(too_big).await.unwrap();
    assert!(
        matches!(refused, Err(diia_gateway::relay::StoreError::Sqlite(_))),
        "expected SQLITE_FULL, got {refused:?}"
    );
    let after = stored(bounded(after).await.unwrap().unwrap());
    assert!(store.fetch(before).await.unwrap().is_some());
    assert!(store.fetch(after).await.unwrap().is_some());
    assert_eq!(store.stats(1).await.unwrap().count(State::Pending), 2);
    // Space freed, writes go through again.
    assert!(store.purge(before).await.unwrap());
    stored(store.put(ingest("small-3", b"p", true), 2).await.unwrap());
}

/// The writer hands checkpoints to a thread of its own (SQLite's automatic checkpoint is
/// off on its connection): under a sustained stream of 200 KiB callbacks, 16 at a time,
/// the WAL must still be copied back and restarted, never grow with the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_sustained_large_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let payload = vec![0x5a_u8; 200 * 1024];
    let wal = dir.path().join("relay.db-wal");
    let mut largest = 0_u64;
    // 640 callbacks = 128 MiB sealed: twice the WAL's size limit.
    for wave in 0..40 {
        let puts: Vec<_> = (0..16)
            .map(|i| store.put(ingest(&format!("req-{wave}-{i}"), &payload, true), 1_000))
            .collect();
        for put in puts {
            stored(
                tokio::time::timeout(Duration::from_secs(60), put)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert_eq!(store.stats(1_000).await.unwrap().count(State::Pending), 640);
    assert!(
        largest < 48 << 20,
        "the WAL grew to {largest} bytes with 128 MiB written: checkpoints did not keep up"
    );
}
