"""Comparison config (`launch/compare.py`): runs that differ in remain rate, one table and plot.

  python launch/compare.py --config.runs="runs/compare_rr0.5 runs/compare_rr0.75" \
      --config.out=docs/compare
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    # run directories (spaces or commas between them), each with eval/results.json and
    # config.json (launch/train.py with the eval stage)
    c.runs = ""
    # a run whose static pruned model is the control of runs that trained none (checked: same
    # held-out windows, same expert-phase tokens); "" = each run's own
    c.control = ""
    c.out = "docs/compare"  # compare.json, compare.md, ppl_vs_active.png
    return c
