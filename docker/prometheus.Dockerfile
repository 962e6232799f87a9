# Prometheus for the `monitoring` compose profile: Debian's `prometheus` package (2.42 in bookworm), built from
# a Debian base so it needs no image registry (the base made by docker/make-base-image.sh works). It scrapes
# every replica of the service `trmrl` (found by DNS) and evaluates the alerting rules of
# docker/prometheus/trmrl-rules.yml; the build checks the configuration and the rules (`promtool check
# config`, `promtool check rules`) and runs the rules' unit tests (`promtool test rules`). See
# docs/operations.md, "Prometheus".
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* /etc/prometheus/prometheus.yml /var/lib/prometheus/* \
    && mkdir -p /etc/prometheus/rules /etc/prometheus/settings /var/lib/prometheus/metrics2 \
    && chown prometheus:prometheus /etc/prometheus/settings /var/lib/prometheus /var/lib/prometheus/metrics2
COPY docker/prometheus/ /tmp/trmrl-prometheus/
COPY docker/prometheus-entrypoint.sh /usr/local/bin/trmrl-prometheus-entrypoint
RUN chmod 0755 /usr/local/bin/trmrl-prometheus-entrypoint \
    && cp /tmp/trmrl-prometheus/prometheus.yml /etc/prometheus/prometheus.yml \
    && cp /tmp/trmrl-prometheus/trmrl-rules.yml /etc/prometheus/rules/trmrl-rules.yml \
    && trmrl-prometheus-entrypoint --render /etc/prometheus/settings/trmrl-settings.yml \
    && chown prometheus:prometheus /etc/prometheus/settings/trmrl-settings.yml \
    && promtool check rules /etc/prometheus/rules/trmrl-rules.yml /etc/prometheus/settings/trmrl-settings.yml \
    && promtool check config /etc/prometheus/prometheus.yml \
    && cd /tmp/trmrl-prometheus && promtool test rules tests/trmrl-rules.test.yml \
    && rm -rf /tmp/trmrl-prometheus
USER prometheus
WORKDIR /var/lib/prometheus
EXPOSE 9090
VOLUME ["/var/lib/prometheus"]
HEALTHCHECK --interval=5s --timeout=3s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/ready HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["trmrl-prometheus-entrypoint"]
CMD ["prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/prometheus/metrics2", \
     "--storage.tsdb.retention.time=15d", "--web.listen-address=:9090"]
