#!/usr/bin/env bash
# Runs the same workloads against Switchboard and mosquitto on this host and
# prints them side by side. The server under test runs alone on CPU 0, the
# load on CPU 1; one server at a time. Every run is bounded (--duration,
# timeouts) and the servers are stopped on exit.
#
# Usage: bench/compare.sh [--connections N] [--idle-connections N] [--messages-per-user K]
set -euo pipefail
cd "$(dirname "$0")/.."

connections=1000
idle_connections=15000
per_user=100
while [ "$#" -gt 0 ]; do
  case "$1" in
    --connections) connections="$2"; shift 2 ;;
    --idle-connections) idle_connections="$2"; shift 2 ;;
    --messages-per-user) per_user="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto (apt)"
  apt-get update -qq
  apt-get install -y -qq mosquitto
fi
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)

cargo build --release -p switchboard -p switchboard-bench
out=target/compare
rm -rf "$out" target/mosquitto
mkdir -p "$out" target/mosquitto
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

start_switchboard() {
  stop_server
  taskset -c 0 target/release/switchboard serve --listen 127.0.0.1:7700 \
    --admin-listen 127.0.0.1:7701 --data-dir "$out/data" --shards 1 --log-level warn &
  server_pid=$!
  sleep 1
}
start_mosquitto() {
  stop_server
  taskset -c 0 "$mosquitto_bin" -c bench/mosquitto.conf &
  server_pid=$!
  sleep 1
}

bench=(timeout 600 taskset -c 1 target/release/switchboard-bench)
users="$out/users.json"

for target in switchboard mqtt; do
  if [ "$target" = switchboard ]; then
    address=127.0.0.1:7700
    user_args=(--users "$users")
    start=start_switchboard
  else
    address=mqtt://127.0.0.1:1883
    user_args=()
    start=start_mosquitto
  fi
  echo "== $target: idle ($idle_connections connections)"
  $start
  "${bench[@]}" idle --target "$address" -n "$idle_connections" --duration 5 "${user_args[@]}" \
    --quiet --json "$out/$target-idle.json"
  echo "== $target: p2p, highest rate with p99 <= 50 ms"
  $start
  "${bench[@]}" p2p --target "$address" -n "$connections" "${user_args[@]}" --rate max \
    --rate-start 5000 --step-duration 4 --p99-max-ms 50 --drain-timeout 5 \
    --quiet --json "$out/$target-p2p.json"
  echo "== $target: offline drain ($connections users x $per_user messages)"
  $start
  "${bench[@]}" offline --target "$address" -n "$connections" -k "$per_user" "${user_args[@]}" \
    --quiet --json "$out/$target-offline.json"
  stop_server
done

for scenario in idle p2p offline; do
  echo
  echo "== $scenario"
  target/release/switchboard-bench compare "$out/switchboard-$scenario.json" "$out/mqtt-$scenario.json"
done
