#!/usr/bin/env bash
# Compares two Switchboard server binaries (say, before and after a change of
# the socket path) in one run on this host, and prints one table: memory per
# idle connection, sessions/s, the highest 1:1 message rate with deliver
# p99 <= 50 ms, latency at half that rate, and syscalls per delivered message.
# The server under test runs alone on CPU 0, the harness on CPU 1; one server
# at a time, started fresh for every measurement, the two binaries taking
# turns step by step so that a change of load on the host hits both alike.
# Every run is bounded (timeout) and the servers are stopped on exit.
#
# Usage: bench/before_after.sh --before BIN --after BIN [--idle-connections N]
#          [--connections N] [--strace-rate R] [--strace-duration S]
#          [--rounds K] [--port P] [--server-arg ARG]...
#   --idle-connections  sessions held in the idle step (default 15000)
#   --connections       users in the p2p steps (default 1000)
#   --rounds            rate searches per binary, taking turns; the median
#                       counts (default 1; use 3 on a host others share)
#   --strace-rate       offered msg/s while syscalls are counted (default 5000)
#   --strace-duration   seconds of that run (default 5)
#   --port              client port (default 7700); the admin port is P+1
#   --server-arg        extra argument for both servers' `serve` (repeatable)
# Results (every JSON, the strace summaries, server logs): target/before-after/
set -euo pipefail

before=""
after=""
idle_connections=15000
connections=1000
strace_rate=5000
strace_duration=5
rounds=1
port=7700
server_args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --before) before="$2"; shift 2 ;;
    --after) after="$2"; shift 2 ;;
    --idle-connections) idle_connections="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --strace-rate) strace_rate="$2"; shift 2 ;;
    --strace-duration) strace_duration="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --server-arg) server_args+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
if [ -z "$before" ] || [ -z "$after" ]; then
  echo "usage: $0 --before BIN --after BIN [options] (--help)" >&2
  exit 2
fi
for bin in "$before" "$after"; do
  if [ ! -x "$bin" ]; then
    echo "not an executable: $bin" >&2
    exit 2
  fi
done
# The harness rounds connection counts down to even; so does this script.
idle_connections=$((idle_connections / 2 * 2))
connections=$((connections / 2 * 2))
# Paths are taken relative to the caller's directory, before the cd below.
before=$(readlink -f "$before")
after=$(readlink -f "$after")
cd "$(dirname "$0")/.."

# Syscalls are counted with perf's syscall tracepoints when perf can read
# them (no slowdown of the server), else with strace -c.
perf_events="raw_syscalls:sys_enter"
for name in io_uring_enter sendto recvfrom sendmsg recvmsg read write epoll_wait futex membarrier; do
  perf_events="$perf_events,syscalls:sys_enter_$name"
done
syscall_tool=strace
if command -v perf >/dev/null 2>&1 && perf stat -x, -e "$perf_events" -- true >/dev/null 2>&1; then
  syscall_tool=perf
fi
for tool in strace jq; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "installing $tool (apt)"
    apt-get update -qq
    apt-get install -y -qq "$tool"
  fi
done
cargo build --release -p switchboard-bench

out=target/before-after
rm -rf "$out"
mkdir -p "$out/bin"
# Copies, so that a rebuild during the run cannot swap a binary under it.
cp "$before" "$out/bin/before"
cp "$after" "$out/bin/after"
labels=(before after)
listen="127.0.0.1:$port"
admin="127.0.0.1:$((port + 1))"
harness=(timeout 900 taskset -c 1 target/release/switchboard-bench)
if [ "$idle_connections" -gt "$connections" ]; then
  accounts=$idle_connections
else
  accounts=$connections
fi

