#!/usr/bin/env bash
# Makes the collector's TLS Secret for an install that does not let the chart generate it
# (collector.tls.generate=false, as deploy/ does): a CA of its own (ECDSA P-256, 10 years) and a
# serving certificate for the collector Service's names, stored as one Secret with tls.crt,
# tls.key (the operator's) and ca.crt (the runners').
#
#   scripts/collector-tls.sh [NAMESPACE [SERVICE [SECRET]]]
#     defaults: fathom-system fathom-collector fathom-collector-tls (what deploy/ expects)
#
# Run once per cluster, before `kubectl apply -k deploy/` (or let cert-manager make a Secret of
# the same shape). The CA key is not kept: a new certificate means a new CA, and the runners
# pick the new ca.crt up when they restart.
set -euo pipefail
ns=${1:-fathom-system}
svc=${2:-fathom-collector}
secret=${3:-fathom-collector-tls}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -subj "/CN=fathom-collector-ca" -days 3650 -sha256 -out ca.crt 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out tls.key 2>/dev/null
openssl req -new -key tls.key -subj "/CN=fathom-collector" -out tls.csr 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
  "$svc" "$svc" "$ns" "$svc" "$ns" "$svc" "$ns" >tls.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 \
  -extfile tls.ext -out tls.crt 2>/dev/null
kubectl -n "$ns" create secret generic "$secret" --type=kubernetes.io/tls \
  --from-file=tls.crt --from-file=tls.key --from-file=ca.crt
