#!/bin/sh
# sysusers-pre.sh FILE...: print the %pre shell that creates the users and
# groups of the sysusers.d(5) FILEs with groupadd, useradd and usermod, the
# way Fedora's %sysusers_create_compat does. debian-build.macros runs it
# for that macro when the RPM is built on Debian (make rpm), where
# Fedora's generator does not exist. It runs at build time, on qlive's
# own file: the output is what `rpm -qp --scripts` shows.
#
# Lines understood (those qlive.sysusers uses):
#   g NAME GID                   the group (GID "-": any free one)
#   u NAME - GECOS HOME SHELL    the user, with a group of its own name
#   m USER GROUP                 USER also in GROUP (both created if missing)
# Any other line is an error (exit 1). rpm ignores the exit status of a
# %(...) expansion, so build.sh runs this once before rpmbuild: a line it
# does not understand fails the build instead of dropping a user.
set -eu

die() { echo "sysusers-pre.sh: $*" >&2; exit 1; }

# A value as a single-quoted shell word.
q() {
  case $1 in *\'*) die "a quote in '$1'" ;; esac
  printf "'%s'" "$1"
}

# Names already handled: a group or user is created once, however many
# lines name it.
seen=" "
once() { # KIND:NAME; false if seen before
  case $seen in *" $1 "*) return 1 ;; esac
  seen="$seen$1 "
}

group() { # NAME GID
  once "g:$1" || return 0
  if [ "$2" = - ]; then
    echo "getent group $(q "$1") >/dev/null || groupadd -r $(q "$1") || :"
  else
    echo "getent group $(q "$1") >/dev/null || groupadd -f -g $(q "$2") -r $(q "$1") || :"
  fi
}

user() { # NAME GECOS HOME SHELL; primary group NAME
  once "u:$1" || return 0
  gecos=$2 home=$3 shell=$4
  [ "$gecos" = - ] && gecos=
  { [ "$home" = - ] || [ -z "$home" ]; } && home=/
  { [ "$shell" = - ] || [ -z "$shell" ]; } && shell=/usr/sbin/nologin
  echo "getent passwd $(q "$1") >/dev/null ||"
  echo "    useradd -r -g $(q "$1") -d $(q "$home") -s $(q "$shell") -c $(q "$gecos") $(q "$1") || :"
}

member() { # USER GROUP
  echo "if getent group $(q "$2") >/dev/null; then"
  echo "    usermod -a -G $(q "$2") $(q "$1") || :"
  echo "fi"
}

[ "$#" -gt 0 ] || die "usage: sysusers-pre.sh FILE..."
for f in "$@"; do
  [ -r "$f" ] || die "$f: not readable"
  echo "# generated from $(basename "$f")"
  n=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    case $line in '' | '#'* | ';'*) continue ;; esac
    # Split like sysusers.d does: words, "double quotes" around one with
    # spaces. The file is this package's own, read at build time.
    eval "set -- $line"
    case "$1:$#" in
      g:2 | g:3) group "$2" "${3:--}" ;;
      u:*)
        if [ "$#" -lt 3 ] || [ "$#" -gt 6 ]; then die "$f:$n: u needs 3 to 6 fields"; fi
        [ "$3" = - ] || die "$f:$n: only automatic ids (-) are supported"
        group "$2" -
        user "$2" "${4:--}" "${5:--}" "${6:--}"
        ;;
      m:3)
        group "$3" -
        group "$2" -
        user "$2" - - -
        member "$2" "$3"
        ;;
      *) die "$f:$n: not understood: $line" ;;
    esac
  done <"$f"
done
