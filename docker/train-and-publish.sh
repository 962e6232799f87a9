#!/bin/sh
# Train a preset into /var/lib/trmrl/runs/NAME (resumed if it exists), then publish its final checkpoint
# as /var/lib/trmrl/checkpoints/NAME, where the service loads it at its next start.
#   trmrl-train-and-publish PRESET NAME [trmrl-train options...]
set -eu
preset="$1"; name="$2"; shift 2
runs="${TRMRL_RUNS_DIR:-/var/lib/trmrl/runs}"
ckpts="${TRMRL_CHECKPOINTS_DIR:-/var/lib/trmrl/checkpoints}"
trmrl-train --preset "$preset" --out "$runs/$name" --no-progress "$@"
tmp="$ckpts/.$name.tmp"
rm -rf "$tmp"
cp -r "$runs/$name/final" "$tmp"
rm -rf "${ckpts:?}/$name"
mv "$tmp" "$ckpts/$name"
echo "published $runs/$name/final as $ckpts/$name (restart the service to serve it)"
