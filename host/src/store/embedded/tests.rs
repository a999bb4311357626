//! The embedded store's own tests: its tables, index, cursor and receipts.

use super::*;

fn alert(tenant: &str, key: &str) -> AlertRecord {
    let json = serde_json::json!({
        "id": key, "tenant": tenant, "rule": "r", "rule_version": "1.0.0", "bucket": "",
        "key": key, "status": "firing", "severity": "info", "title": key,
        "detail": null, "at": 0
    });
    serde_json::from_str(&json.to_string()).unwrap()
}

fn commit(store: &Embedded, alerts: &[(&str, &str)]) {
    let commit = Changes {
        alerts: alerts.iter().map(|(t, k)| alert(t, k)).collect(),
        ..Changes::default()
    };
    store.commit(commit).unwrap();
}

fn keys(store: &Embedded, tenant: &str, after: u64, limit: usize) -> Vec<String> {
    let alerts = store.alerts(tenant, after, limit).unwrap();
    alerts.into_iter().map(|a| a.key).collect()
}

/// Pages of two through a tenant's alerts, by cursor.
fn paged(store: &Embedded, tenant: &str) -> Vec<String> {
    let (mut all, mut after) = (Vec::new(), 0);
    loop {
        let page = store.alerts(tenant, after, 2).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq.unwrap();
        all.extend(page.into_iter().map(|a| a.key));
    }
    all
}

/// Where a test's store lives (gone with the directory).
fn store_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    (dir, path)
}

/// A store whose index the test writes itself, with `batch` 4.
fn open(path: &Path) -> Embedded {
    Embedded::open_with(path, 4, false).unwrap()
}

fn bucket(name: &str) -> BucketId {
    BucketId {
        tenant: "t".into(),
        rule: "r".into(),
        bucket: name.into(),
    }
}

fn set_timers(store: &Embedded, timers: &[(&str, Option<i64>)]) {
    let commit = Changes {
        timers: timers.iter().map(|(b, at)| (bucket(b), *at)).collect(),
        ..Changes::default()
    };
    store.commit(commit).unwrap();
}

fn due(store: &Embedded, until: i64) -> Vec<(String, i64)> {
    let due = store.due_timers(until, 10).unwrap();
    due.into_iter().map(|(id, at)| (id.bucket, at)).collect()
}

#[test]
fn timers_are_indexed_by_due_time_through_sets_moves_cancels_and_a_reopen() {
    let (_dir, path) = store_path();
    let store = open(&path);
    assert_eq!(store.next_timer().unwrap(), None);
    set_timers(&store, &[("a", Some(30)), ("b", Some(10)), ("c", Some(20))]);
    assert_eq!(store.next_timer().unwrap(), Some(10));
    assert_eq!(due(&store, 20), [("b".into(), 10), ("c".into(), 20)]);
    // Moved later, and cancelled: each bucket is indexed once, at its
    // latest due time.
    set_timers(&store, &[("b", Some(40)), ("c", None)]);
    assert_eq!(due(&store, 100), [("a".into(), 30), ("b".into(), 40)]);
    assert_eq!(
        store.due_timers(100, 1).unwrap().len(),
        1,
        "at most the limit"
    );
    drop(store);
    let store = open(&path);
    assert_eq!(due(&store, 35), [("a".into(), 30)]);
    assert_eq!(store.next_timer().unwrap(), Some(30));
}

