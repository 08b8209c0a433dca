//! The HTTP listener (`[http] listen`):
//!
//! - `/healthz` — 200 while the process is alive.
//! - `/readyz` — 200 only when Redis answers PING (a fresh connection per
//!   request, 500 ms at most) and every platform's adapter is ready; else 503
//!   with the reason in the body.
//! - `/metrics` — the Prometheus text format (names in [`crate::metrics`]).
//! - `POST /inbound/<platform>` — for webhook platforms: an inbound event
//!   (JSON, see [`crate::inbound`]) to publish for the workers; signed with
//!   `X-Stargazer-Signature` when the platform has a secret.
//! - `/ui/…` — the dashboard ([`crate::ui`]), when the gateway serves it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::adapters::SharedAdapter;
use crate::inbound::{InboundEvent, InboundPublisher};

/// Platforms that accept inbound events over HTTP, with their secrets.
#[derive(Debug, Clone, Default)]
pub struct InboundRoutes(Arc<RwLock<HashMap<String, InboundRoute>>>);

/// Where a platform's inbound events go, and the secret that signs them.
type InboundRoute = (InboundPublisher, Option<Vec<u8>>);

impl InboundRoutes {
    /// Accept `POST /inbound/<platform>`; with a secret, only signed bodies.
    pub fn add(&self, platform: &str, publisher: InboundPublisher, secret: Option<Vec<u8>>) {
        self.0
            .write()
            .expect("inbound routes poisoned")
            .insert(platform.to_owned(), (publisher, secret));
    }
}

/// How long a readiness check may wait for Redis.
pub const READY_TIMEOUT: Duration = Duration::from_millis(500);

/// What `/readyz` checks: Redis at `redis` (one server or a cluster, with
/// its TLS and credentials), and the adapters once the gateway has started
/// them (until then: not ready, "starting").
#[derive(Debug, Clone)]
pub struct Readiness {
    redis: crate::bus::Target,
    adapters: Arc<RwLock<Option<Vec<Platform>>>>,
    circuits: Arc<RwLock<Vec<crate::circuit::Circuit>>>,
}

/// A platform's name and its adapter.
type Platform = (String, SharedAdapter);

impl Readiness {
    pub fn new(redis_url: &str) -> Readiness {
        Self::for_target(crate::bus::Target::url(redis_url))
    }

    /// Readiness of a gateway that reaches Redis through `target`.
    pub fn for_target(target: crate::bus::Target) -> Readiness {
        Readiness {
            redis: target,
            adapters: Arc::new(RwLock::new(None)),
            circuits: Arc::new(RwLock::new(Vec::new())),
        }
    }

    /// Every platform is running: its adapter is what readiness asks now.
    pub fn set_adapters(&self, adapters: Vec<Platform>) {
        *self.adapters.write().expect("readiness lock poisoned") = Some(adapters);
    }

    /// The platforms' circuits: an open one makes the gateway not ready.
    pub fn set_circuits(&self, circuits: Vec<crate::circuit::Circuit>) {
        *self.circuits.write().expect("readiness lock poisoned") = circuits;
    }

    /// Each platform's readiness (`None` until the platforms run): `None`
    /// when ready, else why not — the adapter's reason, or the open circuit's.
    pub fn platform_states(&self) -> Option<Vec<(String, Option<String>)>> {
        let adapters = self.adapters.read().expect("readiness lock poisoned");
        let circuits = self.circuits.read().expect("readiness lock poisoned");
        adapters.as_ref().map(|a| {
            a.iter()
                .map(|(p, a)| {
                    let circuit = circuits
                        .iter()
                        .find(|c| c.platform() == p)
                        .and_then(|c| c.open_reason())
                        .map(|r| format!("circuit open, sends stopped: credential refused: {r}"));
                    let adapter = (!a.ready()).then(|| {
                        a.not_ready_reason().unwrap_or_else(|| {
                            format!(
                                "the {} adapter is not ready: its platform session is down or \
                                 its credential was refused; sends of this platform wait",
                                a.kind()
                            )
                        })
                    });
                    (p.clone(), circuit.or(adapter))
                })
                .collect()
        })
    }

    /// `Ok` when ready, else the reason.
    pub async fn check(&self) -> Result<(), String> {
        self.check_detail().await.map(|_| ())
    }

