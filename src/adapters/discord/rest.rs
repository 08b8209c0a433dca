//! REST: one call to the API — a permit of the shared limiter, the request
//! (the bot token, the User-Agent), the bucket headers recorded, and the
//! answer classified (429 waits, 5xx/408/network retried, a 401 opens the
//! token's circuit, other 4xx permanent, Discord's `code` and `message`
//! named).

use super::*;

/// One REST route: the request, and the rate-limit identity Discord gives it
/// (the route with its top-level id kept and other ids masked, and that id).
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    /// The path after the API base, segments already encoded.
    pub path: String,
    /// `POST /channels/:c/messages`, …
    pub key: String,
    /// The top-level resource id (channel or webhook).
    pub major: String,
    /// Authenticated by the bot token (false for interaction callbacks and
    /// webhook-token routes, which carry their own token in the path: a 401
    /// there says nothing about the bot token).
    pub bot_auth: bool,
}

impl Route {
    pub(super) fn new(method: Method, path: String, template: &str, major: &str) -> Route {
        Route {
            key: format!("{method} {template}"),
            method,
            path,
            major: major.to_owned(),
            bot_auth: true,
        }
    }

    /// A route authenticated by a token in its path (interactions).
    pub(super) fn token_in_path(mut self) -> Route {
        self.bot_auth = false;
        self
    }
}

/// A request body.
pub(super) enum Body {
    None,
    Json(Value),
    Form(reqwest::multipart::Form),
}

impl DiscordAdapter {
    /// Wait for a permit of `route`: in place while the waits stay short,
    /// else hand the wait back as a rate limit.
    async fn permit(&self, route: &Route, probe: bool) -> Result<(), AdapterError> {
        let redis_err =
            |e| AdapterError::transient(format!("discord rate limiter (redis) failed: {e}"));
        let mut waited = Duration::ZERO;
        loop {
            let w = match self.limiter.host_budget().await.map_err(redis_err)? {
                Some(w) => Some(w),
                None => self
                    .limiter
                    .acquire(route, probe)
                    .await
                    .map_err(redis_err)?,
            };
            let Some(w) = w else { return Ok(()) };
            if let Some(cause) = w.why.strip_prefix("unauthorized:") {
                // Another gateway (or an earlier request) met the refusal:
                // the lane's Halt trips this gateway's circuit and its probe.
                crate::metrics::discord_credential_refused(&self.platform, true);
                return Err(AdapterError::unauthorized(format!(
                    "discord refuses the bot token ({cause}); sends are stopped until it works again"
                )));
            }
            crate::metrics::discord_wait(&self.platform, &w.why);
            if w.why == "invalid_requests" || waited + w.wait > self.max_inline_wait {
                return Err(AdapterError::rate_limited(
                    w.wait,
                    format!(
                        "discord {}: rate limited ({}) for {:?}",
                        route.key, w.why, w.wait
                    ),
                ));
            }
            // A little jitter so waiting gateways do not all come back at once.
            let jitter = Duration::from_millis(rand::random::<u64>() % 15);
            tokio::time::sleep(w.wait + jitter).await;
            waited += w.wait + jitter;
        }
    }

    /// One call to the API: a permit, the request, the bucket headers
    /// recorded; the JSON answer (`Null` for 204), or the failure classified.
    pub(super) async fn call_api(
        &self,
        route: &Route,
        query: &[(&str, &str)],
        body: Body,
    ) -> Result<Value, AdapterError> {
        self.call_api_as(route, query, body, false).await
    }

