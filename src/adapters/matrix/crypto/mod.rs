//! End-to-end encryption in Matrix rooms (the `e2ee` cargo feature): Olm
//! and Megolm through matrix-sdk-crypto's `OlmMachine`, its state in Redis
//! and shared by every gateway of the fleet.
//!
//! **One device for the fleet.** The bot is the device of its access token
//! (`device_id` of `GET /account/whoami`). Its account (identity keys,
//! one-time keys), Olm sessions, Megolm sessions, the devices it knows and
//! the users it tracks live in the crypto store ([`store::RedisStore`]) under
//! `sg:{P}:matrix:crypto:<device>:` — one hash slot, so it is Cluster-safe;
//! a new token (a new device) starts a store of its own.
//!
//! **One crypto operation at a time, fleet-wide.** Every operation — feeding
//! a sync response's to-device events, device lists and one-time-key counts
//! to the machine, decrypting a room's events, sharing a room key and
//! encrypting — runs under the platform's crypto lock
//! (`sg:{P}:matrix:crypto:<device>:lock`, `SET NX PX` with a fresh token, renewed
//! while held, released only by its holder). Every write of the store is a
//! script fenced by that token which bumps `…:crypto:<device>:generation`;
//! a holder that lost the lock writes nothing. A process keeps its machine
//! between operations only while the generation is the one its own last
//! write produced: when another gateway wrote since (or a write of its own
//! failed), it builds a fresh machine from Redis before going on. So no two
//! gateways advance the same Megolm or Olm session, and each starts from
//! the other's last state.
//!
//! **Who does what.** Only the syncer ([`super::sync`]) decrypts: it feeds
//! each sync response to the machine before it turns the timeline into
//! inbound events, so room keys that arrive with the messages they unlock
//! are there first. Any gateway sends: a `m.room.message` (messages,
//! buttons, files, edits) into a room with `m.room.encryption` state is
//! encrypted with the room's current outbound Megolm session, shared first
//! (Olm-encrypted to-device messages, claiming one-time keys where no Olm
//! session exists) with every device of the joined and invited members.
//! Reactions and redactions stay in the clear, as Matrix has them. The
//! machine's own requests (keys upload, query, claim, to-device, signature
//! upload) go out through the adapter's HTTP client and are marked sent.
//!
//! Limits: no cross-signing and no verification (the bot's device is
//! unverified; other users' devices are trusted on first use and every
//! device of a member receives the room key), no key backup, no key
//! forwarding to the bot's other devices, media in encrypted rooms is
//! uploaded unencrypted (only the event is encrypted). An event that cannot
//! be decrypted is published as `encrypted` with the reason; when only its
//! room key was missing, the syncer keeps it (`sg:{P}:matrix:undecrypted`)
//! and publishes it decrypted (`late: true`) once the key arrives.

pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use matrix_sdk_crypto::types::events::room::encrypted::EncryptedEvent;
use matrix_sdk_crypto::types::requests::AnyOutgoingRequest;
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
    TrustRequirement,
};
use redis::{AsyncCommands, Script};
use reqwest::Method;
use ruma::api::IncomingResponse;
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::serde::Raw;
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, RoomId, TransactionId, UInt, UserId};
use serde_json::{Value, json};
use tokio::sync::{MutexGuard, OnceCell};
use tracing::{debug, info, warn};

use super::{Body, MatrixAdapter, seg};
use crate::adapters::AdapterError;
use crate::bus::Conn;
use store::{Fence, RedisStore};

static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lease.lua")));

/// How long the crypto lock lives without a renewal (a dead holder's lock
/// frees itself after this long).
const LOCK_TTL: Duration = Duration::from_secs(15);
/// How long an operation waits for the crypto lock before it fails (as a
/// transient error: the delivery or sync batch is retried).
const LOCK_WAIT: Duration = Duration::from_secs(20);
/// How long a room found unencrypted is believed so (encryption, once on,
/// cannot be turned off; that answer is kept).
const PLAIN_ROOM_TTL: Duration = Duration::from_secs(10);
/// Rounds of outgoing requests one flush sends at most (an answer can
/// make new requests: a keys upload after a query, …).
const FLUSH_ROUNDS: usize = 4;

