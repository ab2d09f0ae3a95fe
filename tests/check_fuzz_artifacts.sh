#!/bin/sh
# Fails if a libFuzzer artifact (crash-*, leak-*, timeout-*, oom-*,
# slow-unit-*) is tracked anywhere but a fuzz corpus, where a finding
# belongs as a regression input. Skipped outside a git checkout.
#   check_fuzz_artifacts.sh SOURCE_DIR
cd "$1" || exit 1
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "not a git checkout: skipped"; exit 0; }
stray=$(git ls-files | grep -E '(^|/)(crash|leak|timeout|oom|slow-unit)-[^/]*$' | grep -v '^tests/fuzz/corpus/')
if [ -n "$stray" ]; then
  echo "fuzzer artifacts committed outside tests/fuzz/corpus/ (move them there as regressions):"
  echo "$stray"
  exit 1
fi
echo "no stray fuzzer artifacts"
