//! Interactions: answering slash commands, button presses, select menus,
//! modal submits and autocompletes (`interaction_response` envelopes).
//!
//! Discord takes one first answer per interaction (a callback,
//! `POST /interactions/{id}/{token}/callback`) within 3 s, and later ones
//! through the interaction's webhook (`/webhooks/{application}/{token}`) for
//! 15 minutes. The gateway session publishes every `INTERACTION_CREATE`
//! inbound and, when no worker has answered within `interaction_defer_ms`
//! (2 s by default), acknowledges it itself with a `defer`.
//!
//! Who answered first is settled in Redis, not by racing Discord: the hash
//! `{base}interaction:<id>` (15 minutes) holds the interaction's `type` (set
//! by the session) and `answered` (`HSETNX`: `auto`, or `worker:<key>` with
//! the envelope's idempotency key). A worker's first answer that finds the
//! interaction already deferred automatically is sent as what still works:
//! `message` → `edit_original` of a deferred command (the "thinking…"
//! placeholder becomes the answer) or a `followup` of a deferred component;
//! `update` → `edit_original`; `defer` → done. A `modal` or `autocomplete`
//! cannot come late (Discord takes them only first): dead-lettered, naming
//! the deadline. Discord's 40060 "already acknowledged" is handled the same
//! way; a retried callback of our own that Discord had taken is a success.

use redis::AsyncCommands;
use reqwest::Method;
use serde_json::{Map, Value, json};
use tracing::{debug, info};

use super::{Body, DiscordAdapter, Route, components, render, seg};
use crate::adapters::{AdapterError, Delivered, Delivery};
use crate::envelope::{InteractionKind, InteractionResponse};

/// How long an interaction's token (and its claim) lives.
pub const TOKEN_LIFE_MS: u64 = 15 * 60 * 1000;

/// Interaction types (Discord's numbers).
pub const APPLICATION_COMMAND: u64 = 2;
pub const MESSAGE_COMPONENT: u64 = 3;
pub const AUTOCOMPLETE: u64 = 4;
pub const MODAL_SUBMIT: u64 = 5;

/// Discord's "Interaction has already been acknowledged".
const ALREADY_ACKNOWLEDGED: &str = "code 40060";

pub use crate::bus::discord::{application_key, claim_key};

/// The callback type of an automatic (or a worker's) `defer` for an
/// interaction of `ty`: a deferred update (6) for a component, a deferred
/// message (5, "thinking…") otherwise; an autocomplete gets empty choices.
pub fn defer_callback(ty: Option<u64>) -> Value {
    match ty {
        Some(MESSAGE_COMPONENT) => json!({"type": 6}),
        Some(AUTOCOMPLETE) => json!({"type": 8, "data": {"choices": []}}),
        _ => json!({"type": 5}),
    }
}

