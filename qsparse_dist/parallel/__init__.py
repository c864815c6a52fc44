"""Model parallelism on megatron-core: process groups and RNG (``state``), the CPU shims
(``cpu_shims``).  Importing this package does not import megatron-core; the functions do."""

from .state import destroy_parallel, initialize_parallel, parallel_initialized, validate_world

__all__ = ["initialize_parallel", "destroy_parallel", "parallel_initialized", "validate_world"]
