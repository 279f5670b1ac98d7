#!/bin/sh
# expect.sh STATUS REGEX [--absent PATH] -- COMMAND...: run COMMAND; fail unless it exits with STATUS and its
# stdout+stderr matches the extended REGEX (and, with --absent, PATH does not exist afterwards).
want=$1; regex=$2; shift 2
absent=
if [ "$1" = "--absent" ]; then absent=$2; shift 2; fi
[ "$1" = "--" ] && shift
out=$("$@" 2>&1 </dev/null); got=$?
printf '%s\n' "$out" | tail -n 20
if [ "$got" != "$want" ]; then echo "FAIL: exit status $got, expected $want"; exit 1; fi
if ! printf '%s\n' "$out" | grep -Eq -- "$regex"; then echo "FAIL: output does not match /$regex/"; exit 1; fi
if [ -n "$absent" ] && [ -e "$absent" ]; then echo "FAIL: $absent exists"; rm -f "$absent"; exit 1; fi
echo "ok: status $got, output matches /$regex/"
