//! A gateway node: one consumer per configured platform, the HTTP listener,
//! and the two-phase shutdown of G8.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::adapters;
use crate::bus::Bus;
use crate::config::{Config, ConsumerConfig};
use crate::consumer::{Consumer, ConsumerParts};
use crate::ops::gauges::Gauges;

/// How often the gauges (pending, lag, oldest pending age, load) are refreshed.
const GAUGE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("redis at {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("platform `{platform}`: {message}")]
    Adapter { platform: String, message: String },
    #[error("http listener on {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The default consumer name: host name and process id.
pub fn default_consumer_name(env: &HashMap<String, String>) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .or_else(|| env.get("HOSTNAME").cloned())
        .unwrap_or_else(|| "gateway".into());
    format!("{host}-{}", std::process::id())
}

/// Run every platform of `config` until `shutdown` resolves, then drain.
pub async fn run(
    config: Config,
    env: HashMap<String, String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let consumer_name = config
        .gateway
        .consumer_name
        .clone()
        .unwrap_or_else(|| default_consumer_name(&env));
    let target = crate::bus::Target::from_config(&config.redis, &env)?;
    let redis_err = |source| GatewayError::Redis {
        url: target.describe(),
        source,
    };
    let http_stop = CancellationToken::new();
    let readiness = crate::http::Readiness::for_target(target.clone());
    let inbound_routes = crate::http::InboundRoutes::default();
    // The dashboard (`/ui/`), read-only unless an action token is configured.
    let ui = match (&config.http.listen, config.http.ui) {
        (Some(_), true) => {
            let token = config.ui_token(&env)?;
            let ui = crate::ui::Ui::new(token.as_deref(), readiness.clone(), &consumer_name);
            ui.spawn_sampler(http_stop.clone());
            Some(ui)
        }
        _ => None,
    };
    if let Some(listen) = &config.http.listen {
        let addr = listen.parse().map_err(|_| {
            GatewayError::Config(crate::config::ConfigError(format!(
                "http.listen `{listen}` is not an address"
            )))
        })?;
        let bound = crate::http::serve_routes(
            addr,
            http_stop.clone(),
            readiness.clone(),
            inbound_routes.clone(),
            ui.as_ref().map(crate::ui::Ui::router).unwrap_or_default(),
        )
        .await
        .map_err(|source| GatewayError::Http {
            addr: listen.clone(),
            source,
        })?;
        info!(%bound, "http listener up (/healthz, /readyz, /metrics)");
        if let Some(ui) = &ui {
            info!(
                url = %format!("http://{bound}/ui/"),
                actions = if ui.actions_enabled() { "with token" } else { "off (read-only)" },
                "dashboard up"
            );
        }
    }
    let mut consumers = Vec::new();
    // Trimming, gauges and inbound loops (matrix sync), per platform;
    // stopped before the consumers drain.
    let ops_stop = CancellationToken::new();
    let mut ops_tasks = Vec::new();
    let mut ready_adapters = Vec::new();
    let mut base: Option<Bus> = None;
    for p in &config.platforms {
        let keys = p.keys(&config.redis.prefix);
        let bus = match &base {
            Some(b) => b.for_platform(keys),
            None => {
                let b = crate::bus::until_up("connect", || Bus::connect_to(&target, keys.clone()))
                    .await
                    .map_err(redis_err)?
                    .with_wait_replicas(
                        config.redis.wait_replicas,
                        ConsumerConfig::ms(config.redis.wait_timeout_ms),
                    );
                base = Some(b.clone());
                b
            }
        };
        let secret = match p.adapter {
            crate::config::AdapterKind::Matrix => Some(Config::access_token_for(p, &env)?),
            crate::config::AdapterKind::Discord => Some(Config::discord_token_for(p, &env)?),
            _ => Config::secret_for(p, &env)?,
        };
        let inbound = crate::inbound::InboundPublisher::new(bus.conn(), bus.keys().clone());
        let adapter_err = |message| GatewayError::Adapter {
            platform: p.name.clone(),
            message,
        };
        let adapter: adapters::SharedAdapter = match p.adapter {
            crate::config::AdapterKind::Console if p.read_stdin => {
                let console = Arc::new(adapters::console::ConsoleAdapter::stdout(&p.name));
                let stdin = tokio::io::BufReader::new(tokio::io::stdin());
                tokio::spawn(console.clone().read_input(stdin, inbound.clone()));
                info!(platform = %p.name, "reading typed lines as inbound messages (#channel text)");
                console
            }
            crate::config::AdapterKind::Matrix => {
                let refresh = Config::refresh_token_for(p, &env)?;
                let matrix = Arc::new(
                    adapters::matrix_shared_from_config(p, secret.clone(), refresh, &bus)
                        .map_err(adapter_err)?,
                );
                let syncer =
                    adapters::matrix_syncer_from_config(p, matrix.clone(), &consumer_name, &bus)
                        .map_err(adapter_err)?;
                ops_tasks.push(tokio::spawn(Arc::new(syncer).run(ops_stop.clone())));
                info!(platform = %p.name, user = %matrix.user_id(), "matrix adapter up; one gateway of the fleet syncs inbound events");
                matrix
            }
            crate::config::AdapterKind::Discord => {
                let discord = Arc::new(
                    adapters::discord_from_config(p, secret.clone(), bus.conn(), bus.keys())
                        .map_err(adapter_err)?,
                );
                if p.gateway {
                    let session = adapters::discord_session_from_config(
                        p,
                        secret.clone(),
                        &consumer_name,
                        &bus,
                        &discord,
                    )
                    .map_err(adapter_err)?;
                    let session = Arc::new(session);
                    discord.attach_session(&session);
                    ops_tasks.push(tokio::spawn(session.run(ops_stop.clone())));
                    info!(platform = %p.name, shards = ?p.shards, "discord gateway session enabled (its shards are leased across the fleet)");
                }
                discord
            }
            _ => adapters::build(p, secret.clone()).map_err(adapter_err)?,
        };
        if p.adapter == crate::config::AdapterKind::Webhook {
            inbound_routes.add(&p.name, inbound, secret.map(String::into_bytes));
        }
        ready_adapters.push((p.name.clone(), adapter.clone()));
        let adapter_kind = adapter.kind();
        let settings = config.consumer_for(p);
        if settings.trim_interval_ms > 0 {
            ops_tasks.push(crate::trim::spawn(
                bus.clone(),
                ConsumerConfig::ms(settings.trim_interval_ms),
                ConsumerConfig::ms(settings.retention_ms),
                ops_stop.clone(),
            ));
        }
        if bus.keys().is_legacy() && bus.is_cluster().await.map_err(redis_err)? {
            return Err(GatewayError::Config(crate::config::ConfigError(format!(
                "platform `{}` has legacy_layout, whose stream `{}` carries no hash tag: \
                 it cannot live on Redis Cluster; move its workers to the current layout first",
                p.name,
                bus.keys().outbound()
            ))));
        }
        let consumer = Consumer::start(ConsumerParts {
            bus: bus.clone(),
            adapter,
            settings: settings.clone(),
            consumer_name: consumer_name.clone(),
            cache_prefix: config.redis.cache_prefix.clone(),
            tools: Vec::new(),
        })
        .await
        .map_err(redis_err)?;
        if let Some(ui) = &ui {
            ui.add_platform(
                crate::ui::UiPlatform {
                    name: p.name.clone(),
                    adapter: adapter_kind.to_owned(),
                    bus: bus.clone(),
                    settings: settings.clone(),
                },
                consumer.stats(),
            );
        }
        ops_tasks.push(
            Gauges::new(bus, consumer.dispatcher(), settings.dlq_maxlen)
                .spawn(GAUGE_EVERY, ops_stop.clone()),
        );
        consumers.push(consumer);
    }
    readiness.set_adapters(ready_adapters);
    readiness.set_circuits(consumers.iter().map(|c| c.circuit()).collect());
    info!(consumer = %consumer_name, platforms = consumers.len(), "gateway running");
    shutdown.await;
    info!("shutting down: no more reads, draining in-flight work");
    ops_stop.cancel();
    futures::future::join_all(ops_tasks).await;
    futures::future::join_all(consumers.into_iter().map(Consumer::shutdown)).await;
    http_stop.cancel();
    info!("gateway stopped");
    Ok(())
}
