#!/usr/bin/env bash
# ansible/test/setup.sh [VENV]
#
# Installs the pinned ansible-core (ansible/test/requirements.txt, with its
# dependencies pinned by ansible/test/constraints.txt) from PyPI into a
# virtualenv, by default target/ansible-venv, for `make test` (ansible-test
# sanity on the collection, and tests/ansible.rs).
#
# Idempotent: does nothing when the venv already holds exactly these pins (a
# stamp file records what was installed); a venv made from other pins, or a
# broken one, is made again. Needs python3.11 (or $QLIVE_ANSIBLE_PYTHON) with
# the venv module (Debian: python3-venv, which scripts/deps.sh installs).
#
# It also puts ansible/test/get_pip.py into ansible-test's cache as its pip
# bootstrap script (see that file: the real one cannot be downloaded here).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${1:-$repo/target/ansible-venv}
req=$here/requirements.txt
cons=$here/constraints.txt
stamp=$venv/.qlive-pins

# ansible-test's pip bootstrap script, under the name its cache uses for the
# pip version this ansible-test bootstraps.
cache_bootstrap() {
  local ver dst
  ver=$("$venv/bin/python" - <<'PY'
import os, re, ansible_test
src = os.path.join(os.path.dirname(ansible_test.__file__), '_internal', 'python_requirements.py')
with open(src) as f:
    print(re.search(r"pip='([0-9.]+)'", f.read()).group(1))
PY
  )
  dst=$HOME/.ansible/test/cache/get_pip_${ver//./_}.py
  if ! cmp -s "$here/get_pip.py" "$dst"; then
    mkdir -p "$(dirname "$dst")"
    cp "$here/get_pip.py" "$dst"
  fi
}

want=$(cat "$req" "$cons")
if [ -x "$venv/bin/ansible-playbook" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
  "$venv/bin/python" -c 'import ansible' 2>/dev/null; then
  cache_bootstrap
  exit 0
fi

python=${QLIVE_ANSIBLE_PYTHON:-}
if [ -z "$python" ]; then
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1 &&
      [ "$("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = 3.11 ]; then
      python=$p
      break
    fi
  done
fi
[ -n "$python" ] || { echo "ansible setup: python3.11 not found (set QLIVE_ANSIBLE_PYTHON)" >&2; exit 1; }

echo "ansible setup: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" -c "$cons"
"$venv/bin/ansible-test" --version
cache_bootstrap
printf '%s' "$want" >"$stamp"
