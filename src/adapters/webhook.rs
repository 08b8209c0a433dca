//! The webhook adapter: POSTs each action as JSON to one URL, signed with
//! HMAC-SHA256 when a secret is set, and classifies the answer into
//! [`AdapterError`]s the dispatcher can act on.
//!
//! The contract (what the receiver sees):
//!
//! * `POST <url>` with `Content-Type: application/json`,
//!   `Idempotency-Key: <the delivery's key>`, `X-Stargazer-Platform: <platform>`
//!   and, with a secret, `X-Stargazer-Signature: sha256=<hex HMAC of the body>`.
//! * The body is the envelope's own JSON object without `type` and `file_data`,
//!   plus `action` (`send_message`, `send_file`, `send_buttons`, `start_typing`,
//!   `stop_typing`, `add_reaction`, `set_presence`, `edit_message`,
//!   `delete_message` — these two with the target's `message_id`), `platform`, `channel_id`,
//!   `seq`, `idempotency_key`, `stream_id`, `attempt`, `resend` and the action's
//!   own fields (`text`, `data_base64`/`filename`/`mimetype`, `buttons`,
//!   `message_id`/`emoji`, presence `text`/`emoji`).
//! * A 2xx succeeds; a JSON body's `message_id` (string or number) is returned.
//!   429, and 503 with `Retry-After`, ask to wait; 408, other 5xx and transport
//!   failures are transient; other answers (4xx, unfollowed 3xx) are permanent.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{Map, Value};

use super::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery};
use crate::envelope::{Action, sign};

/// The header naming the platform a delivery is for.
pub const PLATFORM_HEADER: &str = "x-stargazer-platform";
/// The header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-stargazer-signature";
/// The header carrying the delivery's idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// How long to wait after a 429 that carries no (readable) `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest wait a `Retry-After` can ask for; longer asks are capped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The longest time spent connecting, whatever the request timeout.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a response body is read (for `message_id` or an error message).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How much of a platform's error message goes into an error.
const MAX_MESSAGE_CHARS: usize = 200;

/// Delivers every action by POSTing it as JSON to one URL.
pub struct WebhookAdapter {
    platform: String,
    platform_header: HeaderValue,
    url: Url,
    /// The URL as error messages show it: no password, no query string.
    shown_url: String,
    secret: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    client: reqwest::Client,
}

