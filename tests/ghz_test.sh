#!/usr/bin/env bash
# Runs every deploy/ghz scenario briefly, as shipped (through run.sh), against
# a real callsessiond, and requires every response to be OK. ghz is not
# packaged for Debian: when it is not on PATH (or named by $GHZ) the test
# says so and is reported as skipped (exit 77).
#   ghz_test.sh SOURCE_DIR CALLSESSIOND CALLCTL
set -euo pipefail
source_dir=$1 callsessiond=$2 callctl=$3
ghz=${GHZ:-ghz}
if ! command -v "$ghz" >/dev/null; then
  echo "ghz not found (set GHZ or put ghz on PATH; see README): skipped"
  exit 77
fi
"$ghz" --version

work=$(mktemp -d)
token=ghz-test-provider
CALLSESSION_PROVIDER_TOKEN=$token "$callsessiond" --store=memory --listen=127.0.0.1:0 \
  --max_call_handles_per_app=0 2> "$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  grep -q '"event":"listening"' "$work/server.log" && break
  sleep 0.1
done
address=$(sed -n 's/.*"event":"listening","address":"\([^"]*\)".*/\1/p' "$work/server.log")
[[ -n "$address" ]] || { cat "$work/server.log"; exit 1; }

cd "$source_dir"
for scenario in get-call-info make-call offer-call; do
  echo "== $scenario"
  CALLSESSION_PROVIDER_TOKEN=$token CALLCTL=$callctl GHZ=$ghz \
    deploy/ghz/run.sh "$scenario" "$address" -n 500 -c 8 --connections=2 -O json \
    > "$work/$scenario.json"
  python3 - "$work/$scenario.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
codes = report.get("statusCodeDistribution", {})
errors = report.get("errorDistribution") or {}
print(f"  {report.get('count')} requests, status codes {codes}, errors {errors}")
if errors or set(codes) != {"OK"} or codes["OK"] != report.get("count") or not report.get("count"):
    sys.exit("not every response was OK")
PY
done
