//! The operator commands of the `stargazer` binary — `status` and `dlq` —
//! as thin shells over [`stargazer::ops`]: argument parsing, where Redis is,
//! and printing.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use stargazer::bus::{Bus, Target as RedisTarget};
use stargazer::config::Config;
use stargazer::keys::Keys;
use stargazer::ops::dlq::{self, Filter, ReplayOptions, Selection, Since};
use stargazer::ops::status::{self, human_ms, table};

/// Where Redis is and how keys are named (shared by every command that
/// talks to Redis without running a gateway).
#[derive(clap::Args, Debug)]
pub struct Target {
    /// Take the Redis URL, key prefix, platforms and signing secrets from this config.
    #[arg(long, short, env = "STARGAZER_CONFIG")]
    config: Option<PathBuf>,
    /// Redis URL when no config is given.
    #[arg(
        long,
        env = "STARGAZER_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Redis Cluster seed nodes (comma-separated) when no config is given, instead of --redis-url.
    #[arg(long, env = "STARGAZER_REDIS_CLUSTER", value_delimiter = ',')]
    cluster: Vec<String>,
    /// Key prefix when no config is given.
    #[arg(long, default_value = "sg")]
    prefix: String,
}

/// What a target resolves to.
pub struct Resolved {
    pub bus: Bus,
    prefix: String,
    config: Option<Config>,
}

impl Resolved {
    /// The signing secret of `platform` (from the config, if any).
    pub fn secret(&self, platform: &str) -> Option<Vec<u8>> {
        self.config.as_ref().and_then(|c| {
            let p = c.platforms.iter().find(|p| p.name == platform);
            p.map(|p| c.consumer_for(p))
                .unwrap_or_else(|| c.consumer.clone())
                .signing_secret
                .map(String::into_bytes)
        })
    }

    /// Where `message_key`s may point (the config's, else `<prefix>:msg:`).
    pub fn cache_prefix(&self) -> String {
        self.config
            .as_ref()
            .map(|c| c.redis.cache_prefix.clone())
            .unwrap_or_else(|| format!("{}:msg:", self.prefix))
    }
}