#[test]
fn listing_sees_every_committed_alert_whether_it_waits_or_is_in_the_index_file() {
    let (_dir, path) = store_path();
    let store = open(&path);
    commit(&store, &[("a", "a1"), ("b", "b1"), ("a", "a2")]);
    assert_eq!(keys(&store, "a", 0, 10), ["a1", "a2"], "all waiting");
    store.index.flush().unwrap();
    assert_eq!(store.index.indexed().unwrap(), 3);
    commit(&store, &[("a", "a3"), ("b", "b2"), ("a", "a4")]);
    assert_eq!(keys(&store, "a", 0, 10), ["a1", "a2", "a3", "a4"]);
    assert_eq!(
        paged(&store, "a"),
        ["a1", "a2", "a3", "a4"],
        "across the boundary"
    );
    assert_eq!(
        keys(&store, "a", 0, 3),
        ["a1", "a2", "a3"],
        "the limit holds"
    );
    assert_eq!(keys(&store, "b", 2, 10), ["b2"], "after a cursor");

    // A crash loses the waiting entries: opening rebuilds them from the log.
    drop(store);
    let store = open(&path);
    assert_eq!(store.index.indexed().unwrap(), 3);
    assert_eq!(paged(&store, "a"), ["a1", "a2", "a3", "a4"]);
    assert_eq!(paged(&store, "b"), ["b1", "b2"]);
    store.index.flush().unwrap();
    assert_eq!(store.index.indexed().unwrap(), 6);
    commit(&store, &[("a", "a5")]);
    assert_eq!(paged(&store, "a"), ["a1", "a2", "a3", "a4", "a5"]);
}

