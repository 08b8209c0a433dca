//! Refreshing an expired access token (a soft logout), once for the fleet.
//!
//! When the homeserver issued a refresh token (`refresh_token_env`), a call
//! answered `M_UNKNOWN_TOKEN` with `soft_logout: true` refreshes the access
//! token (`POST /_matrix/client/v3/refresh`) and is tried once more. A refresh
//! token is good for one use only, so the gateways of a fleet must not each
//! refresh: the one that takes `sg:{P}:matrix:token:lock` refreshes and
//! stores the new pair in `sg:{P}:matrix:token`; the others (and a gateway
//! started later with the original, used-up tokens) take the stored pair.
//! A refresh the server refuses leaves the platform halted (`/readyz` says
//! why) until a working token is configured.

use std::time::Duration;

use redis::AsyncCommands;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};
use tracing::info;

use super::{MatrixAdapter, classify};
use crate::adapters::AdapterError;

/// How long one gateway may hold the refresh lock.
const LOCK_TTL: Duration = Duration::from_secs(15);

impl MatrixAdapter {
    /// Refresh the access token with `refresh_token` when it expires.
    pub fn with_refresh_token(mut self, refresh_token: Option<String>) -> Self {
        self.refresh = tokio::sync::Mutex::new(refresh_token.filter(|t| !t.trim().is_empty()));
        self
    }

    pub(super) async fn has_refresh_token(&self) -> bool {
        self.refresh.lock().await.is_some()
    }

    /// Use `access` from now on.
    fn adopt(&self, access: &str) -> Result<(), AdapterError> {
        let mut h = HeaderValue::from_str(&format!("Bearer {access}")).map_err(|_| {
            AdapterError::unauthorized("the refreshed matrix access token is not a valid header")
        })?;
        h.set_sensitive(true);
        *self.auth.write().expect("auth lock") = h;
        Ok(())
    }

    /// The fleet's stored pair, if any.
    async fn stored_tokens(&self) -> Result<Option<(String, Option<String>)>, AdapterError> {
        let Some(sh) = &self.shared else {
            return Ok(None);
        };
        let mut conn = sh.conn.clone();
        let (access, refresh): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(sh.keys.token())
            .arg("access_token")
            .arg("refresh_token")
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                AdapterError::transient(format!("matrix: reading the stored token failed: {e}"))
            })?;
        Ok(access.map(|a| (a, refresh)))
    }

    /// Replace the access token that `stale` carried: by the one another
    /// gateway (or task) refreshed meanwhile, else by refreshing it here.
    pub(super) async fn refresh_token(&self, stale: &HeaderValue) -> Result<(), AdapterError> {
        let mut refresh = self.refresh.lock().await;
        if self.current_auth() != *stale {
            return Ok(()); // refreshed by another task of this process
        }
        let differs = |access: &str| format!("Bearer {access}").as_bytes() != stale.as_bytes();
        if let Some((access, r)) = self.stored_tokens().await?
            && differs(&access)
        {
            self.adopt(&access)?;
            if r.is_some() {
                *refresh = r;
            }
            return Ok(());
        }
        let owner = format!("{:016x}", rand::random::<u64>());
        if let Some(sh) = &self.shared {
            let mut conn = sh.conn.clone();
            let deadline = Instant::now() + LOCK_TTL;
            loop {
                let took: Option<String> = redis::cmd("SET")
                    .arg(sh.keys.token_lock())
                    .arg(&owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| {
                        AdapterError::transient(format!(
                            "matrix: taking the token lock failed: {e}"
                        ))
                    })?;
                if took.is_some() {
                    break;
                }
                // Another gateway is refreshing: wait for its result.
                sleep(Duration::from_millis(200)).await;
                if let Some((access, r)) = self.stored_tokens().await?
                    && differs(&access)
                {
                    self.adopt(&access)?;
                    if r.is_some() {
                        *refresh = r;
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(AdapterError::transient(
                        "matrix: another gateway holds the token lock and stored no new token",
                    ));
                }
            }
            // Between our read and the lock, the holder before us may have finished.
            if let Some((access, r)) = self.stored_tokens().await?
                && differs(&access)
            {
                let _: redis::RedisResult<()> = conn.del(sh.keys.token_lock()).await;
                self.adopt(&access)?;
                if r.is_some() {
                    *refresh = r;
                }
                return Ok(());
            }
        }
        let result = self.refresh_now(refresh.as_deref()).await;
        if let Ok((access, new_refresh)) = &result {
            if let Some(sh) = &self.shared {
                let mut conn = sh.conn.clone();
                let mut pipe = redis::pipe();
                pipe.cmd("HSET")
                    .arg(sh.keys.token())
                    .arg("access_token")
                    .arg(access)
                    .arg("refresh_token")
                    .arg(new_refresh.as_deref().or(refresh.as_deref()).unwrap_or(""))
                    .ignore();
                let stored: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
                if let Err(e) = stored {
                    tracing::warn!(platform = %self.platform, error = %e, "matrix: storing the refreshed token failed; other gateways will not see it");
                }
            }
            self.adopt(access)?;
            if new_refresh.is_some() {
                *refresh = new_refresh.clone();
            }
            info!(platform = %self.platform, "matrix: the access token was refreshed");
        }
        if let Some(sh) = &self.shared {
            let mut conn = sh.conn.clone();
            let current: Option<String> = conn.get(sh.keys.token_lock()).await.unwrap_or(None);
            if current.as_deref() == Some(owner.as_str()) {
                let _: redis::RedisResult<()> = conn.del(sh.keys.token_lock()).await;
            }
        }
        result.map(|_| ())
    }

    /// `POST /refresh`: the new access token and, if the server rotates
    /// them, the new refresh token.
    async fn refresh_now(
        &self,
        refresh: Option<&str>,
    ) -> Result<(String, Option<String>), AdapterError> {
        let refresh = refresh.ok_or_else(|| {
            AdapterError::unauthorized("matrix: no refresh token to refresh with")
        })?;
        let what = "POST /_matrix/client/v3/refresh";
        let resp = self
            .client
            .post(format!("{}/_matrix/client/v3/refresh", self.base))
            .json(&json!({"refresh_token": refresh}))
            .send()
            .await
            .map_err(|e| {
                AdapterError::transient(format!("matrix {what} failed: {}", e.without_url()))
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| AdapterError::transient(format!("matrix {what}: {}", e.without_url())))?;
        if !status.is_success() {
            return Err(classify(what, status, None, &bytes).err);
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            AdapterError::transient(format!("matrix {what}: answer is not JSON: {e}"))
        })?;
        let access = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AdapterError::transient(format!("matrix {what} answered without access_token"))
            })?;
        let next = v
            .get("refresh_token")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok((access.to_owned(), next))
    }
}
