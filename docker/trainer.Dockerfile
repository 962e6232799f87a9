# The trmrl trainer (`trmrl-train`, `trmrl-eval`). It is the service image (same venv, same torch build:
# CUDA by default, CPU when the service image was built for CPU) with the trainer's defaults on top, so the
# two images share every layer but the last few. Build the service image first:
#   docker build -f docker/service.Dockerfile -t trmrl/service:cuda .
#   docker build -f docker/trainer.Dockerfile -t trmrl/trainer:cuda .
# CPU: --build-arg SERVICE_IMAGE=trmrl/service:cpu (see docs/deploy.md).
ARG SERVICE_IMAGE=trmrl/service:cuda
FROM ${SERVICE_IMAGE}
# Runs go to /var/lib/trmrl/runs (a volume); `docker/train-and-publish.sh` copies a finished run's
# `final/` checkpoint into /var/lib/trmrl/checkpoints, the volume the service serves from.
COPY docker/train-and-publish.sh /usr/local/bin/trmrl-train-and-publish
WORKDIR /var/lib/trmrl/runs
VOLUME ["/var/lib/trmrl/runs"]
HEALTHCHECK NONE
ENV TRMRL_STATE_PER_REPLICA=0
CMD ["trmrl-train", "--list-presets"]
