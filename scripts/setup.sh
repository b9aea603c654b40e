#!/usr/bin/env bash
# Set up qcnode on a fresh machine: .venv in the project root (created if missing), the package
# and its dependencies (re-installed only when pyproject.toml changed), and with --test the test
# extras plus the Debian peers and validators the tests use (DCMTK, Orthanc and its DICOMweb plugin,
# PostgreSQL, dciodvfy from dicom3tools, PixelMed's SR validator, Chromium + chromedriver for the
# dashboard; needs root/apt).
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
extras=""
[ "$want_test" = 1 ] && extras="[test]"
stamp=".venv/.qcnode-installed"
if [ "$want_test" = 1 ]; then
  stamp="$stamp-test"
fi
sum=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  echo "[setup] installing qcnode$extras into .venv (first time: torch is a large download)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".$extras"
  echo "$sum" > "$stamp"
fi
if [ "$want_test" = 1 ]; then
  missing=()
  [ -x /usr/bin/storescu ] || missing+=(dcmtk)
  [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
  [ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
  [ -f /usr/share/java/pixelmed.jar ] || missing+=(pixelmed-apps)
  [ -x /usr/bin/chromium ] || missing+=(chromium)          # the dashboard's browser test (headless)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] installing Debian packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
      # Debian starts the services it installs; the tests start their own instances
      (service orthanc stop || true; service postgresql stop || true) >/dev/null 2>&1
    else
      echo "[setup] WARNING: missing ${missing[*]} (install them with apt-get); tests that need them will fail" >&2
    fi
  fi
fi
echo "[setup] ready: $(.venv/bin/python -c 'import qcnode; print("qcnode", qcnode.__version__)')"