/// The slots of the crypto store's keys, in the order `save.lua` gets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Slot {
    Lock = 1,
    Generation,
    Account,
    Identity,
    Sessions,
    Inbound,
    Outbound,
    Devices,
    Identities,
    Tracked,
    Hashes,
    Requests,
    Withheld,
    Settings,
    Custom,
}

const SLOTS: [(Slot, &str); 15] = [
    (Slot::Lock, "lock"),
    (Slot::Generation, "generation"),
    (Slot::Account, "account"),
    (Slot::Identity, "identity"),
    (Slot::Sessions, "sessions"),
    (Slot::Inbound, "inbound"),
    (Slot::Outbound, "outbound"),
    (Slot::Devices, "devices"),
    (Slot::Identities, "identities"),
    (Slot::Tracked, "tracked"),
    (Slot::Hashes, "hashes"),
    (Slot::Requests, "requests"),
    (Slot::Withheld, "withheld"),
    (Slot::Settings, "settings"),
    (Slot::Custom, "custom"),
];

/// The Redis keys of one platform's crypto store, all under
/// `sg:{P}:matrix:crypto:` (docs/operating.md lists them).
#[derive(Debug, Clone)]
pub struct CryptoKeys {
    base: String,
}

impl CryptoKeys {
    /// The keys under `base` (`sg:{P}:matrix:crypto:`).
    pub fn new(base: impl Into<String>) -> Self {
        Self { base: base.into() }
    }

    /// The key of `slot` (`…:crypto:account`, `…:crypto:lock`, …).
    pub fn slot(&self, slot: Slot) -> String {
        let name = SLOTS[slot as usize - 1].1;
        format!("{}{name}", self.base)
    }

    /// Every key, in slot order.
    pub fn all(&self) -> Vec<String> {
        SLOTS.iter().map(|(s, _)| self.slot(*s)).collect()
    }

    /// The keys of one device (`…:crypto:<device>:`): a new access token —
    /// a new device — starts a store of its own instead of meeting another
    /// device's account.
    pub fn for_device(&self, device: &str) -> CryptoKeys {
        CryptoKeys::new(format!("{}{device}:", self.base))
    }
}

/// The machine this process built, and what fences its store.
struct Built {
    machine: OlmMachine,
    fence: Arc<Fence>,
}

/// Aborts a spawned task when dropped (the renewer dies with the lock).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A room's encryption, as far as this process knows it.
#[derive(Debug, Clone)]
enum RoomCrypto {
    /// `m.room.encryption` content.
    Encrypted(Value),
    Plain(Instant),
}

/// A platform's end-to-end encryption; see the module docs.
pub struct Crypto {
    platform: String,
    conn: Conn,
    /// The platform's base (`sg:{P}:matrix:crypto:`); the store is under
    /// the device's keys in it.
    keys: CryptoKeys,
    /// Lock tokens start with this (platform / instance).
    owner: String,
    /// The bot's device and its store's keys, once known.
    device: OnceCell<(OwnedDeviceId, CryptoKeys)>,
    state: tokio::sync::Mutex<Option<Built>>,
    rooms: std::sync::Mutex<HashMap<String, RoomCrypto>>,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypto")
            .field("platform", &self.platform)
            .field("keys", &self.keys)
            .field("device", &self.device.get().map(|(d, _)| d))
            .finish_non_exhaustive()
    }
}

/// The crypto lock, held; the machine is current while it is.
pub struct Locked<'a> {
    state: MutexGuard<'a, Option<Built>>,
    token: String,
    conn: Conn,
    lock_key: String,
    _renew: AbortOnDrop,
}

impl Locked<'_> {
    fn machine(&self) -> &OlmMachine {
        &self.state.as_ref().expect("a built machine").machine
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let mut conn = self.conn.clone();
        let key = self.lock_key.clone();
        let token = std::mem::take(&mut self.token);
        tokio::spawn(async move {
            let r: redis::RedisResult<i64> = LEASE
                .key(key)
                .arg(token)
                .arg(LOCK_TTL.as_millis() as u64)
                .arg("release")
                .invoke_async(&mut conn)
                .await;
            if let Err(e) = r {
                debug!(error = %e, "matrix: releasing the crypto lock failed (it expires by itself)");
            }
        });
    }
}

/// `f` boxed as a `Send` future: proving `Send` here, for the concrete
/// lifetimes, spares the callers' futures a higher-ranked proof the
/// compiler cannot make for some of matrix-sdk-crypto's futures.
fn boxed<'a, T>(
    f: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

