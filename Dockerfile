# One image, two commands: `hermes-bot run` (the Discord bot, the default) and `hermes-bot worker`.
#
#   docker build -t hermes-bot .                          # CPU torch: bot, migrations, openai-engine worker
#   docker build --build-arg TORCH=cuda -t hermes-bot:gpu . # CUDA torch: the transformers worker on NVIDIA GPUs
#
# The CUDA wheels bring their own CUDA runtime; the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit. TORCH_CUDA picks the wheel index (cu126, cu128, cu130, ...).
ARG PYTHON_VERSION=3.11
ARG TORCH=cpu

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --user-group hermes
WORKDIR /app

# torch first, in its own layer: it is by far the largest and changes least. The version matches
# pyproject.toml, so `pip install .` below keeps it instead of pulling PyPI's build.
FROM base AS torch-cpu
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

FROM base AS torch-cuda
ARG TORCH_CUDA=cu130
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH_CUDA}

FROM torch-${TORCH} AS app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY personas ./personas
# Editable, so the package runs from /app and finds the default personas/ directory beside it.
RUN pip install -e .

# Owned by the runtime user before volumes mount there, so named volumes inherit the ownership.
ENV HF_HOME=/home/hermes/.cache/huggingface
RUN mkdir -p /app/data "$HF_HOME" && chown -R hermes:hermes /app/data /home/hermes/.cache
USER hermes

# SIGTERM (docker stop) starts the graceful shutdown; compose gives each service a stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["hermes-bot"]
CMD ["run"]
