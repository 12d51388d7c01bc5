#!/usr/bin/env bash
# Aggregator push benchmark: delivered Bundles/s from a release gateway to a local
# aggregator that answers at once (benches/aggregator.js, Node's http module).
#
# For each scenario the gateway is loaded once with the aggregator down — MESSAGES ADT
# messages sent over MLLP, converted and queued in the outbox — then stopped, and its data
# directory kept. Each run restores that directory, starts the aggregator, starts the
# gateway, and waits until the outbox has nothing pending. The rate is messages delivered
# divided by the time from the aggregator's first request to its last answer. Scenarios:
#   distinct: every message a different patient (one message per Bundle, max_in_flight
#             partitions in parallel: the worst case, nothing to merge);
#   backlog:  PATIENTS patients with MESSAGES/PATIENTS messages each (a patient's backlog
#             merged up to max_bundle_messages per Bundle).
#
# Usage: benches/push.sh   (GATEWAY_BIN=path to reuse a release build; MESSAGES, PATIENTS,
# RUNS change the sizes). Needs node.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
messages=${MESSAGES:-10000}
patients=${PATIENTS:-1000}
runs=${RUNS:-3}
target_dir=${CARGO_TARGET_DIR:-$root/target}
gateway=${GATEWAY_BIN:-$target_dir/release/hl7-fhir-gateway}
[ -n "${GATEWAY_BIN:-}" ] || (cd "$root" && cargo build --release --quiet)
command -v node >/dev/null || {
  echo "needs node" >&2
  exit 2
}

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

mllp=127.0.0.1:6630
http=127.0.0.1:6631
aggregator_port=6632
printf '%s\n' \
  "version: 1" \
  "aggregator:" \
  "  endpoint: http://127.0.0.1:$aggregator_port/fhir" \
  "  max_in_flight: 8" \
  "  max_bundle_messages: 20" \
  "  retry: { initial_backoff_ms: 100, max_backoff_secs: 1 }" >"$work/config.yaml"

outbox_count() { # status
  curl -sf "http://$http/admin/outbox/stats" |
    python3 -c "import json,sys; print(json.load(sys.stdin)['status_counts'].get('$1', 0))"
}

start_gateway() { # data-dir
  "$gateway" serve --config "$work/config.yaml" --data-dir "$1" --mllp-listen "$mllp" --http-listen "$http" \
    2>>"$work/gateway.log" &
  gateway_pid=$!
  pids+=("$gateway_pid")
  for _ in $(seq 200); do
    curl -sf "http://$http/health/live" >/dev/null && return
    sleep 0.05
  done
  echo "gateway did not start; see its log:" >&2
  tail -20 "$work/gateway.log" >&2
  exit 1
}

stop_gateway() {
  kill -TERM "$gateway_pid"
  wait "$gateway_pid" 2>/dev/null || true
}

# Message n is about patient n % count: its first message an A01, later ones A08s.
generate() { # count
  python3 -c '
import sys
total, patients = int(sys.argv[1]), int(sys.argv[2])
for n in range(total):
    p = n % patients
    event = "A01" if n < patients else "A08"
    sys.stdout.write(
        f"MSH|^~\\&|EPIC|HOSP|GW|GW|20240102030405||ADT^{event}^ADT_A01|PUSH{n}|P|2.5.1\r"
        f"EVN|{event}|20240102030405\r"
        f"PID|1||MRN{p:07d}^^^HOSP^MR||FAMILY{p}^GIVEN{n}||19700101|F|||{n} MAIN ST^^SPRINGFIELD^IL^62701\r"
        f"PV1|1|I|W{p % 40}^{p % 30}^A^HOSP||||D{p % 500}^DOC^ANN|||MED||||||||V{p:08d}^^^HOSP^VN\r\n"
    )' "$messages" "$1"
}

load() { # scenario patients
  local scenario=$1 accepted
  generate "$2" >"$work/$scenario.hl7"
  start_gateway "$work/$scenario-data"
  "$gateway" send --to "$mllp" "$work/$scenario.hl7" >"$work/send.log"
  accepted=$(grep -c " AA$" "$work/send.log" || true)
  if [ "$accepted" != "$messages" ]; then
    echo "$scenario: only $accepted of $messages messages accepted" >&2
    exit 1
  fi
  for _ in $(seq 3600); do
    [ "$(outbox_count pending)" = "$messages" ] && break
    sleep 0.5
  done
  stop_gateway
}

run() { # scenario
  local scenario=$1 node_pid delivered
  rm -rf "$work/run-data" && cp -r "$work/$scenario-data" "$work/run-data"
  node "$root/benches/aggregator.js" "$aggregator_port" &
  node_pid=$!
  pids+=("$node_pid")
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$aggregator_port/stats" >/dev/null && break
    sleep 0.05
  done
  start_gateway "$work/run-data"
  for _ in $(seq 12000); do
    [ "$(outbox_count pending)" = 0 ] && break
    sleep 0.05
  done
  delivered=$(outbox_count delivered)
  if [ "$delivered" != "$messages" ]; then
    echo "$scenario: $delivered of $messages delivered" >&2
    exit 1
  fi
  curl -sf "http://127.0.0.1:$aggregator_port/stats" | python3 -c '
import json, sys
stats = json.load(sys.stdin)
seconds = (stats["last_ms"] - stats["first_ms"]) / 1000
requests = stats["requests"]
print(f"{sys.argv[1]}\t{sys.argv[2]}\t{requests}\t{seconds:.3f}")' "$scenario" "$messages" >>"$work/results.tsv"
  stop_gateway
  kill "$node_pid"
  wait "$node_pid" 2>/dev/null || true
}

echo "== loading $messages messages for $messages patients, then for $patients patients" >&2
load distinct "$messages"
load backlog "$patients"
for run_number in $(seq "$runs"); do
  echo "== run $run_number of $runs" >&2
  run distinct
  run backlog
done

python3 - "$work/results.tsv" "$patients" "$messages" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
patients, messages = int(sys.argv[2]), int(sys.argv[3])
print(f"Medians of {len(rows) // 2} runs.\n")
print("| scenario | messages | requests | seconds | messages/s | requests/s |")
print("|---|---:|---:|---:|---:|---:|")
labels = {
    "distinct": f"{messages:,} patients, 1 message each",
    "backlog": f"{patients:,} patients, {messages // patients} messages each",
}
for scenario, label in labels.items():
    runs = [(int(m), int(r), float(s)) for name, m, r, s in rows if name == scenario]
    seconds = statistics.median(s for _, _, s in runs)
    requests = statistics.median(r for _, r, _ in runs)
    rate = statistics.median(m / s for m, _, s in runs)
    request_rate = statistics.median(r / s for _, r, s in runs)
    print(f"| {label} | {runs[0][0]:,} | {requests:,.0f} | {seconds:.2f} | {rate:,.0f} | {request_rate:,.0f} |")
PY
