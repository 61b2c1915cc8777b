"""Dense -> Read-ME refactoring: activation statistics (stats.py, cluster.py), experts and MoE
parameters (experts.py), and the wired pipeline (pipeline.py: Recipe, build_readme)."""
