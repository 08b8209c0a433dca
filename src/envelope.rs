//! The wire format (SPEC §1): parsing a stream entry into an [`Envelope`], and a
//! named [`BadInput`] reason for every way an entry can be wrong.
//!
//! Parsing is strict about what Stargazer needs and lenient about what it does
//! not: unknown fields are ignored, a missing or mistyped required field is an
//! error that names the field.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

/// A Redis stream entry id (`<ms>-<n>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub String);

impl StreamId {
    /// The millisecond part of the id: when Redis appended the entry.
    pub fn millis(&self) -> u64 {
        self.0
            .split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A platform channel (room, webhook target, …) as the platform names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelId(pub String);

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One button of a `buttons` envelope (or of a `message` with buttons).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Button {
    pub label: String,
    /// Exactly one of `custom_id` and `url` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
}

/// What the envelope asks the platform to do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Action {
    Message {
        text: String,
        reply_to: Option<String>,
        buttons: Vec<Button>,
    },
    File {
        data: Vec<u8>,
        filename: String,
        mimetype: String,
        text: Option<String>,
    },
    Buttons {
        text: String,
        buttons: Vec<Button>,
    },
    StartTyping,
    StopTyping,
    Reaction {
        message_id: String,
        emoji: String,
    },
    Presence {
        text: Option<String>,
        emoji: Option<String>,
    },
    Rpc {
        method: String,
        args: Value,
        reply_key: String,
        deadline_ms: Option<u64>,
    },
    /// Replace the text (and buttons) of an earlier message.
    Edit {
        target: Target,
        text: String,
        buttons: Vec<Button>,
    },
    /// Delete an earlier message.
    Delete {
        target: Target,
    },
    /// Answer a Discord interaction (a slash command, a button press, a
    /// select menu, a modal submit, an autocomplete).
    InteractionResponse(Box<InteractionResponse>),
}

/// An `interaction_response` envelope (Discord).
#[derive(Debug, Clone, PartialEq)]
pub struct InteractionResponse {
    pub interaction_id: String,
    pub interaction_token: String,
    pub kind: InteractionKind,
    pub text: Option<String>,
    /// Only the user who interacted sees the answer.
    pub ephemeral: bool,
    pub buttons: Vec<Button>,
    /// For `modal`: `{custom_id, title, components | inputs}`, checked by the adapter.
    pub modal: Option<Value>,
}

/// How an interaction is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InteractionKind {
    /// Answer with a message.
    Message,
    /// Acknowledge now, answer later (`followup` / `edit_original`).
    Defer,
    /// Replace the message the component is on.
    Update,
    /// Open a modal (only as the first answer).
    Modal,
    /// Another message, after the first answer (15 minutes at most).
    Followup,
    /// Replace the first answer (the deferred "thinking…" included).
    EditOriginal,
    /// Autocomplete choices (`choices`).
    Autocomplete,
}

impl InteractionKind {
    pub fn parse(s: &str) -> Option<InteractionKind> {
        Some(match s {
            "message" => InteractionKind::Message,
            "defer" => InteractionKind::Defer,
            "update" => InteractionKind::Update,
            "modal" => InteractionKind::Modal,
            "followup" => InteractionKind::Followup,
            "edit_original" => InteractionKind::EditOriginal,
            "autocomplete" => InteractionKind::Autocomplete,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InteractionKind::Message => "message",
            InteractionKind::Defer => "defer",
            InteractionKind::Update => "update",
            InteractionKind::Modal => "modal",
            InteractionKind::Followup => "followup",
            InteractionKind::EditOriginal => "edit_original",
            InteractionKind::Autocomplete => "autocomplete",
        }
    }

    /// Whether this is the interaction's first answer (a callback), which
    /// Discord takes once, within 3 s.
    pub fn is_initial(self) -> bool {
        matches!(
            self,
            InteractionKind::Message
                | InteractionKind::Defer
                | InteractionKind::Update
                | InteractionKind::Modal
                | InteractionKind::Autocomplete
        )
    }
}

/// The message an `edit` or `delete` acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The platform's own message id.
    MessageId(String),
    /// The `message_key` of an earlier envelope of the same channel, resolved
    /// through the message cache to the platform id its send produced.
    Key(String),
}

