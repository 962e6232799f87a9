# nginx as the session-aware router of the scale-out deployment (docker-compose.scale.yml), built from a
# Debian base so it needs no image registry (the base made by docker/make-base-image.sh works). Runs as an
# unprivileged user on port 8080.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && ln -sf /dev/stderr /var/log/nginx/error.log
COPY docker/nginx.conf /etc/nginx/nginx.conf
COPY docker/router-entrypoint.sh /usr/local/bin/trmrl-router-entrypoint
RUN chmod 0755 /usr/local/bin/trmrl-router-entrypoint
USER www-data
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=3s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080"]
STOPSIGNAL SIGQUIT
ENTRYPOINT ["trmrl-router-entrypoint"]
CMD ["nginx", "-g", "daemon off;"]
