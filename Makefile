# The two set-up commands of the README: `make run` and `make test`. Both work on a fresh
# clone: they create .venv (and, for the TypeScript SDK tests, tests/sdk/ts/node_modules).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TS_DIR := tests/sdk/ts
TS_STAMP := $(TS_DIR)/node_modules/.installed
PYTEST_ARGS ?=

.PHONY: run test lint bench soak dist venv node web tools build-tools spawner clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dist]'
	touch $(STAMP)

venv: $(STAMP)

$(TS_STAMP): $(TS_DIR)/package.json
	command -v npm >/dev/null 2>&1 || { apt-get update && apt-get install -y --no-install-recommends nodejs npm; }
	cd $(TS_DIR) && npm install --no-audit --no-fund --loglevel=error
	touch $(TS_STAMP)

node: $(TS_STAMP)

# The browser terminal's xterm.js files: pinned in packaging/web/package-lock.json, fetched
# from the npm registry and copied into the package (daemon/sandboxd/web/vendor/, not
# committed), so the wheel and the single-file build carry them.
WEB_NPM := packaging/web
WEB_VENDOR := daemon/sandboxd/web/vendor
WEB_ASSETS := $(WEB_VENDOR)/xterm.mjs
$(WEB_ASSETS): $(WEB_NPM)/package.json $(WEB_NPM)/package-lock.json packaging/vendor_web.py
	command -v npm >/dev/null 2>&1 || { apt-get update && apt-get install -y --no-install-recommends nodejs npm; }
	cd $(WEB_NPM) && npm ci --no-audit --no-fund --loglevel=error
	$(PYTHON) packaging/vendor_web.py

web: $(WEB_ASSETS)

# Debian packages the tests and benchmarks use: websocketd (the benchmarks' anchor),
# nginx-light (the download's anchor), systemd-analyze (checks the unit files), unshare
# (PID 1 tests; util-linux), chromium (the browser terminal's tests drive it with
# Playwright; `playwright install` is never run).
tools:
	@missing=""; \
	command -v websocketd >/dev/null 2>&1 || missing="$$missing websocketd"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v unshare >/dev/null 2>&1 || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y --no-install-recommends $$missing; fi

# What the single-file build's launcher needs: a C compiler, static libc and zlib.
build-tools:
	@missing=""; \
	command -v $(CC) >/dev/null 2>&1 || missing="$$missing gcc libc6-dev"; \
	[ -f /usr/include/zlib.h ] || missing="$$missing zlib1g-dev"; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y --no-install-recommends $$missing; fi

# The spawner helper (daemon/sandboxd/runtime/spawner.py): a static C program beside its
# module, not committed. Without it the daemon spawns on its event loop (slower under load).
SPAWNER := daemon/sandboxd/runtime/sandboxd-spawner
$(SPAWNER): daemon/sandboxd/runtime/spawner.c | build-tools
	$(CC) -O2 -s -static -Wall -Wextra -Werror -o $@ daemon/sandboxd/runtime/spawner.c

spawner: $(SPAWNER)

run: $(STAMP) $(WEB_ASSETS)
	@$(MAKE) --no-print-directory spawner || echo "(no spawner helper built: commands spawn on the event loop)"
	$(BIN)/sandboxd --listen 127.0.0.1:8080

lint: $(STAMP)
	$(BIN)/ruff check daemon tests packaging
	$(BIN)/ruff format --check daemon tests packaging
	$(BIN)/mypy --strict daemon packaging

test: $(STAMP) $(TS_STAMP) $(WEB_ASSETS) $(SPAWNER) tools lint dist
	$(BIN)/pytest $(PYTEST_ARGS)

# The long hardening runs (several minutes): chaos (100 MB cut 100 times under the SDK),
# soak (10,000 commands), 2,000 fuzz examples per fuzzer, 200 random examples of up
# to 20 steps of the exec model (tests/test_model.py), and 20 live upgrades under ten
# streaming commands with a 50 MB stream (tests/test_upgrade_soak.py). Numbers are printed.
soak: $(STAMP) tools
	CHAOS_MB=100 CHAOS_CUTS=100 SOAK_COMMANDS=10000 FUZZ_EXAMPLES=2000 \
		MODEL_EXAMPLES=200 MODEL_STEPS=20 UPGRADE_SOAK_UPGRADES=20 UPGRADE_SOAK_MB=50 \
		$(BIN)/pytest -s -o faulthandler_timeout=1800 \
		tests/test_chaos.py tests/test_soak.py tests/test_fuzz.py tests/test_model.py \
		tests/test_upgrade_soak.py

# One self-contained executable for snapshot images (no Python needed on the image): a
# static C launcher (packaging/launcher.c) with a PyInstaller one-folder build appended; it
# unpacks once and execs in place, so sandboxd itself is PID 1. Rebuilt when a source changes.
DIST := dist/sandboxd
LAUNCHER := build/launcher
ONEDIR := build/onedir/sandboxd
$(LAUNCHER): packaging/launcher.c | build-tools
	mkdir -p build
	$(CC) -O2 -s -static -Wall -Wextra -Werror -o $@ packaging/launcher.c -lz

# --add-data takes an absolute path: PyInstaller resolves relative ones from --specpath.
$(ONEDIR)/sandboxd: $(STAMP) $(WEB_ASSETS) $(SPAWNER) packaging/entry.py $(shell find daemon/sandboxd -name "*.py" -o -path "*/web/*" -type f)
	$(BIN)/pyinstaller --onedir --name sandboxd --paths daemon --distpath build/onedir \
		--workpath build/pyinstaller --specpath build --noconfirm --log-level WARN \
		--add-data "$(CURDIR)/daemon/sandboxd/web:sandboxd/web" \
		--add-binary "$(CURDIR)/$(SPAWNER):sandboxd/runtime" \
		packaging/entry.py

$(DIST): $(LAUNCHER) $(ONEDIR)/sandboxd packaging/pack.py
	mkdir -p dist
	$(BIN)/python packaging/pack.py $(LAUNCHER) $(ONEDIR) $@

dist: $(DIST)

# Full benchmarks, sandboxd and websocketd in one run; raw results in bench/results/.
# (The daemon's bytecode is compiled first: with PYTHONDONTWRITEBYTECODE set, every start,
# a live upgrade's new image above all, would compile the edited modules again.)
bench: $(STAMP) $(SPAWNER) tools
	$(BIN)/python -m compileall -q daemon/sandboxd
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist $(TS_DIR)/node_modules $(WEB_NPM)/node_modules $(WEB_VENDOR) \
		.mypy_cache .ruff_cache .pytest_cache
