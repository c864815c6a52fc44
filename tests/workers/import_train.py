"""2 ranks: one or more training runs of an imported model with ``qsparse_dist.train.loop.train`` (the
code ``qsparse-dist train`` runs), one after the other in the same processes.
argv: CONFIG [key.path=value ...] [--next CONFIG [key.path=value ...]]...; writes the run summaries."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist_utils import write_result  # noqa: E402


def main() -> None:
    from qsparse_dist.config import load_config
    from qsparse_dist.train.loop import train

    runs, cur = [], []
    for a in sys.argv[1:]:
        if a == "--next":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    runs.append(cur)
    write_result({"runs": [train(load_config(r[0], r[1:])) for r in runs]})


if __name__ == "__main__":
    main()
