#!/bin/sh
# Entry point of the trmrl images.
#
# 1. Bundled checkpoints: the image holds them in $TRMRL_BUNDLED_DIR; the service serves
#    $TRMRL_CHECKPOINTS_DIR (a volume, which the trainer also publishes to). Each bundled checkpoint that is
#    missing there or differs is installed (under a lock, via a staging directory, so replicas starting
#    together and a service scanning the directory never see half a checkpoint). A newer image thus brings
#    its checkpoints into an old volume; trained checkpoints (other names) are left alone.
# 2. With TRMRL_STATE_PER_REPLICA=1 (the scale-out override) each replica keeps its sessions file in its
#    own sub-directory of the shared state volume, named after the container's hostname (stable across
#    `docker restart`), so replicas never overwrite each other's sessions.
set -eu
bundled="${TRMRL_BUNDLED_DIR:-}"
ckpts="${TRMRL_CHECKPOINTS_DIR:-}"
if [ -n "$bundled" ] && [ -d "$bundled" ] && [ -n "$ckpts" ] && [ "$bundled" != "$ckpts" ]; then
    mkdir -p "$ckpts/.staging"
    (
        flock 9
        for src in "$bundled"/*/; do
            name="$(basename "$src")"
            if ! diff -rq "$src" "$ckpts/$name" >/dev/null 2>&1; then
                rm -rf "$ckpts/.staging/$name"
                cp -r "$src" "$ckpts/.staging/$name"
                rm -rf "${ckpts:?}/$name"
                mv "$ckpts/.staging/$name" "$ckpts/$name"
                echo "trmrl-entrypoint: installed bundled checkpoint $name into $ckpts" >&2
            fi
        done
    ) 9>"$ckpts/.staging/.lock"
fi
if [ "${TRMRL_STATE_PER_REPLICA:-0}" = 1 ] && [ -n "${TRMRL_STATE_DIR:-}" ]; then
    TRMRL_STATE_DIR="${TRMRL_STATE_DIR%/}/$(hostname)"
    export TRMRL_STATE_DIR
fi
if [ -n "${TRMRL_STATE_DIR:-}" ]; then
    mkdir -p "$TRMRL_STATE_DIR"
fi
exec "$@"
