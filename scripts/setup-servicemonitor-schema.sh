#!/usr/bin/env bash
# Install into .node-crd/ the npm package @kubernetes-models/prometheus-operator (MIT), whose
# validators and TypeScript types are generated from the Prometheus Operator's CRD schemas,
# and TypeScript: tests/test_kubernetes.py checks deploy/kubernetes/servicemonitor.yaml with
# the validators (types, patterns, enums, required fields; tests/check_servicemonitor.mjs)
# and with `tsc` against the types (an unknown field is an excess-property error).
# Idempotent: quick when the pin did not change. Needs node and npm; exits 3 without them.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=(@kubernetes-models/prometheus-operator@6.0.0 typescript@5.9.3)
dir=.node-crd
stamp="$dir/.installed-$(echo "${pins[*]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  command -v node >/dev/null && command -v npm >/dev/null || { echo "node/npm missing" >&2; exit 3; }
  rm -rf "$dir"
  mkdir -p "$dir"
  npm install --silent --no-audit --no-fund --prefix "$dir" "${pins[@]}" >&2
  touch "$stamp"
fi
echo "$PWD/$dir"
