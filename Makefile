# The two commands a newcomer needs: `make demo` and `make test`. Both start from a bare clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODELS := examples/models/protein_embedder/encoder.pt
# the epistasis example models: embed_tiny is the last of the two that build.py writes
EPISTASIS := examples/epistasis/models/embed_tiny/encoder.pt
PYTEST_WORKERS ?= auto

.PHONY: install models browser perf-analyzer mlserver-venv demo test test-all lint protos bench chaos soak probe clean gpu-wheels gpu-rehearse

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (torch==2.13.0, a CPU build from local disk); see pyproject extras.
	$(BIN)/python -m pip install -q -e ".[torch,tensorflow,io,hf,dev]"
	touch $(STAMP)

install: $(STAMP)

# Model weights cannot be downloaded here: the example models are built locally, fixed seeds.
$(MODELS): $(STAMP) examples/build_models.py examples/protein/encoder.py examples/models/protein_embedder/model.py
	$(BIN)/python examples/build_models.py

# The epistasis example's two embedders: the same encoder and model.py, other shapes and seeds.
$(EPISTASIS): $(STAMP) examples/epistasis/build.py examples/build_models.py examples/protein/encoder.py examples/models/protein_embedder/model.py
	$(BIN)/python examples/epistasis/build.py --models-only

models: $(MODELS) $(EPISTASIS)

demo: $(MODELS)
	$(BIN)/tensorfleet run examples/jobs/protein-embeddings.yaml --restart

# The dashboard test drives Debian's headless Chromium; installed here where missing and we are root
# (CI: a clean Debian machine). Elsewhere the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
		echo "chromium not installed (not root, or no apt-get): the dashboard browser test will skip"

# Triton's perf_analyzer (a C++ binary shipped in the tritonclient 2.51.0 wheel; it links libcudart and
# libb64) in a venv of its own, for tests/interop/test_perf_analyzer.py. Best effort: the test skips without it.
PERF_VENV := .venv-perf
perf-analyzer:
	@test -x $(PERF_VENV)/bin/perf_analyzer || { \
		{ dpkg -s libb64-0d >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q libb64-0d >/dev/null 2>&1 || \
		  { apt-get update -qq && apt-get install -y -q libb64-0d >/dev/null; }; }; }; } && \
		$(PYTHON) -m venv $(PERF_VENV) && \
		$(PERF_VENV)/bin/python -m pip install -q --no-deps "tritonclient==2.51.0" "nvidia-cuda-runtime-cu12==12.9.79"; } || \
		echo "perf_analyzer not set up: tests/interop/test_perf_analyzer.py will skip"

# MLServer, the baseline of `python -m bench.serve_overhead --tiny` (issue 15), in a venv of its own:
# it cannot share a process with tritonclient.grpc or with tensorfleet (both register a protobuf
# package named `inference`). uvloop 0.22+ breaks its parallel workers (asyncio.get_event_loop in a
# fresh process raises), hence the pin. Its runtime is bench/mlserver_runtime/; the bench skips MLServer without it.
MLSERVER_VENV := .venv-mlserver
mlserver-venv: $(MLSERVER_VENV)/bin/mlserver
$(MLSERVER_VENV)/bin/mlserver:
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q "mlserver==1.7.1" "uvloop==0.21.0" "torch==2.13.0" numpy

test: models browser perf-analyzer
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# Everything, including the slow memory test.
test-all: models browser perf-analyzer
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m ""

lint: install
	$(BIN)/ruff check .

protos: install
	$(BIN)/python -m tensorfleet.protos.generate

# Each prints one JSON line with its ratio against a baseline measured in the same run.
BENCHES := serve_overhead coordinator end_to_end transport rest batching scale warm_start rerun
bench: models
	for name in $(BENCHES); do $(BIN)/python -m bench.$$name || exit 1; done

# The GPU kit (docs/performance.md, "The GPU kit"): wheels for the GPU machine, fetched here
# (needs the package index), carried there as .gpu-wheels/cp312; then `bash bench/gpu/run.sh`.
gpu-wheels: $(STAMP)
	$(BIN)/python -m bench.gpu.wheels --dest .gpu-wheels

# The same script end to end on this CPU machine (device cpu, tiny sizes).
gpu-rehearse: gpu-wheels
	PYTHON=$(BIN)/python bash bench/gpu/run.sh --rehearse --out out/gpu-rehearsal

# Reliability, not speed (docs/reliability.md): faults survived, load held. Both print one JSON line.
chaos: models
	$(BIN)/python -m bench.chaos

# Security (docs/security.md): the attack table replayed against live processes; one JSON line.
probe: install
	$(BIN)/python -m bench.probe

soak: install
	$(BIN)/python -m bench.soak --minutes 10
	$(BIN)/python -m bench.soak_service --minutes 10

clean:
	rm -rf $(VENV) $(PERF_VENV) build *.egg-info jobs out test-artifacts
