//! A gateway that dies while its commits cannot land leaves at most one entry
//! per channel "possibly sent", so the new owner's resend comes before every
//! later entry of the channel: the platform sees each channel's requests in
//! `seq` order, repeats included, even when it does not de-duplicate.
//!
//! Black-box, with the shipped defaults: the gateway binary, a private
//! redis-server (SIGSTOPped so no commit lands, the way a stalled Redis
//! looks), a webhook sink that records every request.

mod blackbox;

use std::collections::HashMap;
use std::time::Duration;

use blackbox::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_commits_outstanding_resends_nothing_after_a_successor() {
    const CHANNELS: usize = 4;
    const PER: u64 = 30;
    let redis = Redis::start();
    let mut c = redis.conn().await;
    let sink = Sink::slow(Duration::from_millis(50)).await;
    for s in 1..=PER {
        for ch in 0..CHANNELS {
            let chan = format!("c{ch}");
            let seq = take_seq(&mut c, &chan).await;
            assert_eq!(seq, s);
            let key = format!("sg:msg:{chan}-{s}");
            xadd(&mut c, &message(&chan, Some(seq), Some(&key), "m"), None).await;
        }
    }
    let mut a = GatewayConfig::new(&redis.url(), "gw-a", &sink.url).start();
    until("a few sends of every channel", secs(20), || {
        let reqs = sink.delivered();
        async move {
            (0..CHANNELS).all(|ch| {
                let name = format!("c{ch}");
                reqs.iter().filter(|r| r.channel() == Some(&name)).count() >= 3
            })
        }
    })
    .await;
    // Nothing can be committed from here on.
    redis.stop();
    let before = sink.reqs().len();
    tokio::time::sleep(secs(2)).await;
    let during = sink.reqs().len() - before;
    a.kill9();
    redis.cont();
    assert!(
        during <= CHANNELS,
        "{during} requests went out while no commit could land; at most one per channel may"
    );

    let _b = GatewayConfig::new(&redis.url(), "gw-b", &sink.url).start();
    until_drained(&c, secs(60)).await;
    assert!(dlq(&mut c).await.is_empty(), "{:?}", dlq(&mut c).await);

    // Every request of a channel, repeats included, in arrival order.
    let mut per_chan: HashMap<String, Vec<u64>> = HashMap::new();
    for r in sink.reqs() {
        if let (Some(ch), Some(seq)) = (r.channel(), r.seq()) {
            per_chan.entry(ch.to_owned()).or_default().push(seq);
        }
    }
    for ch in 0..CHANNELS {
        let name = format!("c{ch}");
        let seqs = per_chan.get(&name).cloned().unwrap_or_default();
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "channel {name}: a request went out after a later seq of its channel: {seqs:?}"
        );
        let mut distinct = seqs.clone();
        distinct.dedup();
        assert_eq!(
            distinct,
            (1..=PER).collect::<Vec<_>>(),
            "channel {name}: every seq delivered"
        );
        let repeats = seqs.len() - distinct.len();
        assert!(
            repeats <= 1,
            "channel {name}: {repeats} resends; a crash leaves at most one possibly sent"
        );
    }
}
