# guide: two commands. `make tour` runs the curriculum, `make test` runs the tests (what CI calls).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2
TIER ?= tiny
# Set TORCH_INDEX to a PyTorch wheel index (e.g. the CPU-only one) on CPU machines without a local torch wheel.
TORCH_INDEX ?=

# Offline, quiet, reproducible: no hub look-ups, no Gradio analytics, one torch thread per process on CPU.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg
export PYTHONWARNINGS := ignore::DeprecationWarning
export OMP_NUM_THREADS ?= 1

.PHONY: install tour test export clean-artifacts

install: $(STAMP)

# CUDA machines get PyPI's CUDA build of torch (with Triton) and onnxruntime-gpu; CPU machines the CPU build, onnxruntime
# and Triton (its interpreter runs the engine's kernels in the tests).
$(STAMP): settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	@if nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA GPU found: installing the CUDA build of torch and onnxruntime-gpu"; \
	  $(PY) -m pip install "torch==2.13.0" && $(PY) -m pip install -e ".[dev,gpu]"; \
	else \
	  echo "no CUDA GPU: installing the CPU build of torch and onnxruntime"; \
	  $(PY) -m pip install "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) && $(PY) -m pip install -e ".[dev,cpu]"; \
	fi
	$(PY) -m pip check
	@# Headless Chromium for the demo screenshot tests (Debian packages; needs root).
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install chromium for the demo screenshot tests (they skip without it)"; fi; \
	fi
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "python3 (guide)" >/dev/null
	touch $(STAMP)

export: $(STAMP)
	$(VENV)/bin/nbdev_export

# The main job: every chapter notebook, executed, plus artifacts/report.md.
tour: $(STAMP)
	$(VENV)/bin/guide pretrain --tier $(TIER) --threads $(JOBS)
	$(VENV)/bin/guide tour --tier $(TIER) --jobs $(JOBS) --out artifacts

# The test command (.ci/run calls exactly this).
test: $(STAMP)
	$(VENV)/bin/guide pretrain --tier tiny --threads $(JOBS)
	$(PY) -m pytest tests -n $(JOBS) --dist worksteal --timeout 1200 --durations 25 -p no:cacheprovider

clean-artifacts:
	rm -rf artifacts
