//! Where Redis is and how to reach it: one server (`redis://`, `rediss://`,
//! `redis+unix://`), a Redis Cluster (seed nodes), a Sentinel-managed
//! primary (followed through failovers), with TLS (a CA file, an optional
//! client certificate) and an ACL user — and [`Conn`], the one connection
//! type the rest of the crate speaks through, whichever it is.
//!
//! [`Conn`] implements [`redis::aio::ConnectionLike`] by delegation, so every
//! command, pipeline and script works unchanged on either deployment; on a
//! cluster, redis-rs routes each command by its key's slot and follows
//! `MOVED`/`ASK` redirections (a resharding mid-run) by itself. Every key of a
//! platform carries the hash tag `{<platform>}` (SPEC §2), so a script's keys
//! always share a slot.
//!
//! Two kinds of connection are made: the shared one (multiplexed, a 10 s
//! response timeout, reconnecting by itself) for short commands, and one per
//! blocking reader with no response timeout of its own (ECOSYSTEM: a blocked
//! `XREADGROUP` would otherwise time out, or hold up everything queued behind
//! it); the caller bounds each blocking call with `tokio::time::timeout`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo,
    IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::config::ConfigError;

/// Response timeout of the shared connection.
const SHARED_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection (and TLS handshake) timeout of every connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A blocking reader's per-node response bound on a cluster, where redis-rs
/// requires one: far above any `BLOCK` the gateway uses, which the caller
/// bounds itself.
const CLUSTER_BLOCKING_TIMEOUT: Duration = Duration::from_secs(3600);

/// A connection to Redis: one server or a cluster.
#[derive(Clone)]
pub enum Conn {
    /// The shared, self-reconnecting connection to one server.
    Single(ConnectionManager),
    /// A connection to a cluster: per-node multiplexed connections, routed
    /// by slot, following redirections and topology changes.
    Cluster(ClusterConnection),
    /// A connection of its own to one server (blocking readers).
    Direct(MultiplexedConnection),
    /// The primary a set of Sentinels names, asked again after a failover.
    Sentinel(Arc<SentinelConn>),
}

/// The shared connection to a Sentinel-managed primary: a
/// `ConnectionManager` to the primary the Sentinels name, dropped at the
/// first sign of a failover (the node gone, or answering `READONLY` as a
/// demoted replica) so the next command asks the Sentinels again. The
/// failing command's error goes to its caller, which retries it (G10).
pub struct SentinelConn {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<(String, ConnectionManager)>>,
}

impl SentinelConn {
    /// The primary's connection, asking the Sentinels when there is none.
    async fn primary(&self) -> RedisResult<ConnectionManager> {
        if let Some((_, c)) = self.current.lock().expect("sentinel state").as_ref() {
            return Ok(c.clone());
        }
        let mut sentinel = self.sentinel.lock().await;
        if let Some((_, c)) = self.current.lock().expect("sentinel state").as_ref() {
            return Ok(c.clone());
        }
        let client = sentinel.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(SHARED_RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1);
        let c = ConnectionManager::new_with_config(client, config).await?;
        tracing::info!(primary = %addr, "connected to the primary the Sentinels name");
        *self.current.lock().expect("sentinel state") = Some((addr, c.clone()));
        Ok(c)
    }

    /// Forget the primary after an error that may mean a failover.
    fn check(&self, e: &redis::RedisError) {
        if (super::transient(e) || e.code() == Some("READONLY"))
            && let Some((addr, _)) = self.current.lock().expect("sentinel state").take()
        {
            tracing::warn!(primary = %addr, error = %e, "the primary failed; asking the Sentinels again");
        }
    }

    /// The primary in use (`host:port`), if connected.
    pub fn primary_addr(&self) -> Option<String> {
        self.current
            .lock()
            .expect("sentinel state")
            .as_ref()
            .map(|(a, _)| a.clone())
    }
}

impl Conn {
    /// Whether this talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Send `cmd` to the primary holding `key`'s slot (on one server, to
    /// that server): for keyless commands whose effect is per node, such as
    /// `WAIT` or `SCAN`.
    pub async fn on_node_of(&mut self, key: &str, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                c.route_command(cmd.clone(), route).await
            }
            other => cmd.query_async(other).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.primary().await?;
                let r = c.req_packed_command(cmd).await;
                if let Err(e) = &r {
                    s.check(e);
                }
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.primary().await?;
                let r = c.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &r {
                    s.check(e);
                }
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Direct(c) => c.get_db(),
            Conn::Sentinel(_) => 0,
        }
    }
}

/// TLS material for `rediss://` (PEM), read once from the configured files.
#[derive(Clone, Default)]
pub struct Tls {
    /// CA certificate(s) to trust instead of the built-in web roots.
    pub ca: Option<Vec<u8>>,
    /// A client certificate chain and its key, for servers that require one.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl Tls {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }

    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            root_cert: self.ca.clone(),
        }
    }
}