fn transient(what: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::transient(format!("matrix e2ee: {what}: {e}"))
}

fn raw<T>(v: &Value) -> Result<Raw<T>, serde_json::Error> {
    Ok(Raw::from_json(serde_json::value::to_raw_value(v)?))
}

/// What an HTTP request of the machine is on the wire: method, path, body.
/// `None` for a request the bot never makes (in-room verification).
pub fn request_http(req: &AnyOutgoingRequest) -> Option<(Method, String, Value)> {
    const V3: &str = "/_matrix/client/v3";
    Some(match req {
        AnyOutgoingRequest::KeysUpload(r) => {
            let mut body = json!({
                "one_time_keys": r.one_time_keys,
                "fallback_keys": r.fallback_keys,
            });
            if let Some(d) = &r.device_keys {
                body["device_keys"] = serde_json::to_value(d).ok()?;
            }
            (Method::POST, format!("{V3}/keys/upload"), body)
        }
        AnyOutgoingRequest::KeysQuery(r) => (
            Method::POST,
            format!("{V3}/keys/query"),
            json!({"device_keys": r.device_keys}),
        ),
        AnyOutgoingRequest::KeysClaim(r) => (
            Method::POST,
            format!("{V3}/keys/claim"),
            json!({"one_time_keys": r.one_time_keys}),
        ),
        AnyOutgoingRequest::ToDeviceRequest(r) => (
            Method::PUT,
            format!(
                "{V3}/sendToDevice/{}/{}",
                seg(&r.event_type.to_string()),
                seg(r.txn_id.as_str())
            ),
            json!({"messages": r.messages}),
        ),
        AnyOutgoingRequest::SignatureUpload(r) => (
            Method::POST,
            format!("{V3}/keys/signatures/upload"),
            serde_json::to_value(&r.signed_keys).ok()?,
        ),
        AnyOutgoingRequest::RoomMessage(_) => return None,
    })
}

/// A JSON answer as the ruma response `R`.
pub fn response<R: IncomingResponse>(v: &Value) -> Result<R, String> {
    let body = match v {
        Value::Null => b"{}".to_vec(),
        v => serde_json::to_vec(v).map_err(|e| e.to_string())?,
    };
    R::try_from_http_response(http::Response::new(body)).map_err(|e| e.to_string())
}

/// Mark `id`'s request sent with its JSON answer `v`.
pub async fn mark_sent(
    machine: &OlmMachine,
    id: &TransactionId,
    req: &AnyOutgoingRequest,
    v: &Value,
) -> Result<(), String> {
    use ruma::api::client::keys::{claim_keys, get_keys, upload_keys, upload_signatures};
    use ruma::api::client::to_device::send_event_to_device;
    let r = match req {
        AnyOutgoingRequest::KeysUpload(_) => {
            let r: upload_keys::v3::Response = response(v)?;
            boxed(machine.mark_request_as_sent(id, &r)).await
        }
        AnyOutgoingRequest::KeysQuery(_) => {
            let r: get_keys::v3::Response = response(v)?;
            boxed(machine.mark_request_as_sent(id, &r)).await
        }
        AnyOutgoingRequest::KeysClaim(_) => {
            let r: claim_keys::v3::Response = response(v)?;
            boxed(machine.mark_request_as_sent(id, &r)).await
        }
        AnyOutgoingRequest::ToDeviceRequest(_) => {
            let r: send_event_to_device::v3::Response = response(v)?;
            boxed(machine.mark_request_as_sent(id, &r)).await
        }
        AnyOutgoingRequest::SignatureUpload(_) => {
            let r: upload_signatures::v3::Response = response(v)?;
            boxed(machine.mark_request_as_sent(id, &r)).await
        }
        AnyOutgoingRequest::RoomMessage(_) => return Ok(()),
    };
    r.map_err(|e| e.to_string())
}

/// Why an event could not be decrypted.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecrypted {
    pub reason: String,
    /// The room key is not (yet) known — not withheld, not a broken event:
    /// worth trying again when keys arrive.
    pub missing_key: bool,
}

/// What decrypting one room's timeline gave, by event id: the event as it
/// was before encryption, or why it could not be decrypted.
pub type Decrypted = HashMap<String, Result<Value, Undecrypted>>;

