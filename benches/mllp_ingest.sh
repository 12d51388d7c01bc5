#!/usr/bin/env bash
# Durable MLLP ingest benchmark: the gateway (every message synced to disk before its ACK) side
# by side with simple-hl7 (Node.js, stores nothing) and two raw ACK servers that parse and store
# nothing (raw-ack in Python, rust-ack = mllp-load --serve-ack: the machine's ceiling), all measured in one run with two load generators: ../shared/bench/loadgen.py
# (Python, the shared reference) and src/bin/mllp-load.rs (the same rules in Rust, whose
# own ceiling is higher).
#
# Each connection sends a ~1.2 KiB ADT^A01 and waits for its ACK before the next (window 1).
# gateway-memory is the same gateway with its data directory in /dev/shm: not durable, it
# shows the gateway's cost without the disk. The script first measures the disk's synced
# 4 KiB write (what each group commit waits for).
#
# Runs: 1 connection x 5,000 messages and 8 connections x 20,000 messages, 3 repeats each;
# medians are printed as a Markdown table for BENCHMARKS.md. The gateway converts what it
# receives while it is measured (its pipeline runs at a lower CPU priority than the ACKs).
#
# Usage: benches/mllp_ingest.sh            (needs ../shared/bench; loopback only)
#        CLIENTS=python benches/mllp_ingest.sh   (only one load generator: python or rust)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED_DIR:-$root/../shared}
bench="$shared/bench"
[ -f "$bench/loadgen.py" ] || { echo "no $bench/loadgen.py: this benchmark needs ../shared" >&2; exit 2; }

venv=${BENCH_VENV:-/tmp/bench-venv}
node_dir=${NODE_MLLP_DIR:-/tmp/node-mllp}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c 'import uvloop' 2>/dev/null || "$venv/bin/pip" install -q uvloop==0.23.0
if [ ! -d "$node_dir/node_modules/simple-hl7" ]; then
  mkdir -p "$node_dir"
  (cd "$node_dir" && npm init -y >/dev/null && npm install --silent simple-hl7@3.3.0 >/dev/null)
fi

target_dir=${CARGO_TARGET_DIR:-$root/target}
# GATEWAY_BIN: measure an already built binary instead of building one (both binaries come
# from one `cargo build --release`).
gateway=${GATEWAY_BIN:-$target_dir/release/hl7-fhir-gateway}
[ -n "${GATEWAY_BIN:-}" ] || (cd "$root" && cargo build --release --quiet)
rust_loadgen=$target_dir/release/mllp-load
clients=${CLIENTS:-python rust}
data=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$data" ${memory:+"$memory"}
}
trap cleanup EXIT

# The disk's own latency for the write the ACK waits for (4 KiB, O_DIRECT|O_DSYNC, into an
# allocated file beside the journal): with the do-nothing server's round trip, it sets the
# one-connection ceiling.
python3 - "$data" <<'PY'
import mmap, os, sys, time
path = os.path.join(sys.argv[1], "sync-probe")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"\0" * (8 << 20), 0)
os.fsync(fd)
os.close(fd)
try:
    fd = os.open(path, os.O_RDWR | os.O_DSYNC | os.O_DIRECT)
except OSError:
    fd = os.open(path, os.O_RDWR | os.O_DSYNC)
block = mmap.mmap(-1, 4096)
block.write(b"x" * 4096)
times = []
for i in range(3000):
    start = time.perf_counter()
    os.pwrite(fd, block, (i % 2048) * 4096)
    times.append(time.perf_counter() - start)
os.close(fd)
os.unlink(path)
times.sort()
print(f"disk: synced 4 KiB write p50 {times[1500] * 1e6:.0f} us, p99 {times[2970] * 1e6:.0f} us, mean {sum(times) / len(times) * 1e6:.0f} us")
PY

"$gateway" serve --data-dir "$data" \
  --mllp-listen 127.0.0.1:6610 --http-listen 127.0.0.1:6611 --mappings "$root/mappings" 2>"$data/gateway.log" &
pids+=($!)
# The same gateway with its data directory in memory (/dev/shm): not durable, so not a
# configuration to run, but it shows what the gateway costs without the disk's sync.
memory=""
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  memory=$(mktemp -d /dev/shm/hl7gw-bench.XXXXXX)
  "$gateway" serve --data-dir "$memory" \
    --mllp-listen 127.0.0.1:6612 --http-listen 127.0.0.1:6613 --mappings "$root/mappings" 2>"$data/gateway-memory.log" &
  pids+=($!)
