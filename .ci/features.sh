#!/usr/bin/env bash
# Builds the gpe binary with each worker feature alone and checks that it
# serves nothing else: `--worker OTHER` must fail with an error naming the
# cargo feature to enable. Proves no worker crate secretly needs another.
set -euo pipefail
cd "$(dirname "$0")/.."
types=(sync thread eventloop greenlet)
# A target dir of its own, so that the test run's binaries stay default-featured.
export CARGO_TARGET_DIR=target/features
passed=0
failed=0
for x in "${types[@]}"; do
  cargo build -q -p gpe --no-default-features --features "$x"
  for y in "${types[@]}"; do
    [ "$x" = "$y" ] && continue
    set +e
    out=$("$CARGO_TARGET_DIR"/debug/gpe serve -k "$y" --bind 127.0.0.1:0 --metrics-bind 127.0.0.1:0 2>&1)
    code=$?
    set -e
    if [ "$code" -ne 0 ] && grep -q "cargo feature \`$y\`" <<<"$out"; then
      passed=$((passed + 1))
    else
      echo "FAIL: gpe built with only '$x' answered -k $y with exit $code: $out"
      failed=$((failed + 1))
    fi
  done
done
echo "feature matrix: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
