"""Patches of megatron-core 0.16.x internals (each guarded by :func:`~.versions.require`).

* :func:`define_missing_te_names` — 0.16.1's ``moe_utils`` imports its Transformer-Engine helpers
  inside ``try: import transformer_engine`` with no ``else``, so without Transformer Engine the router
  (``RouterGatingLinearFunction``: ``if te_general_gemm is not None``) raises ``NameError:
  te_general_gemm``.  The missing names are set to ``None`` (what later releases do) — whenever
  megatron could not import Transformer Engine (``moe_utils.HAVE_TE`` false), on CUDA as on the CPU.
* :func:`use_host_split_sizes` (CPU only) — ``maybe_move_tensor_to_cpu`` moves split sizes to the
  host only for CUDA tensors; gloo's ``all_to_all_single`` needs them there.
* :func:`model_parallel_cpu_manual_seed` / :func:`reset_rng_tracker` (CPU only / teardown) — set and
  clear megatron's module-level RNG tracker (``_CUDA_RNG_STATE_TRACKER``).
* :func:`local_token_dispatcher_class` — a subclass of 0.16.1's ``MoEAlltoAllTokenDispatcher`` for
  an expert layout without communication (expert-TP × EP group of size 1, dropless, no padding):
  the parent copies ``tokens_per_expert`` to the host and waits for it (``cuda_sync_point``
  "before_permutation_2"), and its unfused ``permute`` sizes its output with ``masked_select`` (a
  host sync each); this one permutes with ``nonzero_static`` (the output size ``tokens · top_k`` is
  static when dropless), skips the identity chunk sorts and returns ``tokens_per_expert`` on the
  device — no host sync from router to combine.
* :func:`quiet_unknown_mlp_warning` — a log filter, not a patch: ``TransformerLayer`` warns
  "Unknown MLP type … Using default kwargs." for every layer whose MLP class is not megatron's own
  ``MLP`` (ours is the subclass ``QSparseMLP``, whose default kwargs are the right ones).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .versions import require

__all__ = ["TE_NAMES", "define_missing_te_names", "use_host_split_sizes",
           "cpu_rng_tracker_class", "model_parallel_cpu_manual_seed", "reset_rng_tracker",
           "quiet_unknown_mlp_warning", "local_dispatch_eligible", "local_token_dispatcher_class"]

PACKAGE = "megatron-core"

# Names 0.16.1's moe_utils leaves undefined without Transformer Engine.
TE_NAMES = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_and_pad_with_probs",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)


def define_missing_te_names() -> list[str]:
    """Set the Transformer-Engine names ``moe_utils`` lacks to ``None``; return the names set.
    A no-op when megatron imported Transformer Engine (``moe_utils.HAVE_TE``)."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "HAVE_TE", False):
        return []
    require(PACKAGE, "moe_utils: Transformer-Engine names set to None")
    missing = [name for name in TE_NAMES if not hasattr(moe_utils, name)]
    for name in missing:
        setattr(moe_utils, name, None)
    return missing


