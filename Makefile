# `make demo` and `make test` work on a fresh machine: they build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install fashion-mnist demo test test-slow clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	DS_BUILD_OPS=0 $(PIP) install --quiet -e ".[dev]"  # DeepSpeed without compiled ops: JIT on use
	touch $@

install: $(VENV)/.installed

# Debian's package when we are root and it is missing; otherwise the code falls back to the Hub.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST_DIR) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: $(VENV)/.installed fashion-mnist
	$(PY) scripts/demo.py

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-slow: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache outputs