server_pid=""
strace_pid=""
load_pid=""
stop_pid() {
  # Asks politely, waits up to 10 s, then kills.
  local pid=$1 signal=$2
  kill "-$signal" "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_server() {
  if [ -n "$server_pid" ]; then
    stop_pid "$server_pid" TERM
    server_pid=""
  fi
}
cleanup() {
  if [ -n "$strace_pid" ]; then stop_pid "$strace_pid" INT; strace_pid=""; fi
  if [ -n "$load_pid" ]; then stop_pid "$load_pid" TERM; load_pid=""; fi
  stop_server
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() {
  ss -Hltn "( sport = :$1 )" | grep -q .
}

# start_server LABEL: a fresh server process of that binary on its own data
# directory (kept between steps, so the accounts stay registered).
start_server() {
  local label=$1
  stop_server
  for p in "$port" "$((port + 1))"; do
    if port_busy "$p"; then
      echo "port $p is already in use on this host; pick another with --port" >&2
      exit 1
    fi
  done
  mkdir -p "$out/$label/data"
  taskset -c 0 "$out/bin/$label" serve --listen "$listen" --admin-listen "$admin" \
    --data-dir "$out/$label/data" --shards 1 --log-level warn "${server_args[@]}" \
    >>"$out/$label/server.log" 2>&1 &
  server_pid=$!
  local listening=""
  for _ in $(seq 100); do
    if port_busy "$port"; then listening=yes; break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "$label server exited at start; see $out/$label/server.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  if [ -z "$listening" ]; then
    echo "$label server is not listening on $listen after 10 s" >&2
    exit 1
  fi
  # The port is bound before start-up ends (the log is mapped afterwards:
  # tens of MB of RSS within the next half second). The harness takes its
  # memory baseline as soon as it starts, so wait for the RSS to hold still
  # for a second (at most 15 s) before handing the server over.
  local rss last="" same=0
  for _ in $(seq 60); do
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$server_pid/status")
    if [ "$rss" = "$last" ]; then same=$((same + 1)); else same=0; fi
    [ "$same" -ge 4 ] && return 0
    last=$rss
    sleep 0.25
  done
  echo "   $label server RSS still moving 15 s after start; going on" >&2
}

# bench LABEL NAME SCENARIO ARGS...: one harness run against a fresh server,
# its JSON in $out/LABEL/NAME.json. A failed run is reported and skipped
# (its cells show "-"), so one bad step does not lose the others.
bench() {
  local label=$1 name=$2 scenario=$3
  shift 3
  echo "== $label: $name"
  echo "$label $name: load average $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%T)" >>"$out/steps.log"
  start_server "$label"
  # In the background, so that a signal to this script is handled at once
  # (bash runs traps only between commands, and `wait` is one).
  "${harness[@]}" "$scenario" --target "$listen" --server-pid "$server_pid" \
    --users "$out/$label/users.json" --quiet --json "$out/$label/$name.json" "$@" \
    >"$out/$label/$name.txt" 2>&1 &
  load_pid=$!
  if ! wait "$load_pid"; then
    echo "   $label $name failed; see $out/$label/$name.txt" >&2
    rm -f "$out/$label/$name.json"
  fi
  load_pid=""
  stop_server
}

# json LABEL NAME FILTER: a number from a result, empty when absent.
json() {
  local file="$out/$1/$2.json"
  [ -f "$file" ] || return 0
  jq -r "($3) // empty" "$file"
}

# server_sockets: established connections on the server's port.
server_sockets() {
  taskset -c 1 ss -Htn state established "( sport = :$port )" | wc -l
}

# syscalls LABEL: a fixed-rate p2p run with strace counting the server's
# syscalls from the moment every session is connected (so handshakes are
# not charged to messages) until the run ends.
syscalls() {
  local label=$1
  local dir="$out/$label"
  echo "== $label: syscalls at $strace_rate msg/s for $strace_duration s ($syscall_tool)"
  echo "$label strace: load average $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%T)" >>"$out/steps.log"
  start_server "$label"
  "${harness[@]}" p2p --target "$listen" --server-pid "$server_pid" -n "$connections" \
    --users "$dir/users.json" --rate "$strace_rate" --duration "$strace_duration" \
    --drain-timeout 30 --quiet --json "$dir/strace-p2p.json" >"$dir/strace-p2p.txt" 2>&1 &
  load_pid=$!
  local connected=0
  for _ in $(seq 1200); do
    connected=$(server_sockets)
    [ "$connected" -ge "$connections" ] && break
    kill -0 "$load_pid" 2>/dev/null || break
    sleep 0.05
  done
  if [ "$connected" -lt "$connections" ]; then
    echo "   $label: only $connected of $connections sessions connected; syscalls not counted" >&2
  else
    if [ "$syscall_tool" = perf ]; then
      # Kernel tracepoints, counted in the kernel: the server runs at full
      # speed (strace stops it at every syscall, which changes how much
      # each io_uring_enter carries).
      timeout -s INT 300 perf stat -x, -o "$dir/perf-syscalls.txt" -p "$server_pid" \
        -e "$perf_events" 2>"$dir/strace.log" &
    else
      # -f with -p attaches every thread of the server (and any it starts).
      timeout -s INT 300 strace -f -c -o "$dir/strace.txt" -p "$server_pid" 2>"$dir/strace.log" &
    fi
    strace_pid=$!
    # Detach as soon as the harness starts closing its sessions (after the
    # last receipt), so the teardown is not charged to the messages either.
    while kill -0 "$load_pid" 2>/dev/null && [ "$(server_sockets)" -ge "$connections" ]; do
      sleep 0.02
    done
    kill -INT "$strace_pid" 2>/dev/null || true
  fi
  if ! wait "$load_pid"; then
    echo "   $label strace run failed; see $dir/strace-p2p.txt" >&2
    rm -f "$dir/strace-p2p.json"
  fi
  load_pid=""
  if [ -n "$strace_pid" ]; then
    # SIGINT: strace detaches from every thread and writes its summary.
    kill -INT "$strace_pid" 2>/dev/null || true
    wait "$strace_pid" 2>/dev/null || true
    strace_pid=""
  fi
  stop_server
  local delivered
  delivered=$(json "$label" strace-p2p '.messages.delivered')
  if [ -z "$delivered" ] || [ "$delivered" -eq 0 ]; then
    return 0
  fi
  if [ "$syscall_tool" = perf ]; then
    [ -s "$dir/perf-syscalls.txt" ] || return 0
    # CSV rows: "count,,event,..."; every syscall is raw_syscalls:sys_enter,
    # the named ones are listed too and the rest is "other".
    awk -F, '$3 ~ /^(raw_)?syscalls:/ {
        name = $3; sub(/^syscalls:sys_enter_/, "", name)
        count = ($1 ~ /^[0-9]+$/) ? $1 : 0
        if (name == "raw_syscalls:sys_enter") total = count; else { named += count; print name, count }
      }
      END { if (total > named) print "other", total - named }' "$dir/perf-syscalls.txt"
  else
    [ -s "$dir/strace.txt" ] || return 0
    # The summary's rows: "% time seconds usecs/call calls [errors] syscall".
    awk '/^-/ { table = !table; next } table && $NF != "total" && $NF != "syscall" { print $NF, $4 }' \
      "$dir/strace.txt"
  fi |
    jq -R -n --argjson delivered "$delivered" '
      [inputs | split(" ") | {key: .[0], value: (.[1] | tonumber)}] | from_entries as $calls
      | {delivered: $delivered, calls: $calls,
         total_calls: ([$calls[]] | add // 0),
         per_message: ($calls | map_values(. / $delivered)),
         total_per_message: (([$calls[]] | add // 0) / $delivered)}' \
      >"$dir/syscalls.json"
}

# Which binary goes first flips at every step (before, after; after, before;
# …), so whatever drifts on the host over the run favours neither.
turn=0
next_order() {
  if [ $((turn % 2)) -eq 0 ]; then order=(before after); else order=(after before); fi
  turn=$((turn + 1))
}

started=$(date +%s)
for label in "${labels[@]}"; do
  mkdir -p "$out/$label"
done
next_order
for label in "${order[@]}"; do
  # Registers the accounts once per binary (saved in users.json); every later
  # step reuses them, so connection rates never include registration.
  bench "$label" register connect -n "$accounts"
done
next_order
for label in "${order[@]}"; do
  bench "$label" idle idle -n "$idle_connections" --duration 5
done
for round in $(seq "$rounds"); do
  next_order
  for label in "${order[@]}"; do
    bench "$label" "p2p-max-$round" p2p -n "$connections" --rate max --rate-start 5000 \
      --step-duration 4 --p99-max-ms 50 --drain-timeout 5
  done
done
# rate-max.json: every round's rate and their median (the lower middle one
# for an even count), which the half-rate run uses.
for label in "${labels[@]}"; do
  for round in $(seq "$rounds"); do
    json "$label" "p2p-max-$round" '.rate_max'
  done | jq -s '{rates: ., median: (if length == 0 then null else (sort | .[(length - 1) / 2 | floor]) end)}' \
    >"$out/$label/rate-max.json"
done
next_order
for label in "${order[@]}"; do
  rate_max=$(json "$label" rate-max '.median')
  if [ -n "$rate_max" ]; then
    half=$(awk -v r="$rate_max" 'BEGIN { printf "%.0f", r / 2 }')
    bench "$label" p2p-half p2p -n "$connections" --rate "$half" --duration 10 --drain-timeout 10
  else
    echo "== $label: no maximum rate found; the half-rate run is skipped" >&2
  fi
done
# Both at one offered load (half of the before binary's maximum), so their
# latencies compare at the same work, not only each at half its own ceiling.
common_rate=""
before_max=$(json before rate-max '.median')
if [ -n "$before_max" ]; then
  common_rate=$(awk -v r="$before_max" 'BEGIN { printf "%.0f", r / 2 }')
  next_order
  for label in "${order[@]}"; do
    bench "$label" p2p-common p2p -n "$connections" --rate "$common_rate" --duration 10 --drain-timeout 10
  done
fi
next_order
for label in "${order[@]}"; do
  syscalls "$label"
done
elapsed=$(($(date +%s) - started))

# The table: one row per metric, the two binaries and after/before.
fmt() {
  awk -v x="$1" -v scale="${2:-1}" 'BEGIN {
    if (x == "") { print "-"; exit }
    v = x / scale
    if (v == int(v) && (v >= 100 || v <= -100 || v == 0)) printf "%d\n", v
    else if (v >= 100 || v <= -100) printf "%.0f\n", v
    else if (v >= 10 || v <= -10) printf "%.1f\n", v
    else printf "%.3g\n", v
  }'
}
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a == "" || b == "" || a == 0) print "-"; else printf "%.2f\n", b / a
  }'
}
# row LABEL NAME FILTER [SCALE]: one metric from the same step of both binaries.
row() {
  local title=$1 name=$2 filter=$3 scale=${4:-1}
  local a b
  a=$(json before "$name" "$filter")
  b=$(json after "$name" "$filter")
  printf '| %s | %s | %s | %s |\n' "$title" "$(fmt "$a" "$scale")" "$(fmt "$b" "$scale")" "$(ratio "$a" "$b")"
}

