# The image that runs this package's app code: a Flower SuperExec with flwr-otfusion
# installed. The same image serves both sides of the Flower 1.42 process model:
#   flower-superexec --runtime-api-address superlink:9091    runs the ServerApp
#   flower-superexec --runtime-api-address supernode-1:9094  runs that node's ClientApp
# (SuperExec picks ServerApp or ClientApp from the task it receives.)
#
# Build context: the repository root (see compose.yml); the files sent to the builder
# are limited by app.Dockerfile.dockerignore next to this file.
#
# Nothing is installed at run time: torch and the package are in the image, and the
# SuperExec is not given --allow-runtime-dependency-installation, so the FAB that
# `flwr run` uploads is only unpacked and its components are imported from here.
FROM flwr/superexec:1.42.0

# CPU-only torch from PyTorch's CPU index, first: a plain `pip install torch` pulls a
# multi-GB CUDA build. The package's own `torch>=2.2` is then already satisfied.
ARG TORCH_VERSION=2.13.0
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url https://download.pytorch.org/whl/cpu

# The package, installed (not editable) from a copy of its source, which is removed
# afterwards. The [simulation] extra (Ray) is dropped: SuperExec never simulates.
COPY --chown=app:app pyproject.toml README.md /tmp/flwr-otfusion/
COPY --chown=app:app zoo /tmp/flwr-otfusion/zoo
COPY --chown=app:app fusion /tmp/flwr-otfusion/fusion
COPY --chown=app:app strategies /tmp/flwr-otfusion/strategies
COPY --chown=app:app task /tmp/flwr-otfusion/task
COPY --chown=app:app server /tmp/flwr-otfusion/server
COPY --chown=app:app client /tmp/flwr-otfusion/client
COPY --chown=app:app tools /tmp/flwr-otfusion/tools
COPY --chown=app:app deploy /tmp/flwr-otfusion/deploy
RUN sed -i 's/"flwr\[simulation\]/"flwr/' /tmp/flwr-otfusion/pyproject.toml \
    && python -m pip install --no-cache-dir /tmp/flwr-otfusion \
    && rm -rf /tmp/flwr-otfusion \
    && python -c "import otfusion.server.app, otfusion.client.app" \
    && mkdir -p /app/outputs /app/data

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

WORKDIR /app
ENTRYPOINT ["flower-superexec"]
