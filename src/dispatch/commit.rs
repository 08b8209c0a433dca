//! The commit task: every finished entry of the platform — delivered,
//! skipped or dead-lettered, from every lane — is written in batches, one
//! script call per batch (delivered marks, de-duplication records, dead
//! letters, one XACK), then the message-cache write-back. One call is in
//! flight at a time, so marks are written in the order the lanes set them;
//! a failed call is retried until it lands (G10: a send that completed is
//! never redone because Redis was slow), or refused because this instance
//! was found dead (then nothing is written and the new owners take over).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::Shared;
use crate::bus::{CommitBatch, Committed, DeadRecord};
use crate::dead_letter::DeadLetterKind;
use crate::envelope::{Parsed, StreamId};
use crate::stats::Stats;

/// Most entries in one commit call.
const BATCH_MAX: usize = 512;

/// Times the commit task yields to the lanes before a batch goes out.
const LINGER_YIELDS: usize = 3;

/// How an entry ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Delivered (`true`) or skipped: acknowledged.
    Ack {
        delivered: bool,
    },
    Dead(DeadRecord, DeadLetterKind),
}

/// One finished entry on its way to Redis.
#[derive(Debug)]
pub(crate) struct Done {
    /// The channel state key, and the delivered mark it moves to.
    pub chan: Option<(String, Option<u64>)>,
    pub id: StreamId,
    pub end: End,
    /// De-duplication record: idempotency key → message id (`-` for none).
    pub sent: Option<(String, String)>,
    /// Message-cache write-back: `message_key` → message id.
    pub cache: Option<(String, String)>,
    /// Clear its in-flight record (`unknown_outcome = "dead_letter"`).
    pub sending: bool,
    /// The `type` label for metrics.
    pub ty: &'static str,
    /// Told whether the commit landed.
    pub reply: oneshot::Sender<bool>,
}

impl Done {
    pub(crate) fn new(
        chan: Option<(String, Option<u64>)>,
        id: StreamId,
        end: End,
        ty: &'static str,
    ) -> (Done, oneshot::Receiver<bool>) {
        let (tx, rx) = oneshot::channel();
        (
            Done {
                chan,
                id,
                end,
                sent: None,
                cache: None,
                sending: false,
                ty,
                reply: tx,
            },
            rx,
        )
    }

    pub(crate) fn dead(
        chan: Option<(String, Option<u64>)>,
        id: StreamId,
        record: DeadRecord,
        kind: DeadLetterKind,
        ty: &'static str,
    ) -> (Done, oneshot::Receiver<bool>) {
        Done::new(chan, id, End::Dead(record, kind), ty)
    }
}

/// The dead-letter entry of `parsed` (SPEC §2 fields).
pub(crate) fn dead_record(
    s: &Shared,
    id: &StreamId,
    parsed: &Parsed,
    kind: DeadLetterKind,
    error: &str,
    attempts: u32,
) -> DeadRecord {
    let mut fields: Vec<(&'static str, Vec<u8>)> = vec![
        ("payload", parsed.payload.clone()),
        ("error", error.as_bytes().to_vec()),
        ("error_kind", kind.as_str().as_bytes().to_vec()),
        ("attempts", attempts.to_string().into_bytes()),
        ("original_id", id.0.as_bytes().to_vec()),
        ("consumer", s.who.consumer.as_bytes().to_vec()),
        ("failed_ms", crate::now_ms().to_string().into_bytes()),
    ];
    if let Some(c) = &parsed.routing.channel_id {
        fields.push(("channel_id", c.0.as_bytes().to_vec()));
    }
    if let Some(seq) = parsed.routing.seq {
        fields.push(("seq", seq.to_string().into_bytes()));
    }
    DeadRecord {
        id: id.clone(),
        force: false,
        fields,
    }
}

/// A de-duplication bucket spans one window: a key sent within the last
/// window is in the current bucket or the one before.
fn bucket_len(window: Duration) -> u64 {
    (window.as_millis() as u64).max(1)
}

/// The de-duplication buckets a lookup reads: the current one and the one before.
pub(crate) fn lookup_buckets(window: Duration) -> Vec<u64> {
    let now = crate::now_ms() / bucket_len(window);
    vec![now, now.saturating_sub(1)]
}

pub(crate) struct Committer {
    s: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Done>,
    /// The message-cache write-backs of committed batches, in commit order.
    cache: Option<mpsc::UnboundedSender<Vec<(String, String)>>>,
}

impl Committer {
    pub(crate) fn new(s: Arc<Shared>, rx: mpsc::UnboundedReceiver<Done>) -> Committer {
        Committer { s, rx, cache: None }
    }

