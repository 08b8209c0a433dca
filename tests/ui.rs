//! The dashboard's JSON API (`/ui/api/…`) against real gateways and a private
//! redis-server: the figures of a constructed state (backlog, dead letter,
//! order gap, two gateways), replay exactly once, refusals without the token,
//! and server-side paging through 100,000 dead letters.

mod common;
#[path = "common/dashboard.rs"]
mod dashboard;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashboard::{SLOW, Scene, T, TOKEN};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stargazer::adapters::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery};
use stargazer::http::Readiness;

async fn get(url: String) -> (StatusCode, Value) {
    let r = reqwest::get(url).await.expect("http get");
    let code = r.status();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn post(url: String, token: Option<&str>, body: Value) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new().post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("http post");
    let code = r.status();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overview_shows_backlog_dead_letter_gap_and_both_gateways() {
    let mut s = Scene::start().await;
    let p = s.platform();
    let v = s.settled().await;
    let o = &v["platforms"][0];
    assert_eq!(o["platform"], p.as_str());
    assert_eq!(o["adapter"], "webhook");
    assert_eq!(o["ready"], true);
    assert!(o["not_ready_reason"].is_null());
    assert_eq!(v["node"], "gw-a");
    assert_eq!(v["actions_enabled"], true);
    // Every entry published is in the stream; nothing is unread; the slow
    // channel's twenty and the gapped channel's seq 3 are pending.
    assert_eq!(o["stream_length"], (SLOW + 1 + 2 + dashboard::OK) as u64);
    assert_eq!(o["lag"], 0);
    assert_eq!(o["pending"], (SLOW + 1) as u64);
    let oldest = &o["oldest_pending"];
    assert_eq!(oldest["id"], s.slow_ids[0].as_str(), "{oldest}");
    assert!(oldest["age_ms"].as_u64().unwrap() < 60_000);
    assert_eq!(o["dead_letters"], 1);
    // The gap: seq 2 never came; 1 is done; the owner's gate waits.
    let gaps = o["gap_channels"].as_array().unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(gaps[0]["channel"], "gapped");
    assert_eq!(gaps[0]["waiting_for_seq"], 2);
    assert_eq!(gaps[0]["done_seq"], 1);
    assert!(gaps[0]["owner"].as_str().unwrap().starts_with("gw-"));
    assert!(gaps[0]["since_ms"].as_u64().unwrap() > 0);
    assert_eq!(o["gap_timeout_ms"], 60_000);
    // Two gateways, both live, this one marked; their pending adds up.
    let gws = o["gateways"].as_array().unwrap();
    let names: Vec<&str> = gws.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["gw-a", "gw-b"]);
    assert!(gws.iter().all(|g| g["health"] == "live"), "{gws:?}");
    assert!(gws.iter().all(|g| g["instance"].is_string()));
    assert_eq!(gws[0]["this_node"], true);
    assert_eq!(gws[1]["this_node"], false);
    let held: u64 = gws.iter().map(|g| g["pending"].as_u64().unwrap()).sum();
    assert_eq!(held, (SLOW + 1) as u64);
    // The same figures `stargazer status` computes.
    let st = stargazer::ops::status::collect(&s.rig.bus, "sg", std::slice::from_ref(&p))
        .await
        .unwrap();
    let sp = &st.platforms[0];
    assert_eq!(o["stream_length"], sp.stream_length);
    assert_eq!(o["pending"], sp.pending);
    assert_eq!(o["dead_letters"], sp.dead_letters);

    // Rates are this gateway's own counters: with gw-b shut down, what is
    // published next is gw-a's to deliver, and its chart moves by exactly that.
    let totals = |r: &Value| r["platforms"][0]["totals"]["delivered"].as_u64().unwrap();
    let (_, r) = get(s.url("/ui/api/rates?window=minute")).await;
    assert_eq!(r["platforms"][0]["platform"], p.as_str());
    let before = totals(&r);
    s.stop_b().await;
    let seen = s.receiver.delivered().len();
    for i in 0..10 {
        s.rig
            .publish(json!({"channel_id": "after", "text": format!("after {i}")}))
            .await;
    }
    s.receiver.wait(seen + 10, T).await;
    let deadline = Instant::now() + T;
    loop {
        // The overview samples the fleet's figures (while someone watches).
        let _ = get(s.url("/ui/api/overview")).await;
        let (code, r) = get(s.url("/ui/api/rates?window=minute")).await;
        assert_eq!(code, 200);
        let series = &r["platforms"][0];
        let points = series["t"].as_array().unwrap().len();
        let positive = |k: &str| {
            series[k]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x.as_f64().unwrap() > 0.0)
        };
        let moved = positive("delivered") && positive("fleet_finished");
        if totals(&r) == before + 10 && moved {
            assert_eq!(series["delivered"].as_array().unwrap().len(), points);
            assert_eq!(series["retries"].as_array().unwrap().len(), points);
            break;
        }
        assert!(totals(&r) <= before + 10, "{r}");
        assert!(Instant::now() < deadline, "the rates did not move: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // gw-b left the fleet: no longer registered, its entries taken over.
    let deadline = Instant::now() + T;
    loop {
        let (_, v) = get(s.url("/ui/api/overview")).await;
        let gws = v["platforms"][0]["gateways"].as_array().unwrap().clone();
        let b = gws.iter().find(|g| g["name"] == "gw-b");
        let a = gws.iter().find(|g| g["name"] == "gw-a").unwrap();
        if b.is_none_or(|b| b["health"] == "gone") && a["pending"] == (SLOW + 1) as u64 {
            assert_eq!(a["health"], "live");
            break;
        }
        assert!(Instant::now() < deadline, "gw-b still shown: {gws:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, r) = get(s.url("/ui/api/rates?window=week")).await;
    assert_eq!(code, 400);
    assert!(r["error"].as_str().unwrap().contains("minute or hour"));

    // The dead letter, decoded, in the list and alone.
    let (code, page) = get(s.url(&format!("/ui/api/platforms/{p}/dlq"))).await;
    assert_eq!(code, 200);
    assert_eq!(page["total"], 1);
    let row = &page["entries"][0];
    assert_eq!(row["original_id"], s.bad_id.as_str());
    assert_eq!(row["error_kind"], "rejected");
    assert_eq!(row["channel_id"], "bad");
    assert_eq!(row["type"], "message");
    assert_eq!(row["preview"], "to a channel that is gone");
    assert_eq!(row["replayable"], true);
    assert!(page["next_before"].is_null());
    let id = row["id"].as_str().unwrap();
    let (code, e) = get(s.url(&format!("/ui/api/platforms/{p}/dlq/{id}"))).await;
    assert_eq!(code, 200);
    assert!(
        e["error"].as_str().unwrap().contains("Unknown Channel"),
        "{e}"
    );
    assert_eq!(e["envelope"]["text"], "to a channel that is gone");
    assert_eq!(e["replay"]["idempotency_key"], s.bad_key.as_str());
    assert_eq!(e["attempts"], 1);
    let history: Vec<&str> = e["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["what"].as_str().unwrap())
        .collect();
    assert!(
        history
            .last()
            .unwrap()
            .starts_with("dead-lettered as rejected"),
        "{history:?}"
    );
    assert!(history.iter().any(|h| h.contains(&s.bad_id)), "{history:?}");

    // Bad input is named.
    for (q, says) in [
        ("?limit=0", "limit"),
        ("?before=abc", "before"),
        ("?since=soon", "since"),
    ] {
        let (code, e) = get(s.url(&format!("/ui/api/platforms/{p}/dlq{q}"))).await;
        assert_eq!(code, 400, "{q}");
        assert!(e["error"].as_str().unwrap().contains(says), "{q}: {e}");
    }
    let (code, e) = get(s.url("/ui/api/platforms/nope/dlq")).await;
    assert_eq!(code, 404);
    assert!(e["error"].as_str().unwrap().contains(&p), "{e}");
    let (code, _) = get(s.url(&format!("/ui/api/platforms/{p}/dlq/1-1"))).await;
    assert_eq!(code, 404);

    // The page itself: embedded, self-contained.
    let r = reqwest::get(s.url("/ui/")).await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(html.contains("app.js") && html.contains("Dead letters"));
    let r = reqwest::get(s.url("/ui")).await.unwrap();
    assert_eq!(r.url().path(), "/ui/", "redirected");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_delivers_once_and_actions_need_the_token() {
    let s = Scene::start().await;
    let p = s.platform();
    let dlq = s.dlq_ids().await;
    assert_eq!(dlq.len(), 1);
    let replay = s.url(&format!("/ui/api/platforms/{p}/dlq/replay"));
    let purge = s.url(&format!("/ui/api/platforms/{p}/dlq/purge"));
    let one = json!({"ids": [dlq[0]]});

    // Without a token, with a wrong one, or with GET: refused, nothing moves.
    let (code, e) = post(replay.clone(), None, one.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert!(e["error"].as_str().unwrap().contains("Bearer"), "{e}");
    let (code, e) = post(replay.clone(), Some("not-the-token-at-all"), one.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert!(e["error"].as_str().unwrap().contains("wrong"), "{e}");
    let (code, _) = post(purge.clone(), None, one.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = post(s.url("/ui/api/auth"), Some("nope"), json!({})).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = post(s.url("/ui/api/auth"), Some(TOKEN), json!({})).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        reqwest::get(replay.clone()).await.unwrap().status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(s.dlq_ids().await, dlq, "refusals change nothing");
    // A malformed selection is named, with the token.
    let (code, e) = post(replay.clone(), Some(TOKEN), json!({"ids": ["x"]})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(e["error"].as_str().unwrap().contains("`x`"), "{e}");

    // A dry run reports and changes nothing.
    let (code, dry) = post(
        replay.clone(),
        Some(TOKEN),
        json!({"ids": [dlq[0]], "dry_run": true}),
    )
    .await;
    assert_eq!(code, 200, "{dry}");
    assert_eq!(dry["replayed"].as_array().unwrap().len(), 1);
    assert!(dry["replayed"][0]["new_id"].is_null());
    assert_eq!(s.dlq_ids().await, dlq);

    // The platform knows the channel again; replay it.
    *s.receiver.accept_bad.lock().unwrap() = true;
    let (code, rep) = post(replay.clone(), Some(TOKEN), one.clone()).await;
    assert_eq!(code, 200, "{rep}");
    assert_eq!(rep["replayed"].as_array().unwrap().len(), 1, "{rep}");
    assert_eq!(rep["replayed"][0]["idempotency_key"], s.bad_key.as_str());
    assert!(s.dlq_ids().await.is_empty());
    s.delivered_once(&s.bad_key).await;
    // Replaying it again finds nothing: it was moved exactly once.
    let (code, again) = post(replay.clone(), Some(TOKEN), one.clone()).await;
    assert_eq!(code, 200);
    assert_eq!(again["replayed"].as_array().unwrap().len(), 0);
    assert_eq!(again["skipped"][0]["reason"], "no such dead letter");
    s.delivered_once(&s.bad_key).await;
    let got: Vec<_> = s
        .receiver
        .delivered()
        .into_iter()
        .filter(|g| g.idempotency_key == s.bad_key)
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "to a channel that is gone");
    assert_eq!(got[0].body["replayed_from"], s.bad_id.as_str());
    assert!(got[0].body["seq"].is_null() || got[0].body.get("seq").is_none());

    // Purge: a selection by filter, counted first, then deleted.
    for i in 0..3 {
        s.add_dead_letter(
            "too_large",
            "c",
            &format!("{{\"channel_id\":\"c\",\"text\":\"{i}\"}}"),
            "big",
        )
        .await;
    }
    let keep = s
        .add_dead_letter("rejected", "c", r#"{"channel_id":"c","text":"keep"}"#, "no")
        .await;
    let by_kind = json!({"filter": {"kind": "too_large"}});
    let (code, e) = post(purge.clone(), Some(TOKEN), json!({"filter": {}})).await;
    assert_eq!(
        code,
        StatusCode::BAD_REQUEST,
        "an empty filter is not `all`: {e}"
    );
    let (code, r) = post(
        purge.clone(),
        Some(TOKEN),
        json!({"filter": {"kind": "too_large"}, "dry_run": true}),
    )
    .await;
    assert_eq!(
        (code.as_u16(), r["selected"].as_u64(), r["deleted"].as_u64()),
        (200, Some(3), Some(0))
    );
    assert_eq!(s.dlq_ids().await.len(), 4);
    let (code, r) = post(purge.clone(), Some(TOKEN), by_kind).await;
    assert_eq!((code.as_u16(), r["deleted"].as_u64()), (200, Some(3)));
    assert_eq!(s.dlq_ids().await, [keep]);
    s.stop().await;
}

/// An adapter whose platform refused its credential (circuit open).
#[derive(Debug)]
struct Refused;

impl Adapter for Refused {
    fn kind(&self) -> &'static str {
        "discord"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    fn ready(&self) -> bool {
        false
    }
    fn deliver<'a>(&'a self, _d: Delivery<'a>) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async { Err(AdapterError::unauthorized("401: invalid token")) })
    }
}

#[tokio::test]
async fn a_read_only_dashboard_refuses_actions_and_shows_an_open_circuit_red() {
    let rig = common::Rig::new().await;
    let p = rig.keys.platform().to_owned();
    let readiness = Readiness::new(&rig.server.url());
    readiness.set_adapters(vec![(p.clone(), Arc::new(Refused))]);
    let (_ui, addr, stop) = dashboard::standalone(&rig, None, readiness).await;
    let id = dashboard::add_dead_letter(
        &rig,
        "rejected",
        "c",
        r#"{"channel_id":"c","text":"x"}"#,
        "no",
    )
    .await;
    let (code, e) = post(
        format!("http://{addr}/ui/api/platforms/{p}/dlq/replay"),
        Some(TOKEN),
        json!({"ids": [id]}),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(e["error"].as_str().unwrap().contains("read-only"), "{e}");
    let (code, _) = post(
        format!("http://{addr}/ui/api/platforms/{p}/dlq/purge"),
        None,
        json!({"all": true}),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(rig.dlq().await.len(), 1);

    let (code, v) = get(format!("http://{addr}/ui/api/overview")).await;
    assert_eq!(code, 200);
    assert_eq!(v["actions_enabled"], false);
    let o = &v["platforms"][0];
    assert_eq!(o["ready"], false);
    assert!(
        o["not_ready_reason"]
            .as_str()
            .unwrap()
            .contains("credential"),
        "{o}"
    );
    assert_eq!(o["group_exists"], false);
    assert_eq!(o["dead_letters"], 1);
    stop.cancel();
}

#[tokio::test]
async fn the_first_page_of_100000_dead_letters_is_paged_on_the_server() {
    let rig = common::Rig::new().await;
    let p = rig.keys.platform().to_owned();
    let readiness = Readiness::new(&rig.server.url());
    let (ui, addr, stop) = dashboard::standalone(&rig, Some(TOKEN), readiness).await;
    const N: u64 = 100_000;
    let base = dashboard::fill_dead_letters(&rig, N).await;
    let url = |q: &str| format!("http://{addr}/ui/api/platforms/{p}/dlq{q}");
    let client = reqwest::Client::new();
    let mut took = Vec::new();
    let mut first = Value::Null;
    for _ in 0..7 {
        let started = Instant::now();
        let r = client.get(url("?limit=50")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        first = r.json().await.unwrap();
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    println!(
        "first page of {N} dead letters: fastest {:?}, median of 7 {:?}, server side {} ms",
        took[0], median, first["took_ms"]
    );
    // The figure is reported, not asserted: speed is measured in benchmarks,
    // never in timed tests (docs/operating.md has the measured figures).
    assert_eq!(first["total"], N);
    let entries = first["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 50);
    assert_eq!(
        entries[0]["id"],
        format!("{}-0", base + N - 1),
        "newest first"
    );
    // Paging: each page continues exactly where the last stopped.
    let mut before = first["next_before"].as_str().unwrap().to_owned();
    assert_eq!(before, format!("{}-0", base + N - 50));
    for page in 1..4 {
        let (_, v) = get(url(&format!("?limit=50&before={before}"))).await;
        let e = v["entries"].as_array().unwrap();
        assert_eq!(e.len(), 50);
        assert_eq!(e[0]["id"], format!("{}-0", base + N - 1 - 50 * page));
        before = v["next_before"].as_str().unwrap().to_owned();
    }
    // The last page says there is nothing older.
    let (_, v) = get(url(&format!("?limit=50&before={}-0", base + 30))).await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 30);
    assert!(v["next_before"].is_null());
    // Filters: kind and channel (server side, within the scan budget).
    let (_, v) = get(url("?kind=too_large&channel=c2")).await;
    let e = v["entries"].as_array().unwrap();
    assert_eq!(e.len(), 50, "{v}");
    assert!(
        e.iter()
            .all(|x| x["error_kind"] == "too_large" && x["channel_id"] == "c2")
    );
    // i ≡ 2 (mod 4) and i ≡ 2 (mod 10): i ≡ 2 (mod 20); the newest is N - 18.
    assert_eq!(e[0]["id"], format!("{}-0", base + N - 18));
    // A time window: [base+1000, base+1099] holds exactly 100.
    let (_, v) = get(url(&format!(
        "?since={}&until={}&limit=500",
        base + 1000,
        base + 1099
    )))
    .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 100);
    assert!(v["next_before"].is_null());
    // A filter that matches nothing stops at the budget and says so.
    let (_, v) = get(url("?kind=forbidden_key")).await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 0);
    assert_eq!(v["partial"], true);
    assert_eq!(v["scanned"], stargazer::ui::api::SCAN_BUDGET);

    // Nobody watching: the dashboard sends Redis nothing, whatever the sampler does.
    ui.spawn_sampler(stop.clone());
    let processed = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let before_idle = processed(rig.cmd(&["INFO", "stats"]).await);
    ui.rates().sample_all();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_idle = processed(rig.cmd(&["INFO", "stats"]).await);
    assert_eq!(
        after_idle - before_idle,
        1,
        "only the INFO itself was processed"
    );
    stop.cancel();
}
