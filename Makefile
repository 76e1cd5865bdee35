# Two commands on a fresh clone:
#   make demo   - create .venv, build rlkernels, run the demo (PPO-RLHF + quick benchmark table)
#   make test   - create .venv, build rlkernels, add TRL and verl (integration tests), run the full test suite
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlkernels-built
INTEGRATIONS := $(VENV)/.rlkernels-integrations
VERL_SPEC ?= verl==0.9.1
SOURCES := $(shell find csrc rlkernels -name '*.cpp' -o -name '*.h' -o -name '*.cu') setup.py pyproject.toml requirements-dev.txt

.PHONY: demo test bench env integrations clean gpu-check

env: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(VENV)/bin/python $(SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation -e .
	@touch $(STAMP)

# TRL and verl for tests/test_integrations*.py, with the installed torch and transformers
# pinned so pip never swaps them; verl without its dependencies (requirements-integrations.txt)
integrations: $(INTEGRATIONS)

$(INTEGRATIONS): requirements-integrations.txt | $(STAMP)
	$(PY) -c "import torch, transformers; print('torch==' + torch.__version__); print('transformers==' + transformers.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -r requirements-integrations.txt -c $(VENV)/constraints.txt
	$(PY) -m pip install -q --no-deps "$(VERL_SPEC)"
	@touch $(INTEGRATIONS)

demo: $(STAMP)
	$(PY) -m rlkernels demo --out runs/demo
	$(PY) -m rlkernels bench --quick --ops advantages logprobs losses --out runs/demo/bench

bench: $(STAMP)
	$(PY) -m rlkernels bench

test: $(STAMP) $(INTEGRATIONS)
	RLKERNELS_REQUIRE_INTEGRATIONS=1 $(PY) -m pytest tests -q

# On a machine with a GPU, as it is (no venv, nothing downloaded): build for that GPU, run
# every op on CUDA and Triton against the reference, the sanitizers and the benchmarks;
# the report goes to $(RLKERNELS_GPU_REPORT) (default gpu-report/).  .ci/gpu_check.py.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) .ci/gpu_check.py

clean:
	rm -rf build $(VENV) rlkernels/_C*.so *.egg-info