/// How an action is ordered against the others of its channel (SPEC §3, G3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Sent exactly once, in order.
    Strict,
    /// Only the newest matters: a later one supersedes a queued earlier one.
    LatestWins,
    /// Not part of a channel's sequence at all (RPC).
    Unordered,
}

impl Action {
    /// The envelope `type` this action came from (canonical spelling).
    pub fn type_name(&self) -> &'static str {
        match self {
            Action::Message { .. } => "message",
            Action::File { .. } => "file",
            Action::Buttons { .. } => "buttons",
            Action::StartTyping => "start_typing",
            Action::StopTyping => "stop_typing",
            Action::Reaction { .. } => "reaction",
            Action::Presence { .. } => "presence",
            Action::Rpc { .. } => "rpc_request",
            Action::Edit { .. } => "edit",
            Action::Delete { .. } => "delete",
            Action::InteractionResponse(_) => "interaction_response",
        }
    }

    pub fn ordering(&self) -> Ordering {
        match self {
            Action::StartTyping | Action::StopTyping | Action::Presence { .. } => {
                Ordering::LatestWins
            }
            Action::Rpc { .. } => Ordering::Unordered,
            _ => Ordering::Strict,
        }
    }
}

/// A parsed, validated outbound envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub action: Action,
    /// `None` only for `presence` and channel-less RPCs.
    pub channel_id: Option<ChannelId>,
    pub seq: Option<u64>,
    pub message_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_ms: Option<u64>,
    pub expires_ms: Option<u64>,
    pub trace_id: Option<String>,
    /// The envelope's own JSON object, kept so adapters that forward the whole
    /// envelope (the webhook) can pass its other fields along.
    pub raw: Map<String, Value>,
}

/// Why an entry is bad input (G6). The `kind` goes to the dead-letter stream's
/// `error_kind`, the `detail` (naming the field or problem) to `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct BadInput {
    pub kind: BadInputKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BadInputKind {
    /// The stream entry has no `payload` field.
    MissingPayload,
    /// `payload` is not valid UTF-8 JSON.
    NotJson,
    /// `payload` is JSON but not an object.
    NotObject,
    MissingField,
    /// A field has the wrong JSON type or an impossible value.
    BadField,
    UnknownType,
    BadBase64,
    TooLarge,
    BadSignature,
    /// `message_key` or `reply_key` lies outside the prefix Stargazer may write.
    ForbiddenKey,
}

impl BadInputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BadInputKind::MissingPayload => "missing_payload",
            BadInputKind::NotJson => "not_json",
            BadInputKind::NotObject => "not_object",
            BadInputKind::MissingField => "missing_field",
            BadInputKind::BadField => "bad_field",
            BadInputKind::UnknownType => "unknown_type",
            BadInputKind::BadBase64 => "bad_base64",
            BadInputKind::TooLarge => "too_large",
            BadInputKind::BadSignature => "bad_signature",
            BadInputKind::ForbiddenKey => "forbidden_key",
        }
    }
}

impl fmt::Display for BadInputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn bad(kind: BadInputKind, detail: impl Into<String>) -> BadInput {
    BadInput {
        kind,
        detail: detail.into(),
    }
}

/// The limits and keys a gateway checks entries against.
#[derive(Debug, Clone)]
pub struct ParseRules {
    pub max_payload_bytes: usize,
    /// When set, every entry must carry a valid `sig` (HMAC-SHA256 of the payload).
    pub signing_secret: Option<Vec<u8>>,
    /// `message_key` and `target_key` must start with this (SPEC §2:
    /// `sg:msg:` by default).
    pub cache_prefix: String,
    /// Prefixes of Stargazer's own keys (`sg:{`, `sg:gateway:`): a
    /// `message_key` there is refused whatever the cache prefix says.
    pub own_prefixes: Vec<String>,
    /// `reply_key` must start with this (the platform's RPC reply prefix).
    pub reply_prefix: String,
}

/// What the gateway can learn from an entry even when it is bad: enough to
/// dead-letter it in its channel's order, so its successors are released.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub channel_id: Option<ChannelId>,
    pub seq: Option<u64>,
    pub presence: bool,
}

