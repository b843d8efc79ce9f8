# syntax=docker/dockerfile:1
# genserve image, CPU (default) or CUDA:
#   docker build -t genserve:cpu .
#   docker build -t genserve:cuda --build-arg TORCH_VARIANT=cu128 .
#   docker run -p 8000:8000 genserve:cpu --max-batch-size 64      # flags are appended to the serve command
# The CUDA wheels carry the CUDA runtime libraries; the host needs only the NVIDIA driver and the
# container toolkit (docker run --gpus all). See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu, or a CUDA tag of the PyTorch wheel index (cu126, cu128, ...) that has TORCH_VERSION
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and from its own index: pyproject accepts torch>=2.4, and the PyPI default on x86-64
# Linux is the CUDA build, which the CPU image must not carry.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml ./
# The project's runtime dependencies only: the service runs from its source folder in the final
# stage, where default_models() finds the bundled models beside it.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="genserve" \
      org.opencontainers.image.description="Autoregressive text and diffusion image generation behind one /generate API" \
      io.genserve.torch-variant="${TORCH_VARIANT}"
RUN useradd --create-home --uid 10001 --user-group genserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    GENSERVE_PORT=8000
WORKDIR /app
COPY --chown=genserve:genserve service ./service
COPY --chown=genserve:genserve models/tiny-shakespeare ./models/tiny-shakespeare
COPY --chown=genserve:genserve models/tiny-digits ./models/tiny-digits
USER 10001:10001
EXPOSE 8000
# /ready answers 200 once the models are loaded and warmed (503 before): compose's depends_on waits for it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GENSERVE_PORT', '8000') + '/ready', timeout=4)"]
ENTRYPOINT ["python", "-m", "service", "--host", "0.0.0.0"]
CMD []
