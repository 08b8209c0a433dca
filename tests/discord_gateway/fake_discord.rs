//! A fake Discord that runs by itself and enforces the gateway rules Discord
//! documents, so a test can let several clients loose on it and read what
//! they did wrong afterwards:
//!
//! * `GET /gateway/bot`: the URL, the recommended shard count (guilds /
//!   `guilds_per_shard`, rounded up) and `session_start_limit` with
//!   `max_concurrency` (each IDENTIFY takes one start; `session_starts` per
//!   `starts_reset`). An IDENTIFY past the limit is a violation and closed
//!   with 4004 (Discord resets the token of a bot that does it).
//! * Shard routing: a guild's events go to the session of shard
//!   `(guild_id >> 22) % num_shards`; DMs to shard 0. Every live session
//!   whose shard matches gets the event (two sessions of one shard would
//!   both get it, as on Discord: that is how duplicates happen).
//! * IDENTIFY: `shard` missing while sharding is needed, or a shard holding
//!   more than `guilds_per_shard` guilds → close 4011; `shard_id >=
//!   num_shards` → 4010; two identifies of one bucket (`shard_id %
//!   max_concurrency`) within 5 s → a violation and op 9.
//! * More than 120 client commands in 60 s on a connection → close 4008.
//! * A connection whose heartbeat is overdue (interval × 1.5) → close 4009.
//! * RESUME replays the session's events after `seq`, then RESUMED; a
//!   session of a connection that closed with 1000/1001 is gone (op 9).
//!
//! Every breach is recorded in [`Book::violations`]: a test asserts it is
//! empty.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// Discord's identify window per bucket.
const IDENTIFY_WINDOW: Duration = Duration::from_secs(5);
/// Discord's gateway send limit.
const COMMANDS_PER_MINUTE: usize = 120;

pub const FAKE_BOT: &str = "900000000000000001";

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Guild ids the bot is in.
    pub guilds: Vec<u64>,
    /// Most guilds one shard may hold (Discord: 2,500).
    pub guilds_per_shard: usize,
    pub max_concurrency: u32,
    pub heartbeat_ms: u64,
    /// Session starts (IDENTIFYs) allowed per `starts_reset` (Discord:
    /// 1,000 per day).
    pub session_starts: u32,
    pub starts_reset: Duration,
}

/// What clients did; read by tests.
#[derive(Debug, Default)]
pub struct Book {
    /// (when, shard id, shard count) of every IDENTIFY taken.
    pub identifies: Vec<(Instant, u32, u32)>,
    /// (shard id, session id) of every RESUME that was honoured.
    pub resumes: Vec<(u32, String)>,
    /// Close codes the fake sent, with the shard (None: before identify).
    pub closes: Vec<(Option<u32>, u16)>,
    /// (shard id, presence `d`) of every op 3.
    pub presences: Vec<(u32, Value)>,
    /// Rules broken by a client.
    pub violations: Vec<String>,
    /// Session starts taken (IDENTIFYs that got READY).
    pub starts: u32,
}

struct Session {
    shard: (u32, u32),
    seq: u64,
    /// Every event of the session, for replay on resume.
    events: Vec<(u64, String, Value)>,
    /// The live connection, if any.
    conn: Option<mpsc::UnboundedSender<Out>>,
    gone: bool,
}

enum Out {
    Text(Value),
    Close(u16),
}

struct State {
    rules: Rules,
    book: Book,
    sessions: HashMap<String, Session>,
    next_session: u64,
    /// Last identify per bucket.
    buckets: HashMap<u32, Instant>,
    /// When the session start window began.
    starts_since: Instant,
}

impl State {
    /// Session starts left in the window, and ms until it resets.
    fn starts_left(&mut self) -> (u32, u64) {
        let elapsed = self.starts_since.elapsed();
        if elapsed >= self.rules.starts_reset {
            self.starts_since = Instant::now();
            self.book.starts = 0;
        }
        let reset = self
            .rules
            .starts_reset
            .saturating_sub(self.starts_since.elapsed());
        (
            self.rules.session_starts.saturating_sub(self.book.starts),
            reset.as_millis() as u64,
        )
    }

    fn recommended(&self) -> u32 {
        self.rules
            .guilds
            .len()
            .div_ceil(self.rules.guilds_per_shard)
            .max(1) as u32
    }

    fn guilds_of(&self, (id, n): (u32, u32)) -> Vec<u64> {
        self.rules
            .guilds
            .iter()
            .copied()
            .filter(|g| ((g >> 22) % u64::from(n)) as u32 == id)
            .collect()
    }