/// The outcome of parsing one stream entry.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The raw `payload` bytes, kept for the dead-letter stream.
    pub payload: Vec<u8>,
    pub routing: Routing,
    pub result: Result<Envelope, BadInput>,
}

/// `sha256=<hex>` of the HMAC-SHA256 of `payload` under `secret`.
pub fn sign(secret: &[u8], payload: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(payload);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn verify(secret: &[u8], payload: &[u8], sig: &[u8]) -> bool {
    let Some(hex_part) = sig.strip_prefix(b"sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_part) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(payload);
    mac.verify_slice(&expected).is_ok()
}

/// Parse one stream entry's fields.
pub fn parse_entry(fields: &HashMap<String, Vec<u8>>, rules: &ParseRules) -> Parsed {
    let Some(payload) = fields.get("payload") else {
        return Parsed {
            payload: Vec::new(),
            routing: Routing {
                channel_id: None,
                seq: None,
                presence: false,
            },
            result: Err(bad(
                BadInputKind::MissingPayload,
                "stream entry has no `payload` field",
            )),
        };
    };
    let (routing, result) = parse_payload(payload, fields.get("sig").map(Vec::as_slice), rules);
    Parsed {
        payload: payload.clone(),
        routing,
        result,
    }
}

fn parse_payload(
    payload: &[u8],
    sig: Option<&[u8]>,
    rules: &ParseRules,
) -> (Routing, Result<Envelope, BadInput>) {
    let mut routing = Routing {
        channel_id: None,
        seq: None,
        presence: false,
    };
    // G6: with signing configured, nothing is read from the payload (not
    // even its channel or seq) before its signature is proven, so a forged
    // entry can never move a channel's state.
    if let Some(secret) = &rules.signing_secret {
        let reason = match sig {
            None => Some("entry has no `sig` field but signing is required"),
            Some(sig) if !verify(secret, payload, sig) => {
                Some("`sig` does not match the payload's HMAC-SHA256")
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            return (routing, Err(bad(BadInputKind::BadSignature, reason)));
        }
    }
    if payload.len() > rules.max_payload_bytes {
        // Still learn its channel and seq, so it is dead-lettered in its
        // place and its successors are released.
        if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(payload) {
            routing = routing_of(&obj);
        }
        let e = bad(
            BadInputKind::TooLarge,
            format!(
                "payload is {} bytes, the limit (max_payload_bytes) is {}",
                payload.len(),
                rules.max_payload_bytes
            ),
        );
        return (routing, Err(e));
    }
    let value: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            return (
                routing,
                Err(bad(
                    BadInputKind::NotJson,
                    format!("payload is not JSON: {e}"),
                )),
            );
        }
    };
    let Value::Object(obj) = value else {
        return (
            routing,
            Err(bad(
                BadInputKind::NotObject,
                format!("payload is JSON {}, not an object", json_kind(&value)),
            )),
        );
    };
    // Routing first, leniently: a bad entry is still dead-lettered in its place.
    routing = routing_of(&obj);
    let result = envelope_from(obj, rules);
    (routing, result)
}

/// The largest `seq` (and the largest integer a float carries exactly): 2^53.
pub const MAX_SEQ: u64 = 1 << 53;

/// A JSON number as a non-negative integer: an integer, or an integral float
/// (`1.7e12`, as Python producers write them).
fn as_whole(n: &serde_json::Number) -> Option<u64> {
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    let f = n.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f <= MAX_SEQ as f64).then_some(f as u64)
}

