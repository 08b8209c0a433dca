//! The operations issue, against private redis-servers: `status` figures, dead
//! letter replay (exactly once, original idempotency key, dry run), purge
//! safety, trimming under a live backlog, `/metrics` and `/readyz`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Recorder, Rig, fast};
use serde_json::json;
use stargazer::adapters::{
    Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, SharedAdapter,
};
use stargazer::http::Readiness;
use stargazer::ops::dlq::{self, Filter, ReplayOptions, Selection, Since};
use stargazer::ops::gauges::Gauges;
use stargazer::ops::status;
use stargazer::redis_server::RedisServer;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

/// Append a dead letter by hand, as the gateway's script would.
async fn add_dead_letter(rig: &Rig, kind: &str, channel: &str, payload: &str) -> String {
    let orig = format!("{}-0", 1_000 + rand::random::<u16>() as u64);
    rig.cmd(&[
        "XADD",
        &rig.keys.dlq(),
        "*",
        "payload",
        payload,
        "error",
        "made up",
        "error_kind",
        kind,
        "attempts",
        "1",
        "original_id",
        &orig,
        "consumer",
        "gw-x",
        "failed_ms",
        &stargazer::now_ms().to_string(),
        "channel_id",
        channel,
    ])
    .await
}

async fn xlen(rig: &Rig, key: &str) -> u64 {
    rig.cmd(&["XLEN", key]).await
}

/// Poll a condition on Redis until it holds or `within` passes.
async fn until<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn status_figures_match_a_constructed_state() {
    let rig = Rig::new().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            rig.publish(json!({"channel_id": "c", "text": format!("m{i}")}))
                .await
                .id,
        );
    }
    // A gateway read three and died: pending for it; seven unread.
    let taken = rig.read_as("dead-gw", 3).await;
    assert_eq!(taken.len(), 3);
    add_dead_letter(&rig, "rejected", "c", r#"{"channel_id":"c","text":"x"}"#).await;
    let now = stargazer::now_ms();
    let _: () = rig
        .cmd(&[
            "HSET",
            &rig.keys.channel("stuck"),
            "gap_seq",
            "5",
            "gap_since",
            &(now - 4_000).to_string(),
            "done",
            "3",
        ])
        .await;
    // A channel hash without a gap is not reported.
    let _: () = rig
        .cmd(&["HSET", &rig.keys.channel("fine"), "done", "9"])
        .await;

    let platform = rig.keys.platform().to_owned();
    let st = status::collect(&rig.bus, "sg", std::slice::from_ref(&platform))
        .await
        .unwrap();
    let p = &st.platforms[0];
    assert_eq!(p.platform, platform);
    assert_eq!(p.stream_length, 10);
    assert!(p.group_exists);
    assert_eq!(p.lag, Some(7));
    assert_eq!(p.pending, 3);
    let oldest = p.oldest_pending.as_ref().expect("an oldest pending entry");
    assert_eq!(oldest.id, ids[0].0);
    assert_eq!(oldest.consumer, "dead-gw");
    assert_eq!(oldest.deliveries, 1);
    assert_eq!(p.consumers.len(), 1);
    assert_eq!(p.consumers[0].name, "dead-gw");
    assert_eq!(p.consumers[0].pending, 3);
    assert_eq!(p.dead_letters, 1);
    assert_eq!(p.gap_channels.len(), 1);
    let g = &p.gap_channels[0];
    assert_eq!(
        (g.channel.as_str(), g.waiting_for_seq, g.done_seq),
        ("stuck", 5, 3)
    );
    assert!(
        g.waiting_ms >= 3_000 && g.waiting_ms < 60_000,
        "{}",
        g.waiting_ms
    );

    let table = status::render_table(&st);
    assert!(
        table.contains("PLATFORM") && table.contains(&platform),
        "{table}"
    );
    assert!(table.contains("dead-gw"), "{table}");
    assert!(table.contains("stuck"), "{table}");
    let v = serde_json::to_value(&st).unwrap();
    assert_eq!(v["platforms"][0]["pending"], 3);
    assert_eq!(v["platforms"][0]["gap_channels"][0]["channel"], "stuck");
}

#[tokio::test]
async fn status_of_a_platform_without_a_group_says_so() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "c", "text": "early"}))
        .await;
    let st = status::collect(&rig.bus, "sg", &[rig.keys.platform().to_owned()])
        .await
        .unwrap();
    let p = &st.platforms[0];
    assert_eq!((p.stream_length, p.group_exists, p.pending), (1, false, 0));
    assert!(status::render_table(&st).contains("no group"));
}