def _host_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` that always moves (gloo wants host split sizes)."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def use_host_split_sizes() -> None:
    """CPU only: the alltoall dispatcher keeps its split sizes on the host."""
    require(PACKAGE, "moe_utils/token_dispatcher.maybe_move_tensor_to_cpu")
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _host_split_sizes
    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes


_TRACKER_CLASS = None


def cpu_rng_tracker_class():
    """``CpuRNGStatesTracker``: megatron's ``CudaRNGStatesTracker`` with the named streams kept as CPU
    generator states (built on first use so that importing this module does not import megatron)."""
    global _TRACKER_CLASS
    if _TRACKER_CLASS is not None:
        return _TRACKER_CLASS
    require(PACKAGE, "tensor_parallel.random.CudaRNGStatesTracker subclass")
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    _TRACKER_CLASS = CpuRNGStatesTracker
    return _TRACKER_CLASS


def model_parallel_cpu_manual_seed(seed: int):
    """CPU twin of ``megatron.core.tensor_parallel.model_parallel_cuda_manual_seed`` (same offsets:
    model-parallel ``seed + 2718 + tp_rank``, expert-parallel ``seed + 1024 + 100·ep_rank + etp_rank``)."""
    require(PACKAGE, "tensor_parallel.random._CUDA_RNG_STATE_TRACKER (CPU tracker)")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tracker = cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(
        mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank(),
    )
    return tracker


def reset_rng_tracker() -> None:
    """Forget megatron's RNG tracker (``destroy_model_parallel`` keeps it) so another layout can seed anew."""
    require(PACKAGE, "tensor_parallel.random._CUDA_RNG_STATE_TRACKER reset")
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def local_dispatch_eligible(config, pg_collection) -> bool:
    """Whether the MoE layer of ``config`` needs no token communication and no capacity logic, so
    :func:`local_token_dispatcher_class` can replace megatron's dispatcher: expert TP × EP group of
    size 1 (every local expert is a global one; attention TP/SP only shards the tokens), dropless
    (no capacity factor, no padding to capacity or for quantization) and no shared experts."""
    group = getattr(pg_collection, "tp_ep", None)
    return (
        group is not None and group.size() == 1
        and config.moe_token_dispatcher_type in ("alltoall", "allgather")
        and config.moe_expert_capacity_factor is None
        and not config.moe_pad_expert_input_to_capacity
        and not getattr(config, "moe_router_padding_for_quantization", False)
        and not config.moe_permute_fusion
        and not config.moe_shared_expert_intermediate_size
    )


_DISPATCHER_CLASS = None


def local_token_dispatcher_class():
    """``LocalTokenDispatcher``: megatron's alltoall dispatcher for a layout where
    :func:`local_dispatch_eligible` holds — permutation on the device, no host sync (built on first use
    so that importing this module does not import megatron)."""
    global _DISPATCHER_CLASS
    if _DISPATCHER_CLASS is not None:
        return _DISPATCHER_CLASS
    require(PACKAGE, "token_dispatcher.MoEAlltoAllTokenDispatcher subclass (local, sync-free)")
    from megatron.core.transformer.moe.moe_utils import unpermute
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    class LocalTokenDispatcher(MoEAlltoAllTokenDispatcher):
        """Tokens stay on this rank: permute by expert (megatron's order: expert-major, token order
        inside an expert), run the experts, un-permute.  ``tokens_per_expert`` stays on the device."""

        def dispatch_preprocess(self, hidden_states, routing_map, probs):
            self.hidden_shape = hidden_states.shape
            self.probs, self.routing_map = probs, routing_map
            hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
            self.hidden_shape_before_permute = hidden_states.shape
            n = routing_map.size(0)
            # flat index e·n + t of every routed (token t, expert e), expert-major like masked_select;
            # dropless routing puts exactly top_k experts on every token, so the size is static
            flat = torch.nonzero_static(routing_map.T.contiguous().view(-1),
                                        size=n * self.config.moe_router_topk).squeeze(1)
            token = flat % n
            self.reversed_local_input_permutation_mapping = token
            self.tokens_per_expert = routing_map.sum(dim=0).long()
            permuted_probs = probs.T.contiguous().view(-1).index_select(0, flat)
            return hidden_states.index_select(0, token), permuted_probs

        def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
            return permutated_local_input_tokens, permuted_probs

        def dispatch_postprocess(self, global_input_tokens, global_probs):
            tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
            return global_input_tokens, tokens_per_expert, global_probs

        def combine_preprocess(self, hidden_states):
            return hidden_states

        def token_combine(self, hidden_states, async_finish: bool = True, allocate_on_comm_stream: bool = True):
            return hidden_states

        def combine_postprocess(self, permutated_local_input_tokens):
            output = unpermute(permutated_local_input_tokens, self.reversed_local_input_permutation_mapping,
                               restore_shape=self.hidden_shape_before_permute)
            return output.view(self.hidden_shape)

    _DISPATCHER_CLASS = LocalTokenDispatcher
    return _DISPATCHER_CLASS


class _DropUnknownMLP(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


_UNKNOWN_MLP_FILTER = _DropUnknownMLP()


def quiet_unknown_mlp_warning(quiet: bool = True) -> None:
    """Hide (or, ``quiet=False``, show again) megatron's per-layer "Unknown MLP type" warning."""
    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if quiet:
        log.addFilter(_UNKNOWN_MLP_FILTER)
    else:
        log.removeFilter(_UNKNOWN_MLP_FILTER)