    /// Queue `t`/`d` on session `sid` (and send it if connected).
    fn push(&mut self, sid: &str, t: &str, d: Value) {
        let s = self.sessions.get_mut(sid).expect("session");
        s.seq += 1;
        let seq = s.seq;
        s.events.push((seq, t.to_owned(), d.clone()));
        if let Some(c) = &s.conn {
            let _ = c.send(Out::Text(json!({"op": 0, "t": t, "s": seq, "d": d})));
        }
    }

    /// The live sessions an event of `guild` (None: a DM) goes to.
    fn route(&self, guild: Option<u64>) -> Vec<String> {
        self.sessions
            .iter()
            .filter(|(_, s)| !s.gone)
            .filter(|(_, s)| match guild {
                Some(g) => ((g >> 22) % u64::from(s.shard.1)) as u32 == s.shard.0,
                None => s.shard.0 == 0,
            })
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// The running fake.
#[derive(Clone)]
pub struct FakeDiscord {
    pub api_base: String,
    pub ws_url: String,
    state: Arc<Mutex<State>>,
    /// Notified whenever the book changes.
    pub changed: Arc<Notify>,
}

impl FakeDiscord {
    pub async fn start(rules: Rules) -> FakeDiscord {
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr: SocketAddr = ws.local_addr().unwrap();
        let ws_url = format!("ws://{ws_addr}");
        let state = Arc::new(Mutex::new(State {
            rules,
            book: Book::default(),
            sessions: HashMap::new(),
            next_session: 0,
            buckets: HashMap::new(),
            starts_since: Instant::now(),
        }));
        let changed = Arc::new(Notify::new());
        let st = state.clone();
        let url = ws_url.clone();
        let app = Router::new()
            .route(
                "/api/v10/gateway/bot",
                get(move || async move {
                    let mut s = st.lock().unwrap();
                    let (remaining, reset_after) = s.starts_left();
                    Json(json!({
                        "url": url,
                        "shards": s.recommended(),
                        "session_start_limit": {
                            "total": s.rules.session_starts,
                            "remaining": remaining,
                            "reset_after": reset_after,
                            "max_concurrency": s.rules.max_concurrency
                        }
                    }))
                }),
            )
            .route(
                "/api/v10/users/@me",
                get(|| async {
                    Json(json!({"id": FAKE_BOT, "username": "stargazer", "bot": true}))
                }),
            );
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(http, app).await });
        let fake = FakeDiscord {
            api_base: format!("http://{http_addr}/api/v10"),
            ws_url,
            state,
            changed,
        };
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = ws.accept().await {
                tokio::spawn(f.clone().serve(sock));
            }
        });
        fake
    }

    /// Read the book.
    pub fn book<R>(&self, f: impl FnOnce(&Book) -> R) -> R {
        f(&self.state.lock().unwrap().book)
    }

    /// Change the guilds the bot is in (more guilds: Discord asks for more shards).
    pub fn set_guilds(&self, guilds: Vec<u64>) {
        self.state.lock().unwrap().rules.guilds = guilds;
    }

    /// A user's message in `guild` (None: a DM), routed to its shard's sessions.
    /// Returns how many sessions got it.
    pub fn message(&self, guild: Option<u64>, channel: &str, id: &str, text: &str) -> usize {
        let mut d = json!({
            "id": id, "channel_id": channel, "content": text,
            "author": {"id": "53908099506183680", "username": "mason", "global_name": "Mason"},
            "timestamp": "2017-07-11T17:27:07.299000+00:00", "type": 0,
            "attachments": [], "embeds": [], "mentions": [], "mention_roles": [],
        });
        if let Some(g) = guild {
            d["guild_id"] = g.to_string().into();
        }
        let mut s = self.state.lock().unwrap();
        let to = s.route(guild);
        for sid in &to {
            s.push(sid, "MESSAGE_CREATE", d.clone());
        }
        to.len()
    }

    /// Close every live connection of shard `id` with `code`.
    pub fn kick(&self, id: u32, code: u16) {
        let s = self.state.lock().unwrap();
        for sess in s.sessions.values().filter(|s| s.shard.0 == id && !s.gone) {
            if let Some(c) = &sess.conn {
                let _ = c.send(Out::Close(code));
            }
        }
    }

    /// The shards with a live, connected session, as (id, count), sorted.
    pub fn connected_shards(&self) -> Vec<(u32, u32)> {
        let s = self.state.lock().unwrap();
        let mut v: Vec<_> = s
            .sessions
            .values()
            .filter(|s| !s.gone && s.conn.is_some())
            .map(|s| s.shard)
            .collect();
        v.sort();
        v
    }

    fn violation(&self, what: String) {
        self.state.lock().unwrap().book.violations.push(what);
        self.changed.notify_waiters();
    }

    async fn serve(self, sock: TcpStream) {
        let Ok(ws) = tokio_tungstenite::accept_async(sock).await else {
            return;
        };
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Out>();
        let interval = Duration::from_millis(self.state.lock().unwrap().rules.heartbeat_ms);
        let _ = sink
            .send(Message::text(
                json!({"op": 10, "s": null, "t": null, "d": {"heartbeat_interval": interval.as_millis() as u64}})
                    .to_string(),
            ))
            .await;
        let mut sid: Option<String> = None;
        let mut shard: Option<u32> = None;
        let mut sent: Vec<Instant> = Vec::new();
        let mut beat_due = Instant::now() + interval.mul_f64(1.5);
        let close_with = |code: u16, shard: Option<u32>, me: &FakeDiscord| {
            me.state.lock().unwrap().book.closes.push((shard, code));
            me.changed.notify_waiters();
        };
        loop {
            let overdue = tokio::time::sleep_until(beat_due.into());
            tokio::select! {
                m = stream.next() => {
                    let text = match m {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(f))) => {
                            let code = f.map(|f| u16::from(f.code));
                            self.disconnected(sid.as_deref(), matches!(code, Some(1000 | 1001)));
                            return;
                        }
                        Some(Ok(_)) => continue,
                        _ => {
                            self.disconnected(sid.as_deref(), false);
                            return;
                        }
                    };
                    let now = Instant::now();
                    sent.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
                    sent.push(now);
                    if sent.len() > COMMANDS_PER_MINUTE {
                        self.violation(format!("shard {shard:?}: more than {COMMANDS_PER_MINUTE} commands in 60 s"));
                        close_with(4008, shard, &self);
                        let _ = sink.send(close_frame(4008)).await;
                        self.disconnected(sid.as_deref(), false);
                        return;
                    }
                    let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    match v["op"].as_u64() {
                        Some(1) => {
                            beat_due = now + interval.mul_f64(1.5);
                            let _ = sink.send(Message::text(json!({"op": 11}).to_string())).await;
                        }
                        Some(2) => match self.identify(&v["d"], out.clone()) {
                            Ok((id, s)) => {
                                sid = Some(id);
                                shard = Some(s);
                            }
                            Err(code) => {
                                if code == 9 {
                                    let _ = sink.send(Message::text(json!({"op": 9, "d": false}).to_string())).await;
                                    continue;
                                }
                                close_with(code, shard, &self);
                                let _ = sink.send(close_frame(code)).await;
                                return;
                            }
                        },
                        Some(6) => match self.resume(&v["d"], out.clone()) {
                            Some((id, s)) => {
                                sid = Some(id);
                                shard = Some(s);
                            }
                            None => {
                                let _ = sink.send(Message::text(json!({"op": 9, "d": false}).to_string())).await;
                            }
                        },
                        Some(3) => {
                            if let Some(s) = shard {
                                self.state.lock().unwrap().book.presences.push((s, v["d"].clone()));
                                self.changed.notify_waiters();
                            } else {
                                self.violation("presence before identify".into());
                            }
                        }
                        other => self.violation(format!("unexpected op {other:?}")),
                    }
                }
                o = out_rx.recv() => match o {
                    Some(Out::Text(v)) => { let _ = sink.send(Message::text(v.to_string())).await; }
                    Some(Out::Close(code)) => {
                        close_with(code, shard, &self);
                        let _ = sink.send(close_frame(code)).await;
                        // After these the session cannot be resumed.
                        let resumable = matches!(code, 4000..=4003 | 4005 | 4008);
                        self.disconnected(sid.as_deref(), !resumable);
                        return;
                    }
                    None => {}
                },
                _ = overdue => {
                    self.violation(format!("shard {shard:?}: heartbeat overdue"));
                    close_with(4009, shard, &self);
                    let _ = sink.send(close_frame(4009)).await;
                    self.disconnected(sid.as_deref(), true);
                    return;
                }
            }
        }
    }

    fn disconnected(&self, sid: Option<&str>, gone: bool) {
        if let Some(sid) = sid {
            let mut s = self.state.lock().unwrap();
            if let Some(sess) = s.sessions.get_mut(sid) {
                sess.conn = None;
                sess.gone |= gone;
            }
        }
        self.changed.notify_waiters();
    }

    /// An IDENTIFY: the session id and shard, or a close code (9: op 9).
    fn identify(&self, d: &Value, out: mpsc::UnboundedSender<Out>) -> Result<(String, u32), u16> {
        let mut s = self.state.lock().unwrap();
        let shard = match d["shard"].as_array() {
            Some(a) => (
                a.first().and_then(Value::as_u64).unwrap_or(u64::MAX) as u32,
                a.get(1).and_then(Value::as_u64).unwrap_or(0) as u32,
            ),
            None => (0, 1),
        };
        if shard.1 == 0 || shard.0 >= shard.1 {
            s.book.violations.push(format!("invalid shard {shard:?}"));
            return Err(4010);
        }
        if s.guilds_of(shard).len() > s.rules.guilds_per_shard {
            return Err(4011);
        }
        let now = Instant::now();
        let bucket = shard.0 % s.rules.max_concurrency.max(1);
        if let Some(last) = s.buckets.get(&bucket)
            && now.duration_since(*last) < IDENTIFY_WINDOW
        {
            let gap = now.duration_since(*last);
            s.book.violations.push(format!(
                "identify of bucket {bucket} {gap:?} after the last one"
            ));
            return Err(9);
        }
        if s.starts_left().0 == 0 {
            s.book
                .violations
                .push("identify past the session start limit".into());
            return Err(4004);
        }
        s.buckets.insert(bucket, now);
        s.book.identifies.push((now, shard.0, shard.1));
        s.book.starts += 1;
        s.next_session += 1;
        let sid = format!("fake-{}-{}", shard.0, s.next_session);
        let guilds = s.guilds_of(shard);
        s.sessions.insert(
            sid.clone(),
            Session {
                shard,
                seq: 0,
                events: Vec::new(),
                conn: Some(out),
                gone: false,
            },
        );
        let ready = json!({
            "v": 10,
            "user": {"id": FAKE_BOT, "username": "stargazer", "bot": true},
            "guilds": guilds.iter().map(|g| json!({"id": g.to_string(), "unavailable": true})).collect::<Vec<_>>(),
            "session_id": sid,
            "resume_gateway_url": format!("{}/resume", s_ws(&self.ws_url)),
            "shard": [shard.0, shard.1],
            "application": {"id": FAKE_BOT, "flags": 0}
        });
        s.push(&sid, "READY", ready);
        for g in guilds {
            s.push(
                &sid,
                "GUILD_CREATE",
                json!({"id": g.to_string(), "name": format!("guild {g}"), "unavailable": false,
                       "channels": [{"id": format!("c{g}"), "type": 0}], "threads": []}),
            );
        }
        drop(s);
        self.changed.notify_waiters();
        Ok((sid, shard.0))
    }

    /// A RESUME: replay what the client has not seen, then RESUMED.
    fn resume(&self, d: &Value, out: mpsc::UnboundedSender<Out>) -> Option<(String, u32)> {
        let mut s = self.state.lock().unwrap();
        let sid = d["session_id"].as_str()?.to_owned();
        let after = d["seq"].as_u64().unwrap_or(0);
        let sess = s.sessions.get_mut(&sid)?;
        if sess.gone {
            return None;
        }
        for (seq, t, d) in sess.events.iter().filter(|(seq, _, _)| *seq > after) {
            let _ = out.send(Out::Text(json!({"op": 0, "t": t, "s": seq, "d": d})));
        }
        let _ = out.send(Out::Text(
            json!({"op": 0, "t": "RESUMED", "s": null, "d": {}}),
        ));
        sess.conn = Some(out);
        let shard = sess.shard.0;
        s.book.resumes.push((shard, sid.clone()));
        drop(s);
        self.changed.notify_waiters();
        Some((sid, shard))
    }
}

fn s_ws(url: &str) -> &str {
    url.trim_end_matches('/')
}

fn close_frame(code: u16) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: "".into(),
    }))
}

/// A guild id routed to shard `id` of `n`: a snowflake whose `>> 22` is
/// `k * n + id`.
pub fn guild_on(id: u32, n: u32, k: u64) -> u64 {
    ((k * u64::from(n) + u64::from(id)) << 22) | 0x1234
}
