# Fresh machine: `make demo` or `make test` creates .venv and installs everything first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch 2.14.1 / torchvision 0.29.1 are the releases this project is tested with; pip takes them from local disk here.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,train]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmrc segment demo/clip.mp4 --mask demo/first_mask.png --out demo_output --overlay demo_output/overlay.mp4 --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/local_read.py

clean:
	rm -rf $(VENV) demo_output
