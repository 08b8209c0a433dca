//! The gateway protocol (API v10, JSON): opcodes, close codes and the
//! payloads Stargazer sends, as types instead of bare numbers.

use reqwest::Url;
use serde_json::{Value, json};

/// Gateway opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    Dispatch,
    Heartbeat,
    Identify,
    PresenceUpdate,
    Resume,
    Reconnect,
    InvalidSession,
    Hello,
    HeartbeatAck,
}

impl Op {
    pub fn code(self) -> u8 {
        match self {
            Op::Dispatch => 0,
            Op::Heartbeat => 1,
            Op::Identify => 2,
            Op::PresenceUpdate => 3,
            Op::Resume => 6,
            Op::Reconnect => 7,
            Op::InvalidSession => 9,
            Op::Hello => 10,
            Op::HeartbeatAck => 11,
        }
    }

    pub fn from_code(code: u64) -> Option<Op> {
        Some(match code {
            0 => Op::Dispatch,
            1 => Op::Heartbeat,
            2 => Op::Identify,
            3 => Op::PresenceUpdate,
            6 => Op::Resume,
            7 => Op::Reconnect,
            9 => Op::InvalidSession,
            10 => Op::Hello,
            11 => Op::HeartbeatAck,
            _ => return None,
        })
    }

    /// The op of a payload.
    pub fn of(payload: &Value) -> Option<Op> {
        payload
            .get("op")
            .and_then(Value::as_u64)
            .and_then(Op::from_code)
    }

    /// `{"op": <this>, "d": d}`.
    pub fn payload(self, d: Value) -> Value {
        json!({"op": self.code(), "d": d})
    }
}

/// Gateway close codes (Discord's 4000–4014; others kept as `Other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    UnknownError,
    UnknownOpcode,
    DecodeError,
    NotAuthenticated,
    AuthenticationFailed,
    AlreadyAuthenticated,
    InvalidSeq,
    RateLimited,
    SessionTimedOut,
    InvalidShard,
    ShardingRequired,
    InvalidApiVersion,
    InvalidIntents,
    DisallowedIntents,
    Other(u16),
}

impl CloseCode {
    pub fn from_code(code: u16) -> CloseCode {
        match code {
            4000 => CloseCode::UnknownError,
            4001 => CloseCode::UnknownOpcode,
            4002 => CloseCode::DecodeError,
            4003 => CloseCode::NotAuthenticated,
            4004 => CloseCode::AuthenticationFailed,
            4005 => CloseCode::AlreadyAuthenticated,
            4007 => CloseCode::InvalidSeq,
            4008 => CloseCode::RateLimited,
            4009 => CloseCode::SessionTimedOut,
            4010 => CloseCode::InvalidShard,
            4011 => CloseCode::ShardingRequired,
            4012 => CloseCode::InvalidApiVersion,
            4013 => CloseCode::InvalidIntents,
            4014 => CloseCode::DisallowedIntents,
            other => CloseCode::Other(other),
        }
    }

    /// Whether reconnecting can help (Discord's table). 4004 cannot, but it
    /// is a refused token, handled by the circuit rather than as fatal.
    pub fn can_reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::AuthenticationFailed
                | CloseCode::InvalidShard
                | CloseCode::ShardingRequired
                | CloseCode::InvalidApiVersion
                | CloseCode::InvalidIntents
                | CloseCode::DisallowedIntents
        )
    }

    /// The shard count is wrong (4010 invalid shard, 4011 sharding
    /// required): not fatal, the fleet re-fetches the count and reshards.
    pub fn reshards(self) -> Option<&'static str> {
        Some(match self {
            CloseCode::InvalidShard => "invalid shard sent in Identify",
            CloseCode::ShardingRequired => "sharding required: a shard would hold too many guilds",
            _ => return None,
        })
    }

    /// The session cannot be resumed: identify afresh.
    pub fn forgets_session(self) -> bool {
        matches!(self, CloseCode::InvalidSeq | CloseCode::SessionTimedOut)
    }

    /// For a code after which reconnecting cannot help: the cause and the fix.
    pub fn fix(self) -> Option<&'static str> {
        Some(match self {
            CloseCode::AuthenticationFailed => {
                "authentication failed: the bot token is invalid; set the right token and restart"
            }
            CloseCode::InvalidApiVersion => "invalid API version; this build speaks gateway v10",
            CloseCode::InvalidIntents => {
                "invalid intents: the intents value is not a valid bitfield; fix `intents`"
            }
            CloseCode::DisallowedIntents => {
                "disallowed intents: enable the privileged intents the bot asks for (Message Content) in the developer portal, Bot → Privileged Gateway Intents, or remove them from `intents`"
            }
            _ => return None,
        })
    }
}

