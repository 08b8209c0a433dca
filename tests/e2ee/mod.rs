//! End-to-end encryption against the real Synapse: a second client that
//! encrypts as Element does (matrix-sdk-crypto's `OlmMachine` on a memory
//! store, plain HTTP to the homeserver) makes an encrypted DM with the bot,
//! writes in it and reads the bot's answers; the bot is a whole gateway
//! (its syncer decrypts, any sender encrypts) with its keys in Redis.

use std::collections::BTreeSet;

use matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent;
use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::{
    DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine, TrustRequirement,
};
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::serde::Raw;
use ruma::{OwnedUserId, RoomId, UserId};
use stargazer::adapters::matrix::MatrixKeys;
use stargazer::adapters::matrix::crypto::{mark_sent, request_http};

use super::*;

/// A to-device request that shares a room key.
type KeyShare = Arc<matrix_sdk_crypto::types::requests::ToDeviceRequest>;

fn raw<T>(v: &Value) -> Raw<T> {
    Raw::from_json(serde_json::value::to_raw_value(v).unwrap())
}

fn trust_anyone() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

/// A user with an encrypting device, as Element would be.
struct Element {
    user: User,
    machine: OlmMachine,
    since: Option<String>,
}

impl Element {
    async fn register(base: &str, name: &str) -> Element {
        let user = User::register(base, name).await;
        let uid = UserId::parse(&user.user_id).unwrap();
        let machine = OlmMachine::new(&uid, user.device_id.as_str().into()).await;
        let me = Element {
            user,
            machine,
            since: None,
        };
        me.flush().await;
        me
    }

    /// One call to the client-server API (`path` from `/_matrix/`).
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .user
            .http
            .request(method, format!("{}{path}", self.user.base))
            .bearer_auth(&self.user.token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    async fn send_request(&self, id: &ruma::TransactionId, req: &AnyOutgoingRequest) {
        let Some((method, path, body)) = request_http(req) else {
            return;
        };
        let v = self.call(method, &path, body).await;
        mark_sent(&self.machine, id, req, &v).await.expect("marked");
    }

    /// Send what the machine has to send (keys upload, query, …).
    async fn flush(&self) {
        for _ in 0..4 {
            let reqs = self.machine.outgoing_requests().await.unwrap();
            if reqs.is_empty() {
                return;
            }
            for r in reqs {
                self.send_request(r.request_id(), r.request()).await;
            }
        }
    }

    /// One `/sync`, its to-device events and device lists fed to the machine.
    async fn sync(&mut self) -> Value {
        let mut path = "/_matrix/client/v3/sync?timeout=0".to_owned();
        if let Some(s) = &self.since {
            path.push_str(&format!("&since={}", seg(s)));
        }
        let v = self.call(reqwest::Method::GET, &path, Value::Null).await;
        let to_device = v["to_device"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(raw)
            .collect();
        let lists: DeviceLists =
            serde_json::from_value(v["device_lists"].clone()).unwrap_or_default();
        let counts =
            serde_json::from_value(v["device_one_time_keys_count"].clone()).unwrap_or_default();
        self.machine
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: to_device,
                    changed_devices: &lists,
                    one_time_keys_counts: &counts,
                    unused_fallback_keys: None,
                    next_batch_token: None,
                },
                &trust_anyone(),
            )
            .await
            .expect("sync changes");
        self.since = v["next_batch"].as_str().map(str::to_owned);
        self.flush().await;
        v
    }

