#!/usr/bin/env bash
# Installs the FHIR client libraries of tests/fhir_e2e.rs (pinned in ci/clients/package.json)
# into a cache folder and prints that folder; the test reads it from FHIR_KIT_CLIENT_DIR.
# Reinstalls when the pins change. Needs node and npm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${HL7GW_VALIDATORS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hl7gw-validators}/fhir-clients"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if ! cmp -s "$here/clients/package.json" "$cache/package.json.installed" 2>/dev/null; then
    echo "== installing fhir-kit-client into $cache" >&2
    rm -rf "$cache/node_modules"
    cp "$here/clients/package.json" "$cache/package.json"
    (cd "$cache" && npm install --no-audit --no-fund --loglevel=error >&2)
    cp "$here/clients/package.json" "$cache/package.json.installed"
fi
node -e "require('$cache/node_modules/fhir-kit-client')" >&2
echo "$cache"
