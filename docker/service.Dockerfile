# The trmrl policy service. Built and smoke-tested by the deployment work; see docs/deploy.md when present.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY trmrl ./trmrl
COPY service ./service
COPY trainer ./trainer
COPY clients ./clients
COPY checkpoints ./checkpoints
RUN pip install --no-cache-dir -c requirements/constraints.txt ./clients . \
    && useradd --create-home --uid 10001 trmrl
USER trmrl
ENV TRMRL_HOST=0.0.0.0 TRMRL_PORT=8000 MUJOCO_GL=disable
EXPOSE 8000
CMD ["trmrl-serve"]