    /// [`Self::call_api`]; a `probe` goes through while the token is refused.
    pub(super) async fn call_api_as(
        &self,
        route: &Route,
        query: &[(&str, &str)],
        body: Body,
        probe: bool,
    ) -> Result<Value, AdapterError> {
        self.permit(route, probe).await?;
        let mut req = self
            .client
            .request(route.method.clone(), format!("{}{}", self.base, route.path));
        if route.bot_auth {
            req = req.header(AUTHORIZATION, self.auth.clone());
        }
        if !query.is_empty() {
            req = req.query(query);
        }
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Form(f) => req.multipart(f),
        };
        let what = format!("{} {}", route.method, route.path);
        let resp = req.send().await.map_err(|e| {
            AdapterError::transient(format!("discord {what} failed: {}", e.without_url()))
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| {
            AdapterError::transient(format!(
                "discord {what}: reading the answer failed: {}",
                e.without_url()
            ))
        })?;
        if let Some(h) = bucket_headers(&headers)
            && let Err(e) = self.limiter.update(route, &h).await
        {
            warn!(platform = %self.platform, error = %e, "discord: recording rate-limit headers failed");
        }
        if status.is_success() {
            if bytes.is_empty() || status == StatusCode::NO_CONTENT {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                AdapterError::transient(format!("discord {what}: answer is not JSON: {e}"))
            });
        }
        let err = classify(&what, status, &headers, &bytes);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let limit = rate_limit_of(&headers, &bytes);
            if let Err(e) = self.limiter.limited(route, limit.after, limit.global).await {
                warn!(platform = %self.platform, error = %e, "discord: recording a 429 failed");
            }
            warn!(platform = %self.platform, route = %route.key, scope = %limit.scope, retry_after_ms = limit.after.as_millis() as u64, "discord answered 429");
            crate::metrics::discord_429(&self.platform, &limit.scope);
            if limit.scope != "shared" {
                self.count_invalid().await;
            }
        } else if status == StatusCode::UNAUTHORIZED && route.bot_auth {
            self.count_invalid().await;
            // A verdict on the token, not on this request: stop every send.
            let cause = format!("{what} answered 401");
            if !probe {
                crate::metrics::discord_credential_refused(&self.platform, true);
            }
            if let Err(e) = self.limiter.refused(&cause).await {
                warn!(platform = %self.platform, error = %e, "discord: recording the refused token failed");
            }
            return Err(AdapterError::unauthorized(err.message));
        } else if matches!(status.as_u16(), 401 | 403) {
            self.count_invalid().await;
        }
        Err(err)
    }

    async fn count_invalid(&self) {
        crate::metrics::discord_invalid(&self.platform);
        match self.limiter.invalid().await {
            Ok(n) => {
                debug!(platform = %self.platform, count = n, "discord invalid request counted")
            }
            Err(e) => {
                warn!(platform = %self.platform, error = %e, "discord: counting an invalid request failed")
            }
        }
    }
}