impl fmt::Debug for WebhookAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookAdapter")
            .field("platform", &self.platform)
            .field("url", &self.shown_url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WebhookAdapter {
    /// A webhook adapter for `platform` posting to `url` (http or https),
    /// signing bodies with `secret` when given. `timeout` bounds each whole
    /// request; connecting is bounded by the smaller of it and 10 s.
    ///
    /// Fails, naming the problem, on a bad URL, an empty secret, a zero
    /// timeout or a platform name that cannot be an HTTP header value.
    pub fn new(
        platform: &str,
        url: &str,
        secret: Option<String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let parsed = Url::parse(url).map_err(|e| format!("webhook url is not a valid URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "webhook url must be http or https, not `{}`",
                parsed.scheme()
            ));
        }
        let platform_header = HeaderValue::from_str(platform).map_err(|_| {
            format!("platform name `{platform}` cannot be sent as an HTTP header value")
        })?;
        if platform.is_empty() {
            return Err("platform name is empty".to_owned());
        }
        if secret.as_deref() == Some("") {
            return Err("webhook secret is empty (leave it unset to send unsigned)".to_owned());
        }
        if timeout.is_zero() {
            return Err("webhook timeout must be greater than zero".to_owned());
        }
        let connect_timeout = timeout.min(MAX_CONNECT_TIMEOUT);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            // A redirected POST may turn into a GET or carry a signed body
            // elsewhere: a receiver that moved must be reconfigured.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("stargazer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("could not build the HTTP client: {e}"))?;
        Ok(Self {
            platform: platform.to_owned(),
            platform_header,
            shown_url: shown_url(&parsed),
            url: parsed,
            secret,
            timeout,
            connect_timeout,
            client,
        })
    }

    /// The JSON body for `delivery` (see the module docs).
    fn body(&self, delivery: &Delivery<'_>) -> Result<Map<String, Value>, AdapterError> {
        let env = delivery.envelope;
        let mut body = env.raw.clone();
        body.remove("type");
        body.remove("file_data");
        let set_opt = |body: &mut Map<String, Value>, key: &str, v: Option<&str>| match v {
            Some(v) => {
                body.insert(key.to_owned(), Value::from(v));
            }
            None => {
                body.remove(key);
            }
        };
        let action = match &env.action {
            Action::Message {
                text,
                reply_to,
                buttons,
            } => {
                body.insert("text".into(), Value::from(text.as_str()));
                set_opt(&mut body, "reply_to", reply_to.as_deref());
                if buttons.is_empty() {
                    body.remove("buttons");
                } else {
                    body.insert("buttons".into(), to_json(buttons)?);
                }
                "send_message"
            }
            Action::File {
                data,
                filename,
                mimetype,
                text,
            } => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(data);
                body.insert("data_base64".into(), Value::from(b64));
                body.insert("filename".into(), Value::from(filename.as_str()));
                body.insert("mimetype".into(), Value::from(mimetype.as_str()));
                set_opt(&mut body, "text", text.as_deref());
                "send_file"
            }
            Action::Buttons { text, buttons } => {
                body.insert("text".into(), Value::from(text.as_str()));
                body.insert("buttons".into(), to_json(buttons)?);
                "send_buttons"
            }
            Action::StartTyping => {
                body.remove("text");
                "start_typing"
            }
            Action::StopTyping => {
                body.remove("text");
                "stop_typing"
            }
            Action::Reaction { message_id, emoji } => {
                body.remove("text");
                body.insert("message_id".into(), Value::from(message_id.as_str()));
                body.insert("emoji".into(), Value::from(emoji.as_str()));
                "add_reaction"
            }
            Action::Presence { text, emoji } => {
                // Both always present: null clears that part of the presence.
                body.insert(
                    "text".into(),
                    text.as_deref().map_or(Value::Null, Value::from),
                );
                body.insert(
                    "emoji".into(),
                    emoji.as_deref().map_or(Value::Null, Value::from),
                );
                "set_presence"
            }
            Action::Edit { text, buttons, .. } => {
                body.remove("target_key");
                body.insert("text".into(), Value::from(text.as_str()));
                body.insert("message_id".into(), target_id(delivery)?);
                if buttons.is_empty() {
                    body.remove("buttons");
                } else {
                    body.insert("buttons".into(), to_json(buttons)?);
                }
                "edit_message"
            }
            Action::Delete { .. } => {
                body.remove("target_key");
                body.remove("text");
                body.insert("message_id".into(), target_id(delivery)?);
                "delete_message"
            }
            Action::Rpc { method, .. } => {
                return Err(AdapterError::permanent(format!(
                    "an rpc_request (`{method}`) is answered through `call`, never delivered \
                     to a webhook"
                )));
            }
            Action::InteractionResponse(_) => {
                return Err(AdapterError::permanent(
                    "interaction_response is Discord's; a webhook has no interactions",
                ));
            }
        };
        body.insert("action".into(), Value::from(action));
        body.insert("platform".into(), Value::from(self.platform.as_str()));
        set_opt(
            &mut body,
            "channel_id",
            env.channel_id.as_ref().map(|c| c.0.as_str()),
        );
        match env.seq {
            Some(seq) => body.insert("seq".into(), Value::from(seq)),
            None => body.remove("seq"),
        };
        body.insert(
            "idempotency_key".into(),
            Value::from(delivery.idempotency_key),
        );
        body.insert(
            "stream_id".into(),
            Value::from(delivery.stream_id.0.as_str()),
        );
        body.insert("attempt".into(), Value::from(delivery.attempt));
        body.insert("resend".into(), Value::from(delivery.resend));
        Ok(body)
    }

    async fn post(&self, delivery: Delivery<'_>) -> Result<Delivered, AdapterError> {
        let body = self.body(&delivery)?;
        let bytes = serde_json::to_vec(&body).map_err(|e| {
            AdapterError::permanent(format!("could not encode the webhook body: {e}"))
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            HeaderName::from_static(PLATFORM_HEADER),
            self.platform_header.clone(),
        );
        let key = HeaderValue::from_str(delivery.idempotency_key).map_err(|_| {
            AdapterError::permanent(format!(
                "idempotency key `{}` cannot be sent as an HTTP header value",
                delivery.idempotency_key.escape_debug()
            ))
        })?;
        headers.insert(HeaderName::from_static(IDEMPOTENCY_HEADER), key);
        if let Some(secret) = &self.secret {
            let sig = sign(secret.as_bytes(), &bytes);
            let sig = HeaderValue::from_str(&sig).map_err(|_| {
                AdapterError::permanent("the body's signature is not a valid header value")
            })?;
            headers.insert(HeaderName::from_static(SIGNATURE_HEADER), sig);
        }

        let response = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(bytes)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;

        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(response).await;

        if status.is_success() {
            let message_id = match body {
                Ok(body) => message_id_of(&body),
                Err(e) => {
                    // The platform took it; re-sending would only duplicate.
                    tracing::warn!(
                        platform = %self.platform,
                        error = %self.transport_error(&e),
                        "webhook answered {status} but its body could not be read; no message_id"
                    );
                    None
                }
            };
            return Ok(Delivered { message_id });
        }
        let mut detail = body.ok().and_then(|b| platform_message(&b));
        if status.is_redirection() && detail.is_none() {
            detail = Some(match location {
                Some(l) => format!("redirects are not followed (Location: {})", truncate(&l)),
                None => "redirects are not followed".to_owned(),
            });
        }
        let retry_after = retry_after
            .as_deref()
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        Err(classify(status, retry_after, detail.as_deref()))
    }

    /// A transport failure (no HTTP answer), as a transient error naming what
    /// happened.
    fn transport_error(&self, e: &reqwest::Error) -> AdapterError {
        let url = &self.shown_url;
        let message = if e.is_timeout() && e.is_connect() {
            format!(
                "could not connect to {url}: timed out after {:?}",
                self.connect_timeout
            )
        } else if e.is_timeout() {
            format!(
                "webhook {url} timed out after {:?} (the request may have reached it)",
                self.timeout
            )
        } else if e.is_connect() {
            format!("could not connect to {url}: {}", root_cause(e))
        } else if e.is_body() || e.is_decode() {
            format!("reading the answer of {url} failed: {}", root_cause(e))
        } else {
            format!("webhook request to {url} failed: {}", root_cause(e))
        };
        AdapterError::transient(message)
    }
}