/// Where Redis is: the deployment, the TLS material and the credentials.
#[derive(Clone)]
pub struct Target {
    kind: Kind,
    tls: Tls,
    /// A password from outside the URL (`redis.password_env`); wins over the URL's.
    password: Option<String>,
}

#[derive(Clone)]
enum Kind {
    Single(String),
    Cluster(Vec<String>),
    Sentinel { master: String, urls: Vec<String> },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `scheme://user:…@host:port` → the same with the password hidden.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (Some(auth), host),
        None => (None, rest),
    };
    match auth {
        Some(auth) => {
            let user = auth.split_once(':').map(|(u, _)| u).unwrap_or(auth);
            if auth.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => url.to_owned(),
    }
}

impl Target {
    /// The target `[redis]` describes: `url` or `cluster`, the TLS files
    /// read now, the password from the variable `password_env` names in `env`.
    pub fn from_config(
        c: &crate::config::RedisConfig,
        env: &HashMap<String, String>,
    ) -> Result<Target, ConfigError> {
        let read = |key: &str, path: &Option<String>| -> Result<Option<Vec<u8>>, ConfigError> {
            match path {
                None => Ok(None),
                Some(p) => std::fs::read(p)
                    .map(Some)
                    .map_err(|e| ConfigError(format!("redis.{key}: cannot read `{p}`: {e}"))),
            }
        };
        let ca = read("tls_ca_file", &c.tls_ca_file)?;
        let cert = read("tls_cert_file", &c.tls_cert_file)?;
        let key = read("tls_key_file", &c.tls_key_file)?;
        let tls = Tls {
            ca,
            client: cert.zip(key),
        };
        let password = match &c.password_env {
            None => None,
            Some(var) => Some(env.get(var).cloned().ok_or_else(|| {
                ConfigError(format!(
                    "redis.password_env names `{var}`, which is not set"
                ))
            })?),
        };
        let target = match (&c.sentinel, c.cluster.is_empty()) {
            (Some(s), _) => Target::sentinel(&s.master, s.urls.clone()),
            (None, true) => Target::url(&c.url),
            (None, false) => Target::cluster(c.cluster.clone()),
        };
        Ok(target.with_tls(tls).with_password(password))
    }

    /// One server at `url`.
    pub fn url(url: &str) -> Target {
        Target {
            kind: Kind::Single(url.to_owned()),
            tls: Tls::default(),
            password: None,
        }
    }

    /// A Redis Cluster reached through `seeds` (any of its nodes; the rest
    /// of the topology is asked of them).
    pub fn cluster(seeds: Vec<String>) -> Target {
        Target {
            kind: Kind::Cluster(seeds),
            tls: Tls::default(),
            password: None,
        }
    }

    /// The primary that the Sentinels at `urls` monitor as `master`,
    /// followed through failovers.
    pub fn sentinel(master: &str, urls: Vec<String>) -> Target {
        Target {
            kind: Kind::Sentinel {
                master: master.to_owned(),
                urls,
            },
            tls: Tls::default(),
            password: None,
        }
    }

