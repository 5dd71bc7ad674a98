# The two commands of the README: `make demo` and `make test`. Both do all set-up first:
# a virtual environment with the package, the Kafka jars (mvn) and the sample data (apt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup browser rtsp demo test bench kafka-start kafka-stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP) browser rtsp
	$(BIN)/tilestream kafka fetch
	$(BIN)/tilestream kafka fetch --version 3.9.1
	$(BIN)/tilestream samples fetch

# Debian's Chromium and ChromeDriver for the dashboard's browser test (no browser downloads here).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# GStreamer's RTSP server, run by the system Python (PyGObject), as the real RTSP camera of the agent's
# tests (tests/rtsp_server.py: test pattern, JPEG over RTP).
RTSP_PACKAGES := python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
rtsp:
	@dpkg -s $(RTSP_PACKAGES) >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(RTSP_PACKAGES) >/dev/null; }

demo: setup
	$(BIN)/tilestream demo

# The layering (README "Layers": which package may import which) is checked first, then the suite.
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.bench-*
	touch $@

# `make bench BENCH_ARGS=--quick` for a smoke run, `BENCH_ARGS=--soak` adds the 10-minute soak.
bench: $(BENCH_STAMP) setup
	$(BIN)/python -m benchmarks.run_all $(BENCH_ARGS)

kafka-start: setup
	$(BIN)/tilestream kafka start

kafka-stop:
	$(BIN)/tilestream kafka stop

clean:
	rm -rf $(VENV) build *.egg-info
