# The trmrl policy service (`trmrl-serve`), the bundled checkpoints inside. See docs/deploy.md.
#
# GPU (default): a CUDA runtime base and PyPI's CUDA build of torch:
#   docker build -f docker/service.Dockerfile -t trmrl/service:cuda .
# GPU without any image registry (`make docker-build-gpu`): the same PyPI torch, which carries its own CUDA
# libraries, on the debootstrapped Debian base; only the driver comes from the host (Container Toolkit):
#   docker build -f docker/service.Dockerfile -t trmrl/service:cuda \
#     --build-arg BASE_IMAGE=trmrl/debian-python:bookworm \
#     --build-arg TORCH_WHEELHOUSE=docker/wheelhouse/README.md .
# (TORCH_WHEELHOUSE=docker/wheelhouse/README.md: no local wheel enters the build, so its cache does not
# depend on whether a CPU wheel sits in docker/wheelhouse/.)
# CPU, without any image registry (the base made by docker/make-base-image.sh, torch from the local
# wheelhouse docker/wheelhouse/, so no CUDA wheel is ever downloaded):
#   docker build -f docker/service.Dockerfile -t trmrl/service:cpu \
#     --build-arg BASE_IMAGE=trmrl/debian-python:bookworm \
#     --build-arg TORCH_PIP_ARGS="--no-deps --no-index --find-links /wheelhouse" .
#
# Plain Dockerfile syntax (no BuildKit-only features), so the legacy builder of older engines builds it too.

# Any Debian/Ubuntu image; python3 (>= 3.11) and venv are installed when it lacks them.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# -- python-base: the base image plus python3 and venv (nothing else) -----------------------------------
FROM ${BASE_IMAGE} AS python-base
ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN if ! python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# -- build: a virtual environment with every dependency; pip and the sources stay in this stage -----------
FROM python-base AS build
# torch: the requirement, and where pip takes it from. The default is PyPI (a CUDA build on x86_64 Linux);
# "--no-deps --no-index --find-links /wheelhouse" takes it from docker/wheelhouse/ only (the CPU wheel, no
# download); its small dependencies then come from PyPI with the others, torch itself being satisfied.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_PIP_ARGS=
# What of docker/wheelhouse/ the build takes: all of it (the default), or only its README for a build that
# takes torch from PyPI (then a CPU wheel in the directory neither enters the build nor changes its cache).
ARG TORCH_WHEELHOUSE=docker/wheelhouse/
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# Extra CA certificates for a TLS-intercepting proxy between the build and PyPI (docker/certs/*.crt;
# usually none). They stay in this stage.
COPY docker/certs/ /tmp/certs/
RUN for c in /tmp/certs/*.crt; do [ -f "$c" ] && cat "$c" >> /etc/ssl/certs/ca-certificates.crt; done; \
    python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY ${TORCH_WHEELHOUSE} /wheelhouse/
RUN pip install ${TORCH_PIP_ARGS} "${TORCH_SPEC}"
# Dependencies first (a layer that only changes with pyproject/constraints), then the code itself.
COPY pyproject.toml README.md /src/
COPY requirements/constraints.txt /src/requirements/constraints.txt
COPY clients/pyproject.toml /src/clients/pyproject.toml
COPY clients/sim/pyproject.toml /src/clients/sim/pyproject.toml
# The service's dependencies (torch already satisfied), the client library's and the simulator client's
# (profile `demo` runs trmrl-sim from this image).
RUN cd /src && python3 -c 'import tomllib; \
p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
c = tomllib.load(open("clients/pyproject.toml", "rb"))["project"]; \
s = tomllib.load(open("clients/sim/pyproject.toml", "rb"))["project"]; \
deps = p["dependencies"] + c["dependencies"] + c["optional-dependencies"]["stream"] + s["dependencies"]; \
print("\n".join(d for d in deps if not d.startswith("trmrl")))' > /tmp/requirements.txt
RUN pip install -c /src/requirements/constraints.txt -r /tmp/requirements.txt
COPY trmrl /src/trmrl
COPY service /src/service
COPY trainer /src/trainer
COPY clients /src/clients
RUN pip install --no-deps /src /src/clients /src/clients/sim \
    && pip check \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
    && { pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true; }

# -- service: the venv, the checkpoints, a non-root user; no compilers, no pip, no sources ---------------
FROM python-base AS service
# uid/gid 10001 (fixed: volumes keep their owner across image versions).
RUN echo "trmrl:x:10001:10001:trmrl:/var/lib/trmrl:/usr/sbin/nologin" >> /etc/passwd \
    && echo "trmrl:x:10001:" >> /etc/group \
    && mkdir -p /var/lib/trmrl/state /var/lib/trmrl/checkpoints /var/lib/trmrl/runs \
    && chown -R 10001:10001 /var/lib/trmrl
COPY --from=build /opt/venv /opt/venv
# The bundled checkpoints, read-only in the image. The service serves /var/lib/trmrl/checkpoints (in compose
# a named volume, which the trainer of profile `train` publishes to); the entry point installs the bundled
# ones there at each start (docker/entrypoint.sh). Without a volume the same happens in the container.
COPY checkpoints /opt/trmrl/checkpoints
COPY docker/entrypoint.sh /usr/local/bin/trmrl-entrypoint
RUN chmod 0755 /usr/local/bin/trmrl-entrypoint \
    && /opt/venv/bin/python3 -c 'import torch, service.app, trmrl_client, trmrl_sim; print("torch", torch.__version__, "cuda", torch.version.cuda)'
# NVIDIA_DRIVER_CAPABILITIES: unset, the Container Toolkit's documented default is `utility` alone, without
# the driver's CUDA library; nvidia/cuda bases set it, a plain Debian base does not. Inert without a GPU runtime.
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MUJOCO_GL=disable \
    TRMRL_HOST=0.0.0.0 \
    TRMRL_PORT=8000 \
    TRMRL_BUNDLED_DIR=/opt/trmrl/checkpoints \
    TRMRL_CHECKPOINTS_DIR=/var/lib/trmrl/checkpoints \
    TRMRL_STATE_DIR=/var/lib/trmrl/state
WORKDIR /var/lib/trmrl
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('TRMRL_PORT', '8000'), timeout=2)"
# SIGTERM drains and saves every session to $TRMRL_STATE_DIR; give it time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["trmrl-entrypoint"]
CMD ["trmrl-serve"]
