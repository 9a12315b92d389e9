# `make train` / `make test` create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXPERIMENT ?= macbook_char
# the PyTorch release the project is tested with; `make TORCH=torch train` takes the newest instead
TORCH ?= torch==2.13.0

.PHONY: train sample tensorboard test install clean

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/installed

train: $(VENV)/installed
	$(PY) scripts/train.py experiment=$(EXPERIMENT) $(ARGS)

# after `make train`: sample from the newest run's last.ckpt (CKPT=PATH for another), watch the curves of all runs
CKPT ?= latest
sample: $(VENV)/installed
	$(PY) scripts/sample.py ckpt=$(CKPT) $(ARGS)

tensorboard: $(VENV)/installed
	$(PY) -m tensorboard.main --logdir outputs $(ARGS)

test: $(VENV)/installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

# how many small changes to the core modules the tests catch ([tool.mutmut] in pyproject.toml; slow: hours)
mutation: $(VENV)/installed
	$(PY) -m pip install --quiet -e ".[dev,mutation]"
	$(PY) -m mutmut run
	$(PY) -m mutmut results

clean:
	rm -rf $(VENV)
