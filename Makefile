# Quick start: `make serve` (starts the stack on the embedded default config) and `make test`.
# MLX backend: Metal on macOS; `mlx[cpu]` on Linux unless asked for CUDA: `make serve MLX=cuda`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ifeq ($(shell uname -s),Darwin)
MLX ?= metal
else
MLX ?= cpu
endif
comma := ,
EXTRAS := test$(if $(filter cpu cuda,$(MLX)),$(comma)$(MLX))
STAMP := $(VENV)/.installed-$(MLX)
PYTEST_ARGS ?=

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard workers/*.c workers/*.h)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# switching MLX=cpu <-> MLX=cuda: the two backends must not be installed side by side
	@if ls $(VENV)/.installed-* >/dev/null 2>&1 && [ ! -f $@ ]; then $(BIN)/python -m pip uninstall -q -y mlx-cpu mlx-cuda || true; fi
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-* && touch $@

serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
