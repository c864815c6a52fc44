#!/usr/bin/env python
"""Fit the Q-Sparse scaling law to finished runs: the same as ``qsparse-dist fit-scaling-law``.

    python tools/fit_scaling_law.py --runs runs/sweep_cpu --out runs/sweep_cpu/fit
    python tools/fit_scaling_law.py --paper
"""

import sys

from qsparse_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["fit-scaling-law", *sys.argv[1:]]))
