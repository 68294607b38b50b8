# Thin wrapper: every target runs the same task in tasks.py, so there is one way to run each check.
PYTHON ?= python3
.PHONY: install demo test lint typecheck security docstrings check bench load
install demo test lint typecheck security docstrings check bench load:
	$(PYTHON) tasks.py $@ $(ARGS)