{
  echo
  echo "before: $before"
  echo "after:  $after"
  echo "host: $(nproc) CPUs, $(uname -r); run took ${elapsed} s; load average at each step in $out/steps.log"
  echo
  echo "| metric | before | after | after/before |"
  echo "| --- | --- | --- | --- |"
  row "idle sessions connected" idle '.connect.connected'
  row "sessions/s (idle run, accounts registered)" idle '.rates.sessions_per_s'
  row "server RSS B/conn (idle)" idle '.server.rss_bytes_per_conn'
  row "server PSS B/conn (idle)" idle '.server.pss_bytes_per_conn'
  row "kernel slab B/conn (idle, both ends)" idle '.kernel.slab_bytes_per_conn'
  row "max msg/s, deliver p99 <= 50 ms (median of $rounds)" rate-max '.median'
  if [ "$rounds" -gt 1 ]; then
    printf '| max msg/s per round | %s | %s | |\n' \
      "$(jq -r '.rates | map(floor) | join(", ")' "$out/before/rate-max.json")" \
      "$(jq -r '.rates | map(floor) | join(", ")' "$out/after/rate-max.json")"
  fi
  if [ -n "$common_rate" ]; then
    row "same-load run (half of before's max): offered msg/s" p2p-common '.rates.offered_msgs_per_s'
    row "same-load ack p50 ms" p2p-common '.latency_us.ack.p50' 1000
    row "same-load ack p99 ms" p2p-common '.latency_us.ack.p99' 1000
    row "same-load deliver p50 ms" p2p-common '.latency_us.deliver.p50' 1000
    row "same-load deliver p99 ms" p2p-common '.latency_us.deliver.p99' 1000
    row "same-load receipt p50 ms" p2p-common '.latency_us.receipt.p50' 1000
    row "same-load receipt p99 ms" p2p-common '.latency_us.receipt.p99' 1000
  fi
  row "half-rate run: offered msg/s" p2p-half '.rates.offered_msgs_per_s'
  row "half-rate run: delivered msg/s" p2p-half '.rates.delivered_msgs_per_s'
  row "half-rate ack p50 ms" p2p-half '.latency_us.ack.p50' 1000
  row "half-rate ack p99 ms" p2p-half '.latency_us.ack.p99' 1000
  row "half-rate deliver p50 ms" p2p-half '.latency_us.deliver.p50' 1000
  row "half-rate deliver p99 ms" p2p-half '.latency_us.deliver.p99' 1000
  row "half-rate receipt p50 ms" p2p-half '.latency_us.receipt.p50' 1000
  row "half-rate receipt p99 ms" p2p-half '.latency_us.receipt.p99' 1000
  row "syscall run ($syscall_tool): messages delivered" syscalls '.delivered'
  row "syscall run: deliver p99 ms" strace-p2p '.latency_us.deliver.p99' 1000
  row "syscalls per delivered msg, all" syscalls '.total_per_message'
  # Every syscall either binary made at least 0.01 times per message.
  names=$(cat "$out"/*/syscalls.json 2>/dev/null |
    jq -r '.per_message | to_entries[] | select(.value >= 0.01) | .key' | sort -u)
  for name in $names; do
    row "  $name per msg" syscalls ".per_message[\"$name\"] // 0"
  done
  echo
  echo "Syscalls are counted with $syscall_tool from the moment all $connections sessions are up"
  echo "until the harness starts closing them; a few teardown calls may be counted (at most"
  echo "one \`close\` per connection)."
  if [ "$syscall_tool" = strace ]; then
    echo "strace stops the server at every syscall, which changes how much each io_uring_enter"
    echo "carries: install perf (syscall tracepoints) for counts of an undisturbed server."
  fi
} | tee "$out/table.md"
echo
echo "results: $out/{before,after}/*.json, the table in $out/table.md"
