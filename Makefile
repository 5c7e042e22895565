# llmc: two commands on a fresh machine.
#   make demo   create .venv, install llmc, compile a model for the CPU and generate text
#   make test   install the dev extra and run the whole test suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LLMC   := $(VENV)/bin/llmc
DATA   := data
TORCH  := torch==2.13.0

.PHONY: demo test test-tvm venv install install-dev lint clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

venv: $(VENV)/.created

# torch is installed first, pinned, so that nothing later pulls another build. The distribution is
# llmc-toolchain; a .venv made before the rename may still hold the old "llmc" one: it goes first.
$(VENV)/.installed: $(VENV)/.created pyproject.toml build_backend/llmc_build_backend.py
	$(PIP) install -q $(TORCH)
	$(PIP) uninstall -q -y llmc 2>/dev/null || true
	$(PIP) install -q -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[dev,onnx,serve,bench,ray,triton]'
	touch $@

install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) examples/demo.py --data-dir $(DATA)

test: install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

# The tvm target's tests (apache-tvm is a 96 MB wheel, so it is not in install-dev).
test-tvm: install-dev
	$(PIP) install -q -e '.[tvm]'
	$(PY) -m pytest -q -p no:cacheprovider tests/targets/test_tvm.py tests/targets/test_tvm_gpu_codegen.py tests/targets/test_tvm_cuda_shapes.py

lint: install-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DATA) build *.egg-info
