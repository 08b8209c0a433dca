//! The webhook adapter against a real HTTP receiver: a local axum server that
//! enforces the webhook contract (method, headers, signature), records every
//! request and answers from a script, so each answer class can be checked.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use serde_json::{Value, json};
use stargazer::adapters::webhook::WebhookAdapter;
use stargazer::adapters::{Adapter, AdapterError, Delivered, Delivery, Retry};
use stargazer::envelope::{Envelope, ParseRules, StreamId, parse_entry, sign};

/// How the receiver answers one request.
#[derive(Debug, Clone)]
enum Reply {
    /// This status, these headers, this body.
    Answer(u16, Vec<(&'static str, String)>, String),
    /// Never answer.
    Hang,
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
struct Seen {
    headers: HeaderMap,
    body: Option<Value>,
}

#[derive(Default)]
struct Receiver {
    secret: Option<String>,
    script: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    next_id: AtomicU64,
}

struct Server {
    url: String,
    state: Arc<Receiver>,
}

impl Server {
    /// Start a receiver on a free local port, verifying signatures with
    /// `secret` when given.
    async fn start(secret: Option<&str>) -> Server {
        let state = Arc::new(Receiver {
            secret: secret.map(str::to_owned),
            ..Receiver::default()
        });
        let app = Router::new()
            .route("/hook", any(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Server {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    /// Answer the next requests with `replies`, in order; after them, 200.
    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().expect("lock").extend(replies);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    fn last_body(&self) -> Value {
        self.seen()
            .last()
            .and_then(|s| s.body.clone())
            .expect("a request with a JSON body")
    }

    fn adapter(&self, secret: Option<&str>) -> WebhookAdapter {
        WebhookAdapter::new(
            "hook",
            &self.url,
            secret.map(str::to_owned),
            Duration::from_secs(5),
        )
        .expect("adapter")
    }
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, axum::Json(json!({ "error": message }))).into_response()
}

/// The receiver: checks the contract, records the request, answers from the
/// script (default: 200 with a fresh `message_id`).
async fn receive(
    State(state): State<Arc<Receiver>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.seen.lock().expect("lock").push(Seen {
        headers: headers.clone(),
        body: serde_json::from_slice(&body).ok(),
    });
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if method != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "POST only");
    }
    if header("content-type") != Some("application/json") {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "JSON only");
    }
    if header("x-stargazer-platform").is_none_or(str::is_empty) {
        return error(StatusCode::BAD_REQUEST, "no X-Stargazer-Platform");
    }
    if header("idempotency-key").is_none_or(str::is_empty) {
        return error(StatusCode::BAD_REQUEST, "no Idempotency-Key");
    }
    if let Some(secret) = &state.secret
        && header("x-stargazer-signature") != Some(sign(secret.as_bytes(), &body).as_str())
    {
        return error(StatusCode::UNAUTHORIZED, "bad signature");
    }
    if serde_json::from_slice::<Value>(&body).is_err() {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    }
    let next = state.script.lock().expect("lock").pop_front();
    match next {
        Some(Reply::Answer(code, extra, text)) => {
            let code = StatusCode::from_u16(code).expect("status");
            let mut response = (code, text).into_response();
            for (name, value) in extra {
                response
                    .headers_mut()
                    .insert(name, value.parse().expect("header value"));
            }
            response
        }
        Some(Reply::Hang) => std::future::pending().await,
        None => {
            let n = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            axum::Json(json!({ "message_id": format!("m-{n}") })).into_response()
        }
    }
}

fn envelope(payload: &Value) -> Envelope {
    let rules = ParseRules {
        max_payload_bytes: 1 << 20,
        signing_secret: None,
        cache_prefix: "sg:msg:".into(),
        own_prefixes: vec!["sg:{".into(), "sg:gateway:".into()],
        reply_prefix: "sg:{hook}:rpc:reply:".into(),
    };
    let mut fields = HashMap::new();
    fields.insert("payload".to_owned(), payload.to_string().into_bytes());
    parse_entry(&fields, &rules)
        .result
        .expect("a valid envelope")
}

async fn send(adapter: &WebhookAdapter, payload: Value) -> Result<Delivered, AdapterError> {
    send_as(adapter, payload, "key-1", 1, false).await
}

async fn send_as(
    adapter: &WebhookAdapter,
    payload: Value,
    key: &str,
    attempt: u32,
    resend: bool,
) -> Result<Delivered, AdapterError> {
    let env = envelope(&payload);
    let stream_id = StreamId("1700000000000-0".into());
    adapter
        .deliver(Delivery {
            platform: "hook",
            stream_id: &stream_id,
            envelope: &env,
            idempotency_key: key,
            attempt,
            resend,
            target: None,
        })
        .await
}

fn answer(code: u16, body: &str) -> Reply {
    Reply::Answer(code, Vec::new(), body.to_owned())
}

#[tokio::test]
async fn every_action_maps_to_its_fields() {
    let server = Server::start(None).await;
    let adapter = server.adapter(None);

    let sent = send_as(
        &adapter,
        json!({"type": "message", "channel_id": "c1", "text": "hello", "seq": 3,
               "reply_to": "m-0", "trace_id": "t-9", "custom": {"x": 1},
               "buttons": [{"label": "Yes", "custom_id": "y"}]}),
        "idem-42",
        3,
        true,
    )
    .await
    .expect("message");
    assert_eq!(sent.message_id.as_deref(), Some("m-1"));
    let seen = server.seen();
    let headers = &seen[0].headers;
    assert_eq!(headers["idempotency-key"], "idem-42");
    assert_eq!(headers["x-stargazer-platform"], "hook");
    assert!(!headers.contains_key("x-stargazer-signature"));
    let body = server.last_body();
    assert_eq!(body["action"], "send_message");
    assert_eq!(body["platform"], "hook");
    assert_eq!(body["channel_id"], "c1");
    assert_eq!(body["text"], "hello");
    assert_eq!(body["seq"], 3);
    assert_eq!(body["reply_to"], "m-0");
    assert_eq!(body["trace_id"], "t-9");
    assert_eq!(body["custom"], json!({"x": 1}));
    assert_eq!(body["buttons"], json!([{"label": "Yes", "custom_id": "y"}]));
    assert_eq!(body["idempotency_key"], "idem-42");
    assert_eq!(body["stream_id"], "1700000000000-0");
    assert_eq!(body["attempt"], 3);
    assert_eq!(body["resend"], true);
    assert!(body.get("type").is_none());

    // A file: bytes survive the base64 round trip; defaults are applied.
    let data: Vec<u8> = (0..=255u8).chain([0, 0xff, 0x80]).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let sent = send(
        &adapter,
        json!({"type": "file", "channel_id": 77, "file_data": b64, "text": "the report"}),
    )
    .await
    .expect("file");
    assert_eq!(sent.message_id.as_deref(), Some("m-2"));
    let body = server.last_body();
    assert_eq!(body["action"], "send_file");
    assert_eq!(body["channel_id"], "77");
    assert_eq!(body["filename"], "file");
    assert_eq!(body["mimetype"], "application/octet-stream");
    assert_eq!(body["text"], "the report");
    assert!(body.get("file_data").is_none());
    let back = base64::engine::general_purpose::STANDARD
        .decode(body["data_base64"].as_str().expect("data_base64"))
        .expect("base64");
    assert_eq!(back, data);
    assert_eq!(body["attempt"], 1);
    assert_eq!(body["resend"], false);

    send(
        &adapter,
        json!({"type": "file", "channel_id": "c1", "file_data": "aGk=",
               "filename": "report.pdf", "mimetype": "application/pdf"}),
    )
    .await
    .expect("named file");
    let body = server.last_body();
    assert_eq!(body["filename"], "report.pdf");
    assert_eq!(body["mimetype"], "application/pdf");
    assert!(body.get("text").is_none());

    send(
        &adapter,
        json!({"type": "buttons", "channel_id": "c1", "text": "pick one", "buttons": [
            {"label": "Yes", "custom_id": "yes", "style": "primary"},
            {"label": "Docs", "url": "https://example.com/docs"}]}),
    )
    .await
    .expect("buttons");
    let body = server.last_body();
    assert_eq!(body["action"], "send_buttons");
    assert_eq!(body["text"], "pick one");
    assert_eq!(
        body["buttons"],
        json!([{"label": "Yes", "custom_id": "yes", "style": "primary"},
               {"label": "Docs", "url": "https://example.com/docs"}])
    );

    for (ty, action) in [
        ("typing", "start_typing"),
        ("start_typing", "start_typing"),
        ("stop_typing", "stop_typing"),
    ] {
        let sent = send(&adapter, json!({"type": ty, "channel_id": "c1", "seq": 9}))
            .await
            .expect("typing");
        assert_eq!(sent.message_id.as_deref(), Some(server.last_id().as_str()));
        let body = server.last_body();
        assert_eq!(body["action"], action);
        assert_eq!(body["channel_id"], "c1");
        assert_eq!(body["seq"], 9);
        assert!(body.get("text").is_none());
    }

    send(
        &adapter,
        json!({"type": "reaction", "channel_id": "c1", "message_id": "m-1", "emoji": "👍"}),
    )
    .await
    .expect("reaction");
    let body = server.last_body();
    assert_eq!(body["action"], "add_reaction");
    assert_eq!(body["message_id"], "m-1");
    assert_eq!(body["emoji"], "👍");

    send(
        &adapter,
        json!({"type": "presence", "text": "watching", "emoji": "👀"}),
    )
    .await
    .expect("presence");
    let body = server.last_body();
    assert_eq!(body["action"], "set_presence");
    assert_eq!(body["text"], "watching");
    assert_eq!(body["emoji"], "👀");
    assert!(body.get("channel_id").is_none());

    // Every request passed the receiver's contract checks.
    assert_eq!(server.seen().len(), 9);
}

impl Server {
    /// The `message_id` the receiver gave its latest default answer.
    fn last_id(&self) -> String {
        format!("m-{}", self.state.next_id.load(Ordering::Relaxed))
    }
}

#[tokio::test]
async fn message_ids_come_back_in_any_form() {
    let server = Server::start(None).await;
    let adapter = server.adapter(None);
    let msg = || json!({"channel_id": "c1", "text": "hi"});
    server.script([
        answer(200, r#"{"message_id": 1234567890123}"#),
        answer(201, "accepted, thanks"),
        answer(204, ""),
        answer(200, r#"{"ok": true}"#),
    ]);
    let ids: Vec<Option<String>> = [
        send(&adapter, msg()).await,
        send(&adapter, msg()).await,
        send(&adapter, msg()).await,
        send(&adapter, msg()).await,
    ]
    .into_iter()
    .map(|r| r.expect("2xx is success").message_id)
    .collect();
    assert_eq!(ids, [Some("1234567890123".to_owned()), None, None, None]);
}

#[tokio::test]
async fn signatures_verify_and_a_wrong_secret_is_refused() {
    let server = Server::start(Some("s3cret")).await;
    let good = server.adapter(Some("s3cret"));
    let sent = send(&good, json!({"channel_id": "c1", "text": "signed"}))
        .await
        .expect("a correctly signed request is accepted");
    assert_eq!(sent.message_id.as_deref(), Some("m-1"));
    let sig = server.seen()[0].headers["x-stargazer-signature"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");

    let bad = server.adapter(Some("wrong"));
    let err = send(&bad, json!({"channel_id": "c1", "text": "forged"}))
        .await
        .expect_err("a wrong signature is refused");
    assert_eq!(err.retry, Retry::Never);
    assert!(err.message.contains("401"), "{}", err.message);
    assert!(err.message.contains("bad signature"), "{}", err.message);

    let unsigned = server.adapter(None);
    let err = send(&unsigned, json!({"channel_id": "c1", "text": "unsigned"}))
        .await
        .expect_err("an unsigned request is refused");
    assert_eq!(err.retry, Retry::Never);
}

#[tokio::test]
async fn server_errors_back_off_and_the_retry_carries_the_same_key() {
    let server = Server::start(None).await;
    let adapter = server.adapter(None);
    server.script([
        answer(500, "database on fire"),
        answer(502, ""),
        answer(408, ""),
    ]);
    let msg = || json!({"channel_id": "c1", "text": "hi", "seq": 1});

    let err = send_as(&adapter, msg(), "k-7", 1, false)
        .await
        .expect_err("500");
    assert_eq!(err.retry, Retry::Backoff);
    assert_eq!(
        err.message,
        "webhook answered 500 Internal Server Error: database on fire"
    );
    let err = send_as(&adapter, msg(), "k-7", 2, false)
        .await
        .expect_err("502");
    assert_eq!(err.retry, Retry::Backoff);
    assert_eq!(err.message, "webhook answered 502 Bad Gateway");
    let err = send_as(&adapter, msg(), "k-7", 3, false)
        .await
        .expect_err("408");
    assert_eq!(err.retry, Retry::Backoff);
    let sent = send_as(&adapter, msg(), "k-7", 4, false)
        .await
        .expect("then 200");
    assert_eq!(sent.message_id.as_deref(), Some("m-1"));

    let seen = server.seen();
    assert_eq!(seen.len(), 4);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.headers["idempotency-key"], "k-7");
        let body = s.body.as_ref().expect("body");
        assert_eq!(body["idempotency_key"], "k-7");
        assert_eq!(body["attempt"], i + 1);
    }
}

#[tokio::test]
async fn rate_limits_name_the_wait() {
    let server = Server::start(None).await;
    let adapter = server.adapter(None);
    server.script([
        Reply::Answer(
            429,
            vec![("retry-after", "7".into())],
            r#"{"message": "slow down"}"#.into(),
        ),
        answer(429, ""),
        Reply::Answer(503, vec![("retry-after", "2".into())], String::new()),
        answer(503, "maintenance"),
        // An HTTP-date in the past: retry at once.
        Reply::Answer(
            429,
            vec![("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT".into())],
            String::new(),
        ),
    ]);
    let msg = || json!({"channel_id": "c1", "text": "hi"});

    let err = send(&adapter, msg()).await.expect_err("429");
    assert_eq!(err.retry, Retry::After(Duration::from_secs(7)));
    assert!(err.message.contains("429"), "{}", err.message);
    assert!(err.message.contains("slow down"), "{}", err.message);
    let err = send(&adapter, msg()).await.expect_err("429, no header");
    assert_eq!(err.retry, Retry::After(Duration::from_secs(1)));
    let err = send(&adapter, msg()).await.expect_err("503 + Retry-After");
    assert_eq!(err.retry, Retry::After(Duration::from_secs(2)));
    let err = send(&adapter, msg()).await.expect_err("503");
    assert_eq!(err.retry, Retry::Backoff);
    assert_eq!(
        err.message,
        "webhook answered 503 Service Unavailable: maintenance"
    );
    let err = send(&adapter, msg()).await.expect_err("429, past date");
    assert_eq!(err.retry, Retry::After(Duration::ZERO));
}

#[tokio::test]
async fn client_errors_are_permanent_and_say_why() {
    let server = Server::start(None).await;
    let adapter = server.adapter(None);
    server.script([
        answer(404, r#"{"error": "no such channel"}"#),
        answer(400, &format!("<html>{}</html>", "x".repeat(500))),
    ]);
    let msg = || json!({"channel_id": "c404", "text": "hi"});

    let err = send(&adapter, msg()).await.expect_err("404");
    assert_eq!(err.retry, Retry::Never);
    assert_eq!(
        err.message,
        "webhook answered 404 Not Found: no such channel"
    );
    let err = send(&adapter, msg()).await.expect_err("400");
    assert_eq!(err.retry, Retry::Never);
    assert!(
        err.message
            .starts_with("webhook answered 400 Bad Request: <html>xxx"),
        "{}",
        err.message
    );
    assert!(err.message.len() < 300, "{}", err.message);
}

#[tokio::test]
async fn rpc_is_refused_without_a_request() {
    let server = Server::start(None).await;
    let adapter = server.adapter(None);
    let err = send(
        &adapter,
        json!({"type": "rpc_request", "rpc_method": "history", "reply_key": "sg:{hook}:rpc:reply:1"}),
    )
    .await
    .expect_err("rpc");
    assert_eq!(err.retry, Retry::Never);
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn a_refused_connection_backs_off() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}/hook");
    let adapter = WebhookAdapter::new("hook", &url, None, Duration::from_secs(5)).expect("adapter");
    let err = send(&adapter, json!({"channel_id": "c1", "text": "hi"}))
        .await
        .expect_err("nobody listens");
    assert_eq!(err.retry, Retry::Backoff);
    assert_eq!(
        err.message,
        format!("could not connect to {url}: connection refused")
    );
}

#[tokio::test]
async fn a_hanging_receiver_times_out_and_backs_off() {
    let server = Server::start(None).await;
    server.script([Reply::Hang]);
    let adapter = WebhookAdapter::new("hook", &server.url, None, Duration::from_millis(300))
        .expect("adapter");
    let started = std::time::Instant::now();
    let err = send(&adapter, json!({"channel_id": "c1", "text": "hi"}))
        .await
        .expect_err("no answer");
    assert_eq!(err.retry, Retry::Backoff);
    assert!(
        err.message.contains("timed out after 300ms"),
        "{}",
        err.message
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server.seen().len(), 1);
}