/// A modal's callback data: `{custom_id, title, components}`, where
/// `components` may be given whole (Discord's action rows of text inputs) or
/// as `inputs`: `[{custom_id, label, style?: short|paragraph, required?,
/// placeholder?, value?, min_length?, max_length?}]`, one row each.
/// Checked: title 1–45, at most 5 inputs, labels 1–45, custom ids 1–100.
pub fn modal_data(m: &Value) -> Result<Value, AdapterError> {
    let bad = |why: String| AdapterError::permanent(format!("field `modal` {why}"));
    let text = |k: &str, max: usize| -> Result<String, AdapterError> {
        match m.get(k).and_then(Value::as_str) {
            Some(s) if !s.is_empty() && s.chars().count() <= max => Ok(s.to_owned()),
            _ => Err(bad(format!("needs `{k}` (1 to {max} characters)"))),
        }
    };
    let custom_id = text("custom_id", 100)?;
    let title = text("title", 45)?;
    let rows = if let Some(c) = m.get("components") {
        c.as_array()
            .cloned()
            .ok_or_else(|| bad("`components` must be a list of action rows".into()))?
    } else {
        let inputs = m
            .get("inputs")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("needs `inputs` (or `components`)".into()))?;
        inputs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let field = |k: &str, max: usize| match x.get(k).and_then(Value::as_str) {
                    Some(s) if !s.is_empty() && s.chars().count() <= max => Ok(s.to_owned()),
                    _ => Err(bad(format!(
                        "inputs[{i}] needs `{k}` (1 to {max} characters)"
                    ))),
                };
                let style = match x.get("style").and_then(Value::as_str) {
                    None | Some("short") => 1,
                    Some("paragraph") => 2,
                    Some(o) => {
                        return Err(bad(format!(
                            "inputs[{i}].style `{o}` is short or paragraph"
                        )));
                    }
                };
                let mut input = json!({"type": 4, "custom_id": field("custom_id", 100)?,
                    "label": field("label", 45)?, "style": style});
                for k in [
                    "required",
                    "placeholder",
                    "value",
                    "min_length",
                    "max_length",
                ] {
                    if let Some(v) = x.get(k) {
                        input[k] = v.clone();
                    }
                }
                Ok(json!({"type": 1, "components": [input]}))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    if rows.is_empty() || rows.len() > 5 {
        return Err(bad(format!(
            "has {} inputs; Discord takes 1 to 5",
            rows.len()
        )));
    }
    Ok(json!({"custom_id": custom_id, "title": title, "components": rows}))
}