/// A room key the machine received: room id and Megolm session id.
pub type RoomKey = (String, String);

impl Crypto {
    /// The crypto of `platform`, its store under `keys`.
    pub fn new(platform: &str, conn: Conn, keys: CryptoKeys) -> Self {
        Self {
            platform: platform.to_owned(),
            conn,
            keys,
            owner: format!("{platform}/{:08x}", rand::random::<u32>()),
            device: OnceCell::new(),
            state: tokio::sync::Mutex::new(None),
            rooms: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The bot's device id (the access token's, from `/account/whoami`) and
    /// the keys of its store.
    async fn device(
        &self,
        mx: &MatrixAdapter,
    ) -> Result<(OwnedDeviceId, CryptoKeys), AdapterError> {
        self.device
            .get_or_try_init(|| async {
                let v = mx
                    .call_api(
                        Method::GET,
                        "/_matrix/client/v3/account/whoami",
                        &[],
                        Body::None,
                        false,
                    )
                    .await?;
                let d = v.get("device_id").and_then(Value::as_str).ok_or_else(|| {
                    AdapterError::permanent(
                        "matrix e2ee: /account/whoami names no device_id (an appservice or device-less token cannot hold keys)",
                    )
                })?;
                Ok((OwnedDeviceId::from(d), self.keys.for_device(d)))
            })
            .await
            .cloned()
    }

    async fn lease(&self, keys: &CryptoKeys, token: &str, mode: &str) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = LEASE
            .key(keys.slot(Slot::Lock))
            .arg(token)
            .arg(LOCK_TTL.as_millis() as u64)
            .arg(mode)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Take the platform's crypto lock (waiting for another holder up to
    /// [`LOCK_WAIT`]) and make the machine current.
    pub async fn lock(&self, mx: &MatrixAdapter) -> Result<Locked<'_>, AdapterError> {
        let (device, keys) = self.device(mx).await?;
        let state = self.state.lock().await;
        let token = format!("{}/{:016x}", self.owner, rand::random::<u64>());
        let deadline = Instant::now() + LOCK_WAIT;
        let mut wait = Duration::from_millis(2);
        while !self
            .lease(&keys, &token, "take")
            .await
            .map_err(|e| transient("taking the crypto lock", e))?
        {
            if Instant::now() > deadline {
                return Err(AdapterError::transient(format!(
                    "matrix e2ee: the crypto lock stayed with another gateway for more than {LOCK_WAIT:?}"
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        }
        let renew = AbortOnDrop(tokio::spawn({
            let mut conn = self.conn.clone();
            let key = keys.slot(Slot::Lock);
            let token = token.clone();
            async move {
                loop {
                    tokio::time::sleep(LOCK_TTL / 3).await;
                    let r: redis::RedisResult<i64> = LEASE
                        .key(&key)
                        .arg(&token)
                        .arg(LOCK_TTL.as_millis() as u64)
                        .arg("renew")
                        .invoke_async(&mut conn)
                        .await;
                    if !matches!(r, Ok(1)) {
                        return;
                    }
                }
            }
        }));
        let locked = Locked {
            state,
            token: token.clone(),
            conn: self.conn.clone(),
            lock_key: keys.slot(Slot::Lock),
            _renew: renew,
        };
        self.refresh(locked, &mx.user_id, &device, &keys).await
    }

    /// Keep the machine if Redis holds what it last wrote, else build it anew.
    async fn refresh<'a>(
        &'a self,
        mut locked: Locked<'a>,
        user: &str,
        device: &OwnedDeviceId,
        keys: &CryptoKeys,
    ) -> Result<Locked<'a>, AdapterError> {
        let mut conn = self.conn.clone();
        let generation: Option<u64> = conn
            .get(keys.slot(Slot::Generation))
            .await
            .map_err(|e| transient("reading the crypto generation", e))?;
        let generation = generation.unwrap_or(0);
        if let Some(b) = locked.state.as_ref()
            && !b.fence.poisoned.load(Ordering::SeqCst)
            && b.fence.generation.load(Ordering::SeqCst) == generation
        {
            *b.fence.token.lock().expect("fence lock") = locked.token.clone();
            return Ok(locked);
        }
        *locked.state = None;
        let fence = Arc::new(Fence::default());
        *fence.token.lock().expect("fence lock") = locked.token.clone();
        fence.generation.store(generation, Ordering::SeqCst);
        let store = RedisStore::load(self.conn.clone(), keys.clone(), fence.clone())
            .await
            .map_err(|e| transient("loading the crypto store", e))?;
        let user = UserId::parse(user).map_err(|e| transient("the bot's user id", e))?;
        let machine = OlmMachine::with_store(&user, device, store, None)
            .await
            .map_err(|e| transient("building the Olm machine", e))?;
        crate::metrics::matrix_crypto_rebuild(&self.platform);
        let keys = machine.identity_keys();
        info!(platform = %self.platform, device = %device, curve25519 = %keys.curve25519.to_base64(), generation, "matrix e2ee: the Olm machine is (re)built from the crypto store");
        *locked.state = Some(Built { machine, fence });
        Ok(locked)
    }

    /// Send the machine's outgoing requests and mark them sent.
    async fn flush(&self, locked: &Locked<'_>, mx: &MatrixAdapter) -> Result<(), AdapterError> {
        let machine = locked.machine();
        for _ in 0..FLUSH_ROUNDS {
            let reqs = machine
                .outgoing_requests()
                .await
                .map_err(|e| transient("listing outgoing requests", e))?;
            let reqs: Vec<_> = reqs
                .into_iter()
                .filter(|r| !matches!(r.request(), AnyOutgoingRequest::RoomMessage(_)))
                .collect();
            if reqs.is_empty() {
                return Ok(());
            }
            for r in reqs {
                self.send(machine, mx, r.request_id(), r.request()).await?;
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        machine: &OlmMachine,
        mx: &MatrixAdapter,
        id: &TransactionId,
        req: &AnyOutgoingRequest,
    ) -> Result<(), AdapterError> {
        let Some((method, path, body)) = request_http(req) else {
            return Ok(());
        };
        let v = mx
            .call_api(method, &path, &[], Body::Json(body), false)
            .await?;
        mark_sent(machine, id, req, &v)
            .await
            .map_err(|e| transient(&format!("the answer of {path}"), e))
    }

    /// Feed a sync response's to-device events, device-list changes and
    /// one-time-key counts to the machine (decrypting room keys sent to
    /// the bot), then send what that asks for.
    /// The room keys it brought.
    pub async fn receive_sync(
        &self,
        mx: &MatrixAdapter,
        resp: &Value,
    ) -> Result<Vec<RoomKey>, AdapterError> {
        let bad = |e: serde_json::Error| transient("reading the sync response", e);
        let to_device = resp
            .pointer("/to_device/events")
            .and_then(Value::as_array)
            .map(|evs| evs.iter().map(raw).collect::<Result<Vec<_>, _>>())
            .transpose()
            .map_err(bad)?
            .unwrap_or_default();
        let lists: DeviceLists = match resp.get("device_lists") {
            Some(v) => serde_json::from_value(v.clone()).map_err(bad)?,
            None => DeviceLists::default(),
        };
        let counts: BTreeMap<OneTimeKeyAlgorithm, UInt> =
            match resp.get("device_one_time_keys_count") {
                Some(v) => serde_json::from_value(v.clone()).map_err(bad)?,
                None => BTreeMap::new(),
            };
        let fallback: Option<Vec<OneTimeKeyAlgorithm>> = resp
            .get("device_unused_fallback_key_types")
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .map_err(bad)?;
        let locked = self.lock(mx).await?;
        let n = to_device.len();
        let (_, keys) = locked
            .machine()
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: to_device,
                    changed_devices: &lists,
                    one_time_keys_counts: &counts,
                    unused_fallback_keys: fallback.as_deref(),
                    next_batch_token: None,
                },
                &decryption_settings(),
            )
            .await
            .map_err(|e| transient("processing the sync's to-device events", e))?;
        if n > 0 {
            debug!(platform = %self.platform, to_device = n, "matrix e2ee: to-device events processed");
        }
        if let Err(e) = self.flush(&locked, mx).await {
            // Kept as outgoing by the machine: sent again with the next sync.
            warn!(platform = %self.platform, error = %e.message, "matrix e2ee: sending the machine's requests failed; retried with the next sync");
        }
        Ok(keys
            .into_iter()
            .map(|k| (k.room_id.to_string(), k.session_id))
            .collect())
    }

    /// Decrypt the `m.room.encrypted` events among `events` of `room`.
    /// Fails (the sync batch is fetched again) only when the crypto store
    /// cannot be used; an event that cannot be decrypted is in the answer
    /// with the reason.
    pub async fn decrypt(
        &self,
        mx: &MatrixAdapter,
        room: &str,
        events: &[Value],
    ) -> Result<Decrypted, AdapterError> {
        let encrypted: Vec<&Value> = events
            .iter()
            .filter(|e| e.get("type").and_then(Value::as_str) == Some("m.room.encrypted"))
            .filter(|e| e.get("sender").and_then(Value::as_str) != Some(mx.user_id.as_str()))
            .collect();
        let mut out = Decrypted::new();
        if encrypted.is_empty() {
            return Ok(out);
        }
        let room_id = RoomId::parse(room).map_err(|e| transient("the room id", e))?;
        let locked = self.lock(mx).await?;
        for ev in encrypted {
            let Some(id) = ev.get("event_id").and_then(Value::as_str) else {
                continue;
            };
            let broken = |e: &dyn std::fmt::Display| Undecrypted {
                reason: e.to_string(),
                missing_key: false,
            };
            let r = match raw::<EncryptedEvent>(ev) {
                Err(e) => Err(broken(&e)),
                Ok(r) => match locked
                    .machine()
                    .decrypt_room_event(&r, &room_id, &decryption_settings())
                    .await
                {
                    Ok(d) => serde_json::from_str::<Value>(d.event.json().get())
                        .map(|plain| merge(ev, plain))
                        .map_err(|e| broken(&e)),
                    Err(matrix_sdk_crypto::MegolmError::Store(e)) => {
                        return Err(transient("the crypto store", e));
                    }
                    Err(e @ matrix_sdk_crypto::MegolmError::MissingRoomKey(None)) => {
                        Err(Undecrypted {
                            reason: e.to_string(),
                            missing_key: true,
                        })
                    }
                    Err(e) => Err(broken(&e)),
                },
            };
            match &r {
                Ok(_) => crate::metrics::matrix_decryption(&self.platform, "ok"),
                Err(why) => {
                    crate::metrics::matrix_decryption(&self.platform, "failed");
                    warn!(platform = %self.platform, %room, event = %id, reason = %why.reason, "matrix e2ee: an event could not be decrypted");
                }
            }
            out.insert(id.to_owned(), r);
        }
        Ok(out)
    }

    /// `room`'s `m.room.encryption` content, if the room is encrypted.
    pub async fn room_encryption(
        &self,
        mx: &MatrixAdapter,
        room: &str,
    ) -> Result<Option<Value>, AdapterError> {
        match self.rooms.lock().expect("rooms lock").get(room) {
            Some(RoomCrypto::Encrypted(c)) => return Ok(Some(c.clone())),
            Some(RoomCrypto::Plain(at)) if at.elapsed() < PLAIN_ROOM_TTL => return Ok(None),
            _ => {}
        }
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.encryption/",
            seg(room)
        );
        let known = match mx
            .call_api(Method::GET, &path, &[], Body::None, false)
            .await
        {
            Ok(content) => RoomCrypto::Encrypted(content),
            Err(f) if f.errcode.as_deref() == Some("M_NOT_FOUND") => {
                RoomCrypto::Plain(Instant::now())
            }
            Err(f) => return Err(f.err),
        };
        self.rooms
            .lock()
            .expect("rooms lock")
            .insert(room.to_owned(), known.clone());
        Ok(match known {
            RoomCrypto::Encrypted(c) => Some(c),
            RoomCrypto::Plain(_) => None,
        })
    }

    /// The joined and invited members of `room`.
    async fn members(
        &self,
        mx: &MatrixAdapter,
        room: &str,
    ) -> Result<Vec<OwnedUserId>, AdapterError> {
        let path = format!("/_matrix/client/v3/rooms/{}/members", seg(room));
        let v = mx
            .call_api(
                Method::GET,
                &path,
                &[("not_membership", "leave")],
                Body::None,
                false,
            )
            .await?;
        Ok(v.get("chunk")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| {
                matches!(
                    e.pointer("/content/membership").and_then(Value::as_str),
                    Some("join" | "invite")
                )
            })
            .filter_map(|e| e.get("state_key").and_then(Value::as_str))
            .filter_map(|u| OwnedUserId::try_from(u).ok())
            .collect())
    }

