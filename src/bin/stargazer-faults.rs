//! `stargazer-faults`: a small Jepsen for Stargazer.
//!
//! Runs a private `redis-server` (AOF, fsync always), N real `stargazer
//! gateway` processes with the shipped defaults, a de-duplicating webhook
//! sink and producers (valid entries over many channels, hostile ones mixed
//! in), injects a random fault schedule reproducible from `--seed`
//! (SIGKILL/SIGSTOP of gateways and Redis, platform hangs, 5xx, 429, bare
//! 200s), heals, drains, and checks the whole history against SPEC §3.
//! Exit code: 0 when no guarantee was violated, 1 when one was, 2 when the
//! suite itself could not run. See docs/faults.md.

mod faults;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use faults::run::{Settings, run};
use faults::{check, parse_duration, plan, report};

#[derive(Parser, Debug)]
#[command(
    name = "stargazer-faults",
    version,
    about = "Fault-injection suite: real Redis, real gateways, a checker over the whole history",
    // A later flag wins (scripts/faults.sh passes its own --duration first).
    args_override_self = true
)]
struct Cli {
    /// Seed of the fault schedule and of the producers' choices (default:
    /// random; always printed, so a run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected while producers publish (`150s`, `30m`).
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    duration: Duration,
    /// Gateway processes.
    #[arg(long, default_value_t = 3)]
    gateways: usize,
    /// Channels the valid entries are spread over.
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Valid entries published per second.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Share (0–1) of valid entries whose `seq` is an integral float
    /// (`42.0`, as Python producers write it), which SPEC §1 allows.
    #[arg(long, default_value_t = 0.05)]
    float_share: f64,
    /// Platform name (`sg:{<platform>}:outbound`).
    #[arg(long, default_value = "hook")]
    platform: String,
    /// The `stargazer` binary (default: next to this executable).
    #[arg(long)]
    stargazer: Option<PathBuf>,
    /// The `redis-server` binary.
    #[arg(long, env = "STARGAZER_REDIS_SERVER", default_value = "redis-server")]
    redis_server: String,
    /// Longest wait, after the faults, for every entry to be delivered or
    /// dead-lettered and nothing to be pending.
    #[arg(long, default_value = "240s", value_parser = parse_duration)]
    drain: Duration,
    /// How long a hanging platform holds a request (longer than the
    /// webhook's default 10 s timeout).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    hang: Duration,
    /// Keep the work directory (configs, gateway logs, AOF).
    #[arg(long)]
    keep: bool,
    /// `RUST_LOG` for the gateways.
    #[arg(long, default_value = "warn")]
    gateway_log: String,
    /// A control run: the same workload with no faults at all.
    #[arg(long)]
    no_faults: bool,
    /// Run on a Redis Cluster of three primaries (no replicas, AOF each):
    /// the gateways use `redis.cluster`, the platform's keys live on one
    /// node (the Redis faults strike it) and the message cache spreads over
    /// all three.
    #[arg(long)]
    cluster: bool,
    /// `redis-cli`, for `--cluster` (default: next to `--redis-server`).
    #[arg(long, env = "STARGAZER_REDIS_CLI")]
    redis_cli: Option<String>,
    /// Print the fault schedule of this seed and exit.
    #[arg(long)]
    plan_only: bool,
}

fn settings(cli: Cli) -> Result<Settings> {
    if cli.platform.is_empty()
        || !cli
            .platform
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("--platform must be letters, digits, `-` or `_`");
    }
    if cli.gateways == 0 || cli.channels == 0 || cli.rate.is_nan() || cli.rate <= 0.0 {
        bail!("--gateways, --channels and --rate must be positive");
    }
    if !(0.0..=1.0).contains(&cli.float_share) {
        bail!("--float-share must be between 0 and 1");
    }
    let stargazer = match cli.stargazer {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("stargazer"),
    };
    let redis_cli =
        cli.redis_cli
            .unwrap_or_else(|| match std::path::Path::new(&cli.redis_server).parent() {
                Some(dir) if !dir.as_os_str().is_empty() => {
                    dir.join("redis-cli").to_string_lossy().into_owned()
                }
                _ => "redis-cli".into(),
            });
    Ok(Settings {
        seed: cli.seed.unwrap_or_else(rand::random),
        duration: cli.duration,
        gateways: cli.gateways,
        channels: cli.channels,
        rate: cli.rate,
        float_share: cli.float_share,
        platform: cli.platform,
        stargazer,
        redis_server: cli.redis_server,
        drain: cli.drain,
        hang: cli.hang,
        keep: cli.keep,
        gateway_log: cli.gateway_log,
        no_faults: cli.no_faults,
        cluster: cli.cluster,
        redis_cli,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let plan_only = cli.plan_only;
    let s = match settings(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stargazer-faults: {e:#}");
            return ExitCode::from(2);
        }
    };
    println!("stargazer-faults: seed {}", s.seed);
    if plan_only {
        for p in plan::generate(s.seed, s.duration, s.gateways, s.channels) {
            println!("{:8.1}s  {:?}", p.at.as_secs_f64(), p.step);
        }
        return ExitCode::SUCCESS;
    }
    let interrupted = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    // Dropping the run (interrupted, failed or panicking) kills every child.
    let observed = tokio::select! {
        r = run(&s) => r,
        _ = interrupted => Err(anyhow::anyhow!("interrupted; every child process was killed")),
    };
    match observed {
        Ok(o) => {
            let findings = check::check(&o.history);
            if let Some(dir) = &o.workdir {
                let path = dir.join("history.jsonl");
                if let Err(e) = o.history.write_jsonl(&path) {
                    eprintln!("stargazer-faults: cannot write {}: {e}", path.display());
                }
            }
            let (text, pass) = report::render(&s, &o, &findings);
            println!("{text}");
            if pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("stargazer-faults: {e:#} (seed {})", s.seed);
            ExitCode::from(2)
        }
    }
}
