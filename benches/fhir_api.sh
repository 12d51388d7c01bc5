#!/usr/bin/env bash
# FHIR API benchmark: read and search requests/s and latency with 1 and 16 concurrent
# clients, on a store of at least 100,000 resources, beside nginx serving the same Patient
# JSON as a static file (the ceiling: no database, no auth, no routing).
#
# 1. Starts the gateway (release build) on an empty data directory.
# 2. Fills it the way production does: PATIENTS distinct ADT^A01 messages (default 34,000;
#    each gives a Patient, an Encounter and a Provenance, plus shared Practitioners and
#    Locations: about 103,000 resources) go in over MLLP with `send`, then the script waits until the pipeline's
#    backlog is empty and counts the stored resources.
# 3. wrk, 10 s per run, 3 runs per case, medians of requests/s and of p50/p99 latency:
#    nginx static file, gateway read (`GET /fhir/Patient/{id}`), gateway search by token
#    (`GET /fhir/Patient?identifier=...`), by family name with `_count=10`, by reference
#    (`GET /fhir/Encounter?patient={id}`), and the newest ten patients
#    (`_sort=-_lastUpdated&_count=10`).
#
# Usage: benches/fhir_api.sh   (needs nginx and wrk from Debian: apt-get install nginx-light wrk)
# GATEWAY_BIN=path uses an already built binary; PATIENTS=n changes the store size.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
patients=${PATIENTS:-34000}
runs=${RUNS:-3}
seconds=${SECONDS_PER_RUN:-10}
command -v nginx >/dev/null && command -v wrk >/dev/null || {
  echo "needs nginx and wrk (apt-get install nginx-light wrk)" >&2
  exit 2
}
target_dir=${CARGO_TARGET_DIR:-$root/target}
gateway=${GATEWAY_BIN:-$target_dir/release/hl7-fhir-gateway}
[ -n "${GATEWAY_BIN:-}" ] || (cd "$root" && cargo build --release --quiet)

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$gateway" serve --data-dir "$work/data" --mllp-listen 127.0.0.1:6620 --http-listen 127.0.0.1:6621 \
  2>"$work/gateway.log" &
pids+=($!)
for _ in $(seq 100); do curl -sf http://127.0.0.1:6621/health/ready >/dev/null && break; sleep 0.1; done

