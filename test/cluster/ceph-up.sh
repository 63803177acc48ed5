#!/usr/bin/env bash
# Starts a throw-away single-node Ceph cluster for the tests and benchmarks: one mon, one
# mgr, one memstore OSD (data in RAM, no disk needed) and optionally radosgw with an S3
# user, every daemon bound to 127.0.0.1 and every file under one directory.
#
# Usage: ceph-up.sh DIR    (DIR must not exist; stop with ceph-down.sh DIR)
# Environment (optional):
#   CEPH_BASE_PORT  first port of the range the cluster uses: mon = BASE, daemons
#                   BASE+10..BASE+79, radosgw = BASE+80 (default 26800)
#   CEPH_OSD_BYTES  memstore capacity in bytes (default 4 GiB; RAM is only used as filled)
#   CEPH_RGW        1 to start radosgw and create the S3 user (default 1)
#   CEPH_POOL       RBD pool to create (default rbd)
# Prints KEY=VALUE lines (CEPH_CONF, CEPH_KEYRING, S3_ENDPOINT, ...) on stdout and writes
# them to DIR/env. Needs ceph-mon ceph-osd ceph-mgr radosgw ceph-common jq uuid-runtime curl.
set -euo pipefail

DIR=${1:?usage: ceph-up.sh DIR}
BASE=${CEPH_BASE_PORT:-26800}
OSD_BYTES=${CEPH_OSD_BYTES:-4294967296}
RGW=${CEPH_RGW:-1}
POOL=${CEPH_POOL:-rbd}
RGW_PORT=$((BASE + 80))
ACCESS=BLOCKGATETEST0000001
SECRET=blockgate-test-secret-not-for-production

fail() { echo "ceph-up: $*" >&2; exit 1; }
# Polls "$@" every 0.2 s for at most $1 seconds.
wait_for() { local limit=$1; shift; local end=$(( $(date +%s) + limit ));
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done; }

[ -e "$DIR" ] && fail "$DIR already exists"
mkdir -p "$DIR"/{run,log,mon.a,mgr.x,osd.0,rgw}
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/ceph.conf
FSID=$(uuidgen)

# Test-only settings: pools of one replica on one host, short paxos/mgr periods (halves
# the start-up), msgr2 only, a fixed port range so parallel runs can pick another BASE.
cat > "$CONF" <<CONF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$BASE]
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
ms bind port min = $((BASE + 10))
ms bind port max = $((BASE + 79))
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
log to stderr = false
crash dir = $DIR/log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd objectstore = memstore
memstore device bytes = $OSD_BYTES
osd data = $DIR/osd.\$id
mon data = $DIR/mon.\$id
mgr data = $DIR/mgr.\$id
paxos propose interval = 0.1
paxos min wait = 0.01
mgr stats period = 1
mgr tick period = 1
keyring = $DIR/keyring
[client]
# One socket per client process: several gateways (and the CLI) run as client.admin at once.
admin socket = $DIR/run/\$name.\$pid.asok
[mon]
keyring = $DIR/mon.keyring
[mgr]
keyring = $DIR/mgr.\$id/keyring
[osd]
keyring = $DIR/osd.\$id/keyring
osd op num shards = 2
osd op num threads per shard = 1
[client.rgw.gw]
keyring = $DIR/rgw/keyring
rgw data = $DIR/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
rgw thread pool size = 64
CONF
CEPH=(ceph -c "$CONF" --connect-timeout 20)

ceph-authtool "$DIR/mon.keyring" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$DIR/keyring" --create-keyring --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$BASE]" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
ceph-mon -c "$CONF" -i a
wait_for 30 "${CEPH[@]}" mon stat || fail "the mon does not answer (see $DIR/log/mon.a.log)"

"${CEPH[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' > "$DIR/mgr.x/keyring"
ceph-mgr -c "$CONF" -i x

OSD_UUID=$(uuidgen)
OSD_KEY=$(ceph-authtool --gen-print-key)
OSD_ID=$(printf '{"cephx_secret": "%s"}' "$OSD_KEY" | "${CEPH[@]}" osd new "$OSD_UUID" -i -)
[ "$OSD_ID" = 0 ] || fail "expected osd id 0, got $OSD_ID"
ceph-authtool "$DIR/osd.0/keyring" --create-keyring -n osd.0 --add-key "$OSD_KEY" >/dev/null
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" 2>>"$DIR/log/osd.0.mkfs.log" || fail "osd mkfs failed"
ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/osd.0.start.log"

if [ -n "$POOL" ]; then
  "${CEPH[@]}" osd pool create "$POOL" 8 8 >/dev/null 2>&1
  "${CEPH[@]}" osd pool application enable "$POOL" rbd >/dev/null 2>&1
fi

healthy() {
  "${CEPH[@]}" status -f json 2>/dev/null | jq -e '
    .health.status == "HEALTH_OK" and .osdmap.num_up_osds == 1 and .pgmap.num_pgs > 0
    and ([.pgmap.pgs_by_state[]? | select(.state_name != "active+clean")] | length == 0)'
}
wait_for 120 healthy || { "${CEPH[@]}" -s >&2 || true; fail "cluster not healthy after 120 s"; }

if [ "$RGW" = 1 ]; then
  "${CEPH[@]}" auth get-or-create client.rgw.gw mon 'allow rw' osd 'allow rwx' mgr 'allow rw' > "$DIR/rgw/keyring"
  radosgw -c "$CONF" -n client.rgw.gw
  wait_for 120 curl -sf -o /dev/null "http://127.0.0.1:$RGW_PORT/" || fail "radosgw does not answer (see $DIR/log)"
  radosgw-admin -c "$CONF" user create --uid=blockgate --display-name=blockgate \
    --access-key="$ACCESS" --secret-key="$SECRET" >/dev/null
  # A signed request proves the user is known to the gateway (user creation propagates
  # asynchronously). radosgw wants x-amz-content-sha256, which curl does not add itself.
  signed() { curl -sf -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS:$SECRET" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"; }
  wait_for 30 signed -X PUT "http://127.0.0.1:$RGW_PORT/ceph-up-probe" || fail "signed S3 request refused"
  signed -X DELETE "http://127.0.0.1:$RGW_PORT/ceph-up-probe"
fi

{
  echo "CEPH_DIR=$DIR"
  echo "CEPH_CONF=$CONF"
  echo "CEPH_KEYRING=$DIR/keyring"
  echo "CEPH_POOL=$POOL"
  if [ "$RGW" = 1 ]; then
    echo "S3_ENDPOINT=http://127.0.0.1:$RGW_PORT"
    echo "S3_ACCESS_KEY=$ACCESS"
    echo "S3_SECRET_KEY=$SECRET"
  fi
} | tee "$DIR/env"
