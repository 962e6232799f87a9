#!/bin/bash
# Start nginx with one upstream server line per service replica (see docker/nginx.conf).
#   TRMRL_UPSTREAM_HOST (default trmrl): the service's DNS name; every address it resolves to is a replica.
#   TRMRL_UPSTREAM_PORT (default 8000); TRMRL_REPLICAS (default 1): wait (up to 60 s) for this many.
set -euo pipefail
host="${TRMRL_UPSTREAM_HOST:-trmrl}"
port="${TRMRL_UPSTREAM_PORT:-8000}"
want="${TRMRL_REPLICAS:-1}"
for _ in $(seq 1 120); do
    mapfile -t addrs < <(getent ahostsv4 "$host" | awk '{print $1}' | sort -u)
    [ "${#addrs[@]}" -ge "$want" ] && break
    sleep 0.5
done
if [ "${#addrs[@]}" -eq 0 ]; then
    echo "router: $host resolves to no address" >&2
    exit 1
fi
: >/tmp/trmrl-upstreams.conf
for a in "${addrs[@]}"; do
    echo "server $a:$port max_fails=1 fail_timeout=5s;" >>/tmp/trmrl-upstreams.conf
done
echo "router: ${#addrs[@]} replicas of $host: ${addrs[*]}" >&2
exec "$@"
