#!/usr/bin/env bash
# Entry point of the Prometheus image (docker/prometheus.Dockerfile): writes the settings the alerting rules
# compare with (trmrl-settings.yml, recording rules of constants) from the environment, checks the whole
# configuration with promtool, then runs the command (prometheus).
#
#   TRMRL_REPLICAS           replicas of the service that should be up (default 1)
#   TRMRL_ALERT_ACT_P99_S    p99 budget of POST /v1/act and /act, seconds (default 0.005)
#   TRMRL_ALERT_ERROR_RATIO  share of replies that may be 5xx (default 0.01)
#
#   prometheus-entrypoint --render FILE   only write the settings to FILE (the image build uses it)
set -euo pipefail

number() { # number NAME VALUE: VALUE if it is a non-negative decimal number, else exit with a message
    [[ "$2" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "prometheus-entrypoint: $1=$2 is not a non-negative number" >&2; exit 2; }
    printf '%s' "$2"
}

render() {
    local replicas budget ratio
    replicas=$(number TRMRL_REPLICAS "${TRMRL_REPLICAS:-1}")
    budget=$(number TRMRL_ALERT_ACT_P99_S "${TRMRL_ALERT_ACT_P99_S:-0.005}")
    ratio=$(number TRMRL_ALERT_ERROR_RATIO "${TRMRL_ALERT_ERROR_RATIO:-0.01}")
    cat >"$1" <<YAML
# Written by prometheus-entrypoint from the environment at start; edits here are lost.
groups:
  - name: trmrl-settings
    rules:
      - record: trmrl:replicas_expected
        expr: vector($replicas)
      - record: trmrl:act_p99_budget_seconds
        expr: vector($budget)
      - record: trmrl:error_ratio_budget
        expr: vector($ratio)
YAML
}

if [ "${1:-}" = --render ]; then
    render "$2"
    exit 0
fi
render /etc/prometheus/settings/trmrl-settings.yml
promtool check config /etc/prometheus/prometheus.yml >/dev/null || {
    promtool check config /etc/prometheus/prometheus.yml
    exit 1
}
echo "prometheus-entrypoint: replicas expected ${TRMRL_REPLICAS:-1}, act p99 budget ${TRMRL_ALERT_ACT_P99_S:-0.005} s, 5xx budget ${TRMRL_ALERT_ERROR_RATIO:-0.01}" >&2
exec "$@"