impl DiscordAdapter {
    /// Deliver an `interaction_response`; see the module docs.
    pub(super) async fn respond(
        &self,
        d: &Delivery<'_>,
        r: &InteractionResponse,
    ) -> Result<Delivered, AdapterError> {
        let raw = &d.envelope.raw;
        let mut kind = r.kind;
        let key = claim_key(&self.state_base, &r.interaction_id);
        let mut conn = self.conn.clone();
        let redis_err = |e: redis::RedisError| {
            AdapterError::transient(format!("claiming the interaction (redis) failed: {e}"))
        };
        let (ty, answered): (Option<u64>, Option<String>) = {
            let v: (Option<u64>, Option<String>) = redis::cmd("HMGET")
                .arg(&key)
                .arg("type")
                .arg("answered")
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            v
        };
        if kind.is_initial() {
            let me = format!("worker:{}", d.idempotency_key);
            let mine = match &answered {
                Some(a) => *a == me,
                None => {
                    let won: bool = conn
                        .hset_nx(&key, "answered", &me)
                        .await
                        .map_err(redis_err)?;
                    let _: () = conn
                        .pexpire(&key, TOKEN_LIFE_MS as i64)
                        .await
                        .map_err(redis_err)?;
                    won
                }
            };
            if !mine {
                match late(kind, ty)? {
                    Some(k) => {
                        info!(platform = %self.platform, interaction_id = %r.interaction_id, kind = kind.as_str(), sent_as = k.as_str(),
                            "the interaction was deferred automatically before the worker answered; sending the answer as a follow-up");
                        kind = k;
                    }
                    None => return Ok(Delivered::default()),
                }
            }
        }
        if kind.is_initial() {
            let body = self.callback_body(kind, ty, r, raw)?;
            let route = Route::new(
                Method::POST,
                format!(
                    "/interactions/{}/{}/callback",
                    seg(&r.interaction_id),
                    seg(&r.interaction_token)
                ),
                "/interactions/:i/:t/callback",
                &r.interaction_id,
            )
            .token_in_path();
            match self.call_api(&route, &[], Body::Json(body)).await {
                Ok(_) => return Ok(Delivered::default()),
                Err(e) if e.message.contains(ALREADY_ACKNOWLEDGED) => {
                    if d.resend || d.attempt > 1 {
                        // Our own earlier try was taken.
                        return Ok(Delivered::default());
                    }
                    match late(kind, ty)? {
                        Some(k) => kind = k,
                        None => return Ok(Delivered::default()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let app = self.application_id().await?;
        let data = self.message_data(r, raw)?;
        let webhook = format!("/webhooks/{}/{}", seg(&app), seg(&r.interaction_token));
        match kind {
            InteractionKind::EditOriginal => {
                let route = Route::new(
                    Method::PATCH,
                    format!("{webhook}/messages/@original"),
                    "/webhooks/:a/:t/messages/@original",
                    &app,
                )
                .token_in_path();
                let v = self.call_api(&route, &[], Body::Json(data)).await?;
                Ok(Delivered {
                    message_id: v.get("id").and_then(Value::as_str).map(str::to_owned),
                })
            }
            _ => {
                let route =
                    Route::new(Method::POST, webhook, "/webhooks/:a/:t", &app).token_in_path();
                let v = self
                    .call_api(&route, &[("wait", "true")], Body::Json(data))
                    .await?;
                Ok(Delivered {
                    message_id: v.get("id").and_then(Value::as_str).map(str::to_owned),
                })
            }
        }
    }

    /// A message's data for an interaction: content, components, embeds,
    /// mentions, and the ephemeral flag (64).
    fn message_data(
        &self,
        r: &InteractionResponse,
        raw: &Map<String, Value>,
    ) -> Result<Value, AdapterError> {
        let mut data = json!({
            "allowed_mentions": render::allowed_mentions(raw, &self.allowed_mentions)?,
        });
        if let Some(t) = &r.text {
            let n = t.chars().count();
            if n > super::MAX_CONTENT {
                return Err(AdapterError::permanent(format!(
                    "an interaction answer's text is {n} characters, over Discord's {}",
                    super::MAX_CONTENT
                )));
            }
            data["content"] = Value::from(t.as_str());
        }
        if !r.buttons.is_empty() {
            data["components"] = components(&r.buttons)?;
        } else if let Some(c) = raw.get("components") {
            data["components"] = c.clone();
        }
        if let Some(e) = render::embeds(raw)? {
            data["embeds"] = e;
        }
        if r.ephemeral {
            data["flags"] = json!(64);
        }
        Ok(data)
    }

    /// The callback body of a first answer.
    fn callback_body(
        &self,
        kind: InteractionKind,
        ty: Option<u64>,
        r: &InteractionResponse,
        raw: &Map<String, Value>,
    ) -> Result<Value, AdapterError> {
        Ok(match kind {
            InteractionKind::Message => json!({"type": 4, "data": self.message_data(r, raw)?}),
            InteractionKind::Update => json!({"type": 7, "data": self.message_data(r, raw)?}),
            InteractionKind::Defer => {
                let mut b = defer_callback(ty);
                if r.ephemeral && b["type"] == 5 {
                    b["data"] = json!({"flags": 64});
                }
                b
            }
            InteractionKind::Modal => {
                let m = r.modal.as_ref().ok_or_else(|| {
                    AdapterError::permanent("a `modal` answer needs the field `modal`")
                })?;
                json!({"type": 9, "data": modal_data(m)?})
            }
            InteractionKind::Autocomplete => {
                let choices = raw.get("choices").cloned().unwrap_or(json!([]));
                if choices.as_array().is_none_or(|c| c.len() > 25) {
                    return Err(AdapterError::permanent(
                        "field `choices` must be a list of at most 25 {name, value}",
                    ));
                }
                json!({"type": 8, "data": {"choices": choices}})
            }
            InteractionKind::Followup | InteractionKind::EditOriginal => {
                unreachable!("not a first answer")
            }
        })
    }

    /// The bot's application id: configured, else what the gateway session
    /// recorded from READY, else `GET /applications/@me`; remembered.
    async fn application_id(&self) -> Result<String, AdapterError> {
        if let Some(a) = self.application.lock().expect("app id").clone() {
            return Ok(a);
        }
        let mut conn = self.conn.clone();
        let stored: Option<String> = conn
            .get(application_key(&self.state_base))
            .await
            .unwrap_or(None);
        let id = match stored {
            Some(a) => a,
            None => {
                let route = Route::new(
                    Method::GET,
                    "/applications/@me".into(),
                    "/applications/@me",
                    "@me",
                );
                let v = self.call_api(&route, &[], Body::None).await?;
                v.get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        AdapterError::transient("GET /applications/@me answered without id")
                    })?
                    .to_owned()
            }
        };
        debug!(platform = %self.platform, application_id = %id, "discord application id");
        *self.application.lock().expect("app id") = Some(id.clone());
        Ok(id)
    }
}

/// What a worker's first answer becomes once the interaction was deferred
/// automatically (`None`: nothing left to send).
fn late(kind: InteractionKind, ty: Option<u64>) -> Result<Option<InteractionKind>, AdapterError> {
    Ok(match kind {
        InteractionKind::Message if ty == Some(MESSAGE_COMPONENT) => {
            Some(InteractionKind::Followup)
        }
        InteractionKind::Message | InteractionKind::Update => Some(InteractionKind::EditOriginal),
        InteractionKind::Defer => None,
        InteractionKind::Modal | InteractionKind::Autocomplete => {
            return Err(AdapterError::permanent(format!(
                "too late for a `{}` answer: the interaction was already acknowledged (deferred automatically after `interaction_defer_ms`); Discord takes a {} only as the first answer, within 3 s",
                kind.as_str(),
                kind.as_str()
            )));
        }
        k => Some(k),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_answers_become_follow_ups() {
        use InteractionKind::*;
        assert_eq!(
            late(Message, Some(APPLICATION_COMMAND)).unwrap(),
            Some(EditOriginal)
        );
        assert_eq!(
            late(Message, Some(MESSAGE_COMPONENT)).unwrap(),
            Some(Followup)
        );
        assert_eq!(
            late(Update, Some(MESSAGE_COMPONENT)).unwrap(),
            Some(EditOriginal)
        );
        assert_eq!(late(Defer, None).unwrap(), None);
        assert!(late(Modal, None).unwrap_err().message.contains("too late"));
        assert_eq!(defer_callback(Some(MESSAGE_COMPONENT)), json!({"type": 6}));
        assert_eq!(
            defer_callback(Some(APPLICATION_COMMAND)),
            json!({"type": 5})
        );
    }

    #[test]
    fn modals_are_built_and_checked() {
        let m = modal_data(&json!({"custom_id": "fb", "title": "Feedback",
            "inputs": [{"custom_id": "what", "label": "What happened?", "style": "paragraph"}]}))
        .unwrap();
        assert_eq!(
            m["components"][0]["components"][0],
            json!({"type": 4, "custom_id": "what", "label": "What happened?", "style": 2})
        );
        for (bad, needle) in [
            (json!({"title": "t", "inputs": [{}]}), "custom_id"),
            (
                json!({"custom_id": "x", "title": "t".repeat(46), "inputs": []}),
                "title",
            ),
            (
                json!({"custom_id": "x", "title": "t", "inputs": []}),
                "1 to 5",
            ),
            (
                json!({"custom_id": "x", "title": "t", "inputs": [{"custom_id": "a", "label": "b", "style": "long"}]}),
                "style",
            ),
        ] {
            let e = modal_data(&bad).unwrap_err();
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }
}

/// The inbound event of an `INTERACTION_CREATE` (pure; see the README's
/// table): `command` (a slash, user or message command: `command_name`,
/// `options`), `button` or `select` (a component: `custom_id`, `values`),
/// `autocomplete` (`command_name`, `options`, the `focused` option's name)
/// or `modal_submit` (`custom_id`, `fields`: input custom id → value); each
/// with `interaction_id`, `interaction_token`, `interaction_type`,
/// `application_id`, `guild_id`. `None` for a ping or a malformed one.
pub fn interaction_event(platform: &str, d: &Value) -> Option<crate::inbound::InboundEvent> {
    let s = |p: &str| d.pointer(p).and_then(Value::as_str);
    let ty = d.get("type").and_then(Value::as_u64)?;
    let user = d
        .pointer("/member/user")
        .or_else(|| d.get("user"))
        .unwrap_or(&Value::Null);
    let id = s("/id")?;
    let mut extra = Map::new();
    extra.insert("interaction_id".into(), id.into());
    if let Some(t) = s("/token") {
        extra.insert("interaction_token".into(), t.into());
    }
    extra.insert("interaction_type".into(), ty.into());
    for (k, p) in [
        ("application_id", "/application_id"),
        ("guild_id", "/guild_id"),
    ] {
        if let Some(v) = s(p) {
            extra.insert(k.into(), v.into());
        }
    }
    let mut custom_id = None;
    let kind = match ty {
        APPLICATION_COMMAND | AUTOCOMPLETE => {
            extra.insert("command_name".into(), s("/data/name")?.into());
            let options = d.pointer("/data/options").cloned().unwrap_or(json!([]));
            if ty == AUTOCOMPLETE
                && let Some(f) = focused(&options)
            {
                extra.insert("focused".into(), f.into());
            }
            extra.insert("options".into(), options);
            if let Some(t) = d.pointer("/data/target_id") {
                extra.insert("target_id".into(), t.clone());
            }
            if ty == AUTOCOMPLETE {
                "autocomplete"
            } else {
                "command"
            }
        }
        MESSAGE_COMPONENT => {
            custom_id = Some(s("/data/custom_id")?.to_owned());
            if let Some(v) = d.pointer("/data/values") {
                extra.insert("values".into(), v.clone());
            }
            match d.pointer("/data/component_type").and_then(Value::as_u64) {
                Some(2) | None => "button",
                Some(_) => "select",
            }
        }
        MODAL_SUBMIT => {
            custom_id = Some(s("/data/custom_id")?.to_owned());
            let mut fields = Map::new();
            for row in d
                .pointer("/data/components")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for c in row
                    .get("components")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let (Some(k), Some(v)) = (
                        c.get("custom_id").and_then(Value::as_str),
                        c.get("value").and_then(Value::as_str),
                    ) {
                        fields.insert(k.into(), v.into());
                    }
                }
            }
            extra.insert("fields".into(), Value::Object(fields));
            "modal_submit"
        }
        _ => return None,
    };
    let channel = s("/channel_id").or_else(|| s("/channel/id")).unwrap_or("");
    let user_name = ["/global_name", "/username"]
        .iter()
        .find_map(|p| {
            user.pointer(p)
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
        })
        .unwrap_or("")
        .to_owned();
    Some(crate::inbound::InboundEvent {
        kind: kind.into(),
        platform: platform.into(),
        channel_id: channel.into(),
        user_id: user.get("id").and_then(Value::as_str).unwrap_or("").into(),
        user_name,
        text: None,
        message_id: s("/message/id").map(str::to_owned),
        reply_to: None,
        emoji: None,
        custom_id,
        ts_ms: id
            .parse::<u64>()
            .map(|n| (n >> 22) + 1_420_070_400_000)
            .unwrap_or_else(|_| crate::now_ms()),
        extra,
    })
}

/// The name of the focused option of an autocomplete (nested in
/// subcommands).
fn focused(options: &Value) -> Option<String> {
    for o in options.as_array()? {
        if o.get("focused").and_then(Value::as_bool) == Some(true) {
            return o.get("name").and_then(Value::as_str).map(str::to_owned);
        }
        if let Some(f) = o.get("options").and_then(focused) {
            return Some(f);
        }
    }
    None
}

/// The session's side of an interaction: record its type, and defer it when
/// no worker answered in time.
#[derive(Clone)]
pub struct AutoDefer {
    pub http: reqwest::Client,
    pub api_base: String,
    pub conn: crate::bus::Conn,
    /// `sg:{P}:discord:`.
    pub base: String,
    pub platform: String,
    /// `interaction_defer_ms`.
    pub after: std::time::Duration,
}

/// Tries of an automatic defer (transient failures), inside Discord's 3 s.
const DEFER_TRIES: u32 = 3;

impl AutoDefer {
    /// In the background: record the interaction's type, wait `after`, and
    /// unless a worker has claimed it, claim it (`auto`) and defer it,
    /// retrying transient failures.
    pub fn schedule(&self, id: String, token: String, ty: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            let key = claim_key(&me.base, &id);
            let mut conn = me.conn.clone();
            let r: redis::RedisResult<()> = redis::pipe()
                .hset(&key, "type", ty)
                .ignore()
                .pexpire(&key, TOKEN_LIFE_MS as i64)
                .ignore()
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                tracing::warn!(platform = %me.platform, error = %e, "recording an interaction failed");
            }
            tokio::time::sleep(me.after).await;
            let won: redis::RedisResult<bool> = conn.hset_nx(&key, "answered", "auto").await;
            match won {
                Ok(false) => {
                    debug!(platform = %me.platform, interaction_id = %id, "a worker answered the interaction in time");
                    return;
                }
                Ok(true) => {}
                Err(e) => {
                    // Unknown: defer anyway; a worker's answer then meets 40060.
                    tracing::warn!(platform = %me.platform, error = %e, "claiming an interaction failed; deferring it");
                }
            }
            crate::metrics::discord_session_event(&me.platform, "interaction_deferred");
            let url = format!(
                "{}/interactions/{}/{}/callback",
                me.api_base.trim_end_matches('/'),
                seg(&id),
                seg(&token)
            );
            let body = defer_callback(Some(ty));
            for attempt in 1..=DEFER_TRIES {
                match me.http.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        info!(platform = %me.platform, interaction_id = %id, "no worker answered in time: the interaction was deferred");
                        return;
                    }
                    Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                        debug!(platform = %me.platform, status = %r.status(), attempt, "deferring an interaction failed; retrying");
                    }
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        tracing::warn!(platform = %me.platform, interaction_id = %id, %status, answer = %text, "deferring the interaction was refused");
                        return;
                    }
                    Err(e) => {
                        debug!(platform = %me.platform, error = %e.without_url(), attempt, "deferring an interaction failed; retrying");
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                    .await;
            }
            tracing::warn!(platform = %me.platform, interaction_id = %id, "could not defer the interaction; Discord will show \"The application did not respond\"");
        });
    }

    /// Record the application id READY names, and register the configured
    /// commands (`PUT /applications/{app}/commands`, a bulk overwrite, so
    /// registering again is harmless).
    pub async fn ready(&self, token: &str, application_id: &str, commands: &[Value]) {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<()> = conn.set(application_key(&self.base), application_id).await;
        if let Err(e) = r {
            tracing::warn!(platform = %self.platform, error = %e, "recording the application id failed");
        }
        if commands.is_empty() {
            return;
        }
        let url = format!(
            "{}/applications/{}/commands",
            self.api_base.trim_end_matches('/'),
            seg(application_id)
        );
        match self
            .http
            .put(url)
            .header(reqwest::header::AUTHORIZATION, format!("Bot {token}"))
            .json(&Value::Array(commands.to_vec()))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                info!(platform = %self.platform, commands = commands.len(), "discord application commands registered")
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                tracing::error!(platform = %self.platform, %status, answer = %text, "registering the discord application commands failed; fix `commands`");
            }
            Err(e) => {
                tracing::warn!(platform = %self.platform, error = %e.without_url(), "registering the discord application commands failed")
            }
        }
    }
}
