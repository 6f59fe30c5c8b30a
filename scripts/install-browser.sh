#!/usr/bin/env bash
# Headless Chromium for the web-chat browser test (tests/test_web.py), from Debian's packages.
# Playwright drives it through executable_path; nothing is downloaded by a test tool. Needs root and
# apt-get; elsewhere it says so and the browser test skips (under CI it fails instead).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[browser] installing Debian's chromium (for the web-chat test)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "[browser] no chromium and no root apt-get: tests/test_web.py will be skipped (install chromium to run it)"
fi
