# Every target installs what it needs into .venv, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# transformers 5.x, laid over .venv (its torch and NumPy) for the tests that load exports in 5.x.
HF5 := .venv-hf5
PYTEST_ARGS ?=

.PHONY: install test test-newest lint format demo bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --compile-bytecode --python $(BIN)/python -e '.[train,dev]'
	rm -rf $(HF5)
	$(BIN)/uv pip install --quiet --target $(HF5) 'transformers>=5,<6' \
		"numpy==$$($(BIN)/python -c 'import numpy; print(numpy.__version__)')"
	touch $(STAMP)

test: install lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The model side on the newest stack the registry serves: torch, transformers 5.x and
# sentence-transformers 6.x, with the core install alone (`pip install flexbert`: no Composer,
# streaming, OmegaConf or wandb). torch's wheels bring about 5 GB of CUDA libraries, so this is a
# target of its own, which .ci/run runs after `make test`. The training environment (.venv) writes
# checkpoints and reference outputs; .venv-newest must reproduce them (tests/test_newest_stack.py),
# the core's model tests run there too, and Muon against torch.optim.Muon (tests/test_muon.py).
NEWEST := .venv-newest
NEWEST_STAMP := $(NEWEST)/.installed
NEWEST_STACK := 'torch>=2.15' 'transformers>=5.25,<6' 'sentence-transformers>=6.3,<7'
NEWEST_FIXTURES := runs/newest-stack-fixtures
NEWEST_TESTS := tests/test_newest_stack.py tests/test_encoder.py tests/test_attention_backends.py \
	tests/test_hf_parity.py tests/test_registry.py tests/test_tiling.py tests/test_muon.py
STACK_VERSIONS := import torch, transformers; print(torch.__version__, transformers.__version__)
TRAINING_ONLY := composer streaming omegaconf wandb torchmetrics

$(NEWEST_STAMP): pyproject.toml Makefile | $(STAMP)
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(BIN)/uv pip install --quiet --python $(NEWEST)/bin/python $(NEWEST_STACK) 'pytest>=8,<9' 'pytest-timeout>=2.3'
	touch $(NEWEST_STAMP)

# `pip install .` as a user runs it (a wheel, not editable, so the package's files are what ships),
# every time, so that the tests see this tree's code.
test-newest: $(NEWEST_STAMP)
	$(NEWEST)/bin/python -c '$(STACK_VERSIONS)' > $(NEWEST)/stack-before
	$(BIN)/uv pip install --quiet --python $(NEWEST)/bin/python --reinstall-package flexbert .
	$(NEWEST)/bin/python -c '$(STACK_VERSIONS)' > $(NEWEST)/stack-after
	@cmp -s $(NEWEST)/stack-before $(NEWEST)/stack-after || { echo "the core install changed torch or" \
		"transformers: $$(cat $(NEWEST)/stack-before) -> $$(cat $(NEWEST)/stack-after)"; exit 1; }
	@for module in $(TRAINING_ONLY); do $(NEWEST)/bin/python -c "import $$module" 2>/dev/null && \
		{ echo "the core install brought $$module, a training package"; exit 1; }; done; true
	@echo "$(NEWEST): torch and transformers $$(cat $(NEWEST)/stack-after), the core install alone"
	rm -rf $(NEWEST_FIXTURES)
	$(BIN)/python tests/stack_fixtures.py $(NEWEST_FIXTURES)
	FLEXBERT_STACK_FIXTURES=$(abspath $(NEWEST_FIXTURES)) $(NEWEST)/bin/python -m pytest -p no:cacheprovider \
		$(PYTEST_ARGS) $(NEWEST_TESTS)

# Style is checked, never argued: ruff's lint rules and its formatter (settings in pyproject.toml).
LINTED := src tests bench data_prep main.py
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: install
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# The embedded default: corpus -> tokenizer -> MDS -> three training phases, on CPU, no network.
# Data steps are file targets, so a second `make demo` reuses them; each phase resumes or reruns.
DEMO := runs/demo
DEMO_DATA := $(DEMO)/data
DEMO_SOURCES := web code science

demo: install $(foreach s,$(DEMO_SOURCES),$(DEMO_DATA)/mds/$(s)/index.json)
	$(BIN)/python main.py yamls/demo/pretrain.yaml
	$(BIN)/python main.py yamls/demo/context-extension.yaml
	$(BIN)/python main.py yamls/demo/decay.yaml
	$(BIN)/flexbert plot $(DEMO)/demo-pretrain $(DEMO)/demo-context-extension $(DEMO)/demo-decay
	$(BIN)/flexbert export-hf $(DEMO)/demo-decay/checkpoints/latest-rank0.pt $(DEMO)/hf --overwrite
	@echo "demo done: checkpoints in $(DEMO)/demo-*/checkpoints, plots in $(DEMO)/demo-*/plots," \
		"Hugging Face model in $(DEMO)/hf"

$(DEMO_DATA)/corpus/manifest.json: | install
	$(BIN)/flexbert prepare corpus $(DEMO_DATA)/corpus --overwrite

$(DEMO_DATA)/tokenizer/tokenizer.json: $(DEMO_DATA)/corpus/manifest.json
	$(BIN)/flexbert prepare tokenizer --input $(DEMO_DATA)/corpus --output $(DEMO_DATA)/tokenizer \
		--vocab-size 4096 --overwrite

$(DEMO_DATA)/mds/%/index.json: $(DEMO_DATA)/tokenizer/tokenizer.json
	$(BIN)/flexbert prepare mds --input $(DEMO_DATA)/corpus/$* --output $(DEMO_DATA)/mds/$* \
		--tokenizer $(DEMO_DATA)/tokenizer --overwrite

# Speed is measured here, never in tests; see BENCHMARKS.md for recorded figures.
bench: install
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_loader.py
	$(BIN)/python bench/bench_attention.py
	$(BIN)/python bench/bench_flex_mask.py
	$(BIN)/python bench/bench_model.py
	$(BIN)/python bench/bench_encode.py
	$(BIN)/python bench/bench_data_order.py
	$(BIN)/python bench/bench_optimizer.py

# On a lent GPU node: its own Python (torch, triton, numpy), no .venv, nothing installed.
# Writes gpu_check.json and gpu_check.md; see bench/gpu_check.py and BENCHMARKS.md.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(HF5) $(NEWEST) build src/*.egg-info .pytest_cache