    /// Whether the primary is found through Sentinels.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.kind, Kind::Sentinel { .. })
    }

    /// A Sentinel client for the primary (with this target's password for it).
    fn sentinel_client(&self, master: &str, urls: &[String]) -> RedisResult<SentinelClient> {
        let mut node = redis::RedisConnectionInfo::default();
        if let Some(p) = &self.password {
            node = node.set_password(p.clone());
        }
        let info =
            redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
        SentinelClient::build(
            urls.to_vec(),
            master,
            Some(info),
            redis::sentinel::SentinelServerType::Master,
        )
    }

    /// Ask the Sentinels for the primary now: its address and a client.
    pub async fn resolve_primary(&self) -> RedisResult<Option<(String, Client)>> {
        let Kind::Sentinel { master, urls } = &self.kind else {
            return Ok(None);
        };
        let client = self
            .sentinel_client(master, urls)?
            .async_get_client()
            .await?;
        Ok(Some((
            client.get_connection_info().addr().to_string(),
            client,
        )))
    }

    /// The same target with TLS material (needs `rediss://` URLs).
    pub fn with_tls(mut self, tls: Tls) -> Target {
        self.tls = tls;
        self
    }

    /// The same target with a password that wins over the URL's.
    pub fn with_password(mut self, password: Option<String>) -> Target {
        self.password = password;
        self
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// The URL(s), passwords hidden, for messages and `/readyz`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Single(u) => redact(u),
            Kind::Cluster(seeds) => format!(
                "cluster [{}]",
                seeds
                    .iter()
                    .map(|s| redact(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Kind::Sentinel { master, urls } => format!(
                "sentinel `{master}` [{}]",
                urls.iter()
                    .map(|s| redact(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn info(&self, url: &str) -> RedisResult<ConnectionInfo> {
        let mut info = url.into_connection_info()?;
        if let Some(p) = &self.password {
            let settings = info.redis_settings().clone().set_password(p.clone());
            info = info.set_redis_settings(settings);
        }
        Ok(info)
    }

    /// A client for one server at `url`, with this target's TLS and password.
    fn client_for(&self, url: &str) -> RedisResult<Client> {
        let info = self.info(url)?;
        if self.tls.is_empty() {
            return Client::open(info);
        }
        if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "redis.tls_ca_file / tls_cert_file are set but the URL is not rediss://",
                redact(url),
            )));
        }
        Client::build_with_tls(info, self.tls.certificates())
    }

    /// A plain client of one node (the first seed on a cluster): for
    /// subscriptions, which a cluster broadcasts to every node.
    pub async fn client(&self) -> RedisResult<Client> {
        match &self.kind {
            Kind::Sentinel { .. } => Ok(self.resolve_primary().await?.expect("sentinel").1),
            Kind::Single(u) => self.client_for(u),
            Kind::Cluster(seeds) => {
                self.client_for(seeds.first().map(String::as_str).unwrap_or(""))
            }
        }
    }

    fn cluster_client(&self, seeds: &[String], response: Duration) -> RedisResult<ClusterClient> {
        let infos = seeds
            .iter()
            .map(|s| self.info(s))
            .collect::<RedisResult<Vec<_>>>()?;
        let mut b = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(response)
            // Redirections and reconnections get their own time, not a
            // share of one command's.
            .overall_response_timeout(Some(response * 3));
        if !self.tls.is_empty() {
            b = b.certs(self.tls.certificates());
        }
        b.build()
    }

    /// The shared connection for short commands.
    pub async fn shared(&self) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Single(u) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(SHARED_RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                let client = self.client_for(u)?;
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Kind::Cluster(seeds) => Ok(Conn::Cluster(
                self.cluster_client(seeds, SHARED_RESPONSE_TIMEOUT)?
                    .get_async_connection()
                    .await?,
            )),
            Kind::Sentinel { master, urls } => {
                let s = SentinelConn {
                    sentinel: tokio::sync::Mutex::new(self.sentinel_client(master, urls)?),
                    current: std::sync::Mutex::new(None),
                };
                s.primary().await?;
                Ok(Conn::Sentinel(Arc::new(s)))
            }
        }
    }

    /// A connection of its own for a blocking command (no response timeout
    /// of its own: bound each call with `tokio::time::timeout`).
    pub async fn blocking(&self) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Single(u) => {
                let config = AsyncConnectionConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                Ok(Conn::Direct(
                    self.client_for(u)?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Kind::Cluster(seeds) => Ok(Conn::Cluster(
                self.cluster_client(seeds, CLUSTER_BLOCKING_TIMEOUT)?
                    .get_async_connection()
                    .await?,
            )),
            Kind::Sentinel { .. } => {
                let config = AsyncConnectionConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                let (_, client) = self.resolve_primary().await?.expect("sentinel");
                Ok(Conn::Direct(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
        }
    }

    /// A short-lived connection with `timeout` on everything (`/readyz`).
    pub async fn probe(&self, timeout: Duration) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Single(u) => {
                let config = AsyncConnectionConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout));
                Ok(Conn::Direct(
                    self.client_for(u)?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Kind::Cluster(seeds) => Ok(Conn::Cluster(
                self.cluster_client(seeds, timeout)?
                    .get_async_connection()
                    .await?,
            )),
            Kind::Sentinel { .. } => {
                let config = AsyncConnectionConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout));
                let (_, client) = self.resolve_primary().await?.expect("sentinel");
                Ok(Conn::Direct(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_the_missing_file_and_variable() {
        let c = crate::config::Config::from_toml(
            "[redis]\nurl = \"rediss://h:1\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
            [],
        )
        .unwrap();
        let e = Target::from_config(&c.redis, &HashMap::new()).unwrap_err();
        assert!(
            e.0.contains("redis.tls_ca_file") && e.0.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let c =
            crate::config::Config::from_toml("[redis]\npassword_env = \"SG_PW\"\n", []).unwrap();
        let e = Target::from_config(&c.redis, &HashMap::new()).unwrap_err();
        assert!(
            e.0.contains("redis.password_env") && e.0.contains("SG_PW"),
            "{e}"
        );
        let env = [("SG_PW".to_owned(), "pw".to_owned())].into();
        assert!(Target::from_config(&c.redis, &env).is_ok());
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("rediss://gw:s3cret@db.example:6380/0"),
            "rediss://gw:***@db.example:6380/0"
        );
        assert_eq!(redact("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        let t = Target::cluster(vec!["redis://a:pw@h:1".into(), "redis://h:2".into()]);
        assert_eq!(t.describe(), "cluster [redis://a:***@h:1, redis://h:2]");
        assert!(!format!("{t:?}").contains("pw"));
    }
}
