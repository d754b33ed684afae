#!/usr/bin/env bash
# Lint every shell script of the project (part of `make lint`):
#  1. shellcheck on each tracked file whose first line is a sh/bash shebang;
#     exclusions are `# shellcheck disable=...` directives beside the line, each
#     with its reason.
#  2. In scripts that set `pipefail`, no pipeline may end in a reader that can
#     exit before its input does (`| grep -q`, `| grep -m N`, `| head`): the
#     writer then dies of SIGPIPE and the pipeline fails at random. Capture the
#     output first and match the string (`grep -q PAT <<<"$out"`), or use a
#     reader that consumes everything (`grep -c`, `sed -n 1p`, `awk 'NR==1'`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts=()
while IFS= read -r -d '' f; do
  [ -f "$f" ] || continue
  first=$(sed -n 1p "$f")
  case "$first" in
    '#!/bin/sh'* | '#!/bin/bash'* | '#!/usr/bin/env bash'* | '#!/usr/bin/env sh'*) scripts+=("$f") ;;
  esac
done < <(git ls-files -z)
[ "${#scripts[@]}" -gt 0 ] || { echo "lint-shell: no shell scripts found" >&2; exit 1; }

command -v shellcheck >/dev/null || { echo "lint-shell: shellcheck not installed (scripts/deps.sh installs it)" >&2; exit 1; }
shellcheck "${scripts[@]}"

bad=0
for f in "${scripts[@]}"; do
  grep -q 'pipefail' "$f" || continue
  # A pipe (not `||`) into grep with -q/-m in its flags, or into head.
  # Comment lines are skipped.
  hits=$(grep -nE '(^|[^|])\|[[:space:]]*(grep[[:space:]]+(-[[:alnum:]]*[qm]|--quiet|--max-count)|head([[:space:]]|$|\)))' "$f" |
    grep -vE '^[0-9]+:[[:space:]]*#' || true)
  if [ -n "$hits" ]; then
    printf '%s\n' "$hits"
    echo "lint-shell: $f: a pipeline ends in an early-exiting reader under pipefail (see $0)" >&2
    bad=1
  fi
done
[ "$bad" = 0 ] || exit 1
echo "lint-shell: ${#scripts[@]} scripts clean"
