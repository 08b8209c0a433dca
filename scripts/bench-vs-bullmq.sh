#!/usr/bin/env bash
# Stargazer against BullMQ, in one run on this machine, one table at the end.
#
#   1. builds `stargazer` (release) from this checkout;
#   2. runs the BullMQ peer (shared/baseline/bullmq/b1.mjs: the W1 shape,
#      20,000 jobs over 200 channels, concurrency 50) against a private
#      redis-server of its own on a free port; node_modules go to a cache
#      directory outside the repository, never into it;
#   3. runs `stargazer bench W1 W2 W3 W3x4 W4 W5 W6 --queued 1000000` (its own
#      private redis-server) with BullMQ's figures, which prints the table:
#      msgs/s, the ratios the issue asks for (W1 ≥ 3× BullMQ, W3 ≥ 0.9× W1,
#      W3x4 ≥ 0.8× W1, W4 ≥ 0.3× W1, W5 p99 ≤ 1 ms), Redis commands per
#      message, peak RSS, lost / duplicated / out of order.
#
# Environment:
#   BULLMQ_DIR      the BullMQ baseline (default: ../shared/baseline/bullmq
#                   beside the repository, then /work/shared/baseline/bullmq)
#   BENCH_CACHE     where node_modules live (default ~/.cache/stargazer-bench)
#   BENCH_OUT       where the logs and JSON go (default target/bench-vs-bullmq)
#   BENCH_ARGS      extra arguments for `stargazer bench` (e.g. "--smoke")
#   QUEUED          entries of the queued-backlog run (default 1000000; 0: skip)
#   BULLMQ_CONC     BullMQ's concurrency (default 50)
#   STARGAZER_REDIS_SERVER  another redis-server binary (used for both)
#
# Exit status: that of `stargazer bench` — non-zero when a run lost,
# duplicated or reordered anything, did not finish, or (W6) left a message
# without its final text. Missed throughput targets are shown, not failed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${BENCH_OUT:-$repo/target/bench-vs-bullmq}"
cache="${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stargazer-bench}"
queued="${QUEUED:-1000000}"
conc="${BULLMQ_CONC:-50}"
redis_bin="${STARGAZER_REDIS_SERVER:-redis-server}"
mkdir -p "$out" "$cache"

say() { printf '\n== %s\n' "$*" >&2; }

bullmq_dir="${BULLMQ_DIR:-}"
if [ -z "$bullmq_dir" ]; then
  for d in "$repo/../shared/baseline/bullmq" /work/shared/baseline/bullmq; do
    if [ -f "$d/b1.mjs" ]; then bullmq_dir="$d"; break; fi
  done
fi
if [ -z "$bullmq_dir" ] || [ ! -f "$bullmq_dir/b1.mjs" ]; then
  echo "BullMQ baseline not found: set BULLMQ_DIR to the directory holding b1.mjs and package.json" >&2
  exit 2
fi
for tool in node npm cargo; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done
"$repo/scripts/ensure-redis.sh"

say "building stargazer (release)"
cargo build --release --locked
bin="$repo/target/release/stargazer"

say "BullMQ: npm install into $cache/bullmq"
# The baseline directory stays untouched (it may be read-only): its package
# and script are copied next to the cached node_modules, since Node resolves
# an ES module's imports from the script's own directory.
bdir="$cache/bullmq"
mkdir -p "$bdir"
cp "$bullmq_dir/package.json" "$bullmq_dir/b1.mjs" "$bdir/"
stamp="$(sha256sum "$bdir/package.json" | cut -d' ' -f1)"
if [ ! -d "$bdir/node_modules/bullmq" ] || [ "$(cat "$bdir/.installed" 2>/dev/null)" != "$stamp" ]; then
  (cd "$bdir" && npm install --no-audit --no-fund --loglevel=error >&2)
  echo "$stamp" >"$bdir/.installed"
fi
bullmq_version="$(node -p "require('$bdir/node_modules/bullmq/package.json').version")"

# A private redis-server on a free loopback port, stopped on exit.
redis_pid=""
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if [ -n "${redis_dir:-}" ]; then rm -rf "$redis_dir"; fi
}
trap cleanup EXIT
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
redis_up() {
  local reply
  reply="$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'PING\r\n' >&3 && timeout 1 head -c 7 <&3) 2>/dev/null || true)"
  [[ "$reply" == +PONG* ]]
}
redis_dir="$(mktemp -d)"
port=""
for _ in 1 2 3 4 5; do
  p=$((20000 + RANDOM % 30000))
  port_free "$p" || continue
  "$redis_bin" --port "$p" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" >/dev/null 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do
    if redis_up "$p"; then port="$p"; break; fi
    kill -0 "$redis_pid" 2>/dev/null || break
    sleep 0.05
  done
  [ -n "$port" ] && break
  kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; redis_pid=""
done
[ -n "$port" ] || { echo "could not start a private redis-server" >&2; exit 2; }

say "BullMQ $bullmq_version: W1 shape, concurrency $conc, private redis-server on port $port"
rss_file="$out/bullmq.time"
time_cmd=()
if [ -x /usr/bin/time ]; then time_cmd=(/usr/bin/time -f '%M' -o "$rss_file"); fi
line="$(cd "$bdir" && PORT="$port" CONC="$conc" timeout 600 "${time_cmd[@]}" node b1.mjs | tail -n 1)"
echo "$line" >&2
peak_kb="$(tail -n 1 "$rss_file" 2>/dev/null || true)"
node -e '
  const r = JSON.parse(process.argv[1]);
  r.bullmq_version = process.argv[2];
  if (/^[0-9]+$/.test(process.argv[3])) r.peak_rss_kb = +process.argv[3];
  console.log(JSON.stringify(r));
' "$line" "$bullmq_version" "$peak_kb" >"$out/bullmq.json"
kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; redis_pid=""

workloads=(W1 W2 W3 W3x4 W4 W5 W6)
extra=()
if [ "$queued" != 0 ]; then extra+=(--queued "$queued"); fi
# shellcheck disable=SC2206
extra+=(${BENCH_ARGS:-})
say "stargazer bench ${workloads[*]} ${extra[*]}"
status=0
"$bin" bench "${workloads[@]}" "${extra[@]}" \
  --bullmq-json "$out/bullmq.json" --json "$out/stargazer.json" >"$out/bench.txt" || status=$?

say "full output: $out/bench.txt, figures: $out/stargazer.json, $out/bullmq.json"
echo
echo "Stargazer vs BullMQ — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, redis-server $("$redis_bin" --version | awk '{print $3}' | sed 's/^v=//'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
sed -n '/^## Targets/,$p' "$out/bench.txt" | tail -n +2
grep -E '^W6:' "$out/bench.txt" || true
echo
echo "Redis cmds/msg: every command Redis ran during the drain (INFO commandstats;"
echo "commands inside Lua scripts included; preload and harness excluded), per entry."
exit "$status"
