"""Public evaluation sets read from their PyPI wheels: HumanEval (and BFCL, to come)."""
