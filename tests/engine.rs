//! The delivery engine's guarantees (SPEC §3), each against a private
//! redis-server: nothing lost, nothing duplicated, per-channel order across
//! gateways, fencing, bad input, retries, recovery and shutdown.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Recorder, Rig, Sent, fast, order_by_channel};
use serde_json::json;
use stargazer::adapters::{AdapterError, Capabilities};
use stargazer::bus::{CommitBatch, Committed, Identity};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_keep_per_channel_order_over_50_channels() {
    let rig = Rig::new().await;
    let rec = Recorder::build(
        Box::new(|_, _| Ok(())),
        Duration::from_micros(300),
        Capabilities::ALL,
    );
    let mut s = fast();
    s.read_batch = 16;
    let a = rig.start("gw-a", rec.clone(), s.clone()).await;
    let b = rig.start("gw-b", rec.clone(), s).await;
    for i in 0..1000 {
        rig.publish(json!({"channel_id": format!("c{}", i % 50), "text": format!("m{i}")}))
            .await;
    }
    rec.wait_sent(1000, T).await;
    rig.drained(T).await;
    let sent = rec.sent();
    assert_eq!(sent.len(), 1000, "each message sent exactly once");
    let order = order_by_channel(&sent);
    assert_eq!(order.len(), 50);
    for (c, seqs) in &order {
        assert_eq!(
            seqs,
            &(1..=20).collect::<Vec<u64>>(),
            "channel {c} out of order"
        );
    }
    let (sa, sb) = (a.stats().snapshot(), b.stats().snapshot());
    assert!(
        sa.read > 0 && sb.read > 0,
        "both gateways took part: {sa:?} {sb:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_gateway_that_died_before_sending_loses_nothing() {
    let rig = Rig::new().await;
    for i in 0..10 {
        rig.publish(json!({"channel_id": "c", "text": format!("m{i}")}))
            .await;
    }
    let stranded = rig.read_as("dead-gw", 10).await;
    assert_eq!(stranded.len(), 10);
    let rec = Recorder::ok();
    let gw = rig.start("live-gw", rec.clone(), fast()).await;
    rec.wait_sent(10, T).await;
    rig.drained(T).await;
    let order = order_by_channel(&rec.sent());
    assert_eq!(order["c"], (1..=10).collect::<Vec<_>>());
    assert_eq!(rec.sent().len(), 10, "each sent once");
    assert_eq!(gw.stats().snapshot().claimed, 10);
    gw.shutdown().await;
}

/// A gateway `dead-gw` read `p` and began its send (its in-flight record
/// is written when `unknown_outcome = "dead_letter"`), then vanished before
/// its commit: the platform may or may not have it.
async fn died_mid_send(rig: &Rig, p: &stargazer::publish::Published, _channel: &str) {
    rig.read_as("dead-gw", 1).await;
    let _: i64 = rig
        .cmd(&[
            "HSET",
            &format!(
                "{}:sending",
                rig.keys.outbound().trim_end_matches(":outbound")
            ),
            &p.id.0,
            "1",
        ])
        .await;
}

#[tokio::test]
async fn a_gateway_that_died_after_sending_is_resent_with_the_same_idempotency_key() {
    let rig = Rig::new().await;
    let p = rig
        .publish(json!({"channel_id": "c", "text": "once", "message_key": "sg:msg:once"}))
        .await;
    died_mid_send(&rig, &p, "c").await;

    let rec = Recorder::ok();
    let gw = rig.start("live-gw", rec.clone(), fast()).await;
    rec.wait_sent(1, T).await;
    rig.drained(T).await;
    let sent = rec.sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].resend, "marked as a possible repeat");
    assert_eq!(sent[0].idempotency_key, "sg:msg:once");
    assert_eq!(gw.stats().snapshot().unknown_outcome_resends, 1);
    let mid: Option<String> = rig.cmd(&["HGET", "sg:msg:once", "message_id"]).await;
    assert_eq!(mid, Some(format!("pm-{}", p.id)));
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_outcome_can_be_dead_lettered_instead() {
    let rig = Rig::new().await;
    let p = rig
        .publish(json!({"channel_id": "c", "text": "maybe"}))
        .await;
    died_mid_send(&rig, &p, "c").await;
    let mut s = fast();
    s.unknown_outcome = stargazer::config::UnknownOutcome::DeadLetter;
    let rec = Recorder::ok();
    let gw = rig.start("live-gw", rec.clone(), s).await;
    rig.drained(T).await;
    assert!(rec.calls().is_empty());
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["error_kind"], "unknown_outcome");
    assert_eq!(dlq[0]["original_id"], p.id.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn every_bad_input_is_dead_lettered_with_its_reason_while_the_channel_flows() {
    let rig = Rig::new().await;
    let good = |n: u32| json!({"channel_id": "c", "text": format!("good {n}")});
    rig.publish(good(1)).await;
    rig.publish(json!({"type": "fax", "channel_id": "c", "seq": 2}))
        .await;
    rig.publish(json!({"channel_id": "c", "seq": 3, "text": "x", "message_key": "victim:key"}))
        .await;
    rig.publish(json!({"type": "file", "channel_id": "c", "seq": 4, "file_data": "@@@"}))
        .await;
    rig.publish(json!({"type": "reaction", "channel_id": "c", "seq": 5, "emoji": "x"}))
        .await;
    rig.publish(json!({"channel_id": "c", "seq": 6, "text": 42}))
        .await;
    rig.publisher.publish_raw(b"not json at all").await.unwrap();
    rig.publisher.publish_raw(b"[1, 2, 3]").await.unwrap();
    rig.publish(json!({"text": "no channel"})).await;
    let big = "x".repeat(2000);
    rig.publish(json!({"channel_id": "c", "seq": 7, "text": big}))
        .await;
    let _: String = rig
        .cmd(&[
            "XADD",
            &rig.keys.outbound(),
            "*",
            "body",
            "no payload field",
        ])
        .await;
    rig.publish(json!({"channel_id": "c", "seq": 8, "text": "good 8"}))
        .await;

    let mut s = fast();
    s.max_payload_bytes = 1000;
    s.gap_timeout_ms = 60_000; // order must not depend on gap skipping
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(2, T).await;
    rig.drained(T).await;
    let order = order_by_channel(&rec.sent());
    assert_eq!(order["c"], vec![1, 8]);
    let mut kinds: Vec<String> = rig
        .dlq()
        .await
        .iter()
        .map(|d| d["error_kind"].clone())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "bad_base64",
            "bad_field",
            "forbidden_key",
            "missing_field",
            "missing_field",
            "missing_payload",
            "not_json",
            "not_object",
            "too_large",
            "unknown_type"
        ]
    );
    for d in rig.dlq().await {
        assert!(!d["error"].is_empty());
        assert!(d.contains_key("original_id") && d.contains_key("failed_ms"));
        assert_eq!(d["consumer"], "gw");
        if d["error_kind"] == "unknown_type" {
            assert!(d["error"].contains("fax"), "{}", d["error"]);
            assert!(d["payload"].contains("fax"));
        }
    }
    assert_eq!(gw.stats().snapshot().gaps_skipped, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn unsigned_or_forged_entries_are_dead_lettered_when_signing_is_required() {
    let rig = Rig::new().await;
    let signer = stargazer::publish::Publisher::new(
        rig.bus.conn(),
        rig.keys.clone(),
        "sg:msg:",
        Some(b"k1".to_vec()),
    );
    let forger = stargazer::publish::Publisher::new(
        rig.bus.conn(),
        rig.keys.clone(),
        "sg:msg:",
        Some(b"k2".to_vec()),
    );
    let env = |t: &str| {
        json!({"channel_id": "c", "text": t})
            .as_object()
            .unwrap()
            .clone()
    };
    signer.publish(env("signed")).await.unwrap();
    forger.publish(env("forged")).await.unwrap();
    rig.publish(json!({"channel_id": "c", "text": "unsigned"}))
        .await;
    signer.publish(env("signed again")).await.unwrap();
    let mut s = fast();
    s.signing_secret = Some("k1".into());
    // The forged and the unsigned entry took seq 2 and 3 but can move no
    // channel state: seq 4 waits out the gap (shortened here), proven absent.
    s.gap_timeout_ms = 2000;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(2, T).await;
    rig.drained(T).await;
    let texts: Vec<_> = rec.sent().iter().map(|s| s.text.clone().unwrap()).collect();
    assert_eq!(texts, vec!["signed", "signed again"]);
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 2);
    assert!(dlq.iter().all(|d| d["error_kind"] == "bad_signature"));
    assert!(
        dlq.iter()
            .all(|d| !d.contains_key("channel_id") && !d.contains_key("seq"))
    );
    assert_eq!(gw.stats().snapshot().gaps_skipped, 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dead_lettered_predecessor_releases_its_successors_at_once() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "c", "text": "poison"}))
        .await;
    rig.publish(json!({"channel_id": "c", "text": "next"}))
        .await;
    let mut s = fast();
    s.gap_timeout_ms = 600_000; // a wait for the gap would outlast the test
    let rec = Recorder::scripted(|s, _| match s.text.as_deref() {
        Some("poison") => Err(AdapterError::permanent(
            "400 Bad Request: cannot send poison",
        )),
        _ => Ok(()),
    });
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(1, Duration::from_secs(5)).await;
    rig.drained(T).await;
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["error_kind"], "rejected");
    assert!(dlq[0]["error"].contains("400"));
    assert_eq!(dlq[0]["attempts"], "1");
    assert_eq!(rec.sent()[0].seq, Some(2));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dead_lettered_predecessor_on_another_gateway_releases_the_successor_at_once() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "c", "text": "poison"}))
        .await;
    rig.publish(json!({"channel_id": "c", "text": "next"}))
        .await;
    // seq 1 is pending for gateway A, seq 2 for gateway B; whichever owns
    // the channel gets both, and the poisoned seq 1 must release seq 2 at
    // once, not after the gap timeout.
    assert_eq!(rig.read_as("gw-a", 1).await.len(), 1);
    assert_eq!(rig.read_as("gw-b", 1).await.len(), 1);
    let mut s = fast();
    s.gap_timeout_ms = 600_000; // waiting out the gap would outlast the test
    s.autoclaim_min_idle_ms = 600_000;
    let poison = |sent: &Sent, _: usize| match sent.text.as_deref() {
        Some("poison") => Err(AdapterError::permanent("404: unknown channel")),
        _ => Ok(()),
    };
    let rec_b = Recorder::scripted(poison);
    let b = rig.start("gw-b", rec_b.clone(), s.clone()).await;
    let rec_a = Recorder::scripted(poison);
    let a = rig.start("gw-a", rec_a.clone(), s).await;
    let sent_2 = || {
        rec_a
            .sent()
            .into_iter()
            .chain(rec_b.sent())
            .filter(|x| x.seq == Some(2))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while sent_2() == 0 {
        assert!(Instant::now() < deadline, "seq 2 was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.drained(T).await;
    assert_eq!(sent_2(), 1);
    assert_eq!(rec_a.calls().len() + rec_b.calls().len(), 2);

    assert_eq!(rig.dlq().await[0]["seq"], "1");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_not() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "a", "text": "flaky"}))
        .await;
    rig.publish(json!({"channel_id": "b", "text": "refused"}))
        .await;
    let rec = Recorder::scripted(|s, nth| match s.text.as_deref() {
        Some("flaky") if nth < 2 => Err(AdapterError::transient("503 Service Unavailable")),
        Some("refused") => Err(AdapterError::permanent("403 Forbidden: missing access")),
        _ => Ok(()),
    });
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rec.wait_sent(1, T).await;
    rig.drained(T).await;
    let calls = rec.calls();
    let flaky: Vec<_> = calls
        .iter()
        .filter(|c| c.text.as_deref() == Some("flaky"))
        .collect();
    assert_eq!(flaky.len(), 3);
    assert_eq!(
        flaky.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        flaky
            .iter()
            .all(|c| c.idempotency_key == flaky[0].idempotency_key)
    );
    let refused = calls
        .iter()
        .filter(|c| c.text.as_deref() == Some("refused"))
        .count();
    assert_eq!(refused, 1, "a permanent error is not retried");
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["error_kind"], "rejected");
    assert!(dlq[0]["error"].contains("403 Forbidden: missing access"));
    assert_eq!(gw.stats().snapshot().retries, 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn rate_limits_wait_their_retry_after_and_use_no_attempt() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "a", "text": "limited"}))
        .await;
    let rec = Recorder::scripted(|_, nth| {
        if nth < 3 {
            Err(AdapterError::rate_limited(
                Duration::from_millis(150),
                "429 Too Many Requests",
            ))
        } else {
            Ok(())
        }
    });
    let mut s = fast();
    s.max_attempts = 1; // a 429 must not use it up
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(1, T).await;
    let calls = rec.calls();
    assert_eq!(calls.len(), 4);
    for w in calls.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap >= Duration::from_millis(150), "retried after {gap:?}");
    }
    assert!(calls.iter().all(|c| c.attempt == 1), "429s used no attempt");
    rig.drained(T).await;
    assert!(rig.dlq().await.is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn retries_exhausted_needs_attempts_and_age() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "a", "text": "down"}))
        .await;
    let rec = Recorder::scripted(|_, _| Err(AdapterError::transient("connection refused")));
    let mut s = fast();
    s.max_attempts = 3;
    s.max_age_ms = 400;
    let started = Instant::now();
    let gw = rig.start("gw", rec.clone(), s).await;
    rig.drained(T).await;
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["error_kind"], "retries_exhausted");
    assert!(dlq[0]["error"].contains("connection refused"));
    let attempts: u32 = dlq[0]["attempts"].parse().unwrap();
    assert!(attempts >= 3, "{attempts}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before max_age_ms"
    );
    assert!(rec.calls().len() >= 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_pending_list_longer_than_one_sweep_page_is_fully_recovered() {
    let rig = Rig::new().await;
    for i in 0..350 {
        rig.publish(json!({"channel_id": format!("c{}", i % 7), "text": format!("m{i}")}))
            .await;
    }
    assert_eq!(rig.read_as("dead-gw", 350).await.len(), 350);
    let rec = Recorder::ok();
    let mut s = fast();
    s.max_in_flight = 1000;
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(350, T).await;
    rig.drained(T).await;
    let sent = rec.sent();
    let ids: HashSet<_> = sent.iter().map(|s| s.stream_id.clone()).collect();
    assert_eq!((sent.len(), ids.len()), (350, 350));
    for (c, seqs) in order_by_channel(&sent) {
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "channel {c}");
    }
    assert_eq!(gw.stats().snapshot().claimed, 350);
    gw.shutdown().await;
}

