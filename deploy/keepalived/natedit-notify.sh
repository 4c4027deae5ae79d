#!/bin/sh
# keepalived notify script of a natedit gateway pair (deploy/keepalived/keepalived.conf).
#
#   notify "/usr/local/sbin/natedit-notify.sh /etc/natedit/pair.env"
#
# keepalived appends: GROUP|INSTANCE <name> MASTER|BACKUP|FAULT|STOP [priority].
# MASTER: drop PPTP (TCP 1723, GRE) in nftables, commit the conntrack entries conntrackd
# received from the peer, promote the local Redis (REPLICAOF NO ONE), natedit promote,
# then lift the drop: no GRE is dropped as no_call and no RST escapes in the gap.
# BACKUP, FAULT, STOP: natedit demote, the local Redis a replica of the peer's,
# conntrackd asked for a resync.
# The settings (pair.env, sourced): NATEDIT (the command), NATEDIT_READY (natedit run's
# --ready-file), REDIS_CLI (redis-cli with the options that reach the local Redis),
# PEER_REDIS_HOST, PEER_REDIS_PORT, CONNTRACKD (conntrackd -C its config; empty: none),
# PROMOTE_WAIT (seconds), LOG (a file, default syslog through logger).
set -u
ENV_FILE=${1:?usage: natedit-notify.sh ENV_FILE GROUP|INSTANCE NAME STATE}
shift
. "$ENV_FILE"
STATE=${3:-}
NATEDIT=${NATEDIT:-natedit}
PROMOTE_WAIT=${PROMOTE_WAIT:-10}
CONNTRACKD=${CONNTRACKD:-}
DROP_TABLE=natedit_failover

say() {
    if [ -n "${LOG:-}" ]; then
        echo "$(date +%s.%N) natedit-notify: $*" >> "$LOG"
    else
        logger -t natedit-notify -- "$*"
    fi
}

drop_pptp() {
    nft -f - <<NFT
table ip $DROP_TABLE {
    chain prerouting {
        type filter hook prerouting priority -350; policy accept;
        tcp dport 1723 drop
        tcp sport 1723 drop
        ip protocol gre drop
    }
}
NFT
}

lift_drop() {
    nft delete table ip "$DROP_TABLE" 2>/dev/null || true
}

case "$STATE" in
MASTER)
    say "MASTER: dropping PPTP until natedit is active"
    drop_pptp || say "cannot install the nftables drop"
    if [ -n "$CONNTRACKD" ]; then
        $CONNTRACKD -c || say "conntrackd -c (commit) failed"
        $CONNTRACKD -f || true
        $CONNTRACKD -R || true
        $CONNTRACKD -B || true
    fi
    $REDIS_CLI REPLICAOF NO ONE >/dev/null || say "redis REPLICAOF NO ONE failed"
    if $NATEDIT promote --ready-file "$NATEDIT_READY" --wait "$PROMOTE_WAIT"; then
        say "MASTER: natedit active"
    else
        say "MASTER: natedit promote failed (see natedit's log); PPTP stays dropped"
        exit 1
    fi
    lift_drop
    ;;
BACKUP|FAULT|STOP)
    say "$STATE: natedit follows the peer"
    lift_drop
    $NATEDIT demote --ready-file "$NATEDIT_READY" --wait "$PROMOTE_WAIT" \
        || say "natedit demote failed"
    if ! $REDIS_CLI INFO replication | tr -d '\r' | grep -qx "master_host:$PEER_REDIS_HOST"; then
        $REDIS_CLI REPLICAOF "$PEER_REDIS_HOST" "$PEER_REDIS_PORT" >/dev/null \
            || say "redis REPLICAOF failed"
    fi  # (again when it is already its replica would start a full resync)
    if [ -n "$CONNTRACKD" ]; then
        if [ "$STATE" = BACKUP ]; then
            $CONNTRACKD -n || true
        else
            $CONNTRACKD -t || true
        fi
    fi
    ;;
*)
    say "ignoring state '$STATE'"
    ;;
esac
exit 0
