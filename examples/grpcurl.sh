#!/usr/bin/env bash
# A grpcurl session against a vendetta coordinator (https://github.com/fullstorydev/grpcurl).
# The coordinator serves reflection, so grpcurl needs no .proto files.
#
#   On the coordinator's machine:   bash examples/grpcurl.sh
#   From elsewhere:                 VENDETTA_URL=vendetta://build1:7443 VENDETTA_TOKEN=vdt_... \
#                                   VENDETTA_TLS_FINGERPRINT=AB:CD:... bash examples/grpcurl.sh
#
# WORKSPACE names a workspace to read (default: the demo's, `make demo`).
set -euo pipefail
WORKSPACE=${WORKSPACE:-demo}

if [[ -z "${VENDETTA_URL:-}" ]]; then
  # The local socket: plaintext, no token (only its owner can open it, mode 0600).
  sock="${VENDETTA_HOME:-${XDG_STATE_HOME:-$HOME/.local/state}/vendetta}/coordinator.sock"
  call() { grpcurl -plaintext -unix "$@"; }
  target=$sock
else
  # The TLS listener: fetch its certificate, check it is the pinned one, then trust only it.
  target=${VENDETTA_URL#vendetta://}
  pem=$(mktemp --suffix=.pem)
  trap 'rm -f "$pem"' EXIT
  # (-alpn h2: gRPC servers end a TLS handshake that does not offer HTTP/2)
  openssl s_client -alpn h2 -connect "$target" </dev/null 2>/dev/null | openssl x509 >"$pem"
  got=$(openssl x509 -in "$pem" -noout -fingerprint -sha256 | cut -d= -f2 | tr -d : | tr a-f A-F)
  want=$(tr -d ': ' <<<"${VENDETTA_TLS_FINGERPRINT:?pin the fingerprint server start printed}" | tr a-f A-F)
  [[ "$got" == "$want" ]] || { echo "certificate $got is not the pinned $want" >&2; exit 1; }
  # The self-signed certificate's name is vendetta-coordinator; the token goes in a header.
  call() {
    grpcurl -cacert "$pem" -servername vendetta-coordinator \
      -H "authorization: Bearer ${VENDETTA_TOKEN:?a token: vendetta token create}" "$@"
  }
fi

# Health needs no token (load balancers, probes).
call "$target" grpc.health.v1.Health/Check
# What the coordinator serves (reflection), and one request type.
call "$target" list
call "$target" describe vendetta.v1.StreamLogsRequest
# Reads (scope read): who runs where.
call "$target" vendetta.v1.Coordinator/ListWorkspaces
call -d "{\"name\": \"$WORKSPACE\"}" "$target" vendetta.v1.Coordinator/GetWorkspace
# A server stream: the last 5 lines of its logs (add "follow": true to keep reading).
call -d "{\"name\": \"$WORKSPACE\", \"tail\": 5}" "$target" vendetta.v1.Coordinator/StreamLogs
# A command inside (scope operate): output arrives base64-encoded (bytes), then exit_code.
call -d "{\"name\": \"$WORKSPACE\", \"argv\": [\"uname\", \"-a\"]}" \
  "$target" vendetta.v1.Coordinator/ExecWorkspace
