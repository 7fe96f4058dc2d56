# Two entry points for a fresh machine (both idempotent):
#   make demo   set up, then convert the bundled tiny checkpoint and print its parity report
#   make test   the same set-up (native package, reference side, Ray), then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The original CompVis/Stability `ldm` code; its pinned requirements are obsolete, hence --no-deps.
LDM ?= stable-diffusion-sdkit==2.1.5
# open_clip's files serve as references (OpenAI ViT layout, CLIP tokenizer); --no-deps keeps torchvision out.
OPEN_CLIP ?= open-clip-torch==3.3.0

.PHONY: test-slow setup setup-reference demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.sdport-setup: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,ray,onnx]"
	$(BIN)/pip install -q --no-deps "$(LDM)" "$(OPEN_CLIP)"
	touch $@

setup: $(VENV)/.sdport-setup

demo: setup
	$(BIN)/sdport demo

# Two workers, each test file on one of them (its module fixtures built once): most tests are small
# single-threaded torch work, so the two cores run two files at a time.
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25

test-slow: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf $(VENV) out