#[test]
fn the_writer_thread_writes_a_waiting_batch_and_the_rest_when_the_store_closes() {
    let (_dir, path) = store_path();
    let store = Embedded::open_with(&path, 2, true).unwrap();
    commit(&store, &[("a", "a1"), ("a", "a2"), ("b", "b1")]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.index.indexed().unwrap() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch was never written"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    commit(&store, &[("b", "b2")]);
    drop(store);
    let store = open(&path);
    assert_eq!(store.index.indexed().unwrap(), 4, "written at close");
    assert_eq!(paged(&store, "b"), ["b1", "b2"]);
}

#[test]
fn a_store_without_its_index_file_or_with_an_old_index_table_lists_every_alert() {
    let (_dir, path) = store_path();
    {
        // What an earlier version left: the index inside the store.
        let store = open(&path);
        commit(&store, &[("a", "a1"), ("b", "b1"), ("a", "a2")]);
        let tx = store.db.begin_write().unwrap();
        tx.open_table(LEGACY_INDEX)
            .unwrap()
            .insert(("a", 1), ())
            .unwrap();
        tx.open_table(META).unwrap().insert("indexed", 3).unwrap();
        tx.commit().unwrap();
    }
    std::fs::remove_file(EmbeddedStore::index_path(&path)).unwrap();
    let store = open(&path);
    assert_eq!(paged(&store, "a"), ["a1", "a2"]);
    let tx = store.db.begin_read().unwrap();
    assert!(
        tx.open_table(LEGACY_INDEX).is_err(),
        "the old table is gone"
    );
    drop(tx);
    store.index.flush().unwrap();
    assert_eq!(keys(&store, "b", 0, 10), ["b1"]);
}

fn id(tenant: &str, bucket: &str) -> BucketId {
    BucketId {
        tenant: tenant.to_owned(),
        rule: "r".to_owned(),
        bucket: bucket.to_owned(),
    }
}

fn set_states(store: &Embedded, states: &[(&str, &str, Option<&[u8]>)]) {
    let commit = Changes {
        states: states
            .iter()
            .map(|(t, b, s)| (id(t, b), s.map(<[u8]>::to_vec)))
            .collect(),
        ..Changes::default()
    };
    store.commit(commit).unwrap();
}

fn state(store: &Embedded, tenant: &str, bucket: &str) -> Option<Vec<u8>> {
    store.load(&[id(tenant, bucket)]).unwrap().pop().unwrap()
}

fn in_table(store: &Embedded) -> usize {
    let tx = store.db.begin_read().unwrap();
    let table = tx.open_table(STATES).unwrap();
    ReadableTableMetadata::len(&table).unwrap() as usize
}

#[test]
fn states_read_the_same_from_the_log_the_table_and_after_a_crash() {
    let (_dir, path) = store_path();
    let mut store = open(&path);
    store.state_batch = 5;
    set_states(&store, &[("a", "x", Some(b"1")), ("a", "y", Some(b"2"))]);
    set_states(&store, &[("a", "x", Some(b"3")), ("b", "x", Some(b"4"))]);
    assert_eq!(in_table(&store), 0, "logged only");
    assert_eq!(state(&store, "a", "x").as_deref(), Some(&b"3"[..]));
    assert_eq!(state(&store, "a", "z"), None);
    let listed = |store: &Embedded, tenant| -> Vec<(String, Vec<u8>)> {
        let buckets = store.buckets(tenant).unwrap();
        buckets.into_iter().map(|(id, s)| (id.bucket, s)).collect()
    };
    assert_eq!(
        listed(&store, "a"),
        [("x".into(), b"3".to_vec()), ("y".into(), b"2".to_vec())]
    );

    // The fifth change writes everything into the table.
    set_states(&store, &[("a", "y", None)]);
    assert_eq!(in_table(&store), 2);
    assert!(store.logged.lock().unwrap().of_tenant("a").is_empty());
    assert_eq!(listed(&store, "a"), [("x".into(), b"3".to_vec())]);

    // Logged changes over the table, then a crash: the log is replayed.
    set_states(&store, &[("a", "x", None), ("a", "w", Some(b"5"))]);
    assert_eq!(listed(&store, "a"), [("w".into(), b"5".to_vec())]);
    drop(store);
    let store = open(&path);
    assert_eq!(state(&store, "a", "x"), None, "deleted in the log");
    assert_eq!(state(&store, "a", "w").as_deref(), Some(&b"5"[..]));
    assert_eq!(state(&store, "b", "x").as_deref(), Some(&b"4"[..]));
    assert_eq!(listed(&store, "a"), [("w".into(), b"5".to_vec())]);
}

#[test]
fn the_published_cursor_rides_on_the_next_commit_and_is_kept_at_close() {
    let (_dir, path) = store_path();
    let unpublished = |store: &Embedded| -> Vec<u64> {
        let alerts = store.unpublished().unwrap();
        alerts.into_iter().map(|a| a.seq.unwrap()).collect()
    };
    let store = open(&path);
    commit(&store, &[("a", "a1"), ("a", "a2")]);
    assert_eq!(unpublished(&store), [1, 2]);
    store.mark_published(&[1]);
    assert_eq!(unpublished(&store), [2], "at once, in this process");
    commit(&store, &[("a", "a3")]);
    let stored = |store: &Embedded| {
        let tx = store.db.begin_read().unwrap();
        let meta = tx.open_table(META).unwrap();
        meta.get("published").unwrap().map(|v| v.value())
    };
    assert_eq!(stored(&store), Some(1), "written with the next commit");
    store.mark_published(&[2, 3]);
    drop(store);
    let store = open(&path);
    assert_eq!(stored(&store), Some(3), "written at close");
    assert!(unpublished(&store).is_empty());
}

#[test]
fn an_alert_another_lane_published_past_does_not_leave_the_outbox() {
    // Two lanes (two shards) commit 1 and 2; the second publishes first.
    // Before, the cursor moved to 2 and a crash lost alert 1 to the sink.
    let (_dir, path) = store_path();
    let store = open(&path);
    commit(&store, &[("a", "a1")]);
    commit(&store, &[("b", "b1")]);
    store.mark_published(&[2]);
    commit(&store, &[("c", "c1")]);
    drop(store);
    let store = open(&path);
    let seqs: Vec<u64> = store
        .unpublished()
        .unwrap()
        .into_iter()
        .map(|a| a.seq.unwrap())
        .collect();
    // 2 again (sinks skip what they have), and 1, which never reached it.
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test]
async fn leases_are_this_process_s_checkpoints_outlive_it_and_fence_commits() {
    use crate::store::{Checkpoint, Commit, Fence, LeaseTable, Progress, StateStore, StoreError};
    let (_dir, path) = store_path();
    let write = |bucket: &str| crate::store::BucketWrite {
        id: super::BucketId {
            tenant: "t".into(),
            rule: "r".into(),
            bucket: bucket.into(),
        },
        state: crate::runtime::StateChange::Set(b"s".to_vec()),
        timer: crate::runtime::TimerChange::Keep,
        alerts: Vec::new(),
        ttl_ms: None,
    };
    let seq = |s: &str| crate::event::SeqNo::new(s).unwrap();
    {
        let store = EmbeddedStore::open(&path).unwrap();
        assert!(store.create("events", "shard-0", &[]).await.unwrap());
        assert!(!store.create("events", "shard-0", &[]).await.unwrap());
        let lease = store.list("events").await.unwrap().remove(0);
        let epoch = store.take("events", &lease, "me").await.unwrap().unwrap();
        // Taken as read once: a second take of the same reading fails.
        assert_eq!(store.take("events", &lease, "other").await.unwrap(), None);
        let fence = Fence {
            stream: "events".into(),
            shard: "shard-0".into(),
            owner: "me".into(),
            epoch,
        };
        let commit = |fence: &Fence, n: &str| Commit {
            writes: vec![write("b")],
            progress: Progress::shard(fence.clone(), seq(n), Some(Checkpoint::At(seq(n)))),
            partition: "shard-0".into(),
            now_ms: 0,
        };
        store.commit(commit(&fence, "7")).await.unwrap();
        let stale = Fence {
            epoch: epoch - 1,
            ..fence.clone()
        };
        let fenced = store.commit(commit(&stale, "8")).await.unwrap_err();
        assert!(matches!(fenced, StoreError::Fenced(shard) if shard == "shard-0"));
        let priors = store.load(&[write("b").id], "shard-0").await.unwrap();
        assert_eq!(priors[0].applied, Some(seq("7")));
        assert!(
            store
                .release("events", "shard-0", "me", epoch)
                .await
                .unwrap()
        );
        let fenced = store.commit(commit(&fence, "9")).await.unwrap_err();
        assert!(
            matches!(fenced, StoreError::Fenced(_)),
            "released: {fenced}"
        );
        assert!(!store.renew("events", "shard-0", "me", epoch).await.unwrap());
    }
    // A restart: the lease is free, its checkpoint and the bucket's applied
    // position are where the last commit left them.
    let store = EmbeddedStore::open(&path).unwrap();
    let lease = store.list("events").await.unwrap().remove(0);
    assert_eq!(lease.owner, None);
    assert_eq!(lease.checkpoint.as_deref(), Some("7"));
    let priors = store.load(&[write("b").id], "shard-0").await.unwrap();
    assert_eq!(priors[0].applied, Some(seq("7")));
    let priors = store.load(&[write("b").id], "shard-1").await.unwrap();
    assert_eq!(priors[0].applied, None, "per partition");
}

#[test]
fn an_index_file_ahead_of_the_log_is_started_anew() {
    let (_dir, path) = store_path();
    {
        let store = open(&path);
        commit(&store, &[("a", "a1"), ("a", "a2")]);
        store.index.flush().unwrap();
    }
    // The store replaced by a newer, shorter one; its index kept.
    std::fs::remove_file(&path).unwrap();
    let store = open(&path);
    assert_eq!(store.index.indexed().unwrap(), 0);
    commit(&store, &[("b", "b1")]);
    store.index.flush().unwrap();
    assert!(keys(&store, "a", 0, 10).is_empty());
    assert_eq!(keys(&store, "b", 0, 10), ["b1"]);
}

#[test]
fn receipts_answer_retries_for_their_retention_and_are_pruned_after() {
    let (_dir, path) = store_path();
    let store = open(&path);
    let at = |now_ms: i64, receipts: &[(&str, &[u8])]| Changes {
        receipts: receipts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect(),
        now_ms,
        ..Changes::default()
    };
    let start = 1_700_000_000_000;
    store.commit(at(start, &[("old", b"1")])).unwrap();
    store
        .commit(at(start + RECEIPT_RETENTION_MS - 1, &[("new", b"2")]))
        .unwrap();
    assert_eq!(store.receipt("old").unwrap().as_deref(), Some(&b"1"[..]));
    // Past its retention, the next commit removes it; younger ones stay.
    store
        .commit(at(start + RECEIPT_RETENTION_MS + 1, &[]))
        .unwrap();
    assert_eq!(store.receipt("old").unwrap(), None);
    assert_eq!(store.receipt("new").unwrap().as_deref(), Some(&b"2"[..]));
    let tx = store.db.begin_read().unwrap();
    let times = tx.open_table(RECEIPT_TIMES).unwrap();
    assert_eq!(ReadableTableMetadata::len(&times).unwrap(), 1);
}
