#!/usr/bin/env bash
# Install the Debian packages the tests use (idempotent: `apt-get update` once, then only what
# is missing; instant when all are there). Without root or apt, or offline, it says so and goes
# on: the tests that need a package skip, naming it.
set -uo pipefail
packages=(
  chromium    # tests/test_page.py: the page at / in a real browser, driven by playwright
  prometheus  # tests/test_observability.py: the Prometheus server and promtool
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-apt: not root or no apt-get; missing ${missing[*]} (their tests skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq || echo "setup-apt: apt-get update failed" >&2
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" \
  || echo "setup-apt: installing ${missing[*]} failed (their tests skip)" >&2
exit 0