#[tokio::test]
async fn entries_deleted_from_the_stream_while_pending_are_recorded_as_lost() {
    let rig = Rig::new().await;
    let p = rig
        .publish(json!({"channel_id": "c", "text": "vanishing"}))
        .await;
    rig.read_as("dead-gw", 1).await;
    let _: i64 = rig.cmd(&["XDEL", &rig.keys.outbound(), &p.id.0]).await;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rig.drained(T).await;
    let deadline = Instant::now() + T;
    let dlq = loop {
        let d = rig.dlq().await;
        if !d.is_empty() || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["error_kind"], "lost_in_stream");
    assert_eq!(dlq[0]["original_id"], p.id.0);
    assert!(rec.calls().is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_live_consumers_slow_entries_are_not_stolen() {
    let rig = Rig::new().await;
    for i in 0..4 {
        rig.publish(json!({"channel_id": "slow", "text": format!("m{i}")}))
            .await;
    }
    // Each send takes longer than autoclaim_min_idle_ms: without keep-fresh a
    // sweep elsewhere would claim the queued ones.
    let rec = Recorder::build(
        Box::new(|_, _| Ok(())),
        Duration::from_millis(500),
        Capabilities::ALL,
    );
    let mut s = fast();
    s.autoclaim_min_idle_ms = 300;
    s.lock_ttl_ms = 3000;
    let a = rig.start("gw-a", rec.clone(), s.clone()).await;
    let deadline = Instant::now() + T;
    while a.in_flight() < 4 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other = Recorder::ok();
    let b = rig.start("gw-b", other.clone(), s).await;
    rec.wait_sent(4, T).await;
    rig.drained(T).await;
    assert_eq!(
        b.stats().snapshot().claimed,
        0,
        "gw-b took gw-a's live entries"
    );
    assert!(other.calls().is_empty());
    assert_eq!(order_by_channel(&rec.sent())["slow"], vec![1, 2, 3, 4]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_missing_seq_is_skipped_after_the_gap_timeout_and_delivered_late_if_it_shows_up() {
    let rig = Rig::new().await;
    // A producer took seq 1 and died before publishing; seq 2 must not wait forever.
    rig.publish(json!({"channel_id": "c", "text": "two", "seq": 2}))
        .await;
    let mut s = fast();
    s.gap_timeout_ms = 300;
    let rec = Recorder::ok();
    let started = Instant::now();
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(1, T).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(gw.stats().snapshot().gaps_skipped, 1);
    // It does arrive after all: delivered (late), never dropped.
    rig.publish(json!({"channel_id": "c", "text": "one", "seq": 1}))
        .await;
    rec.wait_sent(2, T).await;
    rig.drained(T).await;
    assert_eq!(gw.stats().snapshot().late, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn typing_is_latest_wins_and_expired_updates_are_never_sent() {
    let rig = Rig::new().await;
    rig.publish(json!({"type": "start_typing", "channel_id": "c"}))
        .await;
    rig.publish(json!({"type": "stop_typing", "channel_id": "c"}))
        .await;
    rig.publish(json!({"type": "start_typing", "channel_id": "d", "expires_ms": 1}))
        .await;
    rig.publish(json!({"type": "presence", "text": "old"}))
        .await;
    rig.publish(json!({"type": "presence", "text": "new"}))
        .await;
    rig.publish(json!({"channel_id": "d", "text": "after"}))
        .await;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rig.drained(T).await;
    let kinds: Vec<_> = rec
        .sent()
        .iter()
        .map(|s| (s.channel.clone(), s.kind))
        .collect();
    assert!(kinds.contains(&(Some("c".into()), "stop_typing")));
    assert!(
        !kinds.contains(&(Some("c".into()), "start_typing")),
        "superseded"
    );
    assert!(
        !kinds.contains(&(Some("d".into()), "start_typing")),
        "expired"
    );
    assert_eq!(kinds.iter().filter(|k| k.1 == "presence").count(), 1);
    let st = gw.stats().snapshot();
    assert_eq!((st.superseded, st.expired), (2, 1));
    gw.shutdown().await;
}

#[tokio::test]
async fn unsupported_actions_are_acknowledged_unsent_and_counted() {
    let rig = Rig::new().await;
    rig.publish(json!({"type": "reaction", "channel_id": "c", "message_id": "m", "emoji": "x"}))
        .await;
    rig.publish(json!({"channel_id": "c", "text": "hi"})).await;
    let caps = Capabilities {
        reactions: false,
        ..Capabilities::ALL
    };
    let rec = Recorder::build(Box::new(|_, _| Ok(())), Duration::ZERO, caps);
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rig.drained(T).await;
    assert_eq!(rec.sent().len(), 1);
    assert_eq!(gw.stats().snapshot().unsupported, 1);
    assert!(rig.dlq().await.is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn the_platform_id_is_written_back_and_a_repeated_message_key_is_not_sent_twice() {
    let rig = Rig::new().await;
    let _: () = rig.cmd(&["HSET", "sg:msg:existing", "author", "bot"]).await;
    let _: () = rig.cmd(&["EXPIRE", "sg:msg:existing", "1000"]).await;
    let p1 = rig
        .publish(json!({"channel_id": "c", "text": "a", "message_key": "sg:msg:new"}))
        .await;
    let p2 = rig
        .publish(json!({"channel_id": "c", "text": "b", "message_key": "sg:msg:existing"}))
        .await;
    rig.publish(json!({"channel_id": "c", "text": "a again", "message_key": "sg:msg:new"}))
        .await;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rig.drained(T).await;
    assert_eq!(
        rec.sent().len(),
        2,
        "the repeated message_key is not sent again"
    );
    let new_id: String = rig.cmd(&["HGET", "sg:msg:new", "message_id"]).await;
    assert_eq!(new_id, format!("pm-{}", p1.id));
    let ttl: i64 = rig.cmd(&["TTL", "sg:msg:new"]).await;
    assert!(
        ttl > 89 * 86400,
        "a new cache key expires in 90 days: {ttl}"
    );
    let old: HashMap<String, String> = rig.cmd(&["HGETALL", "sg:msg:existing"]).await;
    assert_eq!(old["message_id"], format!("pm-{}", p2.id));
    assert_eq!(old["author"], "bot");
    let ttl: i64 = rig.cmd(&["TTL", "sg:msg:existing"]).await;
    assert!(
        (900..=1000).contains(&ttl),
        "an existing key keeps its expiry: {ttl}"
    );
    assert_eq!(gw.stats().snapshot().duplicates_skipped, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn rpc_requests_are_answered_on_their_reply_key() {
    let rig = Rig::new().await;
    let reply = format!("{}abc", rig.keys.reply_prefix());
    rig.publish(json!({"type": "rpc_request", "rpc_method": "nope", "reply_key": reply}))
        .await;
    rig.publish(json!({"type": "rpc_request", "rpc_method": "late", "reply_key": format!("{reply}2"), "deadline_ms": 1})).await;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rig.drained(T).await;
    let v: Vec<String> = rig.cmd(&["LRANGE", &reply, "0", "-1"]).await;
    assert_eq!(v.len(), 1);
    assert!(v[0].contains("error") && v[0].contains("nope"), "{}", v[0]);
    let ttl: i64 = rig.cmd(&["TTL", &reply]).await;
    assert!(ttl > 0 && ttl <= 60);
    let late: i64 = rig.cmd(&["EXISTS", &format!("{reply}2")]).await;
    assert_eq!(late, 0, "a request past its deadline is dropped");
    assert_eq!(gw.stats().snapshot().rpc_expired, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_work_and_a_later_gateway_delivers_the_rest() {
    let rig = Rig::new().await;
    for i in 0..200 {
        rig.publish(json!({"channel_id": format!("c{}", i % 4), "text": format!("m{i}")}))
            .await;
    }
    let rec = Recorder::build(
        Box::new(|_, _| Ok(())),
        Duration::from_millis(5),
        Capabilities::ALL,
    );
    let mut s = fast();
    s.max_in_flight = 20;
    let a = rig.start("gw-a", rec.clone(), s.clone()).await;
    rec.wait_sent(10, T).await;
    a.shutdown().await;
    let after_a = rec.sent().len();
    assert!(after_a < 200, "stopped before the end");
    // What it read and did not finish stays pending, and the gateway has
    // unregistered: the next gateway claims it at once.
    assert!(rig.pending().await > 0, "unfinished entries stay pending");
    let registered: Option<String> = rig
        .cmd(&[
            "HGET",
            &format!("sg:{{{}}}:nodes", rig.keys.platform()),
            "gw-a",
        ])
        .await;
    assert_eq!(registered, None, "gw-a unregistered at shutdown");
    let b = rig.start("gw-b", rec.clone(), s).await;
    rec.wait_sent(200, T).await;
    rig.drained(T).await;
    let sent = rec.sent();
    assert_eq!(sent.len(), 200);
    for (c, seqs) in order_by_channel(&sent) {
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "channel {c}");
    }
    b.shutdown().await;
    let _ = Arc::new(());
}

#[tokio::test]
async fn a_rate_limited_channel_does_not_stall_the_others() {
    let rig = Rig::new().await;
    for i in 0..100 {
        rig.publish(json!({"channel_id": "slow", "text": format!("s{i}")}))
            .await;
    }
    for i in 0..100 {
        rig.publish(json!({"channel_id": format!("c{}", i % 10), "text": format!("m{i}")}))
            .await;
    }
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let g = gate.clone();
    let rec = Recorder::scripted(move |s, _| {
        if s.channel.as_deref() == Some("slow") && g.load(std::sync::atomic::Ordering::SeqCst) {
            Err(AdapterError::rate_limited(
                Duration::from_millis(50),
                "429 Too Many Requests",
            ))
        } else {
            Ok(())
        }
    });
    let mut s = fast();
    s.max_in_flight = 20; // far fewer than the slow channel's backlog
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(100, T).await;
    assert!(
        rec.sent()
            .iter()
            .all(|s| s.channel.as_deref() != Some("slow")),
        "the other channels went first"
    );
    assert!(gw.in_flight() <= 100 + 20);
    gate.store(false, std::sync::atomic::Ordering::SeqCst);
    rec.wait_sent(200, T).await;
    rig.drained(T).await;
    let order = order_by_channel(&rec.sent());
    assert_eq!(order["slow"], (1..=100).collect::<Vec<_>>());
    assert_eq!(rec.sent().len(), 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_channel_beyond_its_memory_share_stays_in_order() {
    let rig = Rig::new().await;
    for i in 0..600 {
        rig.publish(json!({"channel_id": "hot", "text": format!("m{i}")}))
            .await;
    }
    // And entries without seq: stream order within one gateway.
    for i in 0..200 {
        let p = json!({"channel_id": "plain", "text": format!("p{i}")}).to_string();
        rig.publisher.publish_raw(p.as_bytes()).await.unwrap();
    }
    let rec = Recorder::build(
        Box::new(|_, _| Ok(())),
        Duration::from_micros(200),
        Capabilities::ALL,
    );
    let mut s = fast();
    s.max_in_flight = 16; // a lane keeps 4 in memory, the rest parked
    s.read_batch = 7;
    s.gap_timeout_ms = 600_000; // an order inversion would stall here, not skip
    let gw = rig.start("gw", rec.clone(), s).await;
    rec.wait_sent(800, T).await;
    rig.drained(T).await;
    let sent = rec.sent();
    assert_eq!(
        order_by_channel(&sent)["hot"],
        (1..=600).collect::<Vec<_>>()
    );
    let plain: Vec<_> = sent
        .iter()
        .filter(|s| s.channel.as_deref() == Some("plain"))
        .map(|s| s.text.clone().unwrap())
        .collect();
    assert_eq!(plain, (0..200).map(|i| format!("p{i}")).collect::<Vec<_>>());
    let st = gw.stats().snapshot();
    assert_eq!((st.gaps_skipped, st.late), (0, 0));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_message_key_of_the_wrong_type_does_not_wedge_the_channel() {
    let rig = Rig::new().await;
    let _: () = rig.cmd(&["SET", "sg:msg:string", "not a hash"]).await;
    rig.publish(json!({"channel_id": "c", "text": "a", "message_key": "sg:msg:string"}))
        .await;
    rig.publish(json!({"channel_id": "c", "text": "b"})).await;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rec.wait_sent(2, T).await;
    rig.drained(T).await;
    let v: String = rig.cmd(&["GET", "sg:msg:string"]).await;
    assert_eq!(v, "not a hash", "the producer's key is left as it was");
    assert_eq!(order_by_channel(&rec.sent())["c"], vec![1, 2]);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_replaced_instance_cannot_commit() {
    let rig = Rig::new().await;
    let p = rig.publish(json!({"channel_id": "c", "text": "x"})).await;
    rig.read_as("gw", 1).await;
    let old = Identity::new("gw");
    rig.bus.register(&old).await.unwrap();
    // A restart under the same name replaces it: the old instance is fenced.
    let new = Identity::new("gw");
    rig.bus.register(&new).await.unwrap();
    let batch = CommitBatch {
        acks: vec![p.id.clone()],
        marks: vec![(rig.keys.channel("c"), Some(1))],
        ..CommitBatch::default()
    };
    let r = rig
        .bus
        .commit(&old, &batch, 1, Duration::from_secs(60), 0)
        .await
        .unwrap();
    assert_eq!(r, Committed::Stale);
    assert_eq!(rig.pending().await, 1, "nothing acknowledged");
    let done: Option<String> = rig.cmd(&["HGET", &rig.keys.channel("c"), "done"]).await;
    assert_eq!(done, None, "no mark written");
    let r = rig
        .bus
        .commit(&new, &batch, 1, Duration::from_secs(60), 0)
        .await
        .unwrap();
    assert!(matches!(r, Committed::Ok { .. }));
    assert_eq!(rig.pending().await, 0);
}

#[tokio::test]
async fn edits_resolve_their_target_and_queued_ones_coalesce() {
    let rig = Rig::new().await;
    let placeholder = rig
        .publish(json!({"channel_id": "c", "text": "thinking", "message_key": "sg:msg:reply"}))
        .await;
    for i in 1..=20 {
        rig.publish(json!({"type": "edit", "channel_id": "c", "target_key": "sg:msg:reply", "text": format!("part {i}")}))
            .await;
    }
    rig.publish(json!({"type": "delete", "channel_id": "c", "target_key": "sg:msg:other"}))
        .await;
    // The placeholder's send is slow: the edits queue up behind it.
    let rec = Recorder::build(
        Box::new(|_, _| Ok(())),
        Duration::from_millis(300),
        Capabilities::ALL,
    );
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rig.drained(T).await;
    let sent = rec.sent();
    assert_eq!(sent[0].kind, "message");
    let edits: Vec<_> = sent.iter().filter(|s| s.kind == "edit").collect();
    assert!(
        !edits.is_empty() && edits.len() < 20,
        "{} edits sent",
        edits.len()
    );
    assert_eq!(
        edits.last().unwrap().text.as_deref(),
        Some("part 20"),
        "newest wins"
    );
    let want = format!("pm-{}", placeholder.id);
    assert!(
        edits
            .iter()
            .all(|e| e.target.as_deref() == Some(want.as_str()))
    );
    let st = gw.stats().snapshot();
    assert_eq!(st.coalesced as usize + edits.len(), 20);
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["error_kind"], "unknown_target");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_repeated_key_is_not_sent_twice_even_when_the_platform_returns_no_id() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "c", "text": "once", "message_key": "sg:msg:k"}))
        .await;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rig.drained(T).await;
    // The key's cache is gone (another system cleared it), yet the repeat is
    // known from the de-duplication record.
    let _: i64 = rig.cmd(&["DEL", "sg:msg:k"]).await;
    rig.publish(json!({"channel_id": "c", "text": "once", "message_key": "sg:msg:k"}))
        .await;
    rig.drained(T).await;
    assert_eq!(rec.sent().len(), 1);
    assert_eq!(gw.stats().snapshot().duplicates_skipped, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_registered_gateway_that_stops_beating_is_found_dead_and_its_entries_move() {
    let rig = Rig::new().await;
    for i in 0..5 {
        rig.publish(json!({"channel_id": "c", "text": format!("m{i}")}))
            .await;
    }
    // A gateway registered, read everything, then froze (its beat stands still).
    let ghost = Identity::new("ghost");
    rig.bus.register(&ghost).await.unwrap();
    assert_eq!(rig.read_as("ghost", 5).await.len(), 5);
    let rec = Recorder::ok();
    let gw = rig.start("live", rec.clone(), fast()).await;
    rec.wait_sent(5, T).await;
    rig.drained(T).await;
    assert_eq!(
        order_by_channel(&rec.sent())["c"],
        (1..=5).collect::<Vec<_>>()
    );
    let still: Option<String> = rig
        .cmd(&[
            "HGET",
            &format!("sg:{{{}}}:nodes", rig.keys.platform()),
            "ghost",
        ])
        .await;
    assert_eq!(still, None, "declared dead");
    assert_eq!(gw.stats().snapshot().nodes_found_dead, 1);
    gw.shutdown().await;
}
