//! The crypto store of a Matrix platform: matrix-sdk-crypto's
//! [`MemoryStore`] as the cache every read is answered from, with every
//! write also made — first, fenced by the platform's crypto lock — in Redis
//! under `sg:{P}:matrix:crypto:` (see [`super::CryptoKeys`]).
//!
//! [`RedisStore::load`] fills a fresh cache from Redis when an `OlmMachine`
//! is built, so a restarted gateway (or another one of the fleet) goes on
//! with the same device identity, Olm sessions and room keys.
//!
//! What is persisted: the account (identity keys, one-time keys), the
//! private cross-signing identity, Olm sessions, inbound and outbound group
//! (Megolm) sessions, devices and user identities, tracked users, Olm
//! message hashes (replay protection), outgoing key requests, withheld-key
//! notices, room settings and custom values. What lives only in memory (the
//! bot uses none of it): key-backup keys, dehydrated-device keys, the
//! secrets inbox, room key bundles (MSC4268) and the to-device batch token.
//!
//! Fencing: a write is one Lua script (`save.lua`) that checks the lock
//! token this process holds, applies the writes and bumps the generation;
//! a process that lost the lock writes nothing and its store answers
//! an error (the machine is then rebuilt from Redis, see [`super`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use matrix_sdk_crypto::olm::{
    InboundGroupSession, OlmMessageHash, OutboundGroupSession, PickledAccount,
    PickledCrossSigningIdentity, PickledInboundGroupSession, PickledOutboundGroupSession,
    PickledSession, PrivateCrossSigningIdentity, SenderDataType, Session,
};
use matrix_sdk_crypto::store::types::{
    BackupKeys, Changes, DehydratedDeviceKey, PendingChanges, RoomKeyCounts, RoomKeyWithheldEntry,
    RoomPendingKeyBundleDetails, RoomSettings, StoredRoomKeyBundleData, TrackedUser,
};
use matrix_sdk_crypto::store::{CryptoStore, CryptoStoreError, MemoryStore};
use matrix_sdk_crypto::vodozemac::Curve25519PublicKey;
use matrix_sdk_crypto::{Account, DeviceData, GossipRequest, SecretInfo, UserIdentityData};
use redis::{AsyncCommands, Script};
use ruma::events::secret::request::SecretName;
use ruma::{DeviceId, OwnedDeviceId, OwnedRoomId, RoomId, TransactionId, UserId};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{CryptoKeys, Slot};
use crate::bus::Conn;

static SAVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("save.lua")));

type Result<T, E = CryptoStoreError> = std::result::Result<T, E>;

/// Why a write to Redis did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the matrix crypto lock is no longer this gateway's; nothing was written")]
    LockLost,
    #[error("writing the matrix crypto store to Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One write of `save.lua`: key slot, operation (`hset`, `hdel`, `set`,
