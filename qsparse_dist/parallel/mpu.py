"""DeepSpeed's ``mpu`` interface over megatron-core's ``parallel_state``.

DeepSpeed asks the ``mpu`` object for ``get_model_parallel_*`` and ``get_data_parallel_*``; megatron-core
0.16.1's ``parallel_state`` has no ``get_model_parallel_rank/world_size`` (measured: passing the module
fails), so this adapter answers from megatron's groups:

* data parallel = megatron's data-parallel group (excludes TP and PP peers);
* model-parallel *group* = megatron's model-parallel group (all TP × PP ranks of one replica):
  DeepSpeed all-reduces the gradient norm over it, so every pipeline stage contributes;
* model-parallel *rank / world size* = the **tensor**-parallel rank / size: DeepSpeed counts a
  gradient in the norm when ``param.tensor_model_parallel`` is set or the mp rank is 0, which is
  exactly megatron's "not a tensor-parallel duplicate" rule; it also names checkpoint shards
  ``mp_rank_XX`` by this rank, so checkpoints keep one directory per pipeline stage
  (:mod:`qsparse_dist.train.checkpoint`).
"""

from __future__ import annotations

__all__ = ["MegatronMPU"]


class MegatronMPU:
    """Stateless: every call reads megatron-core's current groups."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state as ps

        return ps

    # --- model parallel (see module docstring for the group/rank split) ---
    def get_model_parallel_group(self):
        return self._ps().get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    # --- tensor parallel ---
    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    # --- pipeline parallel ---
    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps().get_pipeline_model_parallel_world_size()

    # --- data parallel ---
    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(self.get_data_parallel_group())