pub(super) fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn seconds(s: &str) -> Option<Duration> {
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .map(|f| Duration::from_secs_f64(f.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// The `X-RateLimit-*` headers of an answer, when it has them.
pub(super) fn bucket_headers(h: &HeaderMap) -> Option<BucketHeaders> {
    Some(BucketHeaders {
        bucket: header(h, "x-ratelimit-bucket").map(str::to_owned),
        limit: header(h, "x-ratelimit-limit")?.parse().ok()?,
        remaining: header(h, "x-ratelimit-remaining")?.parse().ok()?,
        reset_after: seconds(header(h, "x-ratelimit-reset-after")?)?,
    })
}

/// What a 429 says.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RateLimit {
    after: Duration,
    global: bool,
    /// `user`, `global`, `shared` (or empty).
    scope: String,
}

pub(super) fn rate_limit_of(h: &HeaderMap, body: &[u8]) -> RateLimit {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let after = parsed
        .as_ref()
        .and_then(|v| v.get("retry_after"))
        .and_then(Value::as_f64)
        .and_then(|f| seconds(&f.to_string()))
        .or_else(|| header(h, RETRY_AFTER.as_str()).and_then(seconds))
        .unwrap_or(DEFAULT_RETRY_AFTER)
        .min(MAX_RETRY_AFTER);
    let scope = header(h, "x-ratelimit-scope").unwrap_or("").to_owned();
    let global = scope == "global"
        || parsed
            .as_ref()
            .and_then(|v| v.get("global"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
        || header(h, "x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    RateLimit {
        after,
        global,
        scope,
    }
}

/// Classify a non-2xx answer: see the module docs.
pub(super) fn classify(what: &str, status: StatusCode, h: &HeaderMap, body: &[u8]) -> AdapterError {
    let parsed: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
    let code = parsed
        .as_ref()
        .and_then(|m| m.get("code"))
        .and_then(Value::as_u64);
    let text = parsed
        .as_ref()
        .and_then(|m| m.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            let t = String::from_utf8_lossy(body);
            let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
            (!t.is_empty()).then_some(t)
        });
    let mut message = format!("discord {what} answered {}", status.as_u16());
    if let Some(c) = code {
        message.push_str(&format!(" code {c}"));
    }
    if let Some(mut t) = text {
        if let Some(errors) = parsed.as_ref().and_then(|m| m.get("errors")) {
            t.push_str(&format!(" {errors}"));
        }
        message.push_str(": ");
        match t.char_indices().nth(MAX_MESSAGE_CHARS) {
            Some((i, _)) => {
                message.push_str(&t[..i]);
                message.push('…');
            }
            None => message.push_str(&t),
        }
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        let limit = rate_limit_of(h, body);
        let scope = if limit.scope.is_empty() {
            if limit.global { "global" } else { "route" }
        } else {
            limit.scope.as_str()
        };
        return AdapterError::rate_limited(
            limit.after,
            format!("{message} (scope {scope}, retry after {:?})", limit.after),
        );
    }
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        return AdapterError::transient(message);
    }
    AdapterError::permanent(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::Retry;

    #[test]
    fn errors_are_classified() {
        let c = |status: u16, body: &str, headers: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                h.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            classify(
                "POST /channels/1/messages",
                StatusCode::from_u16(status).unwrap(),
                &h,
                body.as_bytes(),
            )
        };
        let e = c(
            403,
            r#"{"message": "Missing Permissions", "code": 50013}"#,
            &[],
        );
        assert_eq!(e.retry, Retry::Never);
        assert_eq!(
            e.message,
            "discord POST /channels/1/messages answered 403 code 50013: Missing Permissions"
        );
        assert_eq!(
            c(404, r#"{"message": "Unknown Channel", "code": 10003}"#, &[]).retry,
            Retry::Never
        );
        let e = c(
            400,
            r#"{"message": "Invalid Form Body", "code": 50035, "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH"}]}}}"#,
            &[],
        );
        assert_eq!(e.retry, Retry::Never);
        assert!(e.message.contains("50035") && e.message.contains("BASE_TYPE_MAX_LENGTH"));
        let e = c(
            429,
            r#"{"message": "You are being rate limited.", "retry_after": 0.25, "global": false}"#,
            &[("x-ratelimit-scope", "user")],
        );
        assert_eq!(e.retry, Retry::After(Duration::from_millis(250)));
        assert!(e.message.contains("scope user"), "{}", e.message);
        assert_eq!(
            c(429, "", &[("retry-after", "2")]).retry,
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(c(502, "bad gateway", &[]).retry, Retry::Backoff);
        assert_eq!(c(408, "", &[]).retry, Retry::Backoff);
        assert_eq!(
            c(401, r#"{"message": "401: Unauthorized", "code": 0}"#, &[]).retry,
            Retry::Never
        );
    }

    #[test]
    fn rate_limits_and_buckets_are_read() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-bucket", HeaderValue::from_static("abcd"));
        h.insert("x-ratelimit-limit", HeaderValue::from_static("5"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("4"));
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("4.250"));
        assert_eq!(
            bucket_headers(&h),
            Some(BucketHeaders {
                bucket: Some("abcd".into()),
                limit: 5,
                remaining: 4,
                reset_after: Duration::from_millis(4250),
            })
        );
        h.insert("x-ratelimit-scope", HeaderValue::from_static("global"));
        let r = rate_limit_of(&h, br#"{"retry_after": 1.5, "global": true}"#);
        assert_eq!(r.after, Duration::from_millis(1500));
        assert!(r.global);
        assert!(bucket_headers(&HeaderMap::new()).is_none());
    }
}