impl Target {
    pub async fn resolve(&self, platform: &str) -> Result<Resolved> {
        let config = match &self.config {
            Some(path) => Some(Config::load(path, std::env::vars())?),
            None => None,
        };
        let (target, prefix) = match &config {
            Some(c) => (
                RedisTarget::from_config(&c.redis, &std::env::vars().collect())?,
                c.redis.prefix.clone(),
            ),
            None if !self.cluster.is_empty() => (
                RedisTarget::cluster(self.cluster.clone()),
                self.prefix.clone(),
            ),
            None => (RedisTarget::url(&self.redis_url), self.prefix.clone()),
        };
        let bus = Bus::connect_to(&target, Keys::new(&prefix, platform))
            .await
            .with_context(|| format!("connecting to {}", target.describe()))?;
        Ok(Resolved {
            bus,
            prefix,
            config,
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Platform to show (repeatable); default: those of --config, else every
    /// platform with an outbound stream under the prefix.
    #[arg(long)]
    platform: Vec<String>,
    /// Print JSON (one object) instead of tables.
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 2) until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
}

pub async fn status(a: StatusArgs) -> Result<()> {
    let r = a.target.resolve("").await?;
    let platforms = if !a.platform.is_empty() {
        a.platform.clone()
    } else if let Some(c) = &r.config {
        c.platforms.iter().map(|p| p.name.clone()).collect()
    } else {
        r.bus.discover_platforms(&r.prefix).await?
    };
    if platforms.is_empty() {
        bail!(
            "no platform found under prefix `{}`; name one with --platform or --config",
            r.prefix
        );
    }
    loop {
        let st = status::collect(&r.bus, &r.prefix, &platforms).await?;
        let text = if a.json {
            format!("{}\n", serde_json::to_string_pretty(&st)?)
        } else {
            status::render_table(&st)
        };
        let mut out = std::io::stdout().lock();
        if let Some(secs) = a.watch {
            // Clear the screen and go home, then redraw.
            write!(out, "\x1b[2J\x1b[H")?;
            if !a.json {
                writeln!(out, "stargazer status — every {secs}s — Ctrl-C to stop\n")?;
            }
        }
        out.write_all(text.as_bytes())?;
        out.flush()?;
        drop(out);
        let Some(secs) = a.watch else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(secs.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
}

/// Options every dlq action takes.
#[derive(clap::Args, Debug)]
struct DlqCommon {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    platform: String,
}

/// Which dead letters (all filters combine).
#[derive(clap::Args, Debug, Default)]
struct FilterArgs {
    /// Only this error_kind (rejected, retries_exhausted, not_json, …).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(stargazer::dead_letter::DeadLetterKind::NAMES))]
    #[arg(long)]
    kind: Option<String>,
    /// Only this channel.
    #[arg(long)]
    channel: Option<String>,
    /// Only dead-lettered within this long (10m, 2h, 1d) or from this dead-letter stream id.
    #[arg(long, value_parser = |s: &str| Since::parse(s))]
    since: Option<Since>,
    /// At most this many (oldest first).
    #[arg(long)]
    limit: Option<usize>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            kind: self.kind.clone(),
            channel: self.channel.clone(),
            since: self.since.clone(),
            limit: self.limit,
        }
    }

    fn any(&self) -> bool {
        self.kind.is_some()
            || self.channel.is_some()
            || self.since.is_some()
            || self.limit.is_some()
    }

    /// One id, a filter, or everything — exactly one of them.
    fn selection(&self, id: &Option<String>, all: bool) -> Result<Selection> {
        match (id, all, self.any()) {
            (Some(id), false, false) => Ok(Selection::One(id.clone())),
            (None, true, false) => Ok(Selection::Filter(Filter::default())),
            (None, false, true) => Ok(Selection::Filter(self.filter())),
            (None, false, false) => {
                bail!(
                    "say which dead letters: an ID, filters (--kind, --channel, --since, --limit) or --all"
                )
            }
            _ => bail!("give either an ID, filters, or --all — not several"),
        }
    }
}

#[derive(clap::Subcommand, Debug)]
enum DlqAction {
    /// List dead letters (oldest first; 100 unless --limit says otherwise).
    List {
        #[command(flatten)]
        common: DlqCommon,
        #[command(flatten)]
        filters: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole, its envelope decoded.
    Show {
        #[command(flatten)]
        common: DlqCommon,
        /// Its id in the dead-letter stream (from `dlq list`).
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again (same idempotency key, no seq) and remove them from the DLQ.
    Replay {
        #[command(flatten)]
        common: DlqCommon,
        /// One dead letter by id.
        id: Option<String>,
        #[command(flatten)]
        filters: FilterArgs,
        /// Every dead letter of the platform.
        #[arg(long)]
        all: bool,
        /// Print what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters (only with --yes; without it, say how many would go).
    Purge {
        #[command(flatten)]
        common: DlqCommon,
        id: Option<String>,
        #[command(flatten)]
        filters: FilterArgs,
        #[arg(long)]
        all: bool,
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
}

fn short(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub async fn dlq(a: DlqArgs) -> Result<()> {
    match a.action {
        DlqAction::List {
            common,
            filters,
            json,
        } => {
            let r = common.target.resolve(&common.platform).await?;
            let mut f = filters.filter();
            f.limit = Some(f.limit.unwrap_or(100));
            let entries = dlq::list(&r.bus, &f).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            let total = r.bus.len_of(&r.bus.keys().dlq()).await?;
            let now = r.bus.server_time_ms().await?;
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.id.clone(),
                        e.original_id.clone(),
                        e.error_kind.clone(),
                        e.channel_id.clone().unwrap_or_else(|| "-".into()),
                        e.attempts.to_string(),
                        format!("{} ago", human_ms(now.saturating_sub(e.failed_ms))),
                        short(&e.error, 60),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "ORIGINAL ID",
                        "KIND",
                        "CHANNEL",
                        "ATTEMPTS",
                        "FAILED",
                        "ERROR"
                    ],
                    &rows
                )
            );
            println!(
                "listed {} of {total} dead letters in {}",
                entries.len(),
                r.bus.keys().dlq()
            );
            Ok(())
        }
        DlqAction::Show { common, id, json } => {
            let r = common.target.resolve(&common.platform).await?;
            let Some(e) = dlq::show(&r.bus, &id).await? else {
                bail!("no dead letter {id} in {}", r.bus.keys().dlq());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
                return Ok(());
            }
            let now = r.bus.server_time_ms().await?;
            println!("id           {}", e.id);
            println!("original id  {}", e.original_id);
            println!("error kind   {}", e.error_kind);
            println!("error        {}", e.error);
            println!("attempts     {}", e.attempts);
            println!("consumer     {}", e.consumer);
            println!(
                "failed       {} ({} ago)",
                e.failed_ms,
                human_ms(now.saturating_sub(e.failed_ms))
            );
            println!("channel      {}", e.channel_id.as_deref().unwrap_or("-"));
            if let Some(s) = e.seq {
                println!("seq          {s}");
            }
            println!("envelope:\n{}", e.pretty_envelope());
            Ok(())
        }
        DlqAction::Replay {
            common,
            id,
            filters,
            all,
            dry_run,
            json,
        } => {
            let sel = filters.selection(&id, all)?;
            let r = common.target.resolve(&common.platform).await?;
            let opts = ReplayOptions {
                dry_run,
                signing_secret: r.secret(&common.platform),
                progress: !json,
            };
            let rep = dlq::replay(&r.bus, &sel, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
                return Ok(());
            }
            let many = rep.replayed.len() + rep.skipped.len() > 100;
            for x in &rep.replayed {
                if dry_run {
                    println!(
                        "would replay {} (original {}, idempotency key {})",
                        x.dlq_id, x.original_id, x.idempotency_key
                    );
                } else if !many {
                    println!(
                        "replayed {} → {} (original {}, idempotency key {})",
                        x.dlq_id,
                        x.new_id.as_deref().unwrap_or("?"),
                        x.original_id,
                        x.idempotency_key
                    );
                }
            }
            for s in &rep.skipped {
                println!("skipped {}: {}", s.dlq_id, s.reason);
            }
            if dry_run {
                println!(
                    "dry run: would replay {}, skip {}; nothing changed",
                    rep.replayed.len(),
                    rep.skipped.len()
                );
            } else {
                println!(
                    "replayed {}, skipped {}",
                    rep.replayed.len(),
                    rep.skipped.len()
                );
            }
            Ok(())
        }
        DlqAction::Purge {
            common,
            id,
            filters,
            all,
            yes,
        } => {
            let sel = filters.selection(&id, all)?;
            let r = common.target.resolve(&common.platform).await?;
            let rep = dlq::purge(&r.bus, &sel, yes, true).await?;
            if !yes {
                println!(
                    "would delete {} dead letter(s); nothing deleted (add --yes to delete them)",
                    rep.selected
                );
                std::process::exit(1);
            }
            println!(
                "deleted {}, skipped {}",
                rep.deleted,
                rep.selected - rep.deleted
            );
            Ok(())
        }
    }
}

/// `stargazer toggle`: switch a feature (the Discord toggle button by
/// default) on or off for a channel or a guild, or list the switches.
#[derive(clap::Args, Debug)]
pub struct ToggleArgs {
    #[command(flatten)]
    to: Target,
    /// The platform (its `[[platform]] name`).
    #[arg(long)]
    platform: String,
    /// The feature (`toggle_menu` is the Discord toggle button).
    #[arg(long, default_value = stargazer::toggles::TOGGLE_MENU)]
    feature: String,
    #[command(subcommand)]
    action: ToggleAction,
}

#[derive(clap::Subcommand, Debug)]
enum ToggleAction {
    /// Switch the feature on for a channel or guild.
    On(ToggleScope),
    /// Switch the feature off for a channel or guild.
    Off(ToggleScope),
    /// Remove a channel's or guild's switch (its guild's, or the default, applies).
    Clear(ToggleScope),
    /// List every switch of the feature.
    List,
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct ToggleScope {
    /// A channel id.
    #[arg(long)]
    channel: Option<String>,
    /// A guild (server) id: every channel of it without a switch of its own.
    #[arg(long)]
    guild: Option<String>,
}

impl ToggleScope {
    fn scope(&self) -> Result<stargazer::toggles::Scope> {
        use stargazer::toggles::Scope;
        match (&self.channel, &self.guild) {
            (Some(c), None) if !c.is_empty() => Ok(Scope::Channel(c.clone())),
            (None, Some(g)) if !g.is_empty() => Ok(Scope::Guild(g.clone())),
            _ => bail!("give one non-empty --channel or --guild"),
        }
    }
}

pub async fn toggle(a: ToggleArgs) -> Result<()> {
    use stargazer::toggles::Toggles;
    let r = a.to.resolve(&a.platform).await?;
    let toggles = Toggles::new(r.bus.conn(), r.bus.keys().clone());
    let (scope, value) = match &a.action {
        ToggleAction::On(s) => (s.scope()?, Some(true)),
        ToggleAction::Off(s) => (s.scope()?, Some(false)),
        ToggleAction::Clear(s) => (s.scope()?, None),
        ToggleAction::List => {
            let all = toggles.list(&a.feature).await?;
            if all.is_empty() {
                println!(
                    "{} on {}: no switches (the platform's default applies everywhere)",
                    a.feature, a.platform
                );
            }
            for (scope, on) in all {
                println!("{scope}\t{}", if on { "on" } else { "off" });
            }
            return Ok(());
        }
    };
    toggles.set(&a.feature, &scope, value).await?;
    let now = match value {
        Some(true) => "on",
        Some(false) => "off",
        None => "cleared",
    };
    println!("{} on {}: {scope} {now}", a.feature, a.platform);
    Ok(())
}

/// The role of `stargazer acl`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AclRole {
    /// A gateway node (also enough for status and dlq).
    Gateway,
    /// A bot worker: publish, RPC, inbound events; no ack, claim or delete.
    Worker,
}

#[derive(clap::Args, Debug)]
pub struct AclArgs {
    role: AclRole,
    /// The ACL user's name (default: sg-gateway or sg-worker).
    #[arg(long)]
    user: Option<String>,
    /// Only this platform's keys (default: every platform, `{*}`).
    #[arg(long)]
    platform: Option<String>,
    /// Key prefix.
    #[arg(long, default_value = "sg")]
    prefix: String,
    /// The message cache prefix (default: `<prefix>:msg:`).
    #[arg(long)]
    cache_prefix: Option<String>,
}

pub fn acl(a: AclArgs) -> Result<()> {
    use stargazer::bus::acl::{Role, rules, setuser};
    let (role, user) = match a.role {
        AclRole::Gateway => (Role::Gateway, "sg-gateway"),
        AclRole::Worker => (Role::Worker, "sg-worker"),
    };
    let user = a.user.as_deref().unwrap_or(user);
    let cache = a
        .cache_prefix
        .clone()
        .unwrap_or_else(|| format!("{}:msg:", a.prefix));
    let r = rules(role, &a.prefix, &cache, a.platform.as_deref());
    println!("{}", setuser(user, &r));
    println!(
        "# then give it a password: ACL SETUSER {user} >PASSWORD (and ACL SAVE, or CONFIG REWRITE)"
    );
    Ok(())
}
