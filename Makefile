# Two commands on a fresh machine: `make test` and `make demo`. Each makes .venv when missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# DDS stays on this host (no multicast on external interfaces); large clouds need LARGE_DATA.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export FASTDDS_BUILTIN_TRANSPORTS ?= LARGE_DATA
export PYTHONUNBUFFERED := 1

.PHONY: test demo bench clean setup
setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py package.xml
	@ldconfig -p | grep -q libusb-1.0.so.0 || { \
	  echo "installing libusb-1.0-0 (open3d needs it)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	  else echo "run: sudo apt-get install -y libusb-1.0-0" >&2; exit 1; fi; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt 2>&1 | sed "/^WARNING: Location/d"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | sed "/^WARNING: Location/d"
	$(PY) -c "import rclpy, torch, triton, open3d, rosbags, ot, ros_ot_fusion.kernels"
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q test

demo: $(STAMP)
	$(VENV)/bin/ros-ot-fusion demo

bench: $(STAMP)
	$(PY) bench/bench_codec.py

clean:
	rm -rf build .pytest_cache