    /// The device keys the server has for `user`'s device `device`.
    async fn device_keys(&self, user: &str, device: &str) -> Option<Value> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/keys/query",
                json!({"device_keys": {user: []}}),
            )
            .await;
        v["device_keys"][user].get(device).cloned()
    }

    /// An encrypted DM with `other`, as Element makes one.
    async fn create_dm(&self, other: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                json!({"preset": "trusted_private_chat", "is_direct": true,
                   "invite": [other],
                   "initial_state": [{"type": "m.room.encryption", "state_key": "",
                                      "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]}),
            )
            .await;
        v["room_id"].as_str().unwrap().to_owned()
    }

    async fn members(&self, room: &str) -> Vec<OwnedUserId> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/members", seg(room)),
                Value::Null,
            )
            .await;
        v["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| matches!(e["content"]["membership"].as_str(), Some("join" | "invite")))
            .filter_map(|e| OwnedUserId::try_from(e["state_key"].as_str()?).ok())
            .collect()
    }

    /// Write `text` in the encrypted `room`: the room key shared with every
    /// member's devices first, then the message encrypted. Its event id.
    async fn say(&mut self, room: &str, text: &str) -> String {
        let (body, keys) = self.encrypt(room, text).await;
        self.send_keys(keys).await;
        self.put_encrypted(room, body).await
    }

    /// Write `text` in `room`, encrypted, but hold back the room key's
    /// to-device messages: the message's event id, and those to send.
    async fn say_keys_later(&mut self, room: &str, text: &str) -> (String, Vec<KeyShare>) {
        let (body, keys) = self.encrypt(room, text).await;
        (self.put_encrypted(room, body).await, keys)
    }

    async fn put_encrypted(&self, room: &str, body: Value) -> String {
        let txn = format!("e{:016x}", rand::random::<u64>());
        let v = self
            .call(
                reqwest::Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.encrypted/{txn}",
                    seg(room)
                ),
                body,
            )
            .await;
        v["event_id"].as_str().unwrap().to_owned()
    }

    /// Send the to-device messages that carry a room key.
    async fn send_keys(&self, keys: Vec<KeyShare>) {
        for s in keys {
            self.send_request(
                &s.txn_id,
                &AnyOutgoingRequest::ToDeviceRequest((*s).clone()),
            )
            .await;
        }
    }

    /// `text` encrypted for `room` (the room's members tracked, Olm
    /// sessions made): the content of its `m.room.encrypted` event, and the
    /// to-device messages that share its room key, still to send.
    async fn encrypt(&mut self, room: &str, text: &str) -> (Value, Vec<KeyShare>) {
        self.sync().await;
        let members = self.members(room).await;
        let room_id = RoomId::parse(room).unwrap();
        self.machine
            .update_tracked_users(members.iter().map(|u| &**u))
            .await
            .unwrap();
        self.flush().await;
        if let Some((id, claim)) = self
            .machine
            .get_missing_sessions(members.iter().map(|u| &**u))
            .await
            .unwrap()
        {
            self.send_request(&id, &AnyOutgoingRequest::KeysClaim(claim))
                .await;
        }
        let shares = self
            .machine
            .share_room_key(
                &room_id,
                members.iter().map(|u| &**u),
                EncryptionSettings::default(),
            )
            .await
            .unwrap();
        let content = json!({"msgtype": "m.text", "body": text});
        let enc = self
            .machine
            .encrypt_room_event_raw(&room_id, "m.room.message", &raw(&content))
            .await
            .unwrap();
        let body: Value = serde_json::from_str(enc.content.json().get()).unwrap();
        (body, shares)
    }

    /// The events `sender` sent in `room` as the server has them.
    async fn raw_events_from(&self, room: &str, sender: &str) -> Vec<Value> {
        self.user
            .events(room, &["m.room.message", "m.room.encrypted"])
            .await
            .into_iter()
            .filter(|e| e["sender"] == sender)
            .collect()
    }

    /// Sync (receiving room keys), then decrypt `ev`: the plaintext event.
    async fn decrypt(&mut self, room: &str, ev: &Value) -> Option<Value> {
        self.sync().await;
        let room_id = RoomId::parse(room).unwrap();
        let r: Raw<EncryptedEvent> = raw(ev);
        let d = self
            .machine
            .decrypt_room_event(&r, &room_id, &trust_anyone())
            .await
            .ok()?;
        serde_json::from_str(d.event.json().get()).ok()
    }

    /// The bodies of `sender`'s events in `room`, decrypted, once there are
    /// `n` of them that decrypt; with their Megolm session ids.
    async fn read_from(&mut self, room: &str, sender: &str, n: usize) -> Vec<(String, String)> {
        let deadline = Instant::now() + T;
        loop {
            let evs = self.raw_events_from(room, sender).await;
            let mut out = Vec::new();
            for ev in &evs {
                assert_eq!(
                    ev["type"], "m.room.encrypted",
                    "the bot wrote in the clear in an encrypted room: {ev}"
                );
                if let Some(plain) = self.decrypt(room, ev).await {
                    out.push((
                        plain["content"]["body"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        ev["content"]["session_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ));
                }
            }
            if out.len() >= n {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "timed out decrypting {n} events of {sender}: {out:?} of {}",
                evs.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The bot's identity keys (curve25519, ed25519) as the server has them.
async fn identity(alice: &Element, bot: &User) -> Option<(String, String)> {
    let keys = alice.device_keys(&bot.user_id, &bot.device_id).await?;
    let k = |alg: &str| {
        keys["keys"][format!("{alg}:{}", bot.device_id)]
            .as_str()
            .map(str::to_owned)
    };
    Some((k("curve25519")?, k("ed25519")?))
}

/// A worker that answers every message with `re: <text>` and reports what
/// it read.
fn answering_worker(
    rig: &Rig,
    stop: CancellationToken,
) -> tokio::sync::mpsc::UnboundedReceiver<InboundEvent> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = Worker::from_bus(rig.bus.clone(), "sg:msg:", None);
    tokio::spawn(async move {
        let out = worker.proxy();
        worker
            .inbound("w1")
            .run(
                |ev: InboundEvent| {
                    let out = out.clone();
                    let tx = tx.clone();
                    async move {
                        if ev.kind == "message" {
                            let text = ev.text.clone().unwrap_or_default();
                            out.send(&ev.channel_id, &format!("re: {text}"))
                                .await
                                .map_err(|e| e.message)?;
                        }
                        let _ = tx.send(ev);
                        Ok::<(), String>(())
                    }
                },
                stop,
            )
            .await
            .expect("worker");
    });
    rx
}

/// The next event the worker read that is a message, within `T`.
async fn next_message(rx: &mut tokio::sync::mpsc::UnboundedReceiver<InboundEvent>) -> InboundEvent {
    loop {
        let ev = tokio::time::timeout(T, rx.recv())
            .await
            .expect("an inbound event in time")
            .expect("the worker runs");
        if ev.kind == "message" || ev.kind == "encrypted" {
            return ev;
        }
    }
}

/// A user, an encrypted DM with a bot that runs as a gateway.
struct Dm {
    base: String,
    bot: User,
    alice: Element,
    room: String,
}

async fn encrypted_dm(rig: &Rig) -> (Dm, CancellationToken, tokio::task::JoinHandle<()>) {
    let base = shared();
    let bot = User::register(&base, "bot").await;
    let alice = Element::register(&base, "alice").await;
    let (stop, task) = gateway(rig, &base, &bot);
    eventually("the bot's device keys on the server", T, || async {
        identity(&alice, &bot).await.is_some()
    })
    .await;
    let room = alice.create_dm(&bot.user_id).await;
    eventually("the bot joined the DM", T, || async {
        alice
            .user
            .joined_members(&room)
            .await
            .contains(&bot.user_id)
    })
    .await;
    (
        Dm {
            base,
            bot,
            alice,
            room,
        },
        stop,
        task,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_dm_is_read_and_answered() {
    let rig = Rig::new().await;
    let (mut dm, stop, task) = encrypted_dm(&rig).await;
    let worker_stop = CancellationToken::new();
    let mut read = answering_worker(&rig, worker_stop.clone());

    let t0 = Instant::now();
    let sent = dm.alice.say(&dm.room, "the secret is 42").await;
    let ev = next_message(&mut read).await;
    let read_after = t0.elapsed();
    assert_eq!(ev.kind, "message", "{ev:?}");
    assert_eq!(ev.text.as_deref(), Some("the secret is 42"));
    assert_eq!(ev.message_id.as_deref(), Some(sent.as_str()));
    assert_eq!(ev.user_id, dm.alice.user.user_id);
    assert_eq!(ev.extra["encrypted"], true);
    // The server only ever had the ciphertext.
    let on_server = dm
        .alice
        .raw_events_from(&dm.room, &dm.alice.user.user_id)
        .await;
    assert_eq!(on_server.len(), 1);
    assert_eq!(on_server[0]["type"], "m.room.encrypted");
    assert!(!on_server[0].to_string().contains("secret is 42"));

    let got = dm.alice.read_from(&dm.room, &dm.bot.user_id, 1).await;
    let answered_after = t0.elapsed();
    assert_eq!(got[0].0, "re: the secret is 42");
    assert!(rig.dlq().await.is_empty(), "{:?}", rig.dlq().await);
    eprintln!(
        "encrypted DM: read by the worker after {read_after:?}, the answer decrypted by the other client after {answered_after:?} (session {})",
        got[0].1
    );
    // Syncs that bring nothing write no crypto state (the generation stays,
    // so the fleet's other gateways keep their machines).
    let generation = format!(
        "{}crypto:{}:generation",
        rig.keys.matrix(),
        dm.bot.device_id
    );
    let before: u64 = rig.cmd(&["GET", &generation]).await;
    // (Reactions stay in the clear: two syncs that bring one each.)
    for n in 1..=2 {
        dm.alice.user.react(&dm.room, &sent, &format!("{n}")).await;
        eventually("the reaction", T, || async {
            inbound(&rig)
                .await
                .iter()
                .filter(|e| e.kind == "reaction")
                .count()
                == n
        })
        .await;
    }
    let after: u64 = rig.cmd(&["GET", &generation]).await;
    assert_eq!(before, after, "idle syncs moved the crypto generation");
    // Once: nothing more reached the worker.
    let inbound_msgs = messages(&inbound(&rig).await).len();
    assert_eq!(inbound_msgs, 1);
    worker_stop.cancel();
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_keeps_its_device_and_still_decrypts() {
    let rig = Rig::new().await;
    let (mut dm, stop, task) = encrypted_dm(&rig).await;
    let before = identity(&dm.alice, &dm.bot).await.unwrap();
    let worker_stop = CancellationToken::new();
    let mut read = answering_worker(&rig, worker_stop.clone());
    dm.alice.say(&dm.room, "before the restart").await;
    assert_eq!(
        next_message(&mut read).await.text.as_deref(),
        Some("before the restart")
    );
    dm.alice.read_from(&dm.room, &dm.bot.user_id, 1).await;
    stop.cancel();
    task.await.unwrap();
    let account: Option<String> = rig
        .cmd(&[
            "GET",
            &format!("{}crypto:{}:account", rig.keys.matrix(), dm.bot.device_id),
        ])
        .await;
    assert!(account.is_some(), "the account is in Redis");

    // A new gateway process (a fresh machine, built from Redis).
    let (stop, task) = gateway(&rig, &dm.base, &dm.bot);
    let t0 = Instant::now();
    dm.alice.say(&dm.room, "after the restart").await;
    let ev = next_message(&mut read).await;
    assert_eq!(ev.kind, "message", "{ev:?}");
    assert_eq!(ev.text.as_deref(), Some("after the restart"));
    let got = dm.alice.read_from(&dm.room, &dm.bot.user_id, 2).await;
    let bodies: BTreeSet<&str> = got.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(
        bodies,
        BTreeSet::from(["re: before the restart", "re: after the restart"])
    );
    let after = identity(&dm.alice, &dm.bot).await.unwrap();
    assert_eq!(
        before, after,
        "the same device identity keys after a restart"
    );
    let devices = dm
        .alice
        .call(
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/query",
            json!({"device_keys": {&dm.bot.user_id: []}}),
        )
        .await;
    assert_eq!(
        devices["device_keys"][&dm.bot.user_id]
            .as_object()
            .map(|m| m.len()),
        Some(1)
    );
    eprintln!(
        "restart: identity keys kept (curve25519 {}), a message after it decrypted and answered in {:?}; both answers in session(s) {:?}",
        after.0,
        t0.elapsed(),
        got.iter().map(|(_, s)| s.as_str()).collect::<BTreeSet<_>>()
    );
    worker_stop.cancel();
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_by_the_non_syncer_gateway_is_decrypted() {
    let rig = Rig::new().await;
    let (mut dm, stop, task) = encrypted_dm(&rig).await;
    let worker_stop = CancellationToken::new();
    let mut read = answering_worker(&rig, worker_stop.clone());
    dm.alice.say(&dm.room, "hello").await;
    assert_eq!(next_message(&mut read).await.text.as_deref(), Some("hello"));
    // The syncer's gateway answered (it is the only consumer so far).
    let first = dm.alice.read_from(&dm.room, &dm.bot.user_id, 1).await;
    assert_eq!(first[0].0, "re: hello");

    // A second gateway's adapter, as `gateway` builds it, without the
    // syncer: it only encrypts, with the crypto state the first one left.
    let other = Arc::new(
        MatrixAdapter::new(rig.keys.platform(), settings(&dm.base, &dm.bot))
            .unwrap()
            .with_redis(rig.bus.conn(), MatrixKeys::new(rig.keys.matrix())),
    );
    let env = envelope(json!({"type": "message", "channel_id": dm.room,
                              "text": "from the other gateway"}));
    deliver_direct(&other, &env, "sg:msg:other-1", 1)
        .await
        .expect("sent by the second gateway");
    let got = dm.alice.read_from(&dm.room, &dm.bot.user_id, 2).await;
    assert_eq!(got[1].0, "from the other gateway");
    assert_eq!(
        got[0].1, got[1].1,
        "the second gateway went on with the room's current Megolm session"
    );

    // The syncer, whose machine is now behind Redis, still decrypts.
    dm.alice.say(&dm.room, "and now?").await;
    let ev = next_message(&mut read).await;
    assert_eq!(ev.text.as_deref(), Some("and now?"));
    let got = dm.alice.read_from(&dm.room, &dm.bot.user_id, 3).await;
    assert_eq!(got[2].0, "re: and now?");
    eprintln!(
        "two gateways: the non-syncer's message decrypted by the client (same session {}), the syncer decrypted after it",
        got[1].1
    );
    worker_stop.cancel();
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_key_comes_later_is_published_when_it_arrives() {
    let rig = Rig::new().await;
    let (mut dm, stop, task) = encrypted_dm(&rig).await;
    let worker_stop = CancellationToken::new();
    let mut read = answering_worker(&rig, worker_stop.clone());
    let (sent, keys) = dm.alice.say_keys_later(&dm.room, "late news").await;
    let ev = next_message(&mut read).await;
    assert_eq!(ev.kind, "encrypted", "{ev:?}");
    assert_eq!(ev.message_id.as_deref(), Some(sent.as_str()));
    assert_eq!(ev.extra["awaiting_key"], true, "{ev:?}");
    assert!(
        ev.extra["reason"].as_str().unwrap().contains("room key"),
        "{ev:?}"
    );
    let kept: u64 = rig
        .cmd(&["HLEN", &format!("{}undecrypted", rig.keys.matrix())])
        .await;
    assert_eq!(kept, 1);

    // The key arrives: the event is published again, decrypted.
    dm.alice.send_keys(keys).await;
    let ev = next_message(&mut read).await;
    assert_eq!(ev.kind, "message", "{ev:?}");
    assert_eq!(ev.text.as_deref(), Some("late news"));
    assert_eq!(ev.message_id.as_deref(), Some(sent.as_str()));
    assert_eq!(ev.extra["late"], true);
    assert_eq!(ev.extra["encrypted"], true);
    let got = dm.alice.read_from(&dm.room, &dm.bot.user_id, 1).await;
    assert_eq!(got[0].0, "re: late news");
    let kept: u64 = rig
        .cmd(&["HLEN", &format!("{}undecrypted", rig.keys.matrix())])
        .await;
    assert_eq!(kept, 0, "no longer kept once published");
    worker_stop.cancel();
    stop.cancel();
    task.await.unwrap();
}
