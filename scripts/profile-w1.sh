#!/usr/bin/env bash
# Where one W1 message's time goes: Redis CPU per command (INFO commandstats,
# commands inside scripts included) and the gateway's CPU (utime + stime of
# the process), both per message, for one gateway draining a W1 backlog
# (20,000 envelopes over 200 channels, null adapter) with the shipped defaults.
#
#   scripts/profile-w1.sh [N]        # N envelopes (default 20000)
#   PERF=1 scripts/profile-w1.sh     # also sample the gateway with perf (cpu-clock)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
scripts/ensure-redis.sh >/dev/null
cargo build --release --quiet
bin="$PWD/target/release/stargazer"
dir="$(mktemp -d)"
trap 'redis-cli -s "$dir/r.sock" shutdown nosave >/dev/null 2>&1 || true; kill "${gw:-0}" 2>/dev/null || true; rm -rf "$dir"' EXIT
redis-server --unixsocket "$dir/r.sock" --port 0 --save "" --appendonly no --dir "$dir" --daemonize yes --logfile "$dir/redis.log"
R=(redis-cli -s "$dir/r.sock")
until "${R[@]}" ping >/dev/null 2>&1; do sleep 0.05; done
# Preload: the SPEC §6 envelopes, seq per channel from 1.
awk -v n="$n" 'BEGIN { for (i = 0; i < n; i++) { c = i % 200; s[c]++;
  printf "XADD sg:{bench}:outbound * payload '"'"'{\"type\":\"message\",\"channel_id\":\"c%d\",\"text\":\"hello %d\",\"message_key\":\"sg:msg:%d\",\"seq\":%d}'"'"'\n", c, i, i, s[c] } }' \
  | "${R[@]}" >/dev/null
cat > "$dir/gw.toml" <<TOML
[redis]
url = "redis+unix://$dir/r.sock"
[gateway]
consumer_name = "profile"
[[platform]]
name = "bench"
adapter = "null"
TOML
"${R[@]}" config resetstat >/dev/null
start=$(date +%s.%N)
RUST_LOG=warn "$bin" gateway --config "$dir/gw.toml" &
gw=$!
if [ -n "${PERF:-}" ]; then
  perf record -q -e cpu-clock -F 4999 -o "${PERF_OUT:-perf-w1.data}" -p "$gw" 2>/dev/null &
  perfpid=$!
fi
until [ "$("${R[@]}" xinfo groups 'sg:{bench}:outbound' 2>/dev/null | awk 'f{print;exit} /^entries-read$/{f=1}')" = "$n" ] \
   && [ "$("${R[@]}" xpending 'sg:{bench}:outbound' 'sg:gateway:bench' | head -1)" = "0" ]; do sleep 0.01; done
end=$(date +%s.%N)
ticks=$(awk '{print $14 + $15}' "/proc/$gw/stat")
hz=$(getconf CLK_TCK)
if [ -n "${perfpid:-}" ]; then kill -INT "$perfpid"; wait "$perfpid" || true; fi
kill -TERM "$gw"; wait "$gw" || true
"${R[@]}" info commandstats | tr -d '\r' | awk -F'[:,=]' -v n="$n" -v t="$ticks" -v hz="$hz" -v s="$start" -v e="$end" '
  /^cmdstat_/ { name = substr($1, 9); calls = $3; usec = $5; tot += usec; c[name] = calls; u[name] = usec }
  END {
    printf "drained %d in %.3f s (%.0f msgs/s; includes the gateway start)\n", n, e - s, n / (e - s)
    printf "gateway CPU: %.1f us/msg (utime+stime)\n", t / hz * 1e6 / n
    printf "redis CPU in commands: %.1f us/msg\n", tot / n
    for (k in c) printf "  %-12s %6.2f calls/msg  %6.2f us/msg\n", k, c[k] / n, u[k] / n | "sort -k3 -nr"
  }'