/// `sadd`), field, value.
#[derive(Debug, Serialize)]
struct Op(u8, &'static str, String, String);

impl Op {
    fn hset(slot: Slot, field: impl Into<String>, value: impl Into<String>) -> Op {
        Op(slot as u8, "hset", field.into(), value.into())
    }
    fn hdel(slot: Slot, field: impl Into<String>) -> Op {
        Op(slot as u8, "hdel", field.into(), String::new())
    }
    fn set(slot: Slot, value: impl Into<String>) -> Op {
        Op(slot as u8, "set", String::new(), value.into())
    }
    fn sadd(slot: Slot, member: impl Into<String>) -> Op {
        Op(slot as u8, "sadd", member.into(), String::new())
    }
}

/// A withheld-key notice as Redis keeps it (the entry does not name its room
/// and session in a form worth parsing back).
#[derive(Serialize, Deserialize)]
struct Withheld {
    room_id: OwnedRoomId,
    session_id: String,
    entry: RoomKeyWithheldEntry,
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

/// What a store shares with the machine's owner ([`super::Crypto`]): the
/// lock token its writes are fenced with, the generation its last write
/// produced, and whether a write failed (the machine is then stale).
#[derive(Debug, Default)]
pub struct Fence {
    pub token: Mutex<String>,
    pub generation: AtomicU64,
    pub poisoned: AtomicBool,
}

/// The Redis-backed crypto store; see the module docs.
pub struct RedisStore {
    mem: MemoryStore,
    conn: Conn,
    keys: CryptoKeys,
    fence: Arc<Fence>,
    /// The account pickle Redis holds: the machine saves the account after
    /// every sync (one-time-key counts), mostly unchanged, and a write that
    /// changes nothing would still move the generation and make every other
    /// gateway rebuild its machine.
    account: Mutex<Option<String>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store with everything Redis holds under `keys` already in its cache.
    pub async fn load(
        conn: Conn,
        keys: CryptoKeys,
        fence: Arc<Fence>,
    ) -> Result<RedisStore, CryptoStoreError> {
        let mut c = conn.clone();
        let mem = MemoryStore::new();
        let account: Option<String> = c
            .get(keys.slot(Slot::Account))
            .await
            .map_err(CryptoStoreError::backend)?;
        let Some(account) = account else {
            return Ok(RedisStore {
                mem,
                conn,
                keys,
                fence,
                account: Mutex::new(None),
            });
        };
        let stored = account.clone();
        let pickle: PickledAccount = serde_json::from_str(&account)?;
        let account = Account::from_pickle(pickle)?;
        let device_keys = account.device_keys();
        let device_id: OwnedDeviceId = account.device_id().to_owned();
        let identity_keys = Arc::new(account.identity_keys());
        mem.save_pending_changes(PendingChanges {
            account: Some(account),
        })
        .await?;

        let hash = |slot: Slot| {
            let mut c = conn.clone();
            let key = keys.slot(slot);
            async move {
                let m: HashMap<String, String> =
                    c.hgetall(key).await.map_err(CryptoStoreError::backend)?;
                Ok::<_, CryptoStoreError>(m)
            }
        };
        let mut changes = Changes::default();
        let identity: Option<String> = c
            .get(keys.slot(Slot::Identity))
            .await
            .map_err(CryptoStoreError::backend)?;
        if let Some(p) = identity {
            let p: PickledCrossSigningIdentity = serde_json::from_str(&p)?;
            changes.private_identity = Some(
                PrivateCrossSigningIdentity::from_pickle(p).map_err(CryptoStoreError::backend)?,
            );
        }
        for p in hash(Slot::Sessions).await?.values() {
            let p: PickledSession = serde_json::from_str(p)?;
            changes.sessions.push(
                Session::from_pickle(device_keys.clone(), p).map_err(CryptoStoreError::backend)?,
            );
        }
        for p in hash(Slot::Inbound).await?.values() {
            let p: PickledInboundGroupSession = serde_json::from_str(p)?;
            changes
                .inbound_group_sessions
                .push(InboundGroupSession::from_pickle(p)?);
        }
        for p in hash(Slot::Outbound).await?.values() {
            let p: PickledOutboundGroupSession = serde_json::from_str(p)?;
            changes
                .outbound_group_sessions
                .push(OutboundGroupSession::from_pickle(
                    device_id.clone(),
                    identity_keys.clone(),
                    p,
                )?);
        }
        for d in hash(Slot::Devices).await?.values() {
            changes
                .devices
                .new
                .push(serde_json::from_str::<DeviceData>(d)?);
        }
        for i in hash(Slot::Identities).await?.values() {
            changes
                .identities
                .new
                .push(serde_json::from_str::<UserIdentityData>(i)?);
        }
        let hashes: Vec<String> = c
            .smembers(keys.slot(Slot::Hashes))
            .await
            .map_err(CryptoStoreError::backend)?;
        for h in &hashes {
            changes
                .message_hashes
                .push(serde_json::from_str::<OlmMessageHash>(h)?);
        }
        for r in hash(Slot::Requests).await?.values() {
            changes
                .key_requests
                .push(serde_json::from_str::<GossipRequest>(r)?);
        }
        for w in hash(Slot::Withheld).await?.values() {
            let w: Withheld = serde_json::from_str(w)?;
            changes
                .withheld_session_info
                .entry(w.room_id)
                .or_default()
                .insert(w.session_id, w.entry);
        }
        for (room, s) in hash(Slot::Settings).await? {
            let room = OwnedRoomId::try_from(room)?;
            changes
                .room_settings
                .insert(room, serde_json::from_str::<RoomSettings>(&s)?);
        }
        mem.save_changes(changes).await?;
        let tracked = hash(Slot::Tracked).await?;
        let tracked: Vec<(ruma::OwnedUserId, bool)> = tracked
            .into_iter()
            .filter_map(|(u, d)| Some((ruma::OwnedUserId::try_from(u).ok()?, d == "1")))
            .collect();
        let refs: Vec<(&UserId, bool)> = tracked.iter().map(|(u, d)| (&**u, *d)).collect();
        mem.save_tracked_users(&refs).await?;
        for (k, v) in hash(Slot::Custom).await? {
            if let Ok(v) = B64.decode(v) {
                mem.set_custom_value(&k, v).await?;
            }
        }
        Ok(RedisStore {
            mem,
            conn,
            keys,
            fence,
            account: Mutex::new(Some(stored)),
        })
    }

    /// Apply `ops` in Redis, fenced by the lock token; bumps the generation.
    async fn write(&self, ops: Vec<Op>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let token = self.fence.token.lock().expect("fence lock").clone();
        let mut script = SAVE.prepare_invoke();
        for k in self.keys.all() {
            script.key(k);
        }
        script.arg(token).arg(json(&ops)?);
        let mut conn = self.conn.clone();
        let r: std::result::Result<i64, redis::RedisError> = script.invoke_async(&mut conn).await;
        let err = match r {
            Ok(g) if g > 0 => {
                self.fence.generation.store(g as u64, Ordering::SeqCst);
                return Ok(());
            }
            Ok(_) => StoreError::LockLost,
            Err(e) => StoreError::Redis(e),
        };
        // The machine's memory now runs ahead of Redis: it is rebuilt.
        self.fence.poisoned.store(true, Ordering::SeqCst);
        Err(CryptoStoreError::backend(err))
    }

    async fn inbound_ops(&self, sessions: &[InboundGroupSession], ops: &mut Vec<Op>) -> Result<()> {
        for s in sessions {
            let p = s.pickle().await;
            ops.push(Op::hset(
                Slot::Inbound,
                format!("{} {}", s.room_id(), s.session_id()),
                json(&p)?,
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl CryptoStore for RedisStore {
    type Error = CryptoStoreError;

    async fn load_account(&self) -> Result<Option<Account>> {
        Ok(self.mem.load_account().await?)
    }

    async fn load_identity(&self) -> Result<Option<PrivateCrossSigningIdentity>> {
        Ok(self.mem.load_identity().await?)
    }

    async fn save_changes(&self, changes: Changes) -> Result<()> {
        let mut ops = Vec::new();
        if let Some(id) = &changes.private_identity {
            ops.push(Op::set(Slot::Identity, json(&id.pickle().await)?));
        }
        for s in &changes.sessions {
            let p = s.pickle().await;
            ops.push(Op::hset(
                Slot::Sessions,
                format!("{} {}", p.sender_key.to_base64(), s.session_id()),
                json(&p)?,
            ));
        }
        self.inbound_ops(&changes.inbound_group_sessions, &mut ops)
            .await?;
        for s in &changes.outbound_group_sessions {
            ops.push(Op::hset(
                Slot::Outbound,
                s.room_id().as_str(),
                json(&s.pickle().await)?,
            ));
        }
        for d in changes.devices.new.iter().chain(&changes.devices.changed) {
            ops.push(Op::hset(
                Slot::Devices,
                format!("{} {}", d.user_id(), d.device_id()),
                json(d)?,
            ));
        }
        for d in &changes.devices.deleted {
            ops.push(Op::hdel(
                Slot::Devices,
                format!("{} {}", d.user_id(), d.device_id()),
            ));
        }
        for i in changes
            .identities
            .new
            .iter()
            .chain(&changes.identities.changed)
        {
            ops.push(Op::hset(Slot::Identities, i.user_id().as_str(), json(i)?));
        }
        for h in &changes.message_hashes {
            ops.push(Op::sadd(Slot::Hashes, json(h)?));
        }
        for r in &changes.key_requests {
            ops.push(Op::hset(Slot::Requests, r.request_id.as_str(), json(r)?));
        }
        for (room, by_session) in &changes.withheld_session_info {
            for (session, entry) in by_session {
                let w = Withheld {
                    room_id: room.clone(),
                    session_id: session.clone(),
                    entry: entry.clone(),
                };
                ops.push(Op::hset(
                    Slot::Withheld,
                    format!("{room} {session}"),
                    json(&w)?,
                ));
            }
        }
        for (room, s) in &changes.room_settings {
            ops.push(Op::hset(Slot::Settings, room.as_str(), json(s)?));
        }
        self.write(ops).await?;
        Ok(self.mem.save_changes(changes).await?)
    }

    async fn save_pending_changes(&self, changes: PendingChanges) -> Result<()> {
        if let Some(a) = &changes.account {
            let pickle = json(&a.pickle())?;
            let same = self.account.lock().expect("account lock").as_deref() == Some(&pickle);
            if !same {
                self.write(vec![Op::set(Slot::Account, pickle.clone())])
                    .await?;
                *self.account.lock().expect("account lock") = Some(pickle);
            }
        }
        Ok(self.mem.save_pending_changes(changes).await?)
    }

    async fn save_inbound_group_sessions(
        &self,
        sessions: Vec<InboundGroupSession>,
        backed_up_to_version: Option<&str>,
    ) -> Result<()> {
        let mut ops = Vec::new();
        self.inbound_ops(&sessions, &mut ops).await?;
        self.write(ops).await?;
        Ok(self
            .mem
            .save_inbound_group_sessions(sessions, backed_up_to_version)
            .await?)
    }

    async fn get_sessions(&self, sender_key: &str) -> Result<Option<Vec<Session>>> {
        Ok(self.mem.get_sessions(sender_key).await?)
    }

    async fn get_inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSession>> {
        Ok(self
            .mem
            .get_inbound_group_session(room_id, session_id)
            .await?)
    }

    async fn get_withheld_info(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<RoomKeyWithheldEntry>> {
        Ok(self.mem.get_withheld_info(room_id, session_id).await?)
    }

    async fn get_withheld_sessions_by_room_id(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<RoomKeyWithheldEntry>> {
        Ok(self.mem.get_withheld_sessions_by_room_id(room_id).await?)
    }

    async fn get_inbound_group_sessions(&self) -> Result<Vec<InboundGroupSession>> {
        Ok(self.mem.get_inbound_group_sessions().await?)
    }

    async fn inbound_group_session_counts(
        &self,
        backup_version: Option<&str>,
    ) -> Result<RoomKeyCounts> {
        Ok(self
            .mem
            .inbound_group_session_counts(backup_version)
            .await?)
    }

    async fn get_inbound_group_sessions_by_room_id(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<InboundGroupSession>> {
        Ok(self
            .mem
            .get_inbound_group_sessions_by_room_id(room_id)
            .await?)
    }

    async fn get_inbound_group_sessions_for_device_batch(
        &self,
        curve_key: Curve25519PublicKey,
        sender_data_type: SenderDataType,
        after_session_id: Option<String>,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        Ok(self
            .mem
            .get_inbound_group_sessions_for_device_batch(
                curve_key,
                sender_data_type,
                after_session_id,
                limit,
            )
            .await?)
    }

    async fn inbound_group_sessions_for_backup(
        &self,
        backup_version: &str,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        Ok(self
            .mem
            .inbound_group_sessions_for_backup(backup_version, limit)
            .await?)
    }

    async fn mark_inbound_group_sessions_as_backed_up(
        &self,
        backup_version: &str,
        room_and_session_ids: &[(&RoomId, &str)],
    ) -> Result<()> {
        Ok(self
            .mem
            .mark_inbound_group_sessions_as_backed_up(backup_version, room_and_session_ids)
            .await?)
    }

    async fn reset_backup_state(&self) -> Result<()> {
        Ok(self.mem.reset_backup_state().await?)
    }

    async fn load_backup_keys(&self) -> Result<BackupKeys> {
        Ok(self.mem.load_backup_keys().await?)
    }

    async fn load_dehydrated_device_pickle_key(&self) -> Result<Option<DehydratedDeviceKey>> {
        Ok(self.mem.load_dehydrated_device_pickle_key().await?)
    }

    async fn delete_dehydrated_device_pickle_key(&self) -> Result<()> {
        Ok(self.mem.delete_dehydrated_device_pickle_key().await?)
    }

    async fn get_outbound_group_session(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<OutboundGroupSession>> {
        Ok(self.mem.get_outbound_group_session(room_id).await?)
    }

    async fn load_tracked_users(&self) -> Result<Vec<TrackedUser>> {
        Ok(self.mem.load_tracked_users().await?)
    }

    async fn save_tracked_users(&self, users: &[(&UserId, bool)]) -> Result<()> {
        let ops = users
            .iter()
            .map(|(u, dirty)| Op::hset(Slot::Tracked, u.as_str(), if *dirty { "1" } else { "0" }))
            .collect();
        self.write(ops).await?;
        Ok(self.mem.save_tracked_users(users).await?)
    }

    async fn get_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Option<DeviceData>> {
        Ok(self.mem.get_device(user_id, device_id).await?)
    }

    async fn get_user_devices(
        &self,
        user_id: &UserId,
    ) -> Result<HashMap<OwnedDeviceId, DeviceData>> {
        Ok(self.mem.get_user_devices(user_id).await?)
    }

    async fn get_own_device(&self) -> Result<DeviceData> {
        Ok(self.mem.get_own_device().await?)
    }

    async fn get_user_identity(&self, user_id: &UserId) -> Result<Option<UserIdentityData>> {
        Ok(self.mem.get_user_identity(user_id).await?)
    }

    async fn is_message_known(&self, message_hash: &OlmMessageHash) -> Result<bool> {
        Ok(self.mem.is_message_known(message_hash).await?)
    }

    async fn get_outgoing_secret_requests(
        &self,
        request_id: &TransactionId,
    ) -> Result<Option<GossipRequest>> {
        Ok(self.mem.get_outgoing_secret_requests(request_id).await?)
    }

    async fn get_secret_request_by_info(
        &self,
        secret_info: &SecretInfo,
    ) -> Result<Option<GossipRequest>> {
        Ok(self.mem.get_secret_request_by_info(secret_info).await?)
    }

    async fn get_unsent_secret_requests(&self) -> Result<Vec<GossipRequest>> {
        Ok(self.mem.get_unsent_secret_requests().await?)
    }

    async fn delete_outgoing_secret_requests(&self, request_id: &TransactionId) -> Result<()> {
        self.write(vec![Op::hdel(Slot::Requests, request_id.as_str())])
            .await?;
        Ok(self.mem.delete_outgoing_secret_requests(request_id).await?)
    }

    async fn get_secrets_from_inbox(
        &self,
        secret_name: &SecretName,
    ) -> Result<Vec<Zeroizing<String>>> {
        Ok(self.mem.get_secrets_from_inbox(secret_name).await?)
    }

    async fn delete_secrets_from_inbox(&self, secret_name: &SecretName) -> Result<()> {
        Ok(self.mem.delete_secrets_from_inbox(secret_name).await?)
    }

    async fn get_room_settings(&self, room_id: &RoomId) -> Result<Option<RoomSettings>> {
        Ok(self.mem.get_room_settings(room_id).await?)
    }

    async fn get_received_room_key_bundle_data(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<StoredRoomKeyBundleData>> {
        Ok(self
            .mem
            .get_received_room_key_bundle_data(room_id, user_id)
            .await?)
    }

    async fn get_pending_key_bundle_details_for_room(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<RoomPendingKeyBundleDetails>> {
        Ok(self
            .mem
            .get_pending_key_bundle_details_for_room(room_id)
            .await?)
    }

    async fn get_all_rooms_pending_key_bundles(&self) -> Result<Vec<RoomPendingKeyBundleDetails>> {
        Ok(self.mem.get_all_rooms_pending_key_bundles().await?)
    }

    async fn has_downloaded_all_room_keys(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self.mem.has_downloaded_all_room_keys(room_id).await?)
    }

    async fn get_custom_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.mem.get_custom_value(key).await?)
    }

    async fn set_custom_value(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.write(vec![Op::hset(Slot::Custom, key, B64.encode(&value))])
            .await?;
        Ok(self.mem.set_custom_value(key, value).await?)
    }

    async fn remove_custom_value(&self, key: &str) -> Result<()> {
        self.write(vec![Op::hdel(Slot::Custom, key)]).await?;
        Ok(self.mem.remove_custom_value(key).await?)
    }

    async fn try_take_leased_lock(
        &self,
        lease_duration_ms: u32,
        key: &str,
        holder: &str,
    ) -> Result<Option<u64>> {
        Ok(self
            .mem
            .try_take_leased_lock(lease_duration_ms, key, holder)
            .await?)
    }

    async fn next_batch_token(&self) -> Result<Option<String>> {
        Ok(self.mem.next_batch_token().await?)
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    async fn reopen(&self) -> Result<()> {
        Ok(())
    }

    async fn get_size(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}