#[tokio::test]
async fn replay_delivers_each_dead_letter_once_with_its_original_key() {
    let rig = Rig::new().await;
    let platform = rig.keys.platform().to_owned();
    // First a platform that refuses everything: three dead letters.
    let refusing = Recorder::scripted(|_, _| Err(AdapterError::permanent("403: missing access")));
    let gw = rig.start("gw-a", refusing.clone(), fast()).await;
    let m1 = rig.publish(json!({"channel_id": "c", "text": "one"})).await;
    let m2 = rig
        .publish(json!({"channel_id": "c", "text": "two", "idempotency_key": "idem-2"}))
        .await;
    let r3 = rig
        .publish(json!({"type": "reaction", "channel_id": "c", "message_id": "m-1", "emoji": "👍"}))
        .await;
    rig.drained(T).await;
    gw.shutdown().await;
    assert_eq!(rig.dlq().await.len(), 3);
    let outbound_before = xlen(&rig, &rig.keys.outbound()).await;

    // A dry run reports all three and changes nothing.
    let all = Selection::Filter(Filter::default());
    let dry = dlq::replay(
        &rig.bus,
        &all,
        &ReplayOptions {
            dry_run: true,
            ..ReplayOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((dry.replayed.len(), dry.skipped.len()), (3, 0));
    assert!(dry.replayed.iter().all(|r| r.new_id.is_none()));
    assert_eq!(rig.dlq().await.len(), 3);
    assert_eq!(xlen(&rig, &rig.keys.outbound()).await, outbound_before);

    // Now a working platform, and the real replay.
    let rec = Recorder::ok();
    let gw = rig.start("gw-b", rec.clone(), fast()).await;
    let rep = dlq::replay(&rig.bus, &all, &ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!((rep.replayed.len(), rep.skipped.len()), (3, 0));
    assert!(rig.dlq().await.is_empty(), "replayed entries leave the DLQ");
    rec.wait_sent(3, T).await;
    rig.drained(T).await;
    // Replaying again finds nothing: each was moved exactly once.
    let again = dlq::replay(&rig.bus, &all, &ReplayOptions::default())
        .await
        .unwrap();
    assert!(again.replayed.is_empty());
    rig.drained(T).await;

    let sent = rec.sent();
    assert_eq!(sent.len(), 3, "each dead letter delivered once: {sent:?}");
    let keys: HashMap<String, usize> = sent.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.idempotency_key.clone()).or_default() += 1;
        m
    });
    let want = [
        m1.message_key.clone().unwrap(),
        "idem-2".to_owned(),
        format!("{platform}:{}", r3.id),
    ];
    for k in &want {
        assert_eq!(keys.get(k), Some(&1), "key {k} in {keys:?}");
    }
    assert!(
        sent.iter().all(|s| s.seq.is_none()),
        "seq removed on replay"
    );
    assert_eq!(m2.seq, Some(2));
    gw.shutdown().await;
}