/// The platform id of an edit's or delete's target, as the engine resolved it.
fn target_id(delivery: &Delivery<'_>) -> Result<Value, AdapterError> {
    delivery.target.map(Value::from).ok_or_else(|| {
        AdapterError::permanent("an edit or delete reached the webhook without its target's id")
    })
}

impl Adapter for WebhookAdapter {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(self.post(delivery))
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, AdapterError> {
    serde_json::to_value(v)
        .map_err(|e| AdapterError::permanent(format!("could not encode the webhook body: {e}")))
}

/// `url` without its password and query string, which may hold secrets.
fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("redacted"));
    }
    if shown.query().is_some() {
        shown.set_query(Some("…"));
    }
    shown.set_fragment(None);
    shown.to_string()
}

/// Up to [`MAX_BODY_BYTES`] of the response body.
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_BODY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_BODY_BYTES {
            break;
        }
    }
    Ok(body)
}

/// The innermost cause of `e`, readably: an OS error by its kind
/// (`connection refused`), anything else by its own message.
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if let Some(io) = cause.downcast_ref::<std::io::Error>()
        && io.raw_os_error().is_some()
    {
        return io.kind().to_string();
    }
    if std::ptr::addr_eq(cause, e as &dyn std::error::Error) {
        // No source; reqwest's own message would name the whole URL.
        return if e.is_builder() {
            "the request could not be built".to_owned()
        } else if e.is_redirect() {
            "a redirect failed".to_owned()
        } else {
            "the request failed".to_owned()
        };
    }
    cause.to_string()
}

/// The `message_id` of a 2xx body, if it is a JSON object carrying one.
fn message_id_of(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    match obj.get("message_id")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The platform's own explanation in an error answer: a JSON body's `error`
/// or `message`, else the start of the body text.
fn platform_message(body: &[u8]) -> Option<String> {
    if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) {
        for key in ["error", "message"] {
            let text = match obj.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(inner)) => match inner.get("message") {
                    Some(Value::String(s)) => s.clone(),
                    _ => Value::Object(inner.clone()).to_string(),
                },
                Some(other) => other.to_string(),
            };
            let text = truncate(&squash(&text));
            if !text.is_empty() {
                return Some(text);
            }
        }
    }
    let text = truncate(&squash(&String::from_utf8_lossy(body)));
    (!text.is_empty()).then_some(text)
}