fn routing_of(obj: &Map<String, Value>) -> Routing {
    Routing {
        channel_id: channel_of(obj)
            .ok()
            .flatten()
            .or_else(|| interaction_lane(obj)),
        seq: match obj.get("seq") {
            Some(Value::Number(n)) => as_whole(n).filter(|s| (1..=MAX_SEQ).contains(s)),
            _ => None,
        },
        presence: obj.get("type").and_then(Value::as_str) == Some("presence"),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The lane of an `interaction_response` without `channel_id`:
/// `interaction:<interaction_id>`, so the answers to one interaction keep
/// their order and never wait behind a channel's messages.
fn interaction_lane(obj: &Map<String, Value>) -> Option<ChannelId> {
    if obj.get("type").and_then(Value::as_str) != Some("interaction_response") {
        return None;
    }
    match obj.get("interaction_id") {
        Some(Value::String(s)) if !s.is_empty() => Some(ChannelId(format!("interaction:{s}"))),
        Some(Value::Number(n)) => Some(ChannelId(format!("interaction:{n}"))),
        _ => None,
    }
}

/// `channel_id` as a string; platforms with numeric ids may send a number.
fn channel_of(obj: &Map<String, Value>) -> Result<Option<ChannelId>, BadInput> {
    match obj.get("channel_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(bad(
            BadInputKind::BadField,
            "field `channel_id` is an empty string",
        )),
        Some(Value::String(s)) => Ok(Some(ChannelId(s.clone()))),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(Some(ChannelId(n.to_string()))),
        Some(v) => Err(bad(
            BadInputKind::BadField,
            format!(
                "field `channel_id` must be a string, found {}",
                json_kind(v)
            ),
        )),
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn opt_str(&self, name: &str) -> Result<Option<String>, BadInput> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(
                BadInputKind::BadField,
                format!("field `{name}` must be a string, found {}", json_kind(v)),
            )),
        }
    }

    fn req_str(&self, name: &str, ty: &str) -> Result<String, BadInput> {
        self.opt_str(name)?.ok_or_else(|| {
            bad(
                BadInputKind::MissingField,
                format!("a `{ty}` envelope needs the field `{name}`"),
            )
        })
    }

    fn opt_u64(&self, name: &str) -> Result<Option<u64>, BadInput> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if as_whole(n).is_some() => Ok(as_whole(n)),
            Some(v) => Err(bad(
                BadInputKind::BadField,
                format!("field `{name}` must be a non-negative integer, found {v}"),
            )),
        }
    }

    fn buttons(&self, ty: &str, required: bool) -> Result<Vec<Button>, BadInput> {
        let list = match self.0.get("buttons") {
            None | Some(Value::Null) if !required => return Ok(Vec::new()),
            None | Some(Value::Null) => {
                return Err(bad(
                    BadInputKind::MissingField,
                    format!("a `{ty}` envelope needs the field `buttons`"),
                ));
            }
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(bad(
                    BadInputKind::BadField,
                    format!("field `buttons` must be a list, found {}", json_kind(v)),
                ));
            }
        };
        if required && list.is_empty() {
            return Err(bad(BadInputKind::BadField, "field `buttons` is empty"));
        }
        list.iter()
            .enumerate()
            .map(|(i, b)| {
                let Value::Object(o) = b else {
                    return Err(bad(
                        BadInputKind::BadField,
                        format!("buttons[{i}] must be an object, found {}", json_kind(b)),
                    ));
                };
                let f = Fields(o);
                let label = f.opt_str("label")?.ok_or_else(|| {
                    bad(
                        BadInputKind::MissingField,
                        format!("buttons[{i}] needs the field `label`"),
                    )
                })?;
                let custom_id = f.opt_str("custom_id")?;
                let url = f.opt_str("url")?;
                if custom_id.is_some() == url.is_some() {
                    return Err(bad(
                        BadInputKind::BadField,
                        format!("buttons[{i}] needs exactly one of `custom_id` and `url`"),
                    ));
                }
                Ok(Button {
                    label,
                    custom_id,
                    url,
                    style: f.opt_str("style")?,
                })
            })
            .collect()
    }
}

/// A key Stargazer would write to (`message_key`) or read (`target_key`)
/// must lie in the message cache and never among Stargazer's own keys.
fn check_cache_key(field: &str, k: &str, rules: &ParseRules) -> Result<(), BadInput> {
    if let Some(own) = rules
        .own_prefixes
        .iter()
        .find(|p| k.starts_with(p.as_str()))
    {
        return Err(bad(
            BadInputKind::ForbiddenKey,
            format!("{field} `{k}` names one of Stargazer's own keys (`{own}…`)"),
        ));
    }
    if !k.starts_with(&rules.cache_prefix) {
        return Err(bad(
            BadInputKind::ForbiddenKey,
            format!(
                "{field} `{k}` lies outside the message-cache prefix `{}`",
                rules.cache_prefix
            ),
        ));
    }
    Ok(())
}