#[tokio::test]
async fn replay_by_id_and_filters_touch_only_the_selection() {
    let rig = Rig::new().await;
    let a = add_dead_letter(&rig, "rejected", "c1", r#"{"channel_id":"c1","text":"a"}"#).await;
    let _b = add_dead_letter(
        &rig,
        "retries_exhausted",
        "c2",
        r#"{"channel_id":"c2","text":"b"}"#,
    )
    .await;
    let _c = add_dead_letter(&rig, "not_json", "c1", "{oops").await;

    let listed = dlq::list(
        &rig.bus,
        &Filter {
            channel: Some("c1".into()),
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 2);
    let limited = dlq::list(
        &rig.bus,
        &Filter {
            limit: Some(1),
            since: Some(Since::parse("10m").unwrap()),
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].id, a);

    // A bad payload is skipped with a reason, not replayed.
    let rep = dlq::replay(
        &rig.bus,
        &Selection::Filter(Filter {
            channel: Some("c1".into()),
            ..Filter::default()
        }),
        &ReplayOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!((rep.replayed.len(), rep.skipped.len()), (1, 1));
    assert!(rep.skipped[0].reason.contains("not a JSON object"));
    assert_eq!(rig.dlq().await.len(), 2);
    let shown = dlq::show(&rig.bus, &rep.skipped[0].dlq_id).await.unwrap();
    assert_eq!(shown.unwrap().error_kind, "not_json");

    // The replayed envelope: no seq, the original id, signed when asked.
    let r: redis::streams::StreamRangeReply =
        rig.cmd(&["XRANGE", &rig.keys.outbound(), "-", "+"]).await;
    assert_eq!(r.ids.len(), 1);
    let payload: String = r.ids[0].get("payload").unwrap();
    let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert!(v["replayed_from"].as_str().is_some());
    assert!(v.get("seq").is_none());

    let missing = dlq::replay(
        &rig.bus,
        &Selection::One("1-1".into()),
        &ReplayOptions::default(),
    )
    .await
    .unwrap();
    assert!(missing.replayed.is_empty() && missing.skipped.len() == 1);
}

#[tokio::test]
async fn replay_signs_with_the_configured_secret() {
    let rig = Rig::new().await;
    add_dead_letter(
        &rig,
        "rejected",
        "c",
        r#"{"channel_id":"c","text":"a","seq":3}"#,
    )
    .await;
    let secret = b"s3cret".to_vec();
    dlq::replay(
        &rig.bus,
        &Selection::Filter(Filter::default()),
        &ReplayOptions {
            signing_secret: Some(secret.clone()),
            ..ReplayOptions::default()
        },
    )
    .await
    .unwrap();
    let r: redis::streams::StreamRangeReply =
        rig.cmd(&["XRANGE", &rig.keys.outbound(), "-", "+"]).await;
    let payload: String = r.ids[0].get("payload").unwrap();
    let sig: String = r.ids[0].get("sig").unwrap();
    assert_eq!(sig, stargazer::envelope::sign(&secret, payload.as_bytes()));
}

#[tokio::test]
async fn purge_without_yes_deletes_nothing() {
    let rig = Rig::new().await;
    for k in ["rejected", "rejected", "too_large"] {
        add_dead_letter(&rig, k, "c", r#"{"channel_id":"c","text":"a"}"#).await;
    }
    let all = Selection::Filter(Filter::default());
    let refused = dlq::purge(&rig.bus, &all, false, false).await.unwrap();
    assert_eq!((refused.selected, refused.deleted), (3, 0));
    assert_eq!(rig.dlq().await.len(), 3);

    let rejected = Selection::Filter(Filter {
        kind: Some("rejected".into()),
        ..Filter::default()
    });
    let done = dlq::purge(&rig.bus, &rejected, true, false).await.unwrap();
    assert_eq!((done.selected, done.deleted), (2, 2));
    let left = rig.dlq().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["error_kind"], "too_large");
}

#[tokio::test]
async fn trimming_under_a_live_backlog_removes_only_acked_entries() {
    let rig = Rig::new().await;
    let stream = rig.keys.outbound();
    let group = rig.keys.group();
    let mut a = Vec::new();
    for i in 0..5 {
        a.push(
            rig.publish(json!({"channel_id": "c", "text": format!("a{i}")}))
                .await
                .id
                .0,
        );
    }
    // A gateway read all five, acknowledged the last four and died holding
    // the first; five more (another channel, so no seq gate is involved) are
    // published and nobody reads them.
    rig.read_as("dead-gw", 5).await;
    for id in &a[1..] {
        let _: u64 = rig.cmd(&["XACK", &stream, &group, id]).await;
    }
    let mut b = Vec::new();
    for i in 0..5 {
        b.push(
            rig.publish(json!({"channel_id": "d", "text": format!("b{i}")}))
                .await
                .id
                .0,
        );
    }
    let zero = Duration::ZERO;

    // The oldest pending entry bounds the trim: nothing can go.
    let t = stargazer::trim::trim_once(&rig.bus, zero).await.unwrap();
    assert_eq!(t.removed, 0, "{t:?}");
    assert_eq!(t.minid.as_deref(), Some(a[0].as_str()));
    let all: redis::streams::StreamRangeReply = rig.cmd(&["XRANGE", &stream, "-", "+"]).await;
    assert_eq!(
        all.ids.len(),
        10,
        "pending and unread entries all still readable"
    );

    // Retention keeps even acknowledged entries while they are young.
    let _: u64 = rig.cmd(&["XACK", &stream, &group, &a[0]]).await;
    let t = stargazer::trim::trim_once(&rig.bus, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(t.removed, 0);

    // Acknowledged and old enough: gone; the unread ones all stay.
    let t = stargazer::trim::trim_once(&rig.bus, zero).await.unwrap();
    assert_eq!(t.removed, 5);
    let left: redis::streams::StreamRangeReply = rig.cmd(&["XRANGE", &stream, "-", "+"]).await;
    let left: Vec<String> = left.ids.into_iter().map(|e| e.id).collect();
    assert_eq!(left, b);

    // A gateway still gets every unread entry after the trim.
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    rec.wait_sent(5, T).await;
    rig.drained(T).await;
    let texts: Vec<String> = rec.sent().into_iter().filter_map(|s| s.text).collect();
    assert_eq!(texts, ["b0", "b1", "b2", "b3", "b4"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn trimming_leaves_a_stream_without_a_group_alone() {
    let rig = Rig::new().await;
    rig.publish(json!({"channel_id": "c", "text": "early"}))
        .await;
    let t = stargazer::trim::trim_once(&rig.bus, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((t.minid, t.removed), (None, 0));
    assert_eq!(xlen(&rig, &rig.keys.outbound()).await, 1);
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("http get");
    let code = r.status().as_u16();
    (code, r.text().await.unwrap_or_default())
}

/// The value of the sample of `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_expose_the_documented_names_and_move_with_deliveries() {
    let rig = Rig::new().await;
    let p = rig.keys.platform().to_owned();
    let stop = CancellationToken::new();
    let readiness = Readiness::new(&rig.server.url());
    let addr = stargazer::http::serve("127.0.0.1:0".parse().unwrap(), stop.clone(), readiness)
        .await
        .unwrap();
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    for i in 0..3 {
        rig.publish(json!({"channel_id": "c", "text": format!("m{i}")}))
            .await;
    }
    rig.publisher.publish_raw(b"not json").await.unwrap();
    rec.wait_sent(3, T).await;
    rig.drained(T).await;

    let delivered = [
        ("platform", p.as_str()),
        ("type", "message"),
        ("outcome", "delivered"),
    ];
    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        sample(&text, "stargazer_deliveries_total", &delivered),
        Some(3.0),
        "{text}"
    );
    let not_json = [("platform", p.as_str()), ("kind", "not_json")];
    assert_eq!(
        sample(&text, "stargazer_dead_letters_total", &not_json),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "stargazer_adapter_latency_seconds_count",
            &[("platform", &p)]
        ),
        Some(3.0)
    );
    assert!(text.contains(&format!(
        "# HELP stargazer_deliveries_total {}",
        stargazer::metrics::DELIVERIES.help
    )));

    // The gauges, once refreshed, with a capped dead-letter stream at its cap.
    let mut g = Gauges::new(rig.bus.clone(), gw.dispatcher(), 1);
    assert!(
        g.refresh().await.unwrap(),
        "one dead letter reaches a cap of 1"
    );
    let (_, text) = get(addr, "/metrics").await;
    for d in [
        &stargazer::metrics::IN_FLIGHT,
        &stargazer::metrics::ACTIVE_LANES,
        &stargazer::metrics::PENDING,
        &stargazer::metrics::LAG,
        &stargazer::metrics::OLDEST_PENDING_AGE,
        &stargazer::metrics::DLQ_LENGTH,
    ] {
        assert!(
            sample(&text, d.name, &[("platform", &p)]).is_some(),
            "{} missing:\n{text}",
            d.name
        );
    }
    assert_eq!(
        sample(
            &text,
            "stargazer_dead_letter_stream_at_cap",
            &[("platform", &p)]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "stargazer_pending", &[("platform", &p)]),
        Some(0.0)
    );

    // More deliveries move the counter.
    for i in 3..5 {
        rig.publish(json!({"channel_id": "c", "text": format!("m{i}")}))
            .await;
    }
    rec.wait_sent(5, T).await;
    rig.drained(T).await;
    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(
        sample(&text, "stargazer_deliveries_total", &delivered),
        Some(5.0)
    );
    gw.shutdown().await;
    stop.cancel();
}

/// An adapter whose platform session is down.
#[derive(Debug)]
struct NotReady;

impl Adapter for NotReady {
    fn kind(&self) -> &'static str {
        "not-ready"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    fn ready(&self) -> bool {
        false
    }
    fn deliver<'a>(&'a self, _d: Delivery<'a>) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async { Err(AdapterError::transient("down")) })
    }
}

/// A redis-server on a given port (to bring one back where the first died).
struct Restarted(std::process::Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn restart_on(port: u16) -> Restarted {
    let dir = tempfile::tempdir().unwrap();
    let bin = std::env::var("STARGAZER_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let child = std::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--dir", &dir.path().to_string_lossy()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start redis-server");
    Restarted(child, dir)
}

#[tokio::test]
async fn readyz_follows_redis_and_the_adapters() {
    let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
    let mut server = RedisServer::start(bin.as_deref()).unwrap();
    let port = server.port();
    let readiness = Readiness::new(&server.url());
    let stop = CancellationToken::new();
    let addr = stargazer::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        stop.clone(),
        readiness.clone(),
    )
    .await
    .unwrap();

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "not ready before the platforms run");
    assert!(body.contains("starting"), "{body}");

    let ok: SharedAdapter = Recorder::ok();
    readiness.set_adapters(vec![("p".into(), ok.clone())]);
    assert_eq!(get(addr, "/readyz").await.0, 200);

    readiness.set_adapters(vec![
        ("p".into(), ok.clone()),
        ("q".into(), Arc::new(NotReady)),
    ]);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("adapter not ready: q"), "{body}");
    readiness.set_adapters(vec![("p".into(), ok)]);

    server.kill();
    let started = Instant::now();
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "Redis is down");
    assert!(body.contains("redis"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the check is bounded"
    );
    assert_eq!(get(addr, "/healthz").await.0, 200, "still alive");

    // Redis comes back on the same address: ready again, with no restart.
    let _back = restart_on(port);
    until(T, "/readyz to recover", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    stop.cancel();
}