    /// `content` of an `event_type` event as the content of the
    /// `m.room.encrypted` event that carries it into `room`, whose
    /// encryption state is `settings`: the room key is shared first with
    /// every device of the members that lacks it.
    pub async fn encrypt(
        &self,
        mx: &MatrixAdapter,
        room: &str,
        settings: &Value,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, AdapterError> {
        let room_id = RoomId::parse(room).map_err(|e| transient("the room id", e))?;
        let members = self.members(mx, room).await?;
        let members: Vec<&UserId> = members.iter().map(|u| u.as_ref()).collect();
        let locked = self.lock(mx).await?;
        let machine = locked.machine();
        boxed(machine.update_tracked_users(members.iter().copied()))
            .await
            .map_err(|e| transient("tracking the room's members", e))?;
        // Their device lists (keys query), and our keys if due.
        self.flush(&locked, mx).await?;
        if let Some((id, claim)) = boxed(machine.get_missing_sessions(members.iter().copied()))
            .await
            .map_err(|e| transient("finding missing Olm sessions", e))?
        {
            let req = AnyOutgoingRequest::KeysClaim(claim);
            self.send(machine, mx, &id, &req).await?;
        }
        let shares = boxed(machine.share_room_key(
            &room_id,
            members.iter().copied(),
            encryption_settings(settings),
        ))
        .await
        .map_err(|e| transient("sharing the room key", e))?;
        for share in shares {
            let req = AnyOutgoingRequest::ToDeviceRequest((*share).clone());
            self.send(machine, mx, &share.txn_id, &req).await?;
        }
        let content = raw(content).map_err(|e| transient("the content", e))?;
        let encrypted = boxed(machine.encrypt_room_event_raw(&room_id, event_type, &content))
            .await
            .map_err(|e| transient("encrypting the event", e))?;
        crate::metrics::matrix_encryption(&self.platform);
        serde_json::from_str(encrypted.content.json().get())
            .map_err(|e| transient("the encrypted content", e))
    }

    /// Take the lock once and send what the machine has to send (keys
    /// upload of a new device): a gateway's device is announced at start.
    pub async fn announce(&self, mx: &MatrixAdapter) -> Result<(), AdapterError> {
        let locked = self.lock(mx).await?;
        self.flush(&locked, mx).await
    }
}

fn decryption_settings() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

/// The Megolm settings of a room's `m.room.encryption` content.
fn encryption_settings(content: &Value) -> EncryptionSettings {
    let mut s = EncryptionSettings {
        sharing_strategy: CollectStrategy::AllDevices,
        ..EncryptionSettings::default()
    };
    if let Some(ms) = content.get("rotation_period_ms").and_then(Value::as_u64) {
        s.rotation_period = Duration::from_millis(ms);
    }
    if let Some(n) = content.get("rotation_period_msgs").and_then(Value::as_u64) {
        s.rotation_period_msgs = n;
    }
    s
}

/// The encrypted event `ev` with the decrypted event's type and content; a
/// relation kept in the clear (`m.relates_to` of the encrypted content) is
/// carried over when the plaintext has none.
fn merge(ev: &Value, plain: Value) -> Value {
    let mut out = ev.clone();
    let mut content = plain.get("content").cloned().unwrap_or_else(|| json!({}));
    if content.get("m.relates_to").is_none()
        && let Some(rel) = ev.pointer("/content/m.relates_to")
        && let Some(obj) = content.as_object_mut()
    {
        obj.insert("m.relates_to".into(), rel.clone());
    }
    out["type"] = plain.get("type").cloned().unwrap_or(Value::Null);
    out["content"] = content;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_server::RedisServer;

    /// A store on `server` whose writes carry `token`, and its fence.
    async fn store(conn: &Conn, keys: &CryptoKeys, token: &str) -> (RedisStore, Arc<Fence>) {
        let fence = Arc::new(Fence::default());
        *fence.token.lock().unwrap() = token.to_owned();
        let s = RedisStore::load(conn.clone(), keys.clone(), fence.clone())
            .await
            .expect("load");
        (s, fence)
    }

    #[tokio::test]
    async fn the_device_survives_a_rebuild_and_a_stale_holder_writes_nothing() {
        let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
        let server = RedisServer::start(bin.as_deref()).expect("redis-server");
        let client = redis::Client::open(server.url()).unwrap();
        let conn = Conn::Single(redis::aio::ConnectionManager::new(client).await.unwrap());
        let keys = CryptoKeys::new("sg:{mx}:matrix:crypto:");
        let user = UserId::parse("@bot:h").unwrap();
        let device = OwnedDeviceId::from("DEV");
        let mut c = conn.clone();
        let set = |k: String, v: &'static str| {
            let mut c = conn.clone();
            async move { c.set::<_, _, ()>(k, v).await.unwrap() }
        };

        set(keys.slot(Slot::Lock), "gw-a").await;
        let (s, fence_a) = store(&conn, &keys, "gw-a").await;
        let a = OlmMachine::with_store(&user, &device, s, None)
            .await
            .unwrap();
        let generation: u64 = c.get(keys.slot(Slot::Generation)).await.unwrap();
        assert!(generation > 0, "the new account was written");
        assert_eq!(fence_a.generation.load(Ordering::SeqCst), generation);
        assert!(!fence_a.poisoned.load(Ordering::SeqCst));

        // Another gateway holds the lock now and builds from Redis: the
        // same device, the same identity keys.
        set(keys.slot(Slot::Lock), "gw-b").await;
        let (s, _) = store(&conn, &keys, "gw-b").await;
        let b = OlmMachine::with_store(&user, &device, s, None)
            .await
            .unwrap();
        assert_eq!(a.identity_keys().curve25519, b.identity_keys().curve25519);
        assert_eq!(a.identity_keys().ed25519, b.identity_keys().ed25519);

        // The former holder, not knowing, changes its state: refused, and
        // its machine is marked stale; Redis keeps what b saw.
        let other = UserId::parse("@u:h").unwrap();
        assert!(a.update_tracked_users([&*other]).await.is_err());
        assert!(fence_a.poisoned.load(Ordering::SeqCst));
        let tracked: HashMap<String, String> = c.hgetall(keys.slot(Slot::Tracked)).await.unwrap();
        assert!(tracked.is_empty(), "{tracked:?}");
        let after: u64 = c.get(keys.slot(Slot::Generation)).await.unwrap();
        assert_eq!(after, generation);
        // The holder's write goes through and moves the generation.
        b.update_tracked_users([&*other]).await.unwrap();
        let tracked: HashMap<String, String> = c.hgetall(keys.slot(Slot::Tracked)).await.unwrap();
        assert_eq!(tracked.get("@u:h").map(String::as_str), Some("1"));
        let moved: u64 = c.get(keys.slot(Slot::Generation)).await.unwrap();
        assert!(moved > generation);
    }

