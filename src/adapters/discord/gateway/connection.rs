//! One websocket connection of a shard, from connect to close: Hello,
//! Identify (in the fleet's identify slot) or Resume, the heartbeat loop,
//! presence updates within the send budget, and each payload and dispatch
//! handled.

use super::*;

impl Runner {
    /// One websocket connection, from connect to close.
    pub(super) async fn connection(
        &self,
        st: &mut Resume,
        stored: &mut Option<u64>,
        stop: &CancellationToken,
        lost: &CancellationToken,
        notify: &Notify,
    ) -> End {
        let platform = self.settings.platform.as_str();
        let resume = st.can_resume();
        let url = if resume {
            st.resume_url.clone().unwrap_or_default()
        } else {
            // The fleet's identify slot for this shard's bucket, before
            // connecting; renewed once the IDENTIFY is sent (Discord counts it).
            if !self.identify_slot(lost).await {
                return End::Cancelled;
            }
            match self.identify_url(lost).await {
                Ok(u) => u,
                Err(end) => return end,
            }
        };
        let url = match gateway_request_url(&url) {
            Ok(u) => u,
            Err(e) => {
                warn!(%platform, "{e}");
                if resume {
                    st.forget();
                }
                return End::Again {
                    wait: None,
                    healthy: false,
                };
            }
        };
        let connecting = timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url.as_str(), None, true),
        );
        let ws = tokio::select! {
            r = connecting => match r {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(e)) => {
                    warn!(%platform, error = %e, "could not connect to the discord gateway");
                    return End::Again { wait: None, healthy: false };
                }
                Err(_) => {
                    warn!(%platform, "connecting to the discord gateway timed out");
                    return End::Again { wait: None, healthy: false };
                }
            },
            _ = lost.cancelled() => return End::Cancelled,
        };
        let (sink, mut source) = ws.split();
        let mut link = Link {
            sink,
            budget: Budget::default(),
        };
        let interval = tokio::select! {
            h = hello(&mut source, self.id) => match h {
                Ok(i) => i,
                Err(end) => {
                    link.close().await;
                    return end;
                }
            },
            _ = lost.cancelled() => {
                link.close().await;
                return End::Cancelled;
            }
        };
        let first = if resume {
            Op::Resume.payload(json!({
                "token": self.settings.token.expose(),
                "session_id": st.session_id,
                "seq": st.seq,
            }))
        } else {
            st.forget();
            let mut d = json!({
                "token": self.settings.token.expose(),
                "intents": self.settings.intents,
                "shard": [self.id, self.count],
                "properties": {
                    "os": std::env::consts::OS,
                    "browser": "stargazer",
                    "device": "stargazer",
                },
            });
            match self.read_presence().await {
                Ok(Some(p)) => d["presence"] = presence_object(&p),
                Ok(None) => {}
                Err(e) => {
                    warn!(%platform, error = %e, "could not read the stored presence; identifying without it")
                }
            }
            Op::Identify.payload(d)
        };
        if let Err(e) = link.send(&first).await {
            warn!(%platform, error = %e, "could not send identify/resume");
            return End::Again {
                wait: None,
                healthy: false,
            };
        }
        if !resume {
            self.identify_sent().await;
        }
        debug!(%platform, shard = self.id, resume, "sent {}", if resume { "resume" } else { "identify" });
        let jitter = interval.mul_f64(rand::random::<f64>());
        let mut live = Live {
            link,
            interval,
            next_heartbeat: Instant::now() + jitter,
            acked: true,
            ready: false,
            presence_due: None,
        };
        let end = self
            .pump(&mut live, &mut source, st, stored, stop, lost, notify)
            .await;
        if matches!(end, End::Cancelled) && stop.is_cancelled() {
            // Stopping with the lease still ours: leave the exact seq behind.
            self.flush_seq(st, stored).await;
        }
        live.link.close().await;
        end
    }

    /// Read, heartbeat and send presence until the connection ends.
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        live: &mut Live,
        source: &mut SplitStream<Ws>,
        st: &mut Resume,
        stored: &mut Option<u64>,
        stop: &CancellationToken,
        lost: &CancellationToken,
        notify: &Notify,
    ) -> End {
        let platform = self.settings.platform.as_str();
        loop {
            let heartbeat_at = live.next_heartbeat;
            let presence_at = live.presence_due;
            tokio::select! {
                biased;
                _ = lost.cancelled() => return End::Cancelled,
                frame = source.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.as_ref().map(|f| u16::from(f.code));
                            let reason = frame.as_ref().map(|f| f.reason.to_string()).unwrap_or_default();
                            return self.on_close(code, &reason, st, live.ready);
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            warn!(%platform, error = %e, "discord gateway connection failed");
                            return End::Again { wait: None, healthy: live.ready };
                        }
                        None => {
                            warn!(%platform, "discord gateway connection ended");
                            return End::Again { wait: None, healthy: live.ready };
                        }
                    };
                    let payload: Value = match serde_json::from_str(text.as_str()) {
                        Ok(v) => v,
                        Err(e) => {
                            warn!(%platform, error = %e, "discord gateway sent a frame that is not JSON; ignored");
                            continue;
                        }
                    };
                    if let Some(end) = self.on_payload(&payload, live, st, stored, stop, lost).await {
                        return end;
                    }
                }
                _ = sleep_until(heartbeat_at) => {
                    if !live.acked {
                        warn!(%platform, "no heartbeat ACK since the last heartbeat: zombied connection; reconnecting to resume");
                        crate::metrics::discord_session_event(platform, "zombie");
                        return End::Again { wait: Some(Duration::ZERO), healthy: live.ready };
                    }
                    if let Err(e) = live.link.send(&Op::Heartbeat.payload(json!(st.seq))).await {
                        warn!(%platform, error = %e, "could not send a heartbeat");
                        return End::Again { wait: None, healthy: live.ready };
                    }
                    live.acked = false;
                    live.next_heartbeat = Instant::now() + live.interval;
                    if live.ready && let Some(end) = self.flush_seq(st, stored).await {
                        if matches!(end, End::Cancelled) {
                            lost.cancel();
                        }
                        return end;
                    }
                }
                _ = notify.notified(), if live.ready => {
                    let at = live.link.budget.next_slot(Instant::now(), PRESENCE_RESERVE);
                    live.presence_due = Some(live.presence_due.map_or(at, |d| d.min(at)));
                }
                _ = sleep_until(presence_at.unwrap_or(heartbeat_at)), if live.ready && presence_at.is_some() => {
                    let at = live.link.budget.next_slot(Instant::now(), PRESENCE_RESERVE);
                    if at > Instant::now() {
                        debug!(%platform, "presence update delayed by the gateway send limit");
                        live.presence_due = Some(at);
                        continue;
                    }
                    match self.read_presence().await {
                        Ok(p) => {
                            live.presence_due = None;
                            if let Some(p) = p {
                                let update = Op::PresenceUpdate.payload(presence_object(&p));
                                if let Err(e) = live.link.send(&update).await {
                                    warn!(%platform, error = %e, "could not send a presence update");
                                    live.presence_due = Some(Instant::now());
                                    return End::Again { wait: None, healthy: live.ready };
                                }
                                debug!(%platform, "presence updated");
                            }
                        }
                        Err(e) => {
                            warn!(%platform, error = %e, "could not read the stored presence; retrying");
                            live.presence_due = Some(Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
            }
        }
    }

    /// Store the seq of events that recorded nothing (fenced); `Some` ends the connection.
    async fn flush_seq(&self, st: &Resume, stored: &mut Option<u64>) -> Option<End> {
        if st.session_id.is_none() || st.seq.is_none() || st.seq == *stored {
            return None;
        }
        match self.commit(st.seq, &Writes::default()).await {
            Ok(Commit::Done) => {
                *stored = st.seq;
                None
            }
            Ok(Commit::Fenced) => Some(End::Cancelled),
            Err(e) => {
                warn!(platform = %self.settings.platform, error = %e, "could not store the discord session seq");
                None
            }
        }
    }

    fn on_close(&self, code: Option<u16>, reason: &str, st: &mut Resume, ready: bool) -> End {
        let platform = self.settings.platform.as_str();
        if let Some(code) = code {
            let close = CloseCode::from_code(code);
            if close == CloseCode::AuthenticationFailed {
                return End::Refused("the gateway closed with 4004 (authentication failed)".into());
            }
            if let Some(why) = close.reshards() {
                return End::Reshard(format!("closed with {code} ({why})"));
            }
            if let Some(why) = close.fix() {
                return End::Fatal(format!("closed with {code} ({why})"));
            }
            if close.forgets_session() {
                info!(%platform, code, "discord gateway session expired; identifying afresh");
                st.forget();
                return End::Again {
                    wait: None,
                    healthy: ready,
                };
            }
        }
        warn!(%platform, code = ?code, %reason, "discord gateway closed the connection");
        End::Again {
            wait: None,
            healthy: ready,
        }
    }

    /// Handle one gateway payload; `Some` ends the connection.
    async fn on_payload(
        &self,
        payload: &Value,
        live: &mut Live,
        st: &mut Resume,
        stored: &mut Option<u64>,
        stop: &CancellationToken,
        lost: &CancellationToken,
    ) -> Option<End> {
        let platform = self.settings.platform.as_str();
        let again = |healthy: bool| End::Again {
            wait: None,
            healthy,
        };
        match Op::of(payload) {
            Some(Op::Dispatch) => {
                let t = payload.get("t").and_then(Value::as_str).unwrap_or("");
                let s = payload.get("s").and_then(Value::as_u64);
                let d = payload.get("d").unwrap_or(&Value::Null);
                match self.on_dispatch(t, s, d, live, st, stored).await {
                    Ok(Commit::Done) => None,
                    Ok(Commit::Fenced) => {
                        if !stop.is_cancelled() {
                            warn!(%platform, "the discord session lease is no longer ours; closing the websocket");
                        }
                        lost.cancel();
                        Some(End::Cancelled)
                    }
                    Err(e) => {
                        warn!(%platform, error = %e, event = t, "could not record a discord event in Redis; reconnecting to have it replayed");
                        Some(again(false))
                    }
                }
            }
            Some(Op::Heartbeat) => {
                match live.link.send(&Op::Heartbeat.payload(json!(st.seq))).await {
                    Ok(()) => None,
                    Err(e) => {
                        warn!(%platform, error = %e, "could not answer a heartbeat request");
                        Some(again(live.ready))
                    }
                }
            }
            Some(Op::Reconnect) => {
                info!(%platform, "discord asked to reconnect; resuming");
                Some(End::Again {
                    wait: Some(Duration::ZERO),
                    healthy: live.ready,
                })
            }
            Some(Op::InvalidSession) => {
                let resumable = payload.get("d").and_then(Value::as_bool).unwrap_or(false);
                crate::metrics::discord_session_event(platform, "invalid_session");
                let wait = Duration::from_millis(rand::random_range(1000..=5000));
                if resumable && st.can_resume() {
                    info!(%platform, "discord invalidated the session (resumable); resuming");
                } else {
                    info!(%platform, "discord invalidated the session; identifying afresh");
                    st.forget();
                    *stored = None;
                    match self.write_session(None).await {
                        Ok(Commit::Done) => {}
                        Ok(Commit::Fenced) => {
                            lost.cancel();
                            return Some(End::Cancelled);
                        }
                        Err(e) => {
                            warn!(%platform, error = %e, "could not clear the stored discord session")
                        }
                    }
                }
                Some(End::Again {
                    wait: Some(wait),
                    healthy: false,
                })
            }
            Some(Op::HeartbeatAck) => {
                live.acked = true;
                None
            }
            Some(Op::Hello) => None,
            other => {
                debug!(%platform, op = ?other, "unhandled gateway opcode");
                None
            }
        }
    }

    async fn on_dispatch(
        &self,
        t: &str,
        s: Option<u64>,
        d: &Value,
        live: &mut Live,
        st: &mut Resume,
        stored: &mut Option<u64>,
    ) -> RedisResult<Commit> {
        let platform = self.settings.platform.as_str();
        match t {
            "READY" => {
                st.session_id = d
                    .get("session_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                st.resume_url = d
                    .get("resume_gateway_url")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                st.user_id = d
                    .pointer("/user/id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                st.seq = s;
                let done = self.write_session(Some(st)).await?;
                if matches!(done, Commit::Done) {
                    let guilds = d
                        .get("guilds")
                        .and_then(Value::as_array)
                        .map_or(0, |g| g.len());
                    *stored = s;
                    self.became_ready(live);
                    crate::metrics::discord_session_event(platform, "ready");
                    if let Some(app) = str_at(d, "/application/id") {
                        let (me, token, app) = (
                            self.auto_defer.clone(),
                            self.settings.token.expose().to_owned(),
                            app.to_owned(),
                        );
                        let commands = self.settings.commands.clone();
                        tokio::spawn(async move { me.ready(&token, &app, &commands).await });
                    }
                    info!(
                        %platform,
                        user_id = st.user_id.as_deref().unwrap_or(""),
                        guilds,
                        "discord gateway ready"
                    );
                }
                return Ok(done);
            }
            "RESUMED" => {
                if let Some(s) = s {
                    st.seq = Some(st.seq.map_or(s, |c| c.max(s)));
                }
                self.became_ready(live);
                crate::metrics::discord_session_event(platform, "resumed");
                info!(%platform, seq = ?st.seq, "discord gateway session resumed");
                return Ok(Commit::Done);
            }
            _ => {}
        }
        if let (Some(s), Some(cur)) = (s, st.seq)
            && s <= cur
        {
            debug!(%platform, seq = s, "replayed event already processed; skipped");
            return Ok(Commit::Done);
        }
        let bot = st.user_id.as_deref().unwrap_or("");
        let w = writes_for(platform, bot, t, d);
        if !w.is_empty() {
            let seq = if st.session_id.is_some() {
                s.or(st.seq)
            } else {
                None
            };
            if let Commit::Fenced = self.commit(seq, &w).await? {
                return Ok(Commit::Fenced);
            }
            if w.event.is_some() {
                crate::metrics::discord_session_event(platform, "published");
            }
            if seq.is_some() {
                *stored = seq;
            }
        }
        if s.is_some() {
            st.seq = s;
        }
        if let Some((id, token, ty)) = w.ack {
            self.auto_defer.schedule(id, token, ty);
        }
        Ok(Commit::Done)
    }

    fn became_ready(&self, live: &mut Live) {
        live.ready = true;
        live.presence_due = Some(Instant::now());
        self.connected.store(true, Ordering::SeqCst);
    }
}

pub(super) async fn hello(source: &mut SplitStream<Ws>, shard: u32) -> Result<Duration, End> {
    let unhealthy = End::Again {
        wait: None,
        healthy: false,
    };
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let frame = match timeout(
            deadline.saturating_duration_since(Instant::now()),
            source.next(),
        )
        .await
        {
            Ok(f) => f,
            Err(_) => {
                warn!("the discord gateway sent no Hello");
                return Err(unhealthy);
            }
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if Op::of(&v) == Some(Op::Hello) {
                    let ms = v
                        .pointer("/d/heartbeat_interval")
                        .and_then(Value::as_u64)
                        .unwrap_or(41_250)
                        .max(1);
                    return Ok(Duration::from_millis(ms));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                if code == Some(4004) {
                    return Err(End::Refused(
                        "the gateway closed with 4004 (authentication failed)".into(),
                    ));
                }
                if let Some(why) = code.and_then(|c| CloseCode::from_code(c).reshards()) {
                    return Err(End::Reshard(format!(
                        "closed with {} ({why})",
                        code.unwrap_or(0)
                    )));
                }
                if let Some(why) = code.and_then(|c| CloseCode::from_code(c).fix()) {
                    return Err(End::Fatal(format!(
                        "closed with {} ({why})",
                        code.unwrap_or(0)
                    )));
                }
                warn!(shard, code = ?code, "the discord gateway closed before Hello");
                return Err(unhealthy);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(error = %e, "the discord gateway failed before Hello");
                return Err(unhealthy);
            }
            None => return Err(unhealthy),
        }
    }
}

/// Forward presence notifications to the holder until `lost`.
pub(super) async fn watch_presence(
    client: redis::Client,
    channel: String,
    notify: Arc<Notify>,
    lost: CancellationToken,
) {
    loop {
        let subscribed = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            RedisResult::Ok(ps)
        };
        let subscribed = tokio::select! {
            r = subscribed => r,
            _ = lost.cancelled() => return,
        };
        match subscribed {
            Ok(ps) => {
                // Whatever was set before the subscription took effect.
                notify.notify_one();
                let mut messages = ps.into_on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(_) => notify.notify_one(),
                            None => break,
                        },
                        _ = lost.cancelled() => return,
                    }
                }
                warn!("the presence subscription ended; subscribing again");
            }
            Err(e) => warn!(error = %e, "could not subscribe to presence updates; retrying"),
        }
        tokio::select! {
            _ = sleep(Duration::from_secs(1)) => {}
            _ = lost.cancelled() => return,
        }
    }
}
