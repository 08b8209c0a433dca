//! The summary table and the verdict.

use std::fmt::Write as _;

use super::check::{Findings, GRACE_MS};
use super::run::{Observed, Settings};

/// The printed report and whether the run passed.
pub fn render(s: &Settings, o: &Observed, f: &Findings) -> (String, bool) {
    let mut out = String::new();
    let w = &mut out;
    let row = |w: &mut String, label: &str, n: String| {
        let _ = writeln!(w, "  {label:<66} {n:>8}");
    };
    let _ = writeln!(
        w,
        "\n== stargazer-faults report — seed {} — {:?}, {} gateways, {} channels, {} msgs/s, \
         float seq {:.0} %, platform `{}`",
        s.seed,
        s.duration,
        s.gateways,
        s.channels,
        s.rate,
        s.float_share * 100.0,
        s.platform
    );

    let _ = writeln!(w, "\nfaults injected");
    let total: u64 = o.faults.values().sum();
    for (kind, n) in &o.faults {
        row(w, kind, n.to_string());
    }
    row(w, "total", total.to_string());

    let _ = writeln!(w, "\nentries");
    row(
        w,
        "published",
        (f.published_valid + f.published_hostile).to_string(),
    );
    row(w, "  valid", f.published_valid.to_string());
    row(
        w,
        "    of which created_ms a day ahead",
        f.future_created.to_string(),
    );
    row(w, "  hostile", f.published_hostile.to_string());
    row(
        w,
        "delivered (valid, a 2xx at least once)",
        f.delivered_valid.to_string(),
    );
    let dead: usize = f.dead_by_kind.values().sum();
    row(w, "dead-lettered", dead.to_string());
    for (kind, n) in &f.dead_by_kind {
        let valid = f.valid_dead_by_kind.get(kind).copied().unwrap_or(0);
        let note = if valid > 0 {
            format!("{n} ({valid} valid)")
        } else {
            n.to_string()
        };
        row(w, &format!("  {kind}"), note);
    }
    let _ = writeln!(
        w,
        "\nhostile entries (dead-lettered with the right kind / published)"
    );
    for (h, (published, ok)) in &f.hostile {
        row(
            w,
            &format!("{} → {}", h.name(), h.expected_kinds().join("|")),
            format!("{ok}/{published}"),
        );
    }

    let _ = writeln!(w, "\nsink");
    row(w, "requests", f.requests.to_string());
    for (kind, n) in &f.answers {
        row(w, &format!("  {kind}"), n.to_string());
    }
    for (action, n) in &f.actions {
        row(w, &format!("  action {action}"), n.to_string());
    }

    let _ = writeln!(w, "\nguarantees");
    let dups = f.dup_explained + f.unexplained_dups();
    row(
        w,
        "duplicates (same Idempotency-Key, 2xx twice)",
        dups.to_string(),
    );
    row(
        w,
        "  resent after an unhealthy gateway (dropped by a de-dup platform)",
        f.dup_explained.to_string(),
    );
    for (cause, n) in &f.dup_unexplained {
        row(w, &format!("  UNEXPLAINED: {cause}"), n.to_string());
    }
    row(
        w,
        "out-of-order (per-channel seq)",
        f.out_of_order.to_string(),
    );
    row(
        w,
        "resent after a successor was sent (order kept only by de-dup)",
        f.resent_after_successor.to_string(),
    );
    row(
        w,
        "  (not counted) predecessor published after its successor went",
        f.late_predecessors.to_string(),
    );
    row(
        w,
        "lost (neither delivered nor dead-lettered)",
        f.lost.to_string(),
    );
    for (state, n) in &f.lost_by_state {
        row(w, &format!("  {state}"), n.to_string());
    }
    row(w, "pending in the group at the end", f.pending.to_string());
    row(w, "foreign keys", f.foreign.len().to_string());
    row(
        w,
        "hostile entries delivered or dead-lettered with a wrong kind",
        f.hostile_wrong_count.to_string(),
    );
    row(
        w,
        "valid entries dead-lettered as bad input",
        f.valid_misfiled.len().to_string(),
    );
    row(
        w,
        "entries both delivered and dead-lettered",
        f.delivered_and_dead_count.to_string(),
    );

    let _ = writeln!(w, "\nrun");
    row(
        w,
        "drained within --drain",
        if o.drained {
            format!("yes, {:.0} s", o.drain_secs)
        } else {
            "NO".into()
        },
    );
    row(
        w,
        "gateways that exited by themselves",
        o.self_exits.len().to_string(),
    );
    let clean = o.shutdown.iter().filter(|(_, _, ok)| *ok).count();
    row(
        w,
        "gateways exiting 0 on SIGTERM",
        format!("{clean}/{}", o.shutdown.len()),
    );
    row(
        w,
        "producer: HINCRBY answers lost (possible seq gaps)",
        o.seq_unknown.to_string(),
    );
    row(
        w,
        "producer: XADDs of unknown outcome (found in stream)",
        format!("{} ({})", o.xadd_unknown, o.xadd_found),
    );

    let mut examples = |title: &str, list: &[String]| {
        if !list.is_empty() {
            let _ = writeln!(w, "\n{title}:");
            for e in list {
                let _ = writeln!(w, "  {e}");
            }
        }
    };
    examples("lost (first few)", &f.lost_examples);
    examples("out of order (first few)", &f.ooo_examples);
    examples("unexplained duplicates (first few)", &f.dup_examples);
    let foreign: Vec<String> = f.foreign.iter().take(12).cloned().collect();
    examples("foreign keys (first few)", &foreign);
    examples("hostile entries mishandled (first few)", &f.hostile_wrong);
    examples(
        "valid entries dead-lettered as bad input (first few)",
        &f.valid_misfiled.iter().take(8).cloned().collect::<Vec<_>>(),
    );
    examples(
        "delivered and dead-lettered (first few)",
        &f.delivered_and_dead,
    );
    let exits: Vec<String> = o
        .self_exits
        .iter()
        .map(|(inc, st, tail)| format!("{inc}: {st}\n    {}", tail.replace('\n', "\n    ")))
        .collect();
    examples("gateways that exited by themselves", &exits);
    let bad_shutdown: Vec<String> = o
        .shutdown
        .iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(inc, st, _)| format!("{inc}: {st}"))
        .collect();
    examples("gateways not exiting 0 on SIGTERM", &bad_shutdown);

    let mut violations = f.violations();
    if !o.drained {
        violations.push("did not drain within --drain".into());
    }
    if !o.self_exits.is_empty() {
        violations.push(format!("gateway self-exits {}", o.self_exits.len()));
    }
    if !bad_shutdown.is_empty() {
        violations.push(format!("unclean SIGTERM exits {}", bad_shutdown.len()));
    }
    let pass = violations.is_empty();
    let _ = writeln!(
        w,
        "\nA duplicate is explained when the gateway that got the earlier 2xx was SIGKILLed or \
         SIGSTOPped past its leases within {} s of it (longer across a Redis outage).",
        GRACE_MS / 1000
    );
    if let Some(dir) = &o.workdir {
        let _ = writeln!(
            w,
            "work dir kept: {} (history.jsonl, gateway logs and configs, redis/ with the AOF)",
            dir.display()
        );
    }
    let _ = writeln!(
        w,
        "\nverdict: {} — seed {} (rerun: stargazer-faults --seed {} --duration {}s --gateways {} \
         --channels {} --rate {} --float-share {})",
        if pass {
            "PASS".to_owned()
        } else {
            format!("FAIL ({})", violations.join(", "))
        },
        s.seed,
        s.seed,
        s.duration.as_secs(),
        s.gateways,
        s.channels,
        s.rate,
        s.float_share
    );
    (out, pass)
}
