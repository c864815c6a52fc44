"""Model parallelism on megatron-core: process groups and RNG (``state``), DeepSpeed's ``mpu`` adapter
(``mpu``); the CPU shims live in :mod:`qsparse_dist.compat`.  Importing this package does not import
megatron-core; the functions do."""

from .state import destroy_parallel, initialize_parallel, parallel_initialized, validate_world

__all__ = ["initialize_parallel", "destroy_parallel", "parallel_initialized", "validate_world"]
