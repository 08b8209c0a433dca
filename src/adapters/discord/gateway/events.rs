//! Event mapping: what a gateway dispatch becomes — an inbound event, the
//! bot's own nonce, channel → guild pairs, an interaction to defer. Pure
//! functions, tested without Redis or a socket.

use serde_json::{Map, Value};

use crate::inbound::InboundEvent;

/// Discord's epoch (2015-01-01) in Unix ms.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// What one event writes to Redis besides its seq.
#[derive(Debug, Default, PartialEq)]
pub struct Writes {
    pub event: Option<InboundEvent>,
    /// (nonce, message id) of a message this bot sent.
    pub nonce: Option<(String, String)>,
    /// (channel id, guild id)
    pub guilds: Vec<(String, String)>,
    /// (interaction id, token, type) to defer after the event is recorded,
    /// unless a worker answers first.
    pub ack: Option<(String, String, u64)>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.event.is_none() && self.nonce.is_none() && self.guilds.is_empty()
    }
}

pub(super) fn str_at<'a>(d: &'a Value, pointer: &str) -> Option<&'a str> {
    d.pointer(pointer).and_then(Value::as_str)
}

/// The creation time of a snowflake, in Unix ms.
pub fn snowflake_ms(id: &str) -> Option<u64> {
    id.parse::<u64>().ok().map(|n| (n >> 22) + DISCORD_EPOCH_MS)
}

/// What a dispatch writes to Redis (the inbound event, the bot's nonce, the
/// channel → guild map) and the interaction to acknowledge.
pub fn writes_for(platform: &str, bot_user_id: &str, t: &str, d: &Value) -> Writes {
    let mut w = Writes {
        event: to_inbound(platform, bot_user_id, t, d),
        ..Writes::default()
    };
    let guild = str_at(d, "/guild_id");
    match t {
        "GUILD_CREATE" => {
            if let Some(g) = str_at(d, "/id") {
                for list in ["channels", "threads"] {
                    for c in d.get(list).and_then(Value::as_array).into_iter().flatten() {
                        if let Some(c) = str_at(c, "/id") {
                            w.guilds.push((c.to_owned(), g.to_owned()));
                        }
                    }
                }
            }
        }
        "CHANNEL_CREATE" | "CHANNEL_UPDATE" | "THREAD_CREATE" | "THREAD_UPDATE" => {
            if let (Some(c), Some(g)) = (str_at(d, "/id"), guild) {
                w.guilds.push((c.to_owned(), g.to_owned()));
            }
        }
        "MESSAGE_CREATE" => {
            if let (Some(c), Some(g)) = (str_at(d, "/channel_id"), guild) {
                w.guilds.push((c.to_owned(), g.to_owned()));
            }
            if !bot_user_id.is_empty()
                && str_at(d, "/author/id") == Some(bot_user_id)
                && let (Some(nonce), Some(id)) = (str_at(d, "/nonce"), str_at(d, "/id"))
                && !nonce.is_empty()
            {
                w.nonce = Some((nonce.to_owned(), id.to_owned()));
            }
        }
        "INTERACTION_CREATE" if w.event.is_some() => {
            if let (Some(id), Some(token), Some(ty)) = (
                str_at(d, "/id"),
                str_at(d, "/token"),
                d.get("type").and_then(Value::as_u64),
            ) {
                w.ack = Some((id.to_owned(), token.to_owned(), ty));
            }
        }
        _ => {}
    }
    w
}

fn user_name(user: &Value) -> String {
    str_at(user, "/global_name")
        .filter(|s| !s.is_empty())
        .or_else(|| str_at(user, "/username"))
        .unwrap_or("")
        .to_owned()
}