    #[test]
    fn keys_share_one_hash_tag_in_slot_order() {
        let k = CryptoKeys::new("sg:{mx}:matrix:crypto:");
        assert_eq!(k.slot(Slot::Lock), "sg:{mx}:matrix:crypto:lock");
        assert_eq!(
            k.for_device("DEV").slot(Slot::Account),
            "sg:{mx}:matrix:crypto:DEV:account"
        );
        assert_eq!(k.slot(Slot::Custom), "sg:{mx}:matrix:crypto:custom");
        let all = k.all();
        assert_eq!(all.len(), SLOTS.len());
        for (i, (slot, _)) in SLOTS.iter().enumerate() {
            assert_eq!(*slot as usize, i + 1);
            assert!(all[i].starts_with("sg:{mx}:"));
        }
    }

    #[test]
    fn a_clear_relation_is_kept_and_settings_read() {
        let ev = json!({"type": "m.room.encrypted", "event_id": "$e", "sender": "@u:h",
            "content": {"algorithm": "m.megolm.v1.aes-sha2",
                        "m.relates_to": {"rel_type": "m.replace", "event_id": "$o"}}});
        let plain =
            json!({"type": "m.room.message", "content": {"msgtype": "m.text", "body": "x"}});
        let m = merge(&ev, plain);
        assert_eq!(m["type"], "m.room.message");
        assert_eq!(m["event_id"], "$e");
        assert_eq!(m["content"]["m.relates_to"]["event_id"], "$o");
        let s = encryption_settings(&json!({"rotation_period_msgs": 5}));
        assert_eq!(s.rotation_period_msgs, 5);
        assert_eq!(s.sharing_strategy, CollectStrategy::AllDevices);
    }
}
