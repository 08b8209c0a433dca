//! A platform that refuses the credential itself (Discord 401, Matrix
//! M_UNKNOWN_TOKEN): the circuit opens, every send stops, nothing is
//! dead-lettered, entries stay pending, readiness names the platform; once
//! the credential works again the probe closes it and everything is sent
//! once, in order.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Recorder, Rig, fast, order_by_channel};
use serde_json::json;
use stargazer::adapters::{
    Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, SharedAdapter,
};
use stargazer::http::Readiness;

/// Refuses every send and probe while `revoked`; else hands the send on.
#[derive(Debug)]
struct Revocable {
    inner: Arc<Recorder>,
    revoked: AtomicBool,
    refused: AtomicUsize,
    probes: AtomicUsize,
}

impl Adapter for Revocable {
    fn kind(&self) -> &'static str {
        "revocable"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            self.probes.fetch_add(1, Ordering::SeqCst);
            if self.revoked.load(Ordering::SeqCst) {
                Err(AdapterError::unauthorized("401 Unauthorized (probe)"))
            } else {
                Ok(())
            }
        })
    }

    fn deliver<'a>(&'a self, d: Delivery<'a>) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async move {
            if self.revoked.load(Ordering::SeqCst) {
                self.refused.fetch_add(1, Ordering::SeqCst);
                return Err(AdapterError::unauthorized(
                    "401 Unauthorized: the token was revoked",
                ));
            }
            self.inner.deliver(d).await
        })
    }
}

async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_stops_every_send_and_loses_nothing() {
    let rig = Rig::new().await;
    let rec = Recorder::ok();
    let adapter = Arc::new(Revocable {
        inner: rec.clone(),
        revoked: AtomicBool::new(true),
        refused: AtomicUsize::new(0),
        probes: AtomicUsize::new(0),
    });
    let shared: SharedAdapter = adapter.clone();
    let consumer = rig.start("gw", shared, fast()).await;
    let circuit = consumer.circuit();
    let readiness = Readiness::new(&rig.server.url());
    readiness.set_adapters(vec![(rig.keys.platform().to_owned(), adapter.clone())]);
    readiness.set_circuits(vec![circuit.clone()]);
    assert!(readiness.check().await.is_ok(), "ready before any refusal");

    let channels = 4;
    let per = 10u64;
    for i in 0..per {
        for c in 0..channels {
            rig.publish(json!({"channel_id": format!("c{c}"), "text": format!("m{i}")}))
                .await;
        }
    }
    until("the circuit to open", Duration::from_secs(10), || {
        circuit.is_open()
    })
    .await;
    // Two probes have failed: the gateway has had time to send more.
    until("two probes", Duration::from_secs(10), || {
        adapter.probes.load(Ordering::SeqCst) >= 2
    })
    .await;
    let refused = adapter.refused.load(Ordering::SeqCst);
    assert!(
        refused <= channels,
        "{refused} sends met the refused credential; at most one per lane may race the circuit"
    );
    assert!(rig.dlq().await.is_empty(), "nothing is dead-lettered");
    let held = rig.pending().await + rig.lag().await;
    assert_eq!(
        held,
        channels as u64 * per,
        "every entry stays pending or unread"
    );
    let why = readiness.check().await.expect_err("not ready while open");
    assert!(
        why.contains(rig.keys.platform()) && why.contains("credential"),
        "readiness names the platform and the cause: {why}"
    );

    let restored = Instant::now();
    adapter.revoked.store(false, Ordering::SeqCst);
    rec.wait_sent(channels * per as usize, Duration::from_secs(20))
        .await;
    let resumed_in = restored.elapsed();
    rig.drained(Duration::from_secs(10)).await;
    assert!(!circuit.is_open());
    assert!(readiness.check().await.is_ok(), "ready again once closed");
    assert!(rig.dlq().await.is_empty());
    let sent = rec.sent();
    assert_eq!(
        sent.len(),
        channels * per as usize,
        "each sent exactly once"
    );
    for (c, seqs) in order_by_channel(&sent) {
        assert_eq!(seqs, (1..=per).collect::<Vec<_>>(), "channel {c} in order");
    }
    // No attempt was used up by the refusals.
    assert!(
        sent.iter().all(|s| s.attempt == 1),
        "a refusal uses no attempt"
    );
    eprintln!(
        "refused sends {refused}, probes {}, resumed {resumed_in:?} after the fix",
        adapter.probes.load(Ordering::SeqCst)
    );
    consumer.shutdown().await;
}
