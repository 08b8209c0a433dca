//! The `stargazer` command line: a thin shell over the library.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value, json};

use stargazer::bus::Bus;
use stargazer::config::Config;
use stargazer::keys::Keys;
use stargazer::publish::Publisher;

mod ops_cli;

#[derive(Parser)]
#[command(
    name = "stargazer",
    version,
    about = "Outbound actions from bot workers to platform gateways, through Redis Streams"
)]
struct Cli {
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway node for every platform in the config file.
    Gateway {
        #[arg(long, short, env = "STARGAZER_CONFIG")]
        config: PathBuf,
    },
    /// Publish an envelope, taking the channel's next seq.
    Send(Box<SendArgs>),
    /// A whole round trip on this machine, with a private redis-server.
    Demo,
    /// Call a gateway RPC as a worker would, and print the reply.
    Rpc(RpcArgs),
    /// Per platform: stream length, lag, pending, consumers, dead letters, order gaps.
    Status(ops_cli::StatusArgs),
    /// Inspect, replay and purge dead letters.
    Dlq(ops_cli::DlqArgs),
    /// Switch a feature (the Discord toggle button) on or off per channel or guild.
    Toggle(ops_cli::ToggleArgs),
    /// Print the least Redis ACL a gateway or a worker needs, as an ACL SETUSER line.
    Acl(ops_cli::AclArgs),
    /// Run the SPEC §6 benchmark workloads (W1–W6, W3x4; Q: a queued backlog) against a private redis-server.
    Bench(stargazer::bench::BenchArgs),
    /// One gateway node of `bench` (spawned by it).
    #[command(hide = true)]
    BenchNode(stargazer::bench::NodeArgs),
}

#[derive(clap::Args)]
struct RpcArgs {
    #[command(flatten)]
    to: ops_cli::Target,
    /// The platform (its `[[platform]] name`).
    #[arg(long)]
    platform: String,
    /// The channel the call is about (sent as the request's `channel_id`).
    #[arg(long)]
    channel: Option<String>,
    /// How long to wait for a gateway's reply.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// `fetch_channel_history`, `should_skip_channel_heartbeat`, `execute_tool`,
    /// `list_tools`, or a method of the platform's adapter.
    method: String,
    /// The arguments, a JSON object.
    #[arg(default_value = "{}")]
    args: String,
}

async fn rpc(a: RpcArgs) -> Result<()> {
    let args: Value = serde_json::from_str(&a.args)
        .with_context(|| format!("ARGS_JSON `{}` is not JSON", a.args))?;
    if !args.is_object() {
        bail!("ARGS_JSON must be a JSON object, like '{{\"limit\": 5}}'");
    }
    let r = a.to.resolve(&a.platform).await?;
    let worker =
        stargazer::sdk::Worker::from_bus(r.bus.clone(), &r.cache_prefix(), r.secret(&a.platform));
    let reply = worker
        .rpc_on(
            a.channel.as_deref(),
            &a.method,
            args,
            Duration::from_millis(a.timeout_ms),
        )
        .await?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(())
}

