#!/usr/bin/env bash
# The Dask cluster's TLS certificates: a certificate authority of its own, and a key and
# certificate signed by it for each role (scheduler, worker, client). Dask then encrypts every
# connection and accepts only peers whose certificate that CA signed (mutual TLS), so reaching
# the scheduler's port is no longer enough to run code on the workers.
#
#   bash infra/make-certs.sh               # -> infra/certs/ (what compose.yaml mounts)
#   bash infra/make-certs.sh DIR           # elsewhere (compose: RETRAIN_DASK_CERTS=DIR)
#
# Writes DIR/ca.crt and DIR/{scheduler,worker,client}.{crt,key}: the layout the containers'
# DASK_DISTRIBUTED__COMM__TLS__* settings name (compose.yaml, k8s/dask-cluster.yaml). The CA's
# own key is thrown away once the three are signed: nobody, this script included, can sign
# another certificate the cluster trusts. To rotate (or after a leak), remove DIR, run this
# again and restart every Dask and Prefect worker service.
#
# The keys are readable by their owner and group only. The containers run as uid/gid 1000 (the
# image's `retrain` user): run as root, this script gives DIR to group RETRAIN_CERT_GID (default
# 1000); as another user, make sure gid 1000 can read them (`sudo chgrp -R 1000 DIR`).
# Never commit DIR (.gitignore has infra/certs/); RETRAIN_CERT_DAYS sets the validity (825).
set -euo pipefail
DIR=${1:-$(dirname "$0")/certs}
DAYS=${RETRAIN_CERT_DAYS:-825}
command -v openssl >/dev/null || { echo "make-certs.sh: needs openssl" >&2; exit 1; }
if [[ -e $DIR/ca.crt ]]; then
  echo "make-certs.sh: $DIR already has certificates; remove the folder to make new ones" >&2
  exit 1
fi

umask 027
mkdir -p "$DIR"
CA_DIR=$(mktemp -d)
trap 'rm -rf "$CA_DIR"' EXIT  # the CA's key goes with it

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$CA_DIR/ca.key"
openssl req -x509 -new -key "$CA_DIR/ca.key" -out "$DIR/ca.crt" -days "$DAYS" -subj "/CN=retrain dask CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

for role in scheduler worker client; do
  key "$DIR/$role.key"
  openssl req -new -key "$DIR/$role.key" -out "$CA_DIR/$role.csr" -subj "/CN=dask-$role"
  # every role both connects and is connected to (workers listen, the scheduler calls them):
  # server and client use; Dask checks the CA's signature, not host names
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:dask-$role" >"$CA_DIR/$role.ext"
  openssl x509 -req -in "$CA_DIR/$role.csr" -CA "$DIR/ca.crt" -CAkey "$CA_DIR/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -extfile "$CA_DIR/$role.ext" \
    -out "$DIR/$role.crt" 2>/dev/null
done
chmod 0750 "$DIR"
chmod 0644 "$DIR"/*.crt
chmod 0640 "$DIR"/*.key
if [[ $(id -u) = 0 ]]; then
  chgrp -R "${RETRAIN_CERT_GID:-1000}" "$DIR"
fi
echo "Dask TLS certificates in $DIR (valid $DAYS days): ca.crt, {scheduler,worker,client}.{crt,key}"
