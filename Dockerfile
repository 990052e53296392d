# The image every Knative Service runs: `mlwf serve`, one HTTP CloudEvents
# function for any stage of both workflows (see deploy/knative/); and the
# image KServe's InferenceService runs as `mlwf model serve` (deploy/kserve/).
#
#   docker build -t REGISTRY/mlwf:0.1.0 . && docker push REGISTRY/mlwf:0.1.0
#
# Only what the two servers need is installed: the package and its `knative`
# and `serve` extras (no ONNX, no test dependencies). It runs as an
# unprivileged user and listens on $PORT, which Knative sets (8080 unless the
# Service says otherwise), on every interface of the container (mlwf's servers
# listen on 127.0.0.1 unless told).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[knative,serve]" \
    && rm -rf /build \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlwf

WORKDIR /tmp
USER 10001
ENV PORT=8080
ENV HOME=/tmp \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1
EXPOSE 8080
CMD ["mlwf", "serve", "--host", "0.0.0.0"]
