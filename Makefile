# The two commands: `make serve` and `make test`. Each bootstraps .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

SYSTEM_TOOLS := espeak-ng:espeak-ng sox:sox chromium:chromium ip:iproute2  # command:Debian package

.PHONY: test serve venv sysdeps data train clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The tests speak with espeak-ng, cut audio with sox, drive the page in chromium and build network
# namespaces with ip (iproute2): installed when root
# (as CI runs), otherwise one line naming what is missing.
sysdeps:
	@missing=""; for tp in $(SYSTEM_TOOLS); do command -v $${tp%%:*} >/dev/null || missing="$$missing $${tp#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt-get)"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "make test needs system packages:$$missing (run: sudo apt-get install$$missing)" >&2; exit 1; fi; \
	fi

# the tests also run SyncCache on the real Wan2.2-S2V class (the [wan] extra: diffsynth) and the
# Ray Serve cluster (the [cluster] extra)
$(VENV)/.installed-extras: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,wan,cluster]'
	touch $@

test: sysdeps venv $(VENV)/.installed-extras
	$(BIN)/python -m pytest -q

serve: venv
	$(BIN)/syncavatar serve

# Regenerate the training corpus and retrain (not run by CI; CI uses the shipped weights).
data: venv
	$(BIN)/syncavatar data --out data/corpus --clips 480 --seed 0

train: venv
	$(BIN)/syncavatar train --corpus data/corpus --out runs/ref

clean:
	rm -rf $(VENV) *.egg-info
