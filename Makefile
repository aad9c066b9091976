# Two entry points do all set-up on a fresh machine: `make up` runs Threadline, `make test` checks it.
VENV := .venv
UV := $(VENV)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
ARGS ?=

.PHONY: up test lint sync

$(UV):
	@echo "==> creating $(VENV) and installing uv"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv

sync: $(UV)
	@echo "==> installing locked dependencies into $(VENV)"
	$(UV) sync --frozen --quiet

up: sync
	$(VENV)/bin/threadline up $(ARGS)

lint: sync
	@echo "==> ruff"
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	@echo "==> mypy"
	$(VENV)/bin/mypy
	@echo "==> import rules"
	$(VENV)/bin/lint-imports

test: lint
	@echo "==> pytest"
	$(VENV)/bin/pytest $(ARGS)
