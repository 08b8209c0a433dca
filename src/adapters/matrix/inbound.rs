//! What one timeline event becomes on the inbound stream (`sg:{P}:inbound`):
//!
//! * `m.room.message` → `message` (`text`, `message_id`, `reply_to`; in a
//!   thread `thread_id`; `formatted_body` when there is one; for `m.image`,
//!   `m.file`, `m.video` and `m.audio` the media as `media_url`, an
//!   authenticated-media URL `…/_matrix/client/v1/media/download/{server}/{id}`
//!   fetched with the bot's token, with `filename`, `mimetype` and `size`),
//!   or `button` when it replies to the room's last buttons message with a
//!   number or a label;
//! * an `m.replace` of a message → `edit` (`message_id` = the edited event,
//!   `text` = the new text);
//! * `m.reaction` → `reaction` (`emoji`, `message_id`), or `button` for a
//!   keycap digit on the last buttons message;
//! * `m.room.redaction` → `delete` (`message_id` = the redacted event, `reason`);
//! * `m.room.encrypted` → with the `e2ee` feature, what the decrypted event
//!   becomes, marked `extra.encrypted: true`; an event that cannot be
//!   decrypted (or any, in a build without the feature) → `encrypted`
//!   (`message_id`, `algorithm`, and `reason` when decryption failed;
//!   `awaiting_key` when its room key was missing: the syncer publishes it
//!   again, decrypted and marked `late`, when the key arrives).
//!
//! The bot's own events and state events become nothing. Every event carries
//! the Matrix `event_id` (in `message_id` or `extra.event_id`).

use serde_json::{Map, Value};

use super::{
    ButtonsMessage, MatrixAdapter, localpart, number_of, reply_target, strip_reply_fallback,
};
use crate::inbound::InboundEvent;

/// The event types the sync (and a gap's backfill) asks for.
pub const TIMELINE_TYPES: &[&str] = &[
    "m.room.message",
    "m.reaction",
    "m.room.redaction",
    "m.room.encrypted",
];

impl MatrixAdapter {
    pub(super) fn event(&self, kind: &str, room: &str, sender: &str, ts_ms: u64) -> InboundEvent {
        InboundEvent {
            kind: kind.into(),
            platform: self.platform.clone(),
            channel_id: room.into(),
            user_id: sender.into(),
            user_name: localpart(sender).into(),
            text: None,
            message_id: None,
            reply_to: None,
            emoji: None,
            custom_id: None,
            ts_ms,
            extra: Map::new(),
        }
    }

    /// An `mxc://server/id` URI as an authenticated-media download URL.
    pub(super) fn media_url(&self, mxc: &str) -> Option<String> {
        let rest = mxc.strip_prefix("mxc://")?;
        let (server, id) = rest.split_once('/')?;
        if server.is_empty() || id.is_empty() || id.contains('/') {
            return None;
        }
        Some(format!(
            "{}/_matrix/client/v1/media/download/{}/{}",
            self.base,
            super::seg(server),
            super::seg(id)
        ))
    }

    /// An encrypted timeline event `ev` as an inbound event, given what
    /// decrypting it gave (see [`super::crypto::Crypto::decrypt`]).
    #[cfg(feature = "e2ee")]
    pub(super) async fn decrypted_event(
        &self,
        room: &str,
        ev: &Value,
        decrypted: &Result<Value, super::crypto::Undecrypted>,
    ) -> Option<InboundEvent> {
        match decrypted {
            Ok(plain) => {
                let mut e = self.timeline_event(room, plain).await?;
                e.extra.insert("encrypted".into(), Value::Bool(true));
                Some(e)
            }
            Err(why) => {
                let mut e = self.timeline_event(room, ev).await?;
                e.extra
                    .insert("reason".into(), Value::from(why.reason.as_str()));
                if why.missing_key {
                    e.extra.insert("awaiting_key".into(), Value::Bool(true));
                }
                Some(e)
            }
        }
    }