    /// `Ok` with what `/readyz` adds to "ready" (under Sentinel: the
    /// primary in use), else the reason.
    pub async fn check_detail(&self) -> Result<String, String> {
        let detail = ping(&self.redis).await?;
        let adapters = self.adapters.read().expect("readiness lock poisoned");
        let Some(adapters) = adapters.as_ref() else {
            return Err("starting: the platforms are not running yet".into());
        };
        let not_ready: Vec<String> = adapters
            .iter()
            .filter(|(_, a)| !a.ready())
            .map(|(p, a)| match a.not_ready_reason() {
                Some(why) => format!("{p} ({why})"),
                None => p.clone(),
            })
            .collect();
        if !not_ready.is_empty() {
            return Err(format!("adapter not ready: {}", not_ready.join(", ")));
        }
        let mut detail = detail;
        for (p, a) in adapters.iter() {
            if let Some(d) = a.ready_detail() {
                detail.push_str(&format!("; {p}: {d}"));
            }
        }
        let open: Vec<String> = self
            .circuits
            .read()
            .expect("readiness lock poisoned")
            .iter()
            .filter_map(|c| {
                c.open_reason()
                    .map(|r| format!("{} (credential refused: {r})", c.platform()))
            })
            .collect();
        if open.is_empty() {
            Ok(detail)
        } else {
            Err(format!("circuit open, sends stopped: {}", open.join("; ")))
        }
    }
}

/// PING Redis over a connection of its own, within [`READY_TIMEOUT`] (on a
/// cluster, every primary: PING goes to all of them; under Sentinel, the
/// primary the Sentinels name now, which is returned).
async fn ping(target: &crate::bus::Target) -> Result<String, String> {
    let attempt = async {
        let primary = match target.resolve_primary().await? {
            Some((addr, _)) => format!(" (redis primary {addr}, from {})", target.describe()),
            None => String::new(),
        };
        let mut conn = target.probe(READY_TIMEOUT).await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(primary)
    };
    // Under Sentinel, two hops: the Sentinels, then the primary.
    let within = if target.is_sentinel() {
        READY_TIMEOUT * 3
    } else {
        READY_TIMEOUT
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(detail)) => Ok(detail),
        Ok(Err(e)) => Err(format!(
            "redis ({}) does not answer PING: {e}",
            target.describe()
        )),
        Err(_) => Err(format!(
            "redis ({}) does not answer PING within {} ms",
            target.describe(),
            within.as_millis()
        )),
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    metrics: PrometheusHandle,
    inbound: InboundRoutes,
}

async fn inbound(
    State(st): State<AppState>,
    Path(platform): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let route = st
        .inbound
        .0
        .read()
        .expect("inbound routes poisoned")
        .get(&platform)
        .cloned();
    let Some((publisher, secret)) = route else {
        return (
            StatusCode::NOT_FOUND,
            format!("no webhook platform `{platform}` takes inbound events here\n"),
        );
    };
    if let Some(secret) = secret {
        let sig = headers
            .get("x-stargazer-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if crate::envelope::sign(&secret, &body) != sig {
            return (
                StatusCode::UNAUTHORIZED,
                "missing or wrong X-Stargazer-Signature\n".into(),
            );
        }
    }
    let mut event: InboundEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not an inbound event: {e}\n"),
            );
        }
    };
    if event.platform.is_empty() {
        event.platform = platform.clone();
    } else if event.platform != platform {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "event says platform `{}` but was posted to `{platform}`\n",
                event.platform
            ),
        );
    }
    if event.ts_ms == 0 {
        event.ts_ms = crate::now_ms();
    }
    if let Err(e) = event.validate() {
        return (StatusCode::BAD_REQUEST, format!("{e}\n"));
    }
    match publisher.publish(&event).await {
        Ok(id) => (StatusCode::ACCEPTED, format!("{{\"id\":\"{id}\"}}")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}\n")),
    }
}

async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    match st.readiness.check_detail().await {
        Ok(detail) => (StatusCode::OK, format!("ready{detail}\n")),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
}

/// Serve until `stop` is cancelled. Installs the metrics recorder (once per
/// process). Returns the bound address at once.
pub async fn serve(
    addr: SocketAddr,
    stop: CancellationToken,
    readiness: Readiness,
) -> std::io::Result<SocketAddr> {
    serve_with(addr, stop, readiness, InboundRoutes::default()).await
}

/// [`serve`], also accepting inbound events for the platforms in `inbound`.
pub async fn serve_with(
    addr: SocketAddr,
    stop: CancellationToken,
    readiness: Readiness,
    inbound_routes: InboundRoutes,
) -> std::io::Result<SocketAddr> {
    serve_routes(addr, stop, readiness, inbound_routes, Router::new()).await
}

/// [`serve_with`], also serving `extra` (the dashboard's routes).
pub async fn serve_routes(
    addr: SocketAddr,
    stop: CancellationToken,
    readiness: Readiness,
    inbound_routes: InboundRoutes,
    extra: Router,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = crate::metrics::install();
    let upkeep = handle.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        // Histograms and idle series are folded in by the recorder's upkeep.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
                _ = upkeep_stop.cancelled() => return,
            }
        }
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/inbound/{platform}", post(inbound))
        .with_state(AppState {
            readiness,
            metrics: handle,
            inbound: inbound_routes,
        })
        .merge(extra);
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    });
    Ok(local)
}
