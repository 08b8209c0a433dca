//! One shard this gateway holds: renewing its lease, holding its websocket
//! with reconnects and backoff (`connection`), and its stored session —
//! loaded to resume, written on READY and moved with every event in one
//! script fenced by the shard's lease — plus the fleet's identify slot.

use super::*;

/// One shard this gateway holds: its lease, its stored session, and the
/// websocket it runs; the shared parts are its [`Session`]'s.
pub(super) struct Runner {
    pub(super) fleet: Arc<Session>,
    /// This shard's id and the shard count it was leased under.
    pub(super) id: u32,
    pub(super) count: u32,
    /// `{base}shard:<id>:lease`, `{base}shard:<id>:session`.
    pub(super) lease: String,
    pub(super) session: String,
    /// READY or RESUMED on the current connection.
    pub(super) connected: Arc<AtomicBool>,
}

impl Deref for Runner {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.fleet
    }
}

impl Runner {
    pub(super) async fn renew(&self) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = RENEW
            .key(&self.lease)
            .arg(&self.settings.owner)
            .arg(self.lease_ms())
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn release(&self) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(&self.lease)
            .arg(&self.settings.owner)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Hold the shard until `stop` (or the lease is lost), then release it.
    pub(super) async fn run(self: Arc<Self>, stop: CancellationToken) -> Held {
        let held = self.hold(&stop).await;
        self.connected.store(false, Ordering::SeqCst);
        if let Err(e) = self.release().await {
            warn!(platform = %self.settings.platform, shard = self.id, error = %e, "could not release the discord shard lease");
        }
        if held == Held::Refused {
            tokio::select! {
                _ = self.wait_for_token() => {}
                _ = stop.cancelled() => return Held::Stopped,
            }
        }
        held
    }

    /// Run the session while the lease is ours.
    pub(super) async fn hold(self: &Arc<Self>, stop: &CancellationToken) -> Held {
        let lost = stop.child_token();
        let renewer = tokio::spawn({
            let me = self.clone();
            let lost = lost.clone();
            async move { me.keep_lease(lost).await }
        });
        let notify = Arc::new(Notify::new());
        let watcher = tokio::spawn(watch_presence(
            self.client.clone(),
            presence_key(&self.base),
            notify.clone(),
            lost.clone(),
        ));
        let held = self.drive(stop, &lost, &notify).await;
        lost.cancel();
        let _ = renewer.await;
        let _ = watcher.await;
        held
    }