/// The op 3 / Identify `presence` object for a stored presence.
pub fn presence_object(stored: &Value) -> Value {
    let part = |k: &str| {
        stored
            .get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let state = match (part("emoji"), part("text")) {
        (Some(e), Some(t)) => Some(format!("{e} {t}")),
        (Some(one), None) | (None, Some(one)) => Some(one.to_owned()),
        (None, None) => None,
    };
    let activities: Vec<Value> = state
        .map(|s| json!({"name": "Custom Status", "type": 4, "state": s}))
        .into_iter()
        .collect();
    json!({"since": null, "activities": activities, "status": "online", "afk": false})
}

/// `<url>?v=10&encoding=json` (other query parameters kept).
pub fn gateway_request_url(url: &str) -> Result<String, String> {
    let mut u = Url::parse(url).map_err(|e| format!("invalid discord gateway URL `{url}`: {e}"))?;
    if !matches!(u.scheme(), "ws" | "wss") {
        return Err(format!(
            "the discord gateway URL `{url}` must be ws:// or wss://"
        ));
    }
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| !matches!(k.as_ref(), "v" | "encoding" | "compress"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    u.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("v", "10")
        .append_pair("encoding", "json");
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_urls_get_version_and_encoding() {
        assert_eq!(
            gateway_request_url("wss://gateway.discord.gg").unwrap(),
            "wss://gateway.discord.gg/?v=10&encoding=json"
        );
        assert_eq!(
            gateway_request_url("ws://127.0.0.1:9/resume?v=9&x=1").unwrap(),
            "ws://127.0.0.1:9/resume?x=1&v=10&encoding=json"
        );
        assert!(gateway_request_url("https://discord.com").is_err());
        assert!(gateway_request_url("not a url").is_err());
    }

    #[test]
    fn presence_objects() {
        let p = presence_object(&json!({"text": "on call", "emoji": "📟"}));
        assert_eq!(
            p,
            json!({"since": null, "activities": [{"name": "Custom Status", "type": 4, "state": "📟 on call"}], "status": "online", "afk": false})
        );
        assert_eq!(
            presence_object(&json!({"text": "hi", "emoji": null}))["activities"][0]["state"],
            "hi"
        );
        assert_eq!(
            presence_object(&json!({"text": "", "emoji": "🔥"}))["activities"][0]["state"],
            "🔥"
        );
        assert_eq!(
            presence_object(&json!({"text": null, "emoji": null}))["activities"],
            json!([])
        );
    }

    #[test]
    fn fatal_codes() {
        for c in [4004, 4012, 4013, 4014] {
            assert!(CloseCode::from_code(c).fix().is_some(), "{c}");
        }
        for c in [
            1000, 1001, 4000, 4001, 4002, 4003, 4005, 4007, 4008, 4009, 4010, 4011,
        ] {
            assert!(CloseCode::from_code(c).fix().is_none(), "{c}");
        }
        // Not fatal: the fleet reshards.
        for c in [4010, 4011] {
            assert!(CloseCode::from_code(c).reshards().is_some(), "{c}");
        }
        assert!(CloseCode::from_code(4004).reshards().is_none());
        assert!(
            CloseCode::from_code(4014)
                .fix()
                .unwrap()
                .contains("developer portal")
        );
    }

    #[test]
    fn ops_and_close_codes() {
        for c in [0, 1, 2, 3, 6, 7, 9, 10, 11] {
            assert_eq!(u64::from(Op::from_code(c).unwrap().code()), c);
        }
        assert_eq!(Op::from_code(5), None);
        assert_eq!(Op::Heartbeat.payload(json!(7)), json!({"op": 1, "d": 7}));
        assert!(CloseCode::from_code(4000).can_reconnect());
        assert!(CloseCode::from_code(4008).can_reconnect());
        assert!(!CloseCode::from_code(4011).can_reconnect());
        assert!(!CloseCode::from_code(4004).can_reconnect());
        assert!(CloseCode::from_code(4009).forgets_session());
        assert_eq!(CloseCode::from_code(1006), CloseCode::Other(1006));
    }
}