    /// One timeline event as an inbound event, or `None` for what is not one.
    pub(super) async fn timeline_event(&self, room: &str, ev: &Value) -> Option<InboundEvent> {
        let sender = ev.get("sender")?.as_str()?;
        if sender == self.user_id || ev.get("state_key").is_some() {
            return None;
        }
        let event_id = ev.get("event_id")?.as_str()?;
        let content = ev.get("content")?.as_object()?;
        let ts = ev
            .get("origin_server_ts")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let relates = content.get("m.relates_to");
        let rel_type = relates
            .and_then(|r| r.get("rel_type"))
            .and_then(Value::as_str);
        match ev.get("type")?.as_str()? {
            "m.room.message" if rel_type == Some("m.replace") => {
                let target = relates?.get("event_id")?.as_str()?;
                let new = content.get("m.new_content").and_then(Value::as_object);
                let text = new
                    .and_then(|n| n.get("body"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| {
                        content
                            .get("body")
                            .and_then(Value::as_str)
                            .map(|b| b.strip_prefix("* ").unwrap_or(b).to_owned())
                    })?;
                let mut e = self.event("edit", room, sender, ts);
                e.message_id = Some(target.to_owned());
                e.text = Some(text);
                e.extra.insert("event_id".into(), Value::from(event_id));
                if let Some(h) = new
                    .and_then(|n| n.get("formatted_body"))
                    .and_then(Value::as_str)
                {
                    e.extra.insert("formatted_body".into(), Value::from(h));
                }
                Some(e)
            }
            "m.room.message" => {
                let body = content.get("body")?.as_str()?;
                let thread = (rel_type == Some("m.thread"))
                    .then(|| relates?.get("event_id")?.as_str())
                    .flatten();
                let falling_back = relates
                    .and_then(|r| r.get("is_falling_back"))
                    .and_then(Value::as_bool)
                    == Some(true);
                // A threaded message's reply to the thread is a fallback, not a reply.
                let reply_to =
                    reply_target(content).filter(|_| !(thread.is_some() && falling_back));
                let text = strip_reply_fallback(body, reply_to.is_some());
                let picked = match reply_to.as_deref() {
                    Some(parent) => self
                        .buttons_of(room)
                        .await
                        .and_then(|m| pick(&m, parent, text.trim(), true)),
                    None => None,
                };
                let mut e = match picked {
                    Some(custom_id) => {
                        let mut e = self.event("button", room, sender, ts);
                        e.custom_id = Some(custom_id);
                        e.message_id = reply_to.clone();
                        e.extra.insert("event_id".into(), Value::from(event_id));
                        e
                    }
                    None => {
                        let mut e = self.event("message", room, sender, ts);
                        e.message_id = Some(event_id.to_owned());
                        e.reply_to = reply_to;
                        e
                    }
                };
                e.text = Some(text);
                if let Some(root) = thread {
                    e.extra.insert("thread_id".into(), Value::from(root));
                }
                let msgtype = content.get("msgtype").and_then(Value::as_str);
                if let Some(t) = msgtype {
                    e.extra.insert("msgtype".into(), Value::from(t));
                }
                if content.get("format").and_then(Value::as_str) == Some("org.matrix.custom.html")
                    && let Some(h) = content.get("formatted_body").and_then(Value::as_str)
                {
                    e.extra.insert("formatted_body".into(), Value::from(h));
                }
                if matches!(msgtype, Some("m.image" | "m.file" | "m.video" | "m.audio"))
                    && let Some(url) = content
                        .get("url")
                        .and_then(Value::as_str)
                        .and_then(|u| self.media_url(u))
                {
                    e.extra.insert("media_url".into(), Value::from(url));
                    let filename = content
                        .get("filename")
                        .and_then(Value::as_str)
                        .unwrap_or(body);
                    e.extra.insert("filename".into(), Value::from(filename));
                    if let Some(info) = content.get("info").and_then(Value::as_object) {
                        for k in ["mimetype", "size"] {
                            if let Some(v) = info.get(k) {
                                e.extra.insert(k.into(), v.clone());
                            }
                        }
                    }
                }
                Some(e)
            }
            "m.reaction" => {
                let rel = relates?;
                if rel_type != Some("m.annotation") {
                    return None;
                }
                let target = rel.get("event_id")?.as_str()?;
                let key = rel.get("key")?.as_str()?;
                let picked = self
                    .buttons_of(room)
                    .await
                    .and_then(|m| pick(&m, target, key, false));
                let mut e = match picked {
                    Some(custom_id) => {
                        let mut e = self.event("button", room, sender, ts);
                        e.custom_id = Some(custom_id);
                        e.text = Some(key.to_owned());
                        e
                    }
                    None => {
                        let mut e = self.event("reaction", room, sender, ts);
                        e.emoji = Some(key.to_owned());
                        e
                    }
                };
                e.message_id = Some(target.to_owned());
                e.extra.insert("event_id".into(), Value::from(event_id));
                Some(e)
            }
            "m.room.redaction" => {
                // Room v11 moved `redacts` into the content.
                let target = ev
                    .get("redacts")
                    .and_then(Value::as_str)
                    .or_else(|| content.get("redacts").and_then(Value::as_str))?;
                let mut e = self.event("delete", room, sender, ts);
                e.message_id = Some(target.to_owned());
                e.extra.insert("event_id".into(), Value::from(event_id));
                if let Some(r) = content.get("reason").and_then(Value::as_str) {
                    e.extra.insert("reason".into(), Value::from(r));
                }
                Some(e)
            }
            "m.room.encrypted" => {
                let mut e = self.event("encrypted", room, sender, ts);
                e.message_id = Some(event_id.to_owned());
                if let Some(a) = content.get("algorithm").and_then(Value::as_str) {
                    e.extra.insert("algorithm".into(), Value::from(a));
                }
                Some(e)
            }
            _ => None,
        }
    }
}

/// The `custom_id` a reply's text (a number or a label) or a reaction's key
/// (a keycap digit) picks on the room's last buttons message `msg`, if
/// `parent` is that message.
pub(super) fn pick(
    msg: &ButtonsMessage,
    parent: &str,
    choice: &str,
    by_label: bool,
) -> Option<String> {
    if msg.event_id != parent {
        return None;
    }
    let index = number_of(choice)
        .filter(|n| (1..=msg.buttons.len()).contains(n))
        .map(|n| n - 1)
        .or_else(|| {
            by_label
                .then(|| {
                    msg.buttons
                        .iter()
                        .position(|b| b.label.trim().eq_ignore_ascii_case(choice))
                })
                .flatten()
        })?;
    msg.buttons[index].custom_id.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::matrix::Choice;
    use crate::adapters::matrix::MatrixSettings;
    use serde_json::json;
    use std::time::Duration;

    fn adapter() -> MatrixAdapter {
        MatrixAdapter::new(
            "mx",
            MatrixSettings {
                homeserver: "http://h.example:8008".into(),
                access_token: "t".into(),
                user_id: "@bot:h".into(),
                auto_join: true,
                sync_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(1),
            },
        )
        .unwrap()
    }

    fn button(label: &str, id: &str) -> Choice {
        Choice {
            label: label.into(),
            custom_id: Some(id.into()),
        }
    }

    #[test]
    fn picks_map_back_to_custom_ids() {
        let msg = ButtonsMessage {
            event_id: "$b".into(),
            buttons: vec![button("Yes", "yes"), button("No", "no")],
        };
        assert_eq!(pick(&msg, "$b", "2", true).as_deref(), Some("no"));
        assert_eq!(pick(&msg, "$b", "yes", true).as_deref(), Some("yes"));
        assert_eq!(pick(&msg, "$b", "yes", false), None);
        assert_eq!(pick(&msg, "$b", "3", true), None);
        assert_eq!(pick(&msg, "$other", "1", true), None);
    }

    #[tokio::test]
    async fn edits_redactions_threads_media_and_encrypted() {
        let a = adapter();
        let ev = |t: &str, content: Value| {
            json!({"type": t, "sender": "@u:h", "event_id": "$e", "origin_server_ts": 5,
                   "content": content})
        };
        let e = a
            .timeline_event(
                "!r",
                &ev(
                    "m.room.message",
                    json!({"msgtype": "m.text", "body": "* fixed",
                       "m.new_content": {"msgtype": "m.text", "body": "fixed"},
                       "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"}}),
                ),
            )
            .await
            .unwrap();
        assert_eq!(
            (e.kind.as_str(), e.message_id.as_deref(), e.text.as_deref()),
            ("edit", Some("$orig"), Some("fixed"))
        );
        let mut red = ev("m.room.redaction", json!({"reason": "oops"}));
        red["redacts"] = json!("$gone");
        let e = a.timeline_event("!r", &red).await.unwrap();
        assert_eq!(
            (e.kind.as_str(), e.message_id.as_deref()),
            ("delete", Some("$gone"))
        );
        assert_eq!(e.extra["reason"], "oops");
        let e = a
            .timeline_event(
                "!r",
                &ev(
                    "m.room.message",
                    json!({"msgtype": "m.text", "body": "in thread",
                       "m.relates_to": {"rel_type": "m.thread", "event_id": "$root",
                                        "is_falling_back": true,
                                        "m.in_reply_to": {"event_id": "$root"}}}),
                ),
            )
            .await
            .unwrap();
        assert_eq!(e.extra["thread_id"], "$root");
        assert_eq!(e.reply_to, None);
        let e = a
            .timeline_event(
                "!r",
                &ev(
                    "m.room.message",
                    json!({"msgtype": "m.image", "body": "cat.png", "url": "mxc://h/abc",
                       "info": {"mimetype": "image/png", "size": 12}}),
                ),
            )
            .await
            .unwrap();
        assert_eq!(
            e.extra["media_url"],
            "http://h.example:8008/_matrix/client/v1/media/download/h/abc"
        );
        assert_eq!(e.extra["mimetype"], "image/png");
        assert_eq!(e.extra["filename"], "cat.png");
        let e = a
            .timeline_event(
                "!r",
                &ev(
                    "m.room.encrypted",
                    json!({"algorithm": "m.megolm.v1.aes-sha2"}),
                ),
            )
            .await
            .unwrap();
        assert_eq!(e.kind, "encrypted");
        let mut own = ev("m.room.message", json!({"msgtype": "m.text", "body": "x"}));
        own["sender"] = json!("@bot:h");
        assert!(a.timeline_event("!r", &own).await.is_none());
        assert_eq!(a.media_url("mxc://h/a/b"), None);
        assert_eq!(a.media_url("https://x/y"), None);
    }
}