fi
NODE_MLLP_DIR="$node_dir" node "$bench/simple_hl7_server.js" 6602 900 >/dev/null 2>&1 &
pids+=($!)
"$venv/bin/python" "$bench/raw_ack_server.py" --port 6600 --max-seconds 900 --uvloop >/dev/null 2>&1 &
pids+=($!)
# The same do-nothing server in Rust (mllp-load --serve-ack): the machine's ceiling for a Rust
# MLLP server, which the Python one is below at 8 connections.
"$rust_loadgen" --serve-ack --port 6604 --max-seconds 900 >/dev/null 2>&1 &
pids+=($!)
for port in 6611 ${memory:+6613}; do
  for _ in $(seq 50); do
    "$gateway" health --http "http://127.0.0.1:$port" 2>/dev/null && break
    sleep 0.2
  done
done
sleep 1

results="$data/results.jsonl"
# Each gateway phase starts with the conversion backlog of the previous ones worked off, as a
# burst arriving at a site would (bounded wait).
drained() { # http-port
  for _ in $(seq 600); do
    backlog=$(curl -s "http://127.0.0.1:$1/metrics" | awk '/^hl7gw_pipeline_backlog /{print $2}')
    [ "${backlog:-1}" = 0 ] && return 0
    sleep 1
  done
  echo "the gateway's conversion backlog did not drain in 600 s" >&2
}
run() { # client label port connections total
  [ "$2" = gateway ] && drained 6611
  [ "$2" = gateway-memory ] && drained 6613
  local generator=("$venv/bin/python" "$bench/loadgen.py" --uvloop)
  [ "$1" = rust ] && generator=("$rust_loadgen")
  "${generator[@]}" --port "$3" -c "$4" -n "$5" --repeat 3 --json \
    --message-file "$root/benches/adt_a01_1k.hl7" --label "$2" | grep summary \
    | sed "s/^{/{\"client\": \"$1\", /" >>"$results"
  sleep 2 # let the gateway's pipeline and checkpoints settle between runs
}
for client in $clients; do
  specs=("raw-ack 6600" "rust-ack 6604" "simple-hl7 6602" "gateway 6610")
  [ -n "$memory" ] && specs+=("gateway-memory 6612")
  for spec in "${specs[@]}"; do
    set -- $spec
    run "$client" "$1" "$2" 1 5000
    run "$client" "$1" "$2" 8 20000
  done
done

# Stop the gateway (SIGTERM: it copies its ingest log into journal.db) before counting.
kill -TERM "${pids[0]}" && wait "${pids[0]}" || true
echo "stored in the gateway's journal: $(sqlite3 "$data/journal.db" 'select count(*) from messages' 2>/dev/null || echo '?') rows"
"$venv/bin/python" - "$results" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    record = json.loads(line)
    rows.append(dict(record["summary"], client=record["client"]))
by = {(r["client"], r["label"], r["connections"]): r for r in rows}
print("| load generator | server | connections | msg/s (median of 3) | ACK p50 ms | ACK p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['client']} | {r['label']} | {r['connections']} | {r['median_msgs_per_s']:,.0f} | {r['median_p50_ms']} | {r['median_p99_ms']} | {'yes' if r['errors_any'] else 'none'} |")
print()
for client in ("python", "rust"):
    for c in (1, 8):
        g, n, raw, rust, memory = (by.get((client, label, c)) for label in ("gateway", "simple-hl7", "raw-ack", "rust-ack", "gateway-memory"))
        if g and n and raw and rust:
            print(f"{client} client, {c} connection(s): gateway / simple-hl7 {g['median_msgs_per_s'] / n['median_msgs_per_s']:.2f}, "
                  f"gateway / raw-ack {g['median_msgs_per_s'] / raw['median_msgs_per_s']:.2f}, "
                  f"gateway / rust-ack {g['median_msgs_per_s'] / rust['median_msgs_per_s']:.2f}"
                  + (f", gateway / gateway-memory {g['median_msgs_per_s'] / memory['median_msgs_per_s']:.2f}" if memory else ""))
PY