fn target_of(f: &Fields<'_>, ty: &str, rules: &ParseRules) -> Result<Target, BadInput> {
    match (f.opt_str("message_id")?, f.opt_str("target_key")?) {
        (Some(_), Some(_)) => Err(bad(
            BadInputKind::BadField,
            format!("a `{ty}` envelope takes `message_id` or `target_key`, not both"),
        )),
        (Some(id), None) => Ok(Target::MessageId(id)),
        (None, Some(k)) => {
            check_cache_key("target_key", &k, rules)?;
            Ok(Target::Key(k))
        }
        (None, None) => Err(bad(
            BadInputKind::MissingField,
            format!("a `{ty}` envelope needs the field `message_id` or `target_key`"),
        )),
    }
}

fn envelope_from(obj: Map<String, Value>, rules: &ParseRules) -> Result<Envelope, BadInput> {
    let f = Fields(&obj);
    let ty = f.opt_str("type")?.unwrap_or_else(|| "message".to_owned());
    let channel_id = channel_of(&obj)?.or_else(|| interaction_lane(&obj));
    let needs_channel = |ty: &str| {
        channel_id.clone().ok_or_else(|| {
            bad(
                BadInputKind::MissingField,
                format!("a `{ty}` envelope needs the field `channel_id`"),
            )
        })
    };
    let action = match ty.as_str() {
        "message" => {
            needs_channel("message")?;
            Action::Message {
                text: f.req_str("text", "message")?,
                reply_to: f.opt_str("reply_to")?,
                buttons: f.buttons("message", false)?,
            }
        }
        "file" => {
            needs_channel("file")?;
            let b64 = f.req_str("file_data", "file")?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| {
                    bad(
                        BadInputKind::BadBase64,
                        format!("field `file_data` is not valid base64: {e}"),
                    )
                })?;
            Action::File {
                data,
                filename: f.opt_str("filename")?.unwrap_or_else(|| "file".to_owned()),
                mimetype: f
                    .opt_str("mimetype")?
                    .unwrap_or_else(|| "application/octet-stream".to_owned()),
                text: f.opt_str("text")?,
            }
        }
        "buttons" => {
            needs_channel("buttons")?;
            Action::Buttons {
                text: f.req_str("text", "buttons")?,
                buttons: f.buttons("buttons", true)?,
            }
        }
        "typing" | "start_typing" => {
            needs_channel(&ty)?;
            Action::StartTyping
        }
        "stop_typing" => {
            needs_channel("stop_typing")?;
            Action::StopTyping
        }
        "reaction" => {
            needs_channel("reaction")?;
            Action::Reaction {
                message_id: f.req_str("message_id", "reaction")?,
                emoji: f.req_str("emoji", "reaction")?,
            }
        }
        "edit" => {
            needs_channel("edit")?;
            Action::Edit {
                target: target_of(&f, "edit", rules)?,
                text: f.req_str("text", "edit")?,
                buttons: f.buttons("edit", false)?,
            }
        }
        "delete" => {
            needs_channel("delete")?;
            Action::Delete {
                target: target_of(&f, "delete", rules)?,
            }
        }
        "interaction_response" => {
            let t = "interaction_response";
            let kind = f.req_str("kind", t)?;
            let kind = InteractionKind::parse(&kind).ok_or_else(|| {
                bad(
                    BadInputKind::BadField,
                    format!(
                        "field `kind` is `{kind}`; it is one of message, defer, update, modal, followup, edit_original, autocomplete"
                    ),
                )
            })?;
            let ephemeral = match obj.get("ephemeral") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(bad(
                        BadInputKind::BadField,
                        format!(
                            "field `ephemeral` must be a boolean, found {}",
                            json_kind(v)
                        ),
                    ));
                }
            };
            let modal = match obj.get("modal") {
                None | Some(Value::Null) => None,
                Some(v @ Value::Object(_)) => Some(v.clone()),
                Some(v) => {
                    return Err(bad(
                        BadInputKind::BadField,
                        format!("field `modal` must be an object, found {}", json_kind(v)),
                    ));
                }
            };
            if kind == InteractionKind::Modal && modal.is_none() {
                return Err(bad(
                    BadInputKind::MissingField,
                    "an `interaction_response` of kind `modal` needs the field `modal`",
                ));
            }
            Action::InteractionResponse(Box::new(InteractionResponse {
                interaction_id: f.req_str("interaction_id", t)?,
                interaction_token: f.req_str("interaction_token", t)?,
                kind,
                text: f.opt_str("text")?,
                ephemeral,
                buttons: f.buttons(t, false)?,
                modal,
            }))
        }
        "presence" => Action::Presence {
            text: f.opt_str("text")?,
            emoji: f.opt_str("emoji")?,
        },
        "rpc_request" => {
            let method = match f.opt_str("rpc_method")? {
                Some(m) => m,
                None => f.req_str("action", "rpc_request").map_err(|_| {
                    bad(
                        BadInputKind::MissingField,
                        "a `rpc_request` envelope needs the field `rpc_method`",
                    )
                })?,
            };
            let args = match obj.get("rpc_args").or_else(|| obj.get("kwargs")) {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(v @ Value::Object(_)) => v.clone(),
                Some(v) => {
                    return Err(bad(
                        BadInputKind::BadField,
                        format!("field `rpc_args` must be an object, found {}", json_kind(v)),
                    ));
                }
            };
            let reply_key = f.req_str("reply_key", "rpc_request")?;
            if !reply_key.starts_with(&rules.reply_prefix) {
                return Err(bad(
                    BadInputKind::ForbiddenKey,
                    format!(
                        "reply_key `{reply_key}` lies outside the reply prefix `{}`",
                        rules.reply_prefix
                    ),
                ));
            }
            Action::Rpc {
                method,
                args,
                reply_key,
                deadline_ms: f.opt_u64("deadline_ms")?,
            }
        }
        other => {
            return Err(bad(
                BadInputKind::UnknownType,
                format!("unknown envelope type `{other}`"),
            ));
        }
    };
    let seq = f.opt_u64("seq")?;
    if let Some(s) = seq
        && !(1..=MAX_SEQ).contains(&s)
    {
        return Err(bad(
            BadInputKind::BadField,
            format!("field `seq` must be an integer from 1 to 2^53, found {s}"),
        ));
    }
    let message_key = f.opt_str("message_key")?;
    if let Some(k) = &message_key {
        check_cache_key("message_key", k, rules)?;
    }
    Ok(Envelope {
        channel_id,
        seq,
        idempotency_key: f.opt_str("idempotency_key")?,
        created_ms: f.opt_u64("created_ms")?,
        expires_ms: f.opt_u64("expires_ms")?,
        trace_id: f.opt_str("trace_id")?,
        message_key,
        action,
        raw: obj,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ParseRules {
        ParseRules {
            max_payload_bytes: 1024,
            signing_secret: None,
            cache_prefix: "sg:".into(),
            own_prefixes: vec!["sg:{".into(), "sg:gateway:".into()],
            reply_prefix: "sg:{p}:rpc:reply:".into(),
        }
    }

    fn parse(json: &str) -> Result<Envelope, BadInput> {
        let mut f = HashMap::new();
        f.insert("payload".to_owned(), json.as_bytes().to_vec());
        parse_entry(&f, &rules()).result
    }

    #[test]
    fn interaction_responses_parse_and_get_a_lane_of_their_own() {
        let e = parse(
            r#"{"type":"interaction_response","interaction_id":"99","interaction_token":"t","kind":"message","text":"hi","ephemeral":true}"#,
        )
        .unwrap();
        assert_eq!(e.channel_id, Some(ChannelId("interaction:99".into())));
        let Action::InteractionResponse(r) = &e.action else {
            panic!("{e:?}")
        };
        assert_eq!(
            (r.kind, r.ephemeral, r.text.as_deref()),
            (InteractionKind::Message, true, Some("hi"))
        );
        assert!(r.kind.is_initial() && !InteractionKind::Followup.is_initial());
        assert_eq!(e.action.ordering(), Ordering::Strict);
        // A channel given is kept: the answers then queue in its order.
        let e = parse(
            r#"{"type":"interaction_response","channel_id":"c1","interaction_id":"99","interaction_token":"t","kind":"followup"}"#,
        )
        .unwrap();
        assert_eq!(e.channel_id, Some(ChannelId("c1".into())));
        for (bad, needle) in [
            (
                r#"{"type":"interaction_response","interaction_token":"t","kind":"message"}"#,
                "interaction_id",
            ),
            (
                r#"{"type":"interaction_response","interaction_id":"1","interaction_token":"t","kind":"shout"}"#,
                "shout",
            ),
            (
                r#"{"type":"interaction_response","interaction_id":"1","interaction_token":"t","kind":"modal"}"#,
                "modal",
            ),
            (
                r#"{"type":"interaction_response","interaction_id":"1","interaction_token":"t","kind":"message","ephemeral":"yes"}"#,
                "ephemeral",
            ),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.detail.contains(needle), "{bad}: {err}");
        }
    }

    fn kind(json: &str) -> BadInputKind {
        parse(json).unwrap_err().kind
    }

    #[test]
    fn message_is_the_default_type() {
        let e = parse(r#"{"channel_id":"c1","text":"hi","seq":3,"extra":1}"#).unwrap();
        assert_eq!(e.action.type_name(), "message");
        assert_eq!(e.seq, Some(3));
        assert_eq!(e.channel_id, Some(ChannelId("c1".into())));
    }

    #[test]
    fn every_bad_input_has_its_reason() {
        assert_eq!(kind("{nope"), BadInputKind::NotJson);
        assert_eq!(kind("[1,2]"), BadInputKind::NotObject);
        assert_eq!(kind(r#"{"text":"hi"}"#), BadInputKind::MissingField);
        assert_eq!(
            kind(r#"{"type":"fax","channel_id":"c"}"#),
            BadInputKind::UnknownType
        );
        assert_eq!(
            kind(r#"{"type":"file","channel_id":"c","file_data":"%%%"}"#),
            BadInputKind::BadBase64
        );
        assert_eq!(
            kind(r#"{"channel_id":"c","text":"x","message_key":"other:1"}"#),
            BadInputKind::ForbiddenKey
        );
        assert_eq!(
            kind(r#"{"channel_id":"c","text":5}"#),
            BadInputKind::BadField
        );
        let big = format!(r#"{{"channel_id":"c","text":"{}"}}"#, "x".repeat(2000));
        assert_eq!(kind(&big), BadInputKind::TooLarge);
        let e = parse(r#"{"type":"reaction","channel_id":"c","emoji":"x"}"#).unwrap_err();
        assert!(e.detail.contains("message_id"), "{}", e.detail);
    }

    #[test]
    fn bad_entries_keep_their_routing() {
        let mut f = HashMap::new();
        f.insert(
            "payload".to_owned(),
            br#"{"type":"fax","channel_id":"c9","seq":4}"#.to_vec(),
        );
        let p = parse_entry(&f, &rules());
        assert!(p.result.is_err());
        assert_eq!(p.routing.channel_id, Some(ChannelId("c9".into())));
        assert_eq!(p.routing.seq, Some(4));
    }

    #[test]
    fn signatures_are_checked_when_required() {
        let mut r = rules();
        r.signing_secret = Some(b"k".to_vec());
        let payload = br#"{"channel_id":"c","text":"hi"}"#.to_vec();
        let mut f = HashMap::new();
        f.insert("payload".to_owned(), payload.clone());
        assert_eq!(
            parse_entry(&f, &r).result.unwrap_err().kind,
            BadInputKind::BadSignature
        );
        f.insert("sig".to_owned(), sign(b"k", &payload).into_bytes());
        assert!(parse_entry(&f, &r).result.is_ok());
        f.insert("sig".to_owned(), sign(b"other", &payload).into_bytes());
        assert!(parse_entry(&f, &r).result.is_err());
    }

    #[test]
    fn rpc_reply_key_must_carry_the_prefix() {
        let ok = r#"{"type":"rpc_request","rpc_method":"m","reply_key":"sg:{p}:rpc:reply:1"}"#;
        assert!(parse(ok).is_ok());
        let e = r#"{"type":"rpc_request","action":"m","reply_key":"sg:victim"}"#;
        assert_eq!(kind(e), BadInputKind::ForbiddenKey);
    }
}