/// `s` with every run of whitespace (newlines included) made one space.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first [`MAX_MESSAGE_CHARS`] characters of `s`, marked when cut.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Classify a non-2xx answer.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    detail: Option<&str>,
) -> AdapterError {
    let mut message = match status.canonical_reason() {
        Some(reason) => format!("webhook answered {} {reason}", status.as_u16()),
        None => format!("webhook answered {}", status.as_u16()),
    };
    if let Some(detail) = detail {
        message.push_str(": ");
        message.push_str(detail);
    }
    match status {
        StatusCode::TOO_MANY_REQUESTS => {
            let after = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
            AdapterError::rate_limited(after, format!("{message} (retry after {after:?})"))
        }
        StatusCode::SERVICE_UNAVAILABLE if retry_after.is_some() => {
            let after = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
            AdapterError::rate_limited(after, format!("{message} (retry after {after:?})"))
        }
        StatusCode::REQUEST_TIMEOUT => AdapterError::transient(message),
        s if s.is_server_error() => AdapterError::transient(message),
        _ => AdapterError::permanent(message),
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date (relative to `now`;
/// a past date is zero). Capped at [`MAX_RETRY_AFTER`]; `None` if unreadable.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let after = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = value.parse::<f64>() {
        // Not allowed by RFC 9110, but some platforms send fractions.
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(secs).unwrap_or(MAX_RETRY_AFTER)
    } else {
        let at = UNIX_EPOCH + Duration::from_secs(parse_http_date(value)?);
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// Seconds since the Unix epoch of an HTTP-date in any of the three forms
/// RFC 9110 accepts: `Sun, 06 Nov 1994 08:49:37 GMT`,
/// `Sunday, 06-Nov-94 08:49:37 GMT` and `Sun Nov  6 08:49:37 1994`.
fn parse_http_date(value: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let mut month = None;
    let mut time = None;
    let mut numbers = Vec::new();
    for token in value.split([' ', ',', '-']).filter(|t| !t.is_empty()) {
        if token.contains(':') {
            let mut parts = token.split(':').map(|p| p.parse::<u64>().ok());
            let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
            if parts.next().is_some() || h > 23 || m > 59 || s > 60 {
                return None;
            }
            time = Some(h * 3600 + m * 60 + s);
        } else if token.bytes().all(|b| b.is_ascii_digit()) {
            numbers.push(token.parse::<u64>().ok()?);
        } else if let Some(i) = MONTHS
            .iter()
            .position(|m| token.len() == 3 && token.eq_ignore_ascii_case(m))
        {
            month = Some(i as u64 + 1);
        }
    }
    let [day, year] = numbers[..] else {
        return None;
    };
    let year = match year {
        0..=69 => year + 2000,
        70..=99 => year + 1900,
        y => y,
    };
    let (month, time) = (month?, time?);
    if !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + time)
}

/// Days from 1970-01-01 to the given (proleptic Gregorian) date, for dates
/// from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    // Howard Hinnant's algorithm, shifted so March is the first month.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::adapters::Retry;
    use crate::envelope::{Envelope, ParseRules, StreamId, parse_entry};

    fn envelope(json: &str) -> Envelope {
        let rules = ParseRules {
            max_payload_bytes: 1 << 16,
            signing_secret: None,
            cache_prefix: "sg:msg:".into(),
            own_prefixes: vec!["sg:{".into(), "sg:gateway:".into()],
            reply_prefix: "sg:{p}:rpc:reply:".into(),
        };
        let mut fields = HashMap::new();
        fields.insert("payload".to_owned(), json.as_bytes().to_vec());
        parse_entry(&fields, &rules).result.expect("valid envelope")
    }

    fn adapter() -> WebhookAdapter {
        WebhookAdapter::new(
            "hook",
            "http://127.0.0.1:9/in",
            None,
            Duration::from_secs(1),
        )
        .expect("adapter")
    }

    fn body(json: &str) -> Result<Map<String, Value>, AdapterError> {
        let env = envelope(json);
        let id = StreamId("5-1".into());
        adapter().body(&Delivery {
            platform: "hook",
            stream_id: &id,
            envelope: &env,
            idempotency_key: "idem",
            attempt: 2,
            resend: true,
            target: None,
        })
    }

    #[test]
    fn body_starts_from_the_envelope() {
        let b = body(r#"{"type":"message","channel_id":7,"text":"hi","seq":3,"extra":{"a":1},"idempotency_key":"theirs"}"#)
            .expect("body");
        assert_eq!(b["action"], "send_message");
        assert_eq!(b["channel_id"], "7");
        assert_eq!(b["text"], "hi");
        assert_eq!(b["seq"], 3);
        assert_eq!(b["extra"]["a"], 1);
        assert_eq!(b["idempotency_key"], "idem");
        assert_eq!(b["stream_id"], "5-1");
        assert_eq!(b["attempt"], 2);
        assert_eq!(b["resend"], true);
        assert_eq!(b["platform"], "hook");
        assert!(!b.contains_key("type"));
        assert!(!b.contains_key("buttons"));
    }

    #[test]
    fn actions_without_text_carry_none() {
        let b = body(r#"{"type":"typing","channel_id":"c","text":"stray"}"#).expect("body");
        assert_eq!(b["action"], "start_typing");
        assert!(!b.contains_key("text"));
        assert!(!b.contains_key("seq"));
        let b = body(r#"{"type":"presence","emoji":"🎮"}"#).expect("body");
        assert_eq!(b["action"], "set_presence");
        assert_eq!(b["text"], Value::Null);
        assert_eq!(b["emoji"], "🎮");
        assert!(!b.contains_key("channel_id"));
    }

    #[test]
    fn rpc_is_never_delivered() {
        let e = body(
            r#"{"type":"rpc_request","rpc_method":"history","reply_key":"sg:{p}:rpc:reply:1"}"#,
        )
        .expect_err("rpc");
        assert_eq!(e.retry, Retry::Never);
        assert!(e.message.contains("history"), "{}", e.message);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_770); // 1994-11-06 08:49:30
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("99999", now), Some(MAX_RETRY_AFTER));
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse_retry_after(date, now),
                Some(Duration::from_secs(7)),
                "{date}"
            );
        }
        assert_eq!(
            parse_retry_after("Sat, 05 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951_825_600)
        );
    }

    #[test]
    fn answers_are_classified() {
        let c = |code: u16, after: Option<u64>| {
            classify(
                StatusCode::from_u16(code).expect("status"),
                after.map(Duration::from_secs),
                Some("why"),
            )
        };
        assert_eq!(c(429, None).retry, Retry::After(Duration::from_secs(1)));
        assert_eq!(c(429, Some(4)).retry, Retry::After(Duration::from_secs(4)));
        assert_eq!(c(503, Some(4)).retry, Retry::After(Duration::from_secs(4)));
        assert_eq!(c(503, None).retry, Retry::Backoff);
        assert_eq!(c(500, None).retry, Retry::Backoff);
        assert_eq!(c(408, None).retry, Retry::Backoff);
        assert_eq!(c(400, None).retry, Retry::Never);
        assert_eq!(c(301, None).retry, Retry::Never);
        assert_eq!(c(404, None).message, "webhook answered 404 Not Found: why");
        assert_eq!(c(599, None).message, "webhook answered 599: why");
    }

    #[test]
    fn platform_messages_are_found() {
        assert_eq!(
            platform_message(br#"{"error":"no such channel"}"#).as_deref(),
            Some("no such channel")
        );
        assert_eq!(
            platform_message(br#"{"message":"bad"}"#).as_deref(),
            Some("bad")
        );
        assert_eq!(
            platform_message(br#"{"error":{"code":5,"message":"nested"}}"#).as_deref(),
            Some("nested")
        );
        assert_eq!(
            platform_message(b"oops\n  here").as_deref(),
            Some("oops here")
        );
        assert_eq!(platform_message(b""), None);
        let long = "é".repeat(500);
        let cut = platform_message(long.as_bytes()).expect("message");
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn message_ids_are_strings() {
        assert_eq!(
            message_id_of(br#"{"message_id":"m-1"}"#).as_deref(),
            Some("m-1")
        );
        assert_eq!(
            message_id_of(br#"{"message_id":42}"#).as_deref(),
            Some("42")
        );
        assert_eq!(message_id_of(b"ok"), None);
        assert_eq!(message_id_of(b""), None);
    }

    #[test]
    fn construction_checks_its_inputs_and_hides_secrets() {
        let ok = WebhookAdapter::new(
            "hook",
            "https://user:pw@example.com/in?token=t",
            Some("s3cret".into()),
            Duration::from_secs(3),
        )
        .expect("adapter");
        let debug = format!("{ok:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("pw") && !debug.contains("token=t"),
            "{debug}"
        );
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(WebhookAdapter::new("hook", "not a url", None, Duration::from_secs(1)).is_err());
        assert!(WebhookAdapter::new("hook", "ftp://x/", None, Duration::from_secs(1)).is_err());
        assert!(WebhookAdapter::new("hook", "http://x/", None, Duration::ZERO).is_err());
        assert!(
            WebhookAdapter::new(
                "hook",
                "http://x/",
                Some(String::new()),
                Duration::from_secs(1)
            )
            .is_err()
        );
        assert!(WebhookAdapter::new("a\nb", "http://x/", None, Duration::from_secs(1)).is_err());
    }
}
