//! The dashboard in Debian's headless Chromium, driven over WebDriver
//! (chromedriver): the page shows the scene's figures, replay from the page
//! delivers the dead letter exactly once, actions without the token are
//! refused, and a page of 100,000 dead letters loads (paged on the server).
//!
//! Needs `chromium` and `chromedriver` (scripts/ensure-chromium.sh). Screenshots
//! go to `target/ui-screenshots/`, or to `STARGAZER_SCREENSHOTS_DIR` (the
//! ones in docs/ are made with `STARGAZER_SCREENSHOTS_DIR=docs`).

mod common;
#[path = "common/dashboard.rs"]
mod dashboard;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::sync::Arc;

use dashboard::{OK, SLOW, Scene, T, TOKEN};
use serde_json::{Value, json};
use webdriver::{Driver, Session};

fn save(name: &str, png: &[u8]) {
    let dir = std::env::var("STARGAZER_SCREENSHOTS_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/ui-screenshots").into());
    std::fs::create_dir_all(&dir).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(format!("{dir}/{name}"), png).unwrap();
}

/// The `data-value` of KPI `kpi` on platform `p`'s card.
async fn kpi(s: &Session, p: &str, kpi: &str) -> Value {
    s.js(
        "const e = document.querySelector(`[data-platform=\"${arguments[0]}\"] [data-kpi=\"${arguments[1]}\"]`);\
         return e ? e.dataset.value : null;",
        vec![json!(p), json!(kpi)],
    )
    .await
}

