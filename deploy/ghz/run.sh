#!/usr/bin/env bash
# Runs one ghz scenario against a running callsessiond, from the repository
# root (the configs name protos/ relatively):
#   deploy/ghz/run.sh get-call-info|make-call|offer-call [HOST:PORT] [ghz flags...]
# It registers an app with callctl (build it first: bash .ci/serve, or
# cmake --build build --target callctl), opens a line and, for
# get-call-info, places the call that is read; then passes the token and the
# request to ghz. offer-call needs CALLSESSION_PROVIDER_TOKEN.
# ghz runs one RPC at a time: the multi-step lifecycle and inbound scenarios
# are callsession-loadgen's (see README, Benchmarks). ghz takes the target as
# its last, positional argument (it has no --host flag); extra ghz flags go
# before it.
set -euo pipefail
scenario=${1:?usage: deploy/ghz/run.sh get-call-info|make-call|offer-call [HOST:PORT] [ghz flags...]}
host=${2:-127.0.0.1:50051}
shift $(( $# >= 2 ? 2 : 1 ))
ghz=${GHZ:-ghz}
config="deploy/ghz/$scenario.json"
[[ -f "$config" ]] || { echo "run.sh: no scenario $scenario" >&2; exit 2; }
callctl=${CALLCTL:-$(ls build-release/client/callctl build/client/callctl 2>/dev/null | head -1)}
[[ -x "$callctl" ]] || { echo "run.sh: build callctl first" >&2; exit 2; }

field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

case "$scenario" in
  offer-call)
    : "${CALLSESSION_PROVIDER_TOKEN:?offer-call needs CALLSESSION_PROVIDER_TOKEN}"
    exec "$ghz" --config "$config" \
      -m "{\"authorization\":\"Bearer $CALLSESSION_PROVIDER_TOKEN\"}" "$@" "$host"
    ;;
esac

token=$("$callctl" --server="$host" init ghz | field app_token)
line=$("$callctl" --server="$host" --token="$token" line-open 0 | field line_handle)
metadata="{\"authorization\":\"Bearer $token\"}"
case "$scenario" in
  get-call-info)
    call=$("$callctl" --server="$host" --token="$token" make-call "$line" +15550100 | field call_handle)
    data="{\"call_handle\":\"$call\"}"
    ;;
  make-call)
    data="{\"line_handle\":\"$line\",\"dest_address\":\"+15550100\"}"
    ;;
esac
exec "$ghz" --config "$config" -m "$metadata" -d "$data" "$@" "$host"
