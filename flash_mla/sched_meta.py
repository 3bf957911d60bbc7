"""Split-KV schedule holder for ``flash_mla_with_kvcache`` (FlashMLA's
``FlashMLASchedMeta``) and the check that a reused holder still fits the call.

``get_mla_metadata()`` returns an empty holder. The first decode call that receives
it records the call's configuration (and, on the native path, the schedule); every
later call must have the same configuration, otherwise the schedule would be wrong
for it, so a mismatch raises ValueError naming the field that changed. Whether
``cache_seqlens`` / ``topk_length`` values changed is not checked: that would need a
device-to-host copy, and decode must stay capturable in a CUDA graph.

This module does not import torch, so ``import flash_mla`` stays cheap.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Tile-scheduler metadata of FlashMLA, filled in by the first decode call.

    Fields (same names and defaults as upstream FlashMLA):
      have_initialized: set by the first ``flash_mla_with_kvcache`` call.
      config: the :class:`FlashMLASchedMeta.Config` that call had.
      tile_scheduler_metadata: int32 device tensor with the split-KV schedule (dense
        decode: [parts, 8], one row per part), or None while the decode runs on the
        PyTorch reference backend (it needs no schedule).
      num_splits: int32 device tensor (split offsets per batch, [b + 1]), or None likewise.
    """

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional["FlashMLASchedMeta.Config"] = None
    tile_scheduler_metadata: Optional["torch.Tensor"] = None
    num_splits: Optional["torch.Tensor"] = None


# Field names in declaration order, computed once (torch.compile can iterate a tuple
# of strings but not dataclasses.fields() of a class).
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(FlashMLASchedMeta.Config))

# What each Config field means to a caller, for the mismatch message.
_FIELD_MEANING = {
    "b": "batch size (q.shape[0])",
    "s_q": "queries per sequence (q.shape[1])",
    "h_q": "query heads (q.shape[2])",
    "page_block_size": "page size (k_cache.shape[1])",
    "h_k": "key heads (k_cache.shape[2])",
    "causal": "causal",
    "is_fp8_kvcache": "is_fp8_kvcache",
    "topk": "topk (indices.shape[-1])",
    "extra_page_block_size": "extra page size (extra_k_cache.shape[1])",
    "extra_topk": "extra topk (extra_indices_in_kvcache.shape[-1])",
}


def check_sched_meta_type(sched_meta: Any) -> None:
    """TypeError unless ``sched_meta`` is a FlashMLASchedMeta."""
    if not isinstance(sched_meta, FlashMLASchedMeta):
        raise TypeError(
            "tile_scheduler_metadata must be the FlashMLASchedMeta returned by "
            f"get_mla_metadata(), got {type(sched_meta).__name__}"
        )


def bind_or_check_config(sched_meta: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> bool:
    """Record ``config`` in a fresh holder, or check it against the recorded one.

    Returns True when this call initialised the holder (the caller then computes
    the schedule). Raises ValueError naming the first field that differs.
    """
    check_sched_meta_type(sched_meta)
    if not sched_meta.have_initialized:
        sched_meta.config = config
        sched_meta.have_initialized = True
        return True
    recorded = sched_meta.config
    if recorded is None:
        raise ValueError(
            "tile_scheduler_metadata has have_initialized=True but no config; pass a "
            "fresh holder from get_mla_metadata()"
        )
    for name in _CONFIG_FIELDS:
        was = getattr(recorded, name)
        now = getattr(config, name)
        if was != now:
            raise ValueError(
                f"tile_scheduler_metadata was initialised with {name}={was!r} "
                f"({_FIELD_MEANING[name]}) but this call has {name}={now!r}; "
                "a schedule can only be reused by calls with the same configuration, "
                "so get a new one from get_mla_metadata() for this call"
            )
    return False


# The enable_batch_invariant a holder's stored schedule was made with (an attribute of the
# instance beside upstream's fields, which stay exactly upstream's).
_INVARIANT_ATTR = "_batch_invariant"


def stored_schedule(holder: FlashMLASchedMeta, batch_invariant: bool, can_store: bool,
                    compute: Callable[[], Tuple["torch.Tensor", "torch.Tensor"]]
                    ) -> Tuple[Optional["torch.Tensor"], Optional["torch.Tensor"]]:
    """The holder's native schedule (tile_scheduler_metadata, num_splits): the stored one,
    or, on the first call that runs natively (``can_store``: the native backend chosen and
    not tracing), ``compute()``'s, stored there. (None, None) otherwise (the reference needs
    none; a traced op computes its own per call). A stored schedule made with another
    enable_batch_invariant raises ValueError."""
    if holder.tile_scheduler_metadata is not None:
        recorded = getattr(holder, _INVARIANT_ATTR, batch_invariant)
        if recorded != batch_invariant:
            raise ValueError(
                f"tile_scheduler_metadata holds a schedule made with enable_batch_invariant="
                f"{recorded} but this call has enable_batch_invariant={batch_invariant}; get a "
                "new one from get_mla_metadata() for this call")
        return holder.tile_scheduler_metadata, holder.num_splits
    if not can_store:
        return None, None
    holder.tile_scheduler_metadata, holder.num_splits = compute()
    setattr(holder, _INVARIANT_ATTR, batch_invariant)
    return holder.tile_scheduler_metadata, holder.num_splits
