#!/usr/bin/env bash
# Debian packages the tests use, installed when missing (`apt-get update` once, only then).
# Idempotent and instant when all are there. Without root or apt, or offline, it says so and
# goes on: the tests that need a package skip, naming it.
set -uo pipefail
packages=(
  chromium  # tests/test_page.py: the page at / in a real browser, driven by playwright
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "setup-apt: cannot install ${missing[*]} (needs root and apt-get); tests using them skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q "${missing[@]}"; }; then
  echo "setup-apt: installing ${missing[*]} failed; tests using them skip" >&2
fi
exit 0