echo "== generating $patients ADT^A01 messages" >&2
python3 - "$patients" >"$work/adt.hl7" <<'EOF'
import sys
families = ["SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ", "MARTINEZ"]
givens = ["JAMES", "MARY", "ROBERT", "PATRICIA", "JOHN", "JENNIFER", "MICHAEL", "LINDA", "DAVID", "ELIZABETH"]
for n in range(int(sys.argv[1])):
    family = families[n % 10] + str(n // 100)
    given = givens[(n // 10) % 10]
    birth = f"19{40 + n % 60:02d}{1 + n % 12:02d}{1 + n % 28:02d}"
    sex = "MF"[n % 2]
    ward = f"W{n % 40}"
    doctor = f"D{n % 500}^DOC{n % 500}^ANN"
    sys.stdout.write(
        f"MSH|^~\\&|EPIC|HOSP|GW|GW|20240102030405||ADT^A01^ADT_A01|BENCH{n}|P|2.5.1\r"
        f"EVN|A01|20240102030405\r"
        f"PID|1||MRN{n:07d}^^^HOSP^MR||{family}^{given}||{birth}|{sex}|||{n} MAIN ST^^SPRINGFIELD^IL^627{n % 100:02d}\r"
        f"PV1|1|I|{ward}^{n % 30}^A^HOSP||||{doctor}|||MED||||||||V{n:08d}^^^HOSP^VN\r\n"
    )
EOF

echo "== sending them over MLLP" >&2
started=$(date +%s)
"$gateway" send --to 127.0.0.1:6620 "$work/adt.hl7" >"$work/send.log"
accepted=$(grep -c " AA$" "$work/send.log" || true)
if [ "$accepted" != "$patients" ]; then
  echo "only $accepted of $patients messages were accepted; first others:" >&2
  grep -v " AA$" "$work/send.log" | head -5 >&2
  exit 1
fi
for _ in $(seq 3600); do
  backlog=$(curl -sf http://127.0.0.1:6621/admin/messages/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["status_counts"].get("accepted", 0))')
  [ "$backlog" = 0 ] && break
  sleep 1
done
loaded=$(( $(date +%s) - started ))
resources=$(sqlite3 "$work/data/gateway.db" "SELECT count(*) FROM resources" 2>/dev/null ||
  python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM resources').fetchone()[0])" "$work/data/gateway.db")
echo "== store: $resources resources from $patients messages in ${loaded}s" >&2

probe_mrn=$(printf 'MRN%07d' $((patients / 2)))
patient_id=$(curl -sf "http://127.0.0.1:6621/fhir/Patient?identifier=$probe_mrn" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])')
mkdir -p "$work/www"
curl -sf "http://127.0.0.1:6621/fhir/Patient/$patient_id" >"$work/www/patient.json"
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  types { application/fhir+json json; }
  client_body_temp_path $work/tmp; proxy_temp_path $work/tmp; fastcgi_temp_path $work/tmp;
  uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp;
  server { listen 127.0.0.1:6622; root $work/www; }
}
EOF
mkdir -p "$work/tmp"
# nginx's workers run as an unprivileged user: let them read the file.
chmod 755 "$work" "$work/www" && chmod 644 "$work/www/patient.json"
nginx -c "$work/nginx.conf"

# wrk prints "Requests/sec: N" and, with --latency, "50% 1.2ms" ... "99% 4ms".
measure() { # label url connections
  local label=$1 url=$2 connections=$3 threads=1
  [ "$connections" -gt 1 ] && threads=2
  for run in $(seq "$runs"); do
    wrk -t"$threads" -c"$connections" -d"${seconds}s" --latency "$url" >"$work/wrk.out"
    python3 - "$label" "$connections" "$work/wrk.out" <<'EOF'
import re, sys
label, connections, path = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
def ms(value):
    number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"\s50%\s+(\S+)", text).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", text).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors:
    sys.exit(f"{label}: {errors.group(1)} error responses")
print(f"{label}\t{connections}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}")
EOF
  done >>"$work/results.tsv"
}

for connections in 1 16; do
  measure "nginx static Patient" "http://127.0.0.1:6622/patient.json" "$connections"
  measure "gateway read Patient/{id}" "http://127.0.0.1:6621/fhir/Patient/$patient_id" "$connections"
  measure "gateway search Patient?identifier" "http://127.0.0.1:6621/fhir/Patient?identifier=$probe_mrn" "$connections"
  measure "gateway search Patient?family&_count=10" "http://127.0.0.1:6621/fhir/Patient?family=SMITH12&_count=10" "$connections"
  measure "gateway search Encounter?patient" "http://127.0.0.1:6621/fhir/Encounter?patient=$patient_id" "$connections"
  measure "gateway search Patient?_sort=-_lastUpdated&_count=10" "http://127.0.0.1:6621/fhir/Patient?_sort=-_lastUpdated&_count=10" "$connections"
done

python3 - "$work/results.tsv" "$resources" <<'EOF'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
groups = {}
for label, connections, rps, p50, p99 in rows:
    groups.setdefault((label, int(connections)), []).append((float(rps), float(p50), float(p99)))
ceiling = {c: statistics.median(r for r, _, _ in runs) for (label, c), runs in groups.items() if label.startswith("nginx")}
print(f"Store: {sys.argv[2]} resources. Medians of {len(next(iter(groups.values())))} runs.\n")
print("| request | clients | req/s | p50 ms | p99 ms | vs nginx |")
print("|---|---:|---:|---:|---:|---:|")
for (label, connections), runs in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
    rps = statistics.median(r for r, _, _ in runs)
    p50 = statistics.median(p for _, p, _ in runs)
    p99 = statistics.median(p for _, _, p in runs)
    print(f"| {label} | {connections} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rps / ceiling[connections]:.2f} |")
EOF
