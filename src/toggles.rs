//! Feature toggles: per-channel and per-guild switches kept in Redis, shared
//! by every gateway and changed at run time (`stargazer toggle`).
//!
//! One hash per platform and feature, `sg:{P}:toggles:<feature>`, with fields
//! `channel:<channel id>` and `guild:<guild id>` set to `on` or `off`. A
//! channel's own switch wins over its guild's; with neither, the feature's
//! default applies. Discord's toggle button is the feature `toggle_menu`.

use std::fmt;

use crate::bus::Conn;
use redis::AsyncCommands;

use crate::keys::Keys;

/// The feature of Discord's toggle button.
pub const TOGGLE_MENU: &str = "toggle_menu";

/// What a switch applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Channel(String),
    Guild(String),
}

impl Scope {
    fn field(&self) -> String {
        match self {
            Scope::Channel(c) => format!("channel:{c}"),
            Scope::Guild(g) => format!("guild:{g}"),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Channel(c) => write!(f, "channel {c}"),
            Scope::Guild(g) => write!(f, "guild {g}"),
        }
    }
}

/// The switches of one platform.
#[derive(Clone)]
pub struct Toggles {
    conn: Conn,
    keys: Keys,
}

impl fmt::Debug for Toggles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Toggles").field("keys", &self.keys).finish()
    }
}

fn parse(v: Option<String>) -> Option<bool> {
    match v.as_deref() {
        Some("on") => Some(true),
        Some("off") => Some(false),
        _ => None,
    }
}

impl Toggles {
    pub fn new(conn: Conn, keys: Keys) -> Self {
        Toggles { conn, keys }
    }

    /// Switch `feature` on (`Some(true)`), off (`Some(false)`) or back to
    /// what its guild or default says (`None`) for `scope`.
    pub async fn set(
        &self,
        feature: &str,
        scope: &Scope,
        value: Option<bool>,
    ) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let key = self.keys.toggles(feature);
        match value {
            Some(on) => {
                let _: () = conn
                    .hset(key, scope.field(), if on { "on" } else { "off" })
                    .await?;
            }
            None => {
                let _: () = conn.hdel(key, scope.field()).await?;
            }
        }
        Ok(())
    }

    /// Whether `feature` is on in `channel` (of `guild`, when known), or
    /// `default` when neither has a switch. One round trip.
    pub async fn enabled(
        &self,
        feature: &str,
        channel: &str,
        guild: Option<&str>,
        default: bool,
    ) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let mut fields = vec![Scope::Channel(channel.to_owned()).field()];
        if let Some(g) = guild.filter(|g| !g.is_empty()) {
            fields.push(Scope::Guild(g.to_owned()).field());
        }
        let got: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.toggles(feature))
            .arg(&fields)
            .query_async(&mut conn)
            .await?;
        let mut got = got.into_iter().map(parse);
        let channel = got.next().flatten();
        let guild = got.next().flatten();
        Ok(channel.or(guild).unwrap_or(default))
    }

    /// Every switch of `feature`, sorted: (scope, on).
    pub async fn list(&self, feature: &str) -> redis::RedisResult<Vec<(Scope, bool)>> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, String)> = conn.hgetall(self.keys.toggles(feature)).await?;
        let mut out: Vec<(Scope, bool)> = all
            .into_iter()
            .filter_map(|(field, v)| {
                let on = parse(Some(v))?;
                let scope = if let Some(c) = field.strip_prefix("channel:") {
                    Scope::Channel(c.to_owned())
                } else {
                    Scope::Guild(field.strip_prefix("guild:")?.to_owned())
                };
                Some((scope, on))
            })
            .collect();
        out.sort_by_key(|(s, _)| match s {
            Scope::Guild(g) => (0, g.clone()),
            Scope::Channel(c) => (1, c.clone()),
        });
        Ok(out)
    }
}