    /// Writes each committed batch's message-cache pairs (SPEC §2: after the
    /// commit, idempotent, retried), one batch after another, beside the
    /// commit task: the lanes are told a commit landed without waiting for
    /// its write-back (an edit finds its target in the lane's own record of
    /// sent ids or in the de-duplication records the commit wrote).
    async fn write_back(s: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Vec<(String, String)>>) {
        while let Some(pairs) = rx.recv().await {
            for attempt in 0..5 {
                match s.bus.write_cache(&pairs).await {
                    Ok(()) => break,
                    Err(e) => {
                        debug!(error = %e, attempt, "message-cache write-back failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    }
                }
            }
        }
    }

    pub(crate) async fn run(mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.cache = Some(tx);
        let writer = tokio::spawn(Self::write_back(self.s.clone(), rx));
        self.commit_all().await;
        // What was committed is written back before the task ends.
        self.cache = None;
        let _ = writer.await;
    }

    async fn commit_all(&mut self) {
        loop {
            let first = tokio::select! {
                d = self.rx.recv() => d,
                // Lanes and RPCs finish first (they are tracked too); once
                // only this task is left, what is queued is written and it ends.
                _ = self.s.tracker_idle() => self.rx.try_recv().ok(),
            };
            let Some(first) = first else { return };
            let mut batch = vec![first];
            // Let the lanes that are ready finish theirs too: a larger batch
            // writes each busy channel's mark once for more of its entries.
            for _ in 0..LINGER_YIELDS {
                while batch.len() < BATCH_MAX {
                    match self.rx.try_recv() {
                        Ok(d) => batch.push(d),
                        Err(_) => break,
                    }
                }
                if batch.len() >= BATCH_MAX {
                    break;
                }
                tokio::task::yield_now().await;
            }
            self.write(batch).await;
        }
    }

    async fn write(&mut self, batch: Vec<Done>) {
        let s = self.s.clone();
        let mut cb = CommitBatch::default();
        let mut mark_at: HashMap<String, usize> = HashMap::new();
        let mut cache = Vec::new();
        for d in &batch {
            if let Some((chan, mark)) = &d.chan {
                match mark_at.get(chan) {
                    Some(&i) => {
                        if mark.is_some() {
                            cb.marks[i].1 = *mark;
                        }
                    }
                    None => {
                        mark_at.insert(chan.clone(), cb.marks.len());
                        cb.marks.push((chan.clone(), *mark));
                    }
                }
            }
            match &d.end {
                End::Ack { .. } => cb.acks.push(d.id.clone()),
                End::Dead(r, _) => cb.dead.push(r.clone()),
            }
            if let Some(p) = &d.sent {
                cb.sent.push(p.clone());
            }
            if let Some(p) = &d.cache {
                cache.push(p.clone());
            }
            if d.sending {
                cb.sending.push(d.id.clone());
            }
        }
        let window = s.set.dedup_window;
        let bucket = crate::now_ms() / bucket_len(window);
        let ttl = window + Duration::from_millis(bucket_len(window));
        let mut delay = Duration::from_millis(20);
        let landed = loop {
            if s.lost.is_cancelled() {
                break false;
            }
            match s
                .bus
                .commit(&s.who, &cb, bucket, ttl, s.set.dlq_maxlen)
                .await
            {
                Ok(Committed::Ok { .. }) => break true,
                Ok(Committed::Stale) => {
                    warn!(
                        entries = batch.len(),
                        "commit refused: this gateway was found dead by its peers; \
                         dropping what it holds (the channels' new owners take over)"
                    );
                    s.lost.cancel();
                    break false;
                }
                Err(e) => {
                    warn!(error = %e, entries = batch.len(), "commit failed; retrying (nothing is sent again)");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = s.lost.cancelled() => break false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        if landed {
            Stats::inc(&s.stats.commits);
            if !cache.is_empty()
                && let Some(tx) = &self.cache
            {
                let _ = tx.send(cache);
            }
        }
        let platform = s.bus.keys().platform().to_owned();
        for d in batch {
            if landed {
                match &d.end {
                    End::Ack { delivered: true } => {
                        crate::metrics::finished_as(&platform, d.ty, "delivered", None)
                    }
                    End::Ack { delivered: false } => {
                        crate::metrics::finished_as(&platform, d.ty, "skipped", None)
                    }
                    End::Dead(_, kind) => {
                        Stats::inc(&s.stats.dead_lettered);
                        crate::metrics::finished_as(
                            &platform,
                            d.ty,
                            "dead_lettered",
                            Some(kind.as_str()),
                        )
                    }
                }
            }
            s.forget(&d.id);
            s.sending(&d.id, false);
            let _ = d.reply.send(landed);
        }
    }
}
