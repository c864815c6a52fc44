"""1 rank: build megatron GPT models and report every parameter's name and shape, so the test can
check the projection table and the parameter counts of ``qsparse_dist.config.shapes`` against a
model megatron-core actually built.  ``argv[1]``: JSON ``{case: config dict}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist_utils import write_result  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    from qsparse_dist.config import config_from_dict
    from qsparse_dist.model.megatron.gpt import build_megatron_gpt
    from qsparse_dist.parallel import destroy_parallel, initialize_parallel

    result = {}
    for case, raw in json.loads(sys.argv[1]).items():
        cfg = config_from_dict(raw)
        initialize_parallel(cfg.parallel, seed=1234)
        model = build_megatron_gpt(cfg)
        result[case] = {n: list(p.shape) for n, p in model.named_parameters()}
        destroy_parallel()
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