#[derive(clap::Args)]
struct SendArgs {
    #[command(flatten)]
    to: ops_cli::Target,
    /// The platform (its `[[platform]] name`).
    #[arg(long)]
    platform: String,
    /// Channel id (not needed for presence).
    #[arg(long)]
    channel: Option<String>,
    #[arg(long = "type", value_enum, default_value_t = Kind::Message)]
    kind: Kind,
    /// Text of the message (or caption of a file, presence text).
    text: Option<String>,
    /// file: path of the file to send.
    #[arg(long)]
    file: Option<PathBuf>,
    /// file: MIME type (default application/octet-stream).
    #[arg(long)]
    mimetype: Option<String>,
    /// buttons: `LABEL=CUSTOM_ID` or `LABEL=https://…`, repeatable.
    #[arg(long = "button")]
    buttons: Vec<String>,
    /// message: platform id of the message this replies to.
    #[arg(long)]
    reply_to: Option<String>,
    /// reaction, edit, delete: the platform id of the message it acts on.
    #[arg(long)]
    message_id: Option<String>,
    /// edit, delete: the `message_key` of an earlier message of the channel
    /// (its platform id is looked up by the gateway).
    #[arg(long)]
    target_key: Option<String>,
    /// The envelope's `message_key` (default: a fresh one under the cache
    /// prefix for messages, files and buttons), so later edits can name it.
    #[arg(long)]
    message_key: Option<String>,
    /// reaction / presence: the emoji.
    #[arg(long)]
    emoji: Option<String>,
    /// typing / presence: drop it unsent after this many ms.
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// Publish this many copies (numbered " #i" when above 1).
    #[arg(long, default_value_t = 1)]
    count: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    Message,
    File,
    Buttons,
    Typing,
    StopTyping,
    Reaction,
    Presence,
    Edit,
    Delete,
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn env_map() -> HashMap<String, String> {
    std::env::vars().collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Gateway { config } => {
            init_logs(cli.log_format, "info");
            let env = env_map();
            let config = Config::load(&config, env.clone())?;
            if config.platforms.is_empty() {
                bail!("the config has no [[platform]]: nothing to serve");
            }
            stargazer::gateway::run(config, env, shutdown_signal()).await?;
            Ok(())
        }
        Command::Send(args) => {
            init_logs(cli.log_format, "warn");
            send(*args).await
        }
        Command::Demo => {
            init_logs(cli.log_format, "warn");
            demo().await
        }
        Command::Rpc(args) => {
            init_logs(cli.log_format, "warn");
            rpc(args).await
        }
        Command::Status(args) => {
            init_logs(cli.log_format, "warn");
            ops_cli::status(args).await
        }
        Command::Dlq(args) => {
            init_logs(cli.log_format, "warn");
            ops_cli::dlq(args).await
        }
        Command::Toggle(args) => {
            init_logs(cli.log_format, "warn");
            ops_cli::toggle(args).await
        }
        Command::Acl(args) => ops_cli::acl(args),
        Command::Bench(args) => {
            init_logs(cli.log_format, "warn");
            stargazer::bench::run(args).await
        }
        Command::BenchNode(args) => {
            init_logs(cli.log_format, "warn");
            stargazer::bench::run_node(args).await
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn envelope_of(a: &SendArgs, text: Option<String>) -> Result<Map<String, Value>> {
    let mut env = Map::new();
    let ty = match a.kind {
        Kind::Message => "message",
        Kind::File => "file",
        Kind::Buttons => "buttons",
        Kind::Typing => "start_typing",
        Kind::StopTyping => "stop_typing",
        Kind::Reaction => "reaction",
        Kind::Presence => "presence",
        Kind::Edit => "edit",
        Kind::Delete => "delete",
    };
    env.insert("type".into(), ty.into());
    if a.kind != Kind::Presence {
        let c = a
            .channel
            .clone()
            .context("--channel is needed for every type but presence")?;
        env.insert("channel_id".into(), c.into());
    }
    let needs_text = matches!(a.kind, Kind::Message | Kind::Buttons | Kind::Edit);
    match text {
        Some(t) => {
            env.insert("text".into(), t.into());
        }
        None if needs_text => bail!("TEXT is needed for a {ty}"),
        None => {}
    }
    if let Some(r) = &a.reply_to {
        env.insert("reply_to".into(), r.clone().into());
    }
    match a.kind {
        Kind::File => {
            let path = a.file.as_ref().context("--file is needed for a file")?;
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            env.insert(
                "file_data".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(data)
                    .into(),
            );
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "file".into());
            env.insert("filename".into(), name.into());
            if let Some(m) = &a.mimetype {
                env.insert("mimetype".into(), m.clone().into());
            }
        }
        Kind::Buttons | Kind::Message if !a.buttons.is_empty() => {
            let buttons: Result<Vec<Value>> = a
                .buttons
                .iter()
                .map(|b| {
                    let (label, target) = b
                        .split_once('=')
                        .with_context(|| format!("--button `{b}` is not LABEL=ID or LABEL=URL"))?;
                    Ok(
                        if target.starts_with("http://") || target.starts_with("https://") {
                            json!({"label": label, "url": target})
                        } else {
                            json!({"label": label, "custom_id": target})
                        },
                    )
                })
                .collect();
            env.insert("buttons".into(), Value::Array(buttons?));
        }
        Kind::Buttons => bail!("a buttons envelope needs at least one --button"),
        Kind::Edit | Kind::Delete => match (&a.message_id, &a.target_key) {
            (Some(m), None) => {
                env.insert("message_id".into(), m.clone().into());
            }
            (None, Some(k)) => {
                env.insert("target_key".into(), k.clone().into());
            }
            _ => bail!("an {ty} needs exactly one of --target-key and --message-id"),
        },
        Kind::Reaction => {
            let m = a
                .message_id
                .clone()
                .context("--message-id is needed for a reaction")?;
            let e = a
                .emoji
                .clone()
                .context("--emoji is needed for a reaction")?;
            env.insert("message_id".into(), m.into());
            env.insert("emoji".into(), e.into());
        }
        _ => {}
    }
    if a.kind == Kind::Presence
        && let Some(e) = &a.emoji
    {
        env.insert("emoji".into(), e.clone().into());
    }
    if let Some(ttl) = a.ttl_ms {
        env.insert("expires_ms".into(), (stargazer::now_ms() + ttl).into());
    }
    if let Some(k) = &a.message_key {
        env.insert("message_key".into(), k.clone().into());
    }
    Ok(env)
}

async fn send(a: SendArgs) -> Result<()> {
    let r = a.to.resolve(&a.platform).await?;
    let publisher = Publisher::new(
        r.bus.conn(),
        r.bus.keys().clone(),
        &r.cache_prefix(),
        r.secret(&a.platform),
    );
    let bar = (a.count > 100)
        .then(|| stargazer::ops::progress_bar(a.count, "publishing"))
        .flatten();
    for i in 1..=a.count {
        let text = match (&a.text, a.count) {
            (Some(t), 1) => Some(t.clone()),
            (Some(t), _) => Some(format!("{t} #{i}")),
            (None, _) => None,
        };
        let env = envelope_of(&a, text)?;
        let p = publisher.publish(env).await?;
        if let Some(b) = &bar {
            b.inc(1);
        }
        if a.count <= 20 {
            match p.seq {
                Some(s) => println!("published {} (seq {s})", p.id),
                None => println!("published {}", p.id),
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.count > 20 {
        println!(
            "published {} envelopes to {}",
            a.count,
            publisher.keys().outbound()
        );
    }
    Ok(())
}

/// The README's first command: a private Redis, a gateway with the console
/// adapter, and a worker: a backlog published before any gateway runs (two
/// entries of it poison), then the whole loop — an inbound message, the
/// worker's reply with typing, a file and buttons, a reaction, an RPC for
/// history, a tool call — and what ended where.
async fn demo() -> Result<()> {
    let bin = std::env::var("STARGAZER_REDIS_SERVER").ok();
    let server = stargazer::redis_server::RedisServer::start(bin.as_deref())
        .context("starting a private redis-server for the demo")?;
    println!("• private redis-server on {}", server.url());
    let tools = tempfile_dir()?;
    write_demo_tool(&tools)?;
    let text = format!(
        r#"
[redis]
url = "{}"
[gateway]
consumer_name = "demo-gw"
[consumer]
autoclaim_interval_ms = 1000
tools_dir = "{}"
[[platform]]
name = "demo"
adapter = "console"
"#,
        server.url(),
        tools.display()
    );
    let config = Config::from_toml(&text, [])?;
    let keys = Keys::new("sg", "demo");
    let bus = Bus::connect(&server.url(), keys.clone()).await?;
    let worker = stargazer::sdk::Worker::from_bus(bus.clone(), "sg:msg:", None);
    let out = worker.proxy();

    println!(
        "• a worker publishes to {} before any gateway runs:",
        keys.outbound()
    );
    for round in 1..=2 {
        for ch in ["general", "support"] {
            out.send(ch, &format!("hello {ch}, message {round}"))
                .await?;
        }
    }
    worker
        .publisher()
        .publish(obj(
            json!({"type": "file", "channel_id": "general", "file_data": "not base64!"}),
        ))
        .await?;
    worker.publisher().publish_raw(b"{this is not json").await?;
    out.send("general", "after the poison, still in order")
        .await?;
    out.set_presence("watching the stars", Some("🔭")).await?;
    println!("  8 entries, two of them poison");

    println!("• a gateway starts (console adapter) and drains them:\n");
    let stop = tokio_util::sync::CancellationToken::new();
    let gw = tokio::spawn(stargazer::gateway::run(config, HashMap::new(), {
        let stop = stop.clone();
        async move { stop.cancelled().await }
    }));
    drain(&bus, &keys).await?;

    println!("\n• a user writes in #general; the worker answers it:\n");
    let inbound = stargazer::inbound::InboundPublisher::new(bus.conn(), keys.clone());
    let mut said = stargazer::inbound::InboundEvent::message(
        "demo",
        "general",
        "ada",
        "what's the weather like up there?",
    );
    said.message_id = Some("user-msg-1".into());
    inbound.publish(&said).await?;
    let worker_stop = tokio_util::sync::CancellationToken::new();
    let handled = std::sync::Arc::new(tokio::sync::Notify::new());
    let consumer = worker.inbound("demo-worker");
    let bot = {
        let (out, stop, handled) = (out.clone(), worker_stop.clone(), handled.clone());
        tokio::spawn(async move {
            consumer
                .run(
                    move |ev: stargazer::inbound::InboundEvent| {
                        let (out, handled) = (out.clone(), handled.clone());
                        async move {
                            let ch = ev.channel_id.clone();
                            out.start_typing(&ch, Duration::from_secs(5)).await?;
                            out.reply(
                                &ch,
                                ev.message_id.as_deref().unwrap_or_default(),
                                &format!("{}: clear skies, here is the chart", ev.user_name),
                            )
                            .await?;
                            out.send_file(
                                &ch,
                                b"Sirius  -1.46\nCanopus -0.74\n",
                                "brightest.txt",
                                "text/plain",
                                Some("the brightest stars"),
                            )
                            .await?;
                            out.send_buttons(
                                &ch,
                                "Want more?",
                                &[("Yes", "more"), ("Star map", "https://example.org/map")],
                            )
                            .await?;
                            if let Some(m) = &ev.message_id {
                                out.react(&ch, m, "⭐").await?;
                            }
                            handled.notify_one();
                            Ok::<(), stargazer::adapters::AdapterError>(())
                        }
                    },
                    stop,
                )
                .await
        })
    };
    handled.notified().await;
    drain(&bus, &keys).await?;

    println!("\n• the worker asks the gateway over RPC:");
    let history = worker
        .rpc(
            "fetch_channel_history",
            json!({"channel_id": "general", "limit": 3}),
            Duration::from_secs(5),
        )
        .await?;
    for m in history.as_array().into_iter().flatten() {
        println!(
            "  history: {} — {}",
            m["user_name"].as_str().unwrap_or("?"),
            m["text"].as_str().unwrap_or("")
        );
    }
    let roll = worker
        .rpc(
            "execute_tool",
            json!({"tool_name": "dice", "tool_args": {"sides": 20}, "tool_ctx": {"channel_id": "general", "user_name": "ada"}}),
            Duration::from_secs(5),
        )
        .await?;
    println!("  execute_tool dice(sides = 20) → {roll}");

    worker_stop.cancel();
    let _ = bot.await;
    stop.cancel();
    gw.await??;

    let mut conn = bus.conn();
    let dlq: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(keys.dlq())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await?;
    println!(
        "\n• dead-letter stream {} holds {} entries:",
        keys.dlq(),
        dlq.ids.len()
    );
    for e in &dlq.ids {
        let f = |k: &str| e.get::<String>(k).unwrap_or_default();
        println!(
            "  {} [{}] {}",
            f("original_id"),
            f("error_kind"),
            f("error")
        );
    }
    let (pending, lag) = group_backlog(&bus, &keys).await?;
    println!(
        "• group {}: pending {pending}, lag {lag} — every entry delivered, skipped or dead-lettered",
        keys.group()
    );
    let _ = std::fs::remove_dir_all(&tools);
    println!("• done; the private redis-server stops with the demo");
    Ok(())
}

/// Wait until the demo platform has nothing unread or pending.
async fn drain(bus: &Bus, keys: &Keys) -> Result<()> {
    let started = Instant::now();
    loop {
        let (pending, lag) = group_backlog(bus, keys).await?;
        if pending == 0 && lag == 0 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the demo did not drain in 30 s (pending {pending}, lag {lag})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("stargazer-demo-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A delegated tool for the demo: `dice`, a shell script with a manifest.
fn write_demo_tool(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let exe = dir.join("dice.sh");
    std::fs::write(
        &exe,
        "#!/bin/sh\n# reads {\"args\": {\"sides\": N}, \"context\": …} on stdin\nsides=$(sed -n 's/.*\"sides\":\\([0-9]*\\).*/\\1/p')\necho \"{\\\"rolled\\\": $(( $(date +%N | sed 's/^0*//') % ${sides:-6} + 1 )), \\\"sides\\\": ${sides:-6}}\"\n",
    )?;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(
        dir.join("dice.json"),
        json!({"name": "dice", "description": "roll a die", "command": "dice.sh",
               "parameters": {"type": "object", "properties": {"sides": {"type": "integer", "minimum": 2}}}})
        .to_string(),
    )?;
    Ok(())
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// (pending, lag) of the platform's consumer group.
async fn group_backlog(bus: &Bus, keys: &Keys) -> Result<(u64, u64)> {
    let mut conn = bus.conn();
    let v: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(keys.outbound())
        .query_async(&mut conn)
        .await?;
    for g in v {
        let name = g
            .get("name")
            .and_then(|n| redis::from_redis_value_ref::<String>(n).ok());
        if name.as_deref() == Some(keys.group().as_str()) {
            let num = |k: &str| {
                g.get(k)
                    .and_then(|n| redis::from_redis_value_ref::<u64>(n).ok())
                    .unwrap_or(0)
            };
            return Ok((num("pending"), num("lag")));
        }
    }
    Ok((0, u64::MAX))
}
