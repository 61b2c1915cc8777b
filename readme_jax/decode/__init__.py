"""One decode step library (steps.py) and its static-batch driver (generator.py)."""