async fn toasts(s: &Session) -> String {
    s.js(
        "return Array.from(document.querySelectorAll('.toast')).map(t => t.textContent).join('\\n');",
        vec![],
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_shows_the_figures_of_the_scene() {
    let scene = Scene::start().await;
    let p = scene.platform();
    let driver = Driver::start().await;
    let s = driver.session(1440, 1100).await;
    s.goto(&scene.url("/ui/")).await;
    s.until(
        "the platform card",
        &format!("return document.querySelector('[data-platform=\"{p}\"] [data-kpi=\"dlq\"]')?.dataset.value === '1';"),
        T,
    )
    .await;
    assert_eq!(kpi(&s, &p, "pending").await, json!((SLOW + 1).to_string()));
    assert_eq!(kpi(&s, &p, "lag").await, json!("0"));
    assert_eq!(
        kpi(&s, &p, "stream").await,
        json!((SLOW + 1 + 2 + OK).to_string())
    );
    assert_eq!(kpi(&s, &p, "gaps").await, json!("1"));
    assert_eq!(kpi(&s, &p, "gateways").await, json!("2"));
    let oldest = kpi(&s, &p, "oldest").await;
    assert!(oldest.as_str().is_some_and(|o| !o.is_empty()), "{oldest}");
    let gws = s
        .js(
            "return Array.from(document.querySelectorAll('[data-gateway]')).map(r => [r.dataset.gateway, r.dataset.health]);",
            vec![],
        )
        .await;
    assert_eq!(gws, json!([["gw-a", "live"], ["gw-b", "live"]]));
    let gap = s
        .js(
            "const r = document.querySelector('[data-gap=\"gapped\"]'); return r && [r.dataset.seq, r.textContent];",
            vec![],
        )
        .await;
    assert_eq!(gap[0], "2", "{gap}");
    assert!(
        gap[1]
            .as_str()
            .unwrap()
            .contains("seq 2 has not been finished"),
        "{gap}"
    );
    let ready = s
        .js(
            "return document.querySelector('[data-ready]').dataset.ready;",
            vec![],
        )
        .await;
    assert_eq!(ready, "true");
    let count = s
        .js(
            "return document.querySelector('#dlq-count').textContent;",
            vec![],
        )
        .await;
    assert_eq!(count, "1");
    let conn = s
        .js(
            "return document.querySelector('#conn').textContent;",
            vec![],
        )
        .await;
    assert_eq!(conn, "live");
    // A steady trickle for the charts: both gateways deliver while we look.
    let trickle = {
        let publisher = scene.rig.publisher.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                let mut m = serde_json::Map::new();
                m.insert("channel_id".into(), json!(format!("t{}", i % 8)));
                m.insert("text".into(), json!(format!("tick {i}")));
                let _ = publisher.publish(m).await;
                tokio::time::sleep(std::time::Duration::from_millis(15 + (i % 7) * 6)).await;
            }
        })
    };
    // The chart has its samples (this gateway's counters).
    s.until(
        "the rate chart",
        "return document.querySelector('[data-kpi=\"rate\"]').dataset.value !== '';",
        T,
    )
    .await;
    s.until(
        "a chart with ten points of deliveries",
        "const c = document.querySelector('canvas.chart'); return Number(c.dataset.moving) >= 10;",
        T,
    )
    .await;
    save("ui-overview.png", &s.screenshot().await);
    // Dark-aware: the same page under `prefers-color-scheme: dark`.
    s.color_scheme("dark").await;
    s.until(
        "the dark palette",
        "return getComputedStyle(document.body).backgroundColor === 'rgb(13, 17, 23)';",
        T,
    )
    .await;
    s.until(
        "a redraw in the dark palette",
        "const n = Number(document.querySelector('canvas.chart').dataset.draws || 0); window.__d0 = window.__d0 || n; return n > window.__d0;",
        T,
    )
    .await;
    save("ui-overview-dark.png", &s.screenshot().await);
    trickle.abort();
    s.close().await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_from_the_page_delivers_once_and_needs_the_token() {
    let scene = Scene::start().await;
    let p = scene.platform();
    let bad = scene.dlq_ids().await[0].clone();
    // Three more, of other kinds, that stay.
    scene
        .add_dead_letter(
            "too_large",
            "c-17",
            r#"{"channel_id":"c-17","type":"file","file_data":"aGVsbG8=","filename":"report.pdf"}"#,
            "payload of 9437184 bytes is over max_payload_bytes (8388608)",
        )
        .await;
    scene
        .add_dead_letter(
            "not_json",
            "",
            "{oops",
            "payload is not JSON: key must be a string at line 1 column 2",
        )
        .await;
    scene
        .add_dead_letter(
            "retries_exhausted",
            "ops",
            r#"{"channel_id":"ops","text":"nightly report ready","message_key":"sg:msg:nightly"}"#,
            "503 Service Unavailable after 5 attempts",
        )
        .await;

    let driver = Driver::start().await;
    let s = driver.session(1440, 1000).await;
    s.goto(&scene.url(&format!("/ui/#dlq?platform={p}"))).await;
    s.until(
        "four dead-letter rows",
        "return document.querySelectorAll('#dlq-rows tr[data-id]').length === 4;",
        T,
    )
    .await;
    // Open the one that failed on the unknown channel.
    s.click(&format!("tr[data-id=\"{bad}\"] td.content")).await;
    s.until(
        "the detail view",
        "return document.querySelector('#d-body').textContent.includes('Unknown Channel');",
        T,
    )
    .await;
    let detail = s
        .js(
            "return document.querySelector('#d-body').textContent;",
            vec![],
        )
        .await;
    let detail = detail.as_str().unwrap();
    assert!(
        detail.contains(&scene.bad_key),
        "idempotency key shown: {detail}"
    );
    assert!(
        detail.contains("to a channel that is gone"),
        "envelope shown"
    );
    assert!(
        detail.contains("dead-lettered as rejected"),
        "history shown"
    );
    save("ui-dlq.png", &s.screenshot().await);

    // Without the token: the gateway refuses, the page says so, nothing moves.
    s.click("#d-replay").await;
    s.until(
        "the refusal",
        "return Array.from(document.querySelectorAll('.toast')).some(t => t.textContent.includes('Refused (401)'));",
        T,
    )
    .await;
    s.until(
        "the token dialog",
        "return document.querySelector('#token-dialog').open;",
        T,
    )
    .await;
    assert_eq!(scene.dlq_ids().await.len(), 4, "{}", toasts(&s).await);
    // A wrong token is refused in the dialog.
    s.type_into("#t-token", "not-the-token").await;
    s.click("#t-save").await;
    s.until(
        "the wrong-token message",
        "return document.querySelector('#t-error').textContent.includes('wrong dashboard token');",
        T,
    )
    .await;
    // The right one unlocks the actions (kept in sessionStorage).
    s.js("document.querySelector('#t-token').value = '';", vec![])
        .await;
    s.type_into("#t-token", TOKEN).await;
    s.type_into("#t-operator", "browser-test").await;
    s.click("#t-save").await;
    s.until(
        "unlocked",
        "return !document.querySelector('#token-dialog').open && sessionStorage.getItem('stargazer.ui.token') !== null;",
        T,
    )
    .await;

    // The platform knows the channel again; replay the ticked row.
    *scene.receiver.accept_bad.lock().unwrap() = true;
    s.click("#d-close").await;
    s.click(&format!("input[data-ck=\"{bad}\"]")).await;
    s.click("#act-replay").await;
    s.until(
        "the confirmation",
        "return document.querySelector('#confirm-dialog').open && document.querySelector('#c-body').textContent.includes('1 dead letter will be moved');",
        T,
    )
    .await;
    s.click("#c-ok").await;
    s.until(
        "the replay",
        "return Array.from(document.querySelectorAll('.toast')).some(t => t.textContent.includes('Replayed 1'));",
        T,
    )
    .await;
    scene.delivered_once(&scene.bad_key).await;
    s.until(
        "three rows left",
        "return document.querySelectorAll('#dlq-rows tr[data-id]').length === 3;",
        T,
    )
    .await;
    let left = scene.dlq_ids().await;
    assert_eq!(left.len(), 3);
    assert!(!left.contains(&bad));
    let got: Vec<_> = scene
        .receiver
        .delivered()
        .into_iter()
        .filter(|g| g.idempotency_key == scene.bad_key)
        .collect();
    assert_eq!(got.len(), 1, "delivered exactly once");
    assert_eq!(got[0].body["replayed_from"], scene.bad_id.as_str());
    s.close().await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_page_of_100000_dead_letters_loads_and_refuses_actions() {
    let rig = common::Rig::new().await;
    let p = rig.keys.platform().to_owned();
    let readiness = stargazer::http::Readiness::new(&rig.server.url());
    readiness.set_adapters(vec![(p.clone(), Arc::new(NotReady))]);
    let (_ui, addr, stop) = dashboard::standalone(&rig, None, readiness).await;
    const N: u64 = 100_000;
    let base = dashboard::fill_dead_letters(&rig, N).await;
    let driver = Driver::start().await;
    let s = driver.session(1440, 1000).await;
    let url = format!("http://{addr}/ui/#dlq?platform={p}");
    let mut loads = Vec::new();
    for _ in 0..3 {
        s.goto("about:blank").await;
        s.goto(&url).await;
        let ms = s
            .until(
                "the first page rendered",
                "return document.body.dataset.dlqReadyMs;",
                T,
            )
            .await;
        loads.push(ms.as_str().unwrap().parse::<f64>().unwrap());
        let timing = s
            .js(
                "const r = performance.getEntriesByType('resource').map(e => [e.name.replace(/^.*\\/ui\\//, ''), Math.round(e.startTime), Math.round(e.responseEnd)]);\
                 const n = performance.getEntriesByType('navigation')[0];\
                 return {html: [Math.round(n.requestStart), Math.round(n.responseEnd)], dcl: Math.round(n.domContentLoadedEventEnd), resources: r};",
                vec![],
            )
            .await;
        println!("load {ms}: {timing}");
    }
    let rows = s
        .js(
            "return Array.from(document.querySelectorAll('#dlq-rows tr[data-id]')).map(r => r.dataset.id);",
            vec![],
        )
        .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[0], format!("{}-0", base + N - 1));
    let summary = s
        .js(
            "return document.querySelector('#dlq-summary').textContent;",
            vec![],
        )
        .await;
    assert!(
        summary
            .as_str()
            .unwrap()
            .starts_with("100,000 dead letters"),
        "{summary}"
    );
    loads.sort_by(f64::total_cmp);
    println!(
        "page load to the first rendered page of {N} dead letters (navigation start → table drawn): {loads:?} ms"
    );
    assert!(loads[1] < 1000.0, "median page load {} ms", loads[1]);

    // Older pages come from the server, one at a time.
    s.click("#pg-older").await;
    s.until(
        "page 2",
        &format!(
            "return document.querySelector('#dlq-rows tr[data-id]')?.dataset.id === '{}-0';",
            base + N - 51
        ),
        T,
    )
    .await;

    // Read-only: the button says so, and an action is refused by the gateway.
    let b = s
        .js(
            "const b = document.querySelector('#token-btn'); return [b.textContent, b.disabled];",
            vec![],
        )
        .await;
    assert_eq!(b, json!(["Read-only", true]));
    let first = rows[0].as_str().unwrap().to_owned();
    s.click("#pg-newer").await;
    s.until(
        "page 1",
        &format!(
            "return document.querySelector('#dlq-rows tr[data-id]')?.dataset.id === '{first}';"
        ),
        T,
    )
    .await;
    s.click(&format!("input[data-ck=\"{first}\"]")).await;
    s.click("#act-purge").await;
    s.until(
        "the refusal",
        "return Array.from(document.querySelectorAll('.toast')).some(t => t.textContent.includes('Refused (403)') && t.textContent.includes('read-only'));",
        T,
    )
    .await;
    let len: u64 = rig.cmd(&["XLEN", &rig.keys.dlq()]).await;
    assert_eq!(len, N, "nothing purged");
    // The open circuit shows red on the overview.
    s.goto(&format!("http://{addr}/ui/")).await;
    s.until(
        "the red readiness pill",
        "const r = document.querySelector('[data-ready]'); return r && r.dataset.ready === 'false' && r.classList.contains('bad');",
        T,
    )
    .await;
    let circuit = s
        .js(
            "return document.querySelector('[data-circuit]').dataset.circuit;",
            vec![],
        )
        .await;
    assert_eq!(circuit, "open");
    save("ui-circuit-open.png", &s.screenshot().await);
    s.close().await;
    stop.cancel();
}

/// An adapter whose platform refused its credential (circuit open).
#[derive(Debug)]
struct NotReady;

impl stargazer::adapters::Adapter for NotReady {
    fn kind(&self) -> &'static str {
        "discord"
    }
    fn capabilities(&self) -> stargazer::adapters::Capabilities {
        stargazer::adapters::Capabilities::ALL
    }
    fn ready(&self) -> bool {
        false
    }
    fn deliver<'a>(
        &'a self,
        _d: stargazer::adapters::Delivery<'a>,
    ) -> stargazer::adapters::BoxFuture<
        'a,
        Result<stargazer::adapters::Delivered, stargazer::adapters::AdapterError>,
    > {
        Box::pin(async { Err(stargazer::adapters::AdapterError::unauthorized("401")) })
    }
}