/// The inbound event a dispatch (`t`, `d`) becomes, if any: MESSAGE_CREATE
/// → `message`, MESSAGE_REACTION_ADD → `reaction`, INTERACTION_CREATE of a
/// message component → `button`; the bot's own messages and reactions → none.
pub fn to_inbound(platform: &str, bot_user_id: &str, t: &str, d: &Value) -> Option<InboundEvent> {
    let is_bot_user = |id: Option<&str>| !bot_user_id.is_empty() && id == Some(bot_user_id);
    let mut extra = Map::new();
    if let Some(g) = str_at(d, "/guild_id") {
        extra.insert("guild_id".into(), g.into());
    }
    let base =
        |kind: &str, channel: &str, user_id: &str, user_name: String, ts_ms: u64| InboundEvent {
            kind: kind.into(),
            platform: platform.into(),
            channel_id: channel.into(),
            user_id: user_id.into(),
            user_name,
            text: None,
            message_id: None,
            reply_to: None,
            emoji: None,
            custom_id: None,
            ts_ms,
            extra: Map::new(),
        };
    match t {
        "MESSAGE_CREATE" => {
            let author = d.get("author")?;
            let author_id = str_at(author, "/id")?;
            if is_bot_user(Some(author_id)) {
                return None;
            }
            let id = str_at(d, "/id");
            // The id says when the message was created, to the ms (the same
            // instant as its `timestamp`).
            let ts = id.and_then(snowflake_ms).unwrap_or_else(crate::now_ms);
            let mut ev = base(
                "message",
                str_at(d, "/channel_id")?,
                author_id,
                user_name(author),
                ts,
            );
            ev.text = Some(str_at(d, "/content").unwrap_or("").to_owned());
            ev.message_id = id.map(str::to_owned);
            ev.reply_to = str_at(d, "/message_reference/message_id").map(str::to_owned);
            extra.insert(
                "is_bot".into(),
                author
                    .get("bot")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .into(),
            );
            ev.extra = extra;
            Some(ev)
        }
        "MESSAGE_REACTION_ADD" => {
            let user_id = str_at(d, "/user_id")?;
            if is_bot_user(Some(user_id)) {
                return None;
            }
            let name = str_at(d, "/emoji/name").unwrap_or("");
            let emoji = match str_at(d, "/emoji/id") {
                Some(id) => format!("{name}:{id}"),
                None if !name.is_empty() => name.to_owned(),
                None => return None,
            };
            let member_user = d.pointer("/member/user").unwrap_or(&Value::Null);
            let mut ev = base(
                "reaction",
                str_at(d, "/channel_id")?,
                user_id,
                user_name(member_user),
                crate::now_ms(),
            );
            ev.message_id = str_at(d, "/message_id").map(str::to_owned);
            ev.emoji = Some(emoji);
            ev.extra = extra;
            Some(ev)
        }
        "INTERACTION_CREATE" => {
            crate::adapters::discord::interactions::interaction_event(platform, d)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOT: &str = "111111111111111111";

    #[test]
    fn snowflakes_tell_the_time() {
        // 175928847299117063 >> 22 = 41944705796 ms after Discord's epoch.
        assert_eq!(snowflake_ms("175928847299117063"), Some(1_462_015_105_796));
        assert_eq!(snowflake_ms("x"), None);
    }

    /// Discord's documented MESSAGE_CREATE sample (trimmed), in a guild, a reply.
    fn message_sample() -> Value {
        json!({
            "id": "334385199974967042",
            "channel_id": "290926798999357250",
            "guild_id": "290926798626357999",
            "author": {"id": "53908099506183680", "username": "Mason", "global_name": "Mason G", "avatar": null, "discriminator": "0"},
            "content": "Supa Hot",
            "timestamp": "2017-07-11T17:27:07.299000+00:00",
            "edited_timestamp": null,
            "tts": false,
            "mention_everyone": false,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": false,
            "type": 19,
            "nonce": "1234",
            "message_reference": {"type": 0, "message_id": "334385199974967040", "channel_id": "290926798999357250", "guild_id": "290926798626357999"}
        })
    }

    #[test]
    fn message_create_becomes_a_message() {
        let ev = to_inbound("discord", BOT, "MESSAGE_CREATE", &message_sample()).unwrap();
        assert_eq!(ev.kind, "message");
        assert_eq!(ev.platform, "discord");
        assert_eq!(ev.channel_id, "290926798999357250");
        assert_eq!(ev.user_id, "53908099506183680");
        assert_eq!(ev.user_name, "Mason G");
        assert_eq!(ev.text.as_deref(), Some("Supa Hot"));
        assert_eq!(ev.message_id.as_deref(), Some("334385199974967042"));
        assert_eq!(ev.reply_to.as_deref(), Some("334385199974967040"));
        // From the id (a snowflake: its creation time to the ms; the
        // documented sample's `timestamp` was edited by hand, 17 s apart).
        assert_eq!(ev.ts_ms, 1_499_794_044_250);
        // The same without `timestamp`.
        let mut bare = message_sample();
        bare.as_object_mut().unwrap().remove("timestamp");
        let ev = to_inbound("discord", BOT, "MESSAGE_CREATE", &bare).unwrap();
        assert_eq!(ev.ts_ms, (334385199974967042u64 >> 22) + DISCORD_EPOCH_MS);
        assert_eq!(ev.extra["guild_id"], "290926798626357999");
        assert_eq!(ev.extra["is_bot"], false);
        assert!(ev.validate().is_ok());

        // A DM: no guild; the username when there is no global name.
        let mut dm = message_sample();
        dm.as_object_mut().unwrap().remove("guild_id");
        dm["author"]["global_name"] = Value::Null;
        dm["author"]["bot"] = true.into();
        let ev = to_inbound("discord", BOT, "MESSAGE_CREATE", &dm).unwrap();
        assert_eq!(ev.user_name, "Mason");
        assert!(!ev.extra.contains_key("guild_id"));
        assert_eq!(ev.extra["is_bot"], true);
    }

    #[test]
    fn the_bots_own_message_is_not_inbound_but_its_nonce_is_kept() {
        let mut own = message_sample();
        own["author"]["id"] = BOT.into();
        assert_eq!(to_inbound("discord", BOT, "MESSAGE_CREATE", &own), None);
        let w = writes_for("discord", BOT, "MESSAGE_CREATE", &own);
        assert_eq!(w.event, None);
        assert_eq!(w.nonce, Some(("1234".into(), "334385199974967042".into())));
        assert_eq!(
            w.guilds,
            vec![("290926798999357250".into(), "290926798626357999".into())]
        );
        // Someone else's nonce is nobody's business.
        let w = writes_for("discord", BOT, "MESSAGE_CREATE", &message_sample());
        assert_eq!(w.nonce, None);
        // An integer nonce is not ours either.
        own["nonce"] = 1234.into();
        assert_eq!(
            writes_for("discord", BOT, "MESSAGE_CREATE", &own).nonce,
            None
        );
    }

    #[test]
    fn reactions_unicode_and_custom() {
        let d = json!({
            "user_id": "53908099506183680",
            "channel_id": "290926798999357250",
            "message_id": "334385199974967042",
            "guild_id": "290926798626357999",
            "member": {"user": {"id": "53908099506183680", "username": "Mason", "global_name": null}, "roles": []},
            "emoji": {"id": null, "name": "🔥"},
            "message_author_id": BOT,
            "burst": false,
            "type": 0
        });
        let ev = to_inbound("discord", BOT, "MESSAGE_REACTION_ADD", &d).unwrap();
        assert_eq!(ev.kind, "reaction");
        assert_eq!(ev.channel_id, "290926798999357250");
        assert_eq!(ev.user_id, "53908099506183680");
        assert_eq!(ev.user_name, "Mason");
        assert_eq!(ev.message_id.as_deref(), Some("334385199974967042"));
        assert_eq!(ev.emoji.as_deref(), Some("🔥"));
        assert_eq!(ev.extra["guild_id"], "290926798626357999");
        assert!(ev.validate().is_ok());

        let mut custom = d.clone();
        custom["emoji"] = json!({"id": "41771983429993937", "name": "LUL", "animated": false});
        let ev = to_inbound("discord", BOT, "MESSAGE_REACTION_ADD", &custom).unwrap();
        assert_eq!(ev.emoji.as_deref(), Some("LUL:41771983429993937"));

        let mut own = d;
        own["user_id"] = BOT.into();
        assert_eq!(
            to_inbound("discord", BOT, "MESSAGE_REACTION_ADD", &own),
            None
        );
    }

    #[test]
    fn component_interactions_become_buttons() {
        let d = json!({
            "id": "846462639134605312",
            "application_id": "845027738276462632",
            "type": 3,
            "data": {"custom_id": "vote:yes", "component_type": 2},
            "guild_id": "290926798626357999",
            "channel_id": "345626669114982999",
            "member": {"user": {"id": "53908232506183680", "username": "Mason", "global_name": "Mase"}, "roles": []},
            "token": "A_UNIQUE_TOKEN",
            "version": 1,
            "message": {"id": "846462626593357834", "channel_id": "345626669114982999", "content": "Vote?"}
        });
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &d).unwrap();
        assert_eq!(ev.kind, "button");
        assert_eq!(ev.channel_id, "345626669114982999");
        assert_eq!(ev.user_id, "53908232506183680");
        assert_eq!(ev.user_name, "Mase");
        assert_eq!(ev.message_id.as_deref(), Some("846462626593357834"));
        assert_eq!(ev.custom_id.as_deref(), Some("vote:yes"));
        assert_eq!(ev.extra["guild_id"], "290926798626357999");
        assert_eq!(ev.extra["interaction_id"], "846462639134605312");
        assert_eq!(ev.extra["interaction_token"], "A_UNIQUE_TOKEN");
        assert!(ev.validate().is_ok());
        let w = writes_for("discord", BOT, "INTERACTION_CREATE", &d);
        assert_eq!(
            w.ack,
            Some(("846462639134605312".into(), "A_UNIQUE_TOKEN".into(), 3))
        );

        // In a DM the user is `user`, not `member.user`.
        let mut dm = d.clone();
        let o = dm.as_object_mut().unwrap();
        o.remove("member");
        o.remove("guild_id");
        o.insert("user".into(), json!({"id": "7", "username": "ada"}));
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &dm).unwrap();
        assert_eq!((ev.user_id.as_str(), ev.user_name.as_str()), ("7", "ada"));

        // A select menu, a slash command, an autocomplete, a modal submit:
        // every type is published, and deferred unless a worker answers.
        let mut sel = d.clone();
        sel["data"] = json!({"custom_id": "pick", "component_type": 3, "values": ["a", "b"]});
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &sel).unwrap();
        assert_eq!(
            (ev.kind.as_str(), ev.extra["values"].clone()),
            ("select", json!(["a", "b"]))
        );
        let mut cmd = d.clone();
        cmd["type"] = 2.into();
        cmd["data"] = json!({"id": "1", "name": "ask", "type": 1,
            "options": [{"name": "question", "type": 3, "value": "why?"}]});
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &cmd).unwrap();
        assert_eq!(ev.kind, "command");
        assert_eq!(ev.extra["command_name"], "ask");
        assert_eq!(ev.extra["options"][0]["value"], "why?");
        assert_eq!(ev.extra["interaction_type"], 2);
        assert!(ev.validate().is_ok());
        assert_eq!(
            writes_for("discord", BOT, "INTERACTION_CREATE", &cmd).ack,
            Some(("846462639134605312".into(), "A_UNIQUE_TOKEN".into(), 2))
        );
        let mut auto = cmd.clone();
        auto["type"] = 4.into();
        auto["data"]["options"][0]["focused"] = true.into();
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &auto).unwrap();
        assert_eq!(
            (ev.kind.as_str(), ev.extra["focused"].clone()),
            ("autocomplete", json!("question"))
        );
        let mut modal = d;
        modal["type"] = 5.into();
        modal["data"] = json!({"custom_id": "fb", "components": [{"type": 1, "components": [
            {"type": 4, "custom_id": "what", "value": "it broke"}]}]});
        let ev = to_inbound("discord", BOT, "INTERACTION_CREATE", &modal).unwrap();
        assert_eq!(ev.kind, "modal_submit");
        assert_eq!(ev.custom_id.as_deref(), Some("fb"));
        assert_eq!(ev.extra["fields"], json!({"what": "it broke"}));
        assert!(ev.validate().is_ok());
        let mut ping = auto;
        ping["type"] = 1.into();
        assert_eq!(
            to_inbound("discord", BOT, "INTERACTION_CREATE", &ping),
            None
        );
    }

    #[test]
    fn guilds_map_from_guild_create_and_channel_events() {
        let d = json!({
            "id": "G", "name": "g", "unavailable": false,
            "channels": [{"id": "C1", "type": 0}, {"id": "C2", "type": 2}],
            "threads": [{"id": "T1", "parent_id": "C1", "type": 11}]
        });
        let w = writes_for("discord", BOT, "GUILD_CREATE", &d);
        assert_eq!(
            w.guilds,
            vec![
                ("C1".into(), "G".into()),
                ("C2".into(), "G".into()),
                ("T1".into(), "G".into())
            ]
        );
        let w = writes_for(
            "discord",
            BOT,
            "CHANNEL_CREATE",
            &json!({"id": "C3", "guild_id": "G", "type": 0}),
        );
        assert_eq!(w.guilds, vec![("C3".into(), "G".into())]);
        let w = writes_for(
            "discord",
            BOT,
            "CHANNEL_CREATE",
            &json!({"id": "D1", "type": 1}),
        );
        assert!(w.is_empty());
        assert!(
            writes_for("discord", BOT, "TYPING_START", &json!({"channel_id": "C1"})).is_empty()
        );
    }
}
