#!/usr/bin/env bash
# Shared by tests/rig/fetch-new-qemu.sh and tests/guest/debian/build.sh
# (sourced, bash): find the host's own Debian mirror for a suite.
#
# find_mirror SUITE prints "URI<TAB>SIGNED-BY" of the first enabled deb
# source that carries SUITE, from one-line (.list) and deb822 (.sources)
# files, or nothing.
find_mirror() {
    local suite=$1 f hit
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        hit=$(awk -v suite="$suite" '
            /^[[:space:]]*deb[[:space:]]/ {
                sb = ""; i = 2
                if ($2 ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /signed-by=/) { sb = $i; sub(/.*signed-by=/, "", sb); sub(/\]$/, "", sb) }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if ($(i + 1) == suite) { printf "%s\t%s\n", $i, sb; exit }
            }' "$f")
        [[ -z $hit ]] || {
            printf '%s\n' "$hit"
            return 0
        }
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        hit=$(awk -v suite="$suite" '
            function flush() {
                if (types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && enabled !~ /^[[:space:]]*no/ &&
                    (" " suites " ") ~ ("[[:space:]]" suite "[[:space:]]") && uris != "") {
                    split(uris, u, /[[:space:]]+/); printf "%s\t%s\n", u[1], sb; found = 1; exit
                }
                types = uris = suites = sb = enabled = ""
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            /^[A-Za-z-]+:/ {
                key = tolower($1); sub(/:$/, "", key); val = $0; sub(/^[^:]*:[[:space:]]*/, "", val)
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "signed-by") sb = val
                else if (key == "enabled") enabled = val
            }
            END { if (!found) flush() }' "$f")
        [[ -z $hit ]] || {
            printf '%s\n' "$hit"
            return 0
        }
    done
    return 0
}