    pub(super) async fn keep_lease(&self, lost: CancellationToken) {
        let tick = self.settings.lease / 3;
        loop {
            tokio::select! {
                _ = sleep(tick) => {}
                _ = lost.cancelled() => return,
            }
            match self.renew().await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(platform = %self.settings.platform, shard = self.id, "the discord shard lease is held by another gateway; closing the websocket");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    warn!(platform = %self.settings.platform, shard = self.id, error = %e, "could not renew the discord shard lease; closing the websocket");
                    lost.cancel();
                    return;
                }
            }
        }
    }

    /// Connect, and reconnect with backoff, until the lease is lost, stop or a fatal close.
    pub(super) async fn drive(
        &self,
        stop: &CancellationToken,
        lost: &CancellationToken,
        notify: &Notify,
    ) -> Held {
        let (mut st, mut stored) = match self.load_session().await {
            Ok(s) => {
                let stored = s.seq;
                (s, stored)
            }
            Err(e) => {
                warn!(platform = %self.settings.platform, error = %e, "could not read the stored discord session");
                return Held::Retry;
            }
        };
        let mut backoff = BACKOFF_BASE;
        // Resumes in a row that did not come up: past a few, the resume host
        // is taken to be gone and the session is started afresh.
        let mut failed_resumes = 0u32;
        loop {
            let resuming = st.can_resume();
            let end = self
                .connection(&mut st, &mut stored, stop, lost, notify)
                .await;
            self.connected.store(false, Ordering::SeqCst);
            let delay = match end {
                End::Cancelled => {
                    return if stop.is_cancelled() {
                        Held::Stopped
                    } else {
                        Held::Retry
                    };
                }
                End::Fatal(why) => {
                    error!(platform = %self.settings.platform, shard = self.id, "discord gateway: {why}; not reconnecting until restarted");
                    return Held::Fatal;
                }
                End::Reshard(why) => {
                    warn!(platform = %self.settings.platform, shard = self.id, shards = self.count, "discord gateway: {why}; resharding");
                    return Held::Reshard;
                }
                End::Refused(why) => {
                    self.refuse(&why).await;
                    return Held::Refused;
                }
                End::Again { wait, healthy } => {
                    if resuming && !healthy {
                        failed_resumes += 1;
                        if failed_resumes >= MAX_FAILED_RESUMES && st.can_resume() {
                            warn!(platform = %self.settings.platform, attempts = failed_resumes, "resuming the discord session keeps failing; identifying afresh");
                            st.forget();
                            stored = None;
                            if let Err(e) = self.write_session(None).await {
                                warn!(platform = %self.settings.platform, error = %e, "could not clear the stored discord session");
                            }
                            failed_resumes = 0;
                        }
                    } else {
                        failed_resumes = 0;
                    }
                    if healthy {
                        backoff = BACKOFF_BASE;
                        wait.unwrap_or(Duration::ZERO)
                    } else {
                        let d =
                            wait.unwrap_or_else(|| backoff.mul_f64(0.5 + rand::random::<f64>()));
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        d
                    }
                }
            };
            crate::metrics::discord_session_event(&self.settings.platform, "reconnect");
            info!(
                platform = %self.settings.platform,
                resume = st.can_resume(),
                delay_ms = delay.as_millis() as u64,
                "discord gateway reconnecting"
            );
            tokio::select! {
                _ = sleep(delay) => {}
                _ = lost.cancelled() => {
                    return if stop.is_cancelled() { Held::Stopped } else { Held::Retry };
                }
            }
        }
    }

    pub(super) async fn load_session(&self) -> RedisResult<Resume> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn.hgetall(&self.session).await?;
        let mut st = Resume {
            session_id: h.get("session_id").cloned().filter(|s| !s.is_empty()),
            resume_url: h.get("resume_url").cloned().filter(|s| !s.is_empty()),
            seq: h.get("seq").and_then(|s| s.parse().ok()),
            user_id: h.get("user_id").cloned().filter(|s| !s.is_empty()),
            shards: h.get("shards").and_then(|s| s.parse().ok()),
        };
        // A session of another shard count covers other guilds: start afresh.
        if !st.can_resume() || st.shards.is_some_and(|n| n != self.count) {
            st.forget();
        }
        Ok(st)
    }

    /// Write (or with `st` = None, delete) the stored session, if the lease is ours.
    pub(super) async fn write_session(&self, st: Option<&Resume>) -> RedisResult<Commit> {
        let mut conn = self.conn.clone();
        let mut inv = WRITE_SESSION.prepare_invoke();
        inv.key(&self.lease)
            .key(&self.session)
            .arg(&self.settings.owner);
        if let Some(st) = st {
            let fields = [
                ("session_id", st.session_id.clone()),
                ("resume_url", st.resume_url.clone()),
                ("seq", st.seq.map(|s| s.to_string())),
                ("user_id", st.user_id.clone()),
                ("shards", Some(self.count.to_string())),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    inv.arg(k).arg(v);
                }
            }
        }
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(if n == 1 { Commit::Done } else { Commit::Fenced })
    }

    /// Record one event's writes and move the stored seq, atomically and only
    /// while the lease is ours.
    pub(super) async fn commit(&self, seq: Option<u64>, w: &Writes) -> RedisResult<Commit> {
        let mut conn = self.conn.clone();
        let payload = w
            .event
            .as_ref()
            .map(|ev| serde_json::to_string(ev).expect("events serialise"))
            .unwrap_or_default();
        let (nonce, message_id) = match &w.nonce {
            Some((n, m)) => (nonce_key(&self.base, n), m.clone()),
            None => (nonce_key(&self.base, ""), String::new()),
        };
        let mut inv = COMMIT.prepare_invoke();
        inv.key(&self.lease)
            .key(&self.session)
            .key(&self.inbound_key)
            .key(guilds_key(&self.base))
            .key(nonce)
            .arg(&self.settings.owner)
            .arg(seq.map(|s| s.to_string()).unwrap_or_default())
            .arg(payload)
            .arg(crate::inbound::INBOUND_MAXLEN)
            .arg(message_id)
            .arg(NONCE_TTL_S);
        for (channel, guild) in &w.guilds {
            inv.arg(channel).arg(guild);
        }
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(if n == 1 { Commit::Done } else { Commit::Fenced })
    }

    /// Wait for this shard's identify slot: Discord takes one IDENTIFY per
    /// bucket (`shard % max_concurrency`) per 5 s from the whole bot, so the
    /// slot is a key the fleet shares. `false`: the lease was lost first.
    pub(super) async fn identify_slot(&self, lost: &CancellationToken) -> bool {
        let buckets = self.max_concurrency.load(Ordering::SeqCst).max(1);
        let key = identify_key(&self.base, self.id % buckets);
        let me = format!("{}:{}", self.settings.owner, self.id);
        loop {
            if lost.is_cancelled() {
                return false;
            }
            let mut conn = self.conn.clone();
            let taken: RedisResult<(Option<String>, i64)> = redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(&me)
                .arg("NX")
                .arg("PX")
                .arg(IDENTIFY_GAP.as_millis() as u64)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await;
            let wait = match taken {
                Ok((Some(_), _)) => return true,
                Ok((None, ttl)) => {
                    debug!(platform = %self.settings.platform, shard = self.id, wait_ms = ttl, "waiting for the identify slot of the shard's bucket");
                    Duration::from_millis(ttl.clamp(10, 5_000) as u64)
                }
                Err(e) => {
                    warn!(platform = %self.settings.platform, shard = self.id, error = %e, "could not take the identify slot; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = sleep(wait) => {}
                _ = lost.cancelled() => return false,
            }
        }
    }

    /// The IDENTIFY went out: its bucket's 5 s count from now.
    pub(super) async fn identify_sent(&self) {
        let buckets = self.max_concurrency.load(Ordering::SeqCst).max(1);
        let key = identify_key(&self.base, self.id % buckets);
        let mut conn = self.conn.clone();
        let r: RedisResult<()> = redis::cmd("SET")
            .arg(&key)
            .arg(format!("{}:{}", self.settings.owner, self.id))
            .arg("PX")
            .arg(IDENTIFY_GAP.as_millis() as u64)
            .query_async(&mut conn)
            .await;
        if let Err(e) = r {
            warn!(platform = %self.settings.platform, shard = self.id, error = %e, "could not renew the identify slot");
        }
    }
}
