#!/usr/bin/env bash
# Make sure a headless Chromium is there for the report test (tests/eval/test_report.py).
# Installs Debian's `chromium` package only when no browser is found and this is root on a
# machine with apt; otherwise says what to do and exits 0 (the test then skips locally, or
# fails under CI=true). A browser elsewhere can be named with LYNX_TEST_CHROMIUM=/path/to/chrome.
set -euo pipefail

for candidate in "${LYNX_TEST_CHROMIUM:-}" chromium chromium-browser google-chrome; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
    echo "chromium: $(command -v "$candidate")"
    exit 0
  fi
done

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "chromium: not found; installing Debian's chromium package (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  echo "chromium: $(command -v chromium)"
else
  echo "chromium: not found and cannot install it here (needs root and apt-get);" \
       "install Chromium or set LYNX_TEST_CHROMIUM to enable the report browser test" >&2
fi
