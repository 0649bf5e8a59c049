"""Host copies of training state for snapshots, into buffers reused from one snapshot to the next.

The training thread blocks only while the state is copied; reusing the buffers means the copy does not
page-fault fresh memory every time (and on a GPU, the buffers are pinned so the copy is asynchronous).
Both the asynchronous checkpoint (:mod:`ling_train.checkpoint`) and the memory snapshots
(:mod:`ling_train.shmresume`) take their copies here.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor


class HostBuffers:
    """Copies of nested state (dicts, lists, tensors, DTensors, plain values) into reused host tensors.

    Args:
        keep_placement: A DTensor (an FSDP2 shard) is copied as a host DTensor with the same mesh and
            placement (what DCP needs to write it as a shard of the whole); when False, as a plain tensor
            holding this rank's local shard (what a per-rank memory snapshot holds; see
            :func:`fill_local_shards` for the way back).
    """

    def __init__(self, keep_placement: bool) -> None:
        self.keep_placement = keep_placement
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, obj: Any, key: str = "") -> Any:
        """Return ``obj`` with every tensor copied into this object's buffer for its ``key`` path."""
        if isinstance(obj, DTensor) and self.keep_placement:
            return self._copy_dtensor(obj, key)
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            if isinstance(src, DTensor):
                src = src.to_local()
            buf = self._buffers.get(key)
            if buf is None or isinstance(buf, DTensor) or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
                self._buffers[key] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            return buf
        if isinstance(obj, dict):
            return {k: self.copy(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [self.copy(v, f"{key}/{i}") for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return copy.deepcopy(obj)

    def _copy_dtensor(self, src: DTensor, key: str) -> DTensor:
        local = src.to_local().detach()
        held = self._buffers.get(key)
        if (not isinstance(held, DTensor) or held.shape != src.shape or held.to_local().shape != local.shape
                or held.dtype != src.dtype):
            # from_local would move a host tensor onto a GPU mesh's device; .to("cpu") keeps the mesh
            # and placement with a host local tensor (what torch's own async staging does).
            held = (cast(DTensor, src.to("cpu")) if local.device.type != "cpu" else
                    DTensor.from_local(torch.empty_like(local), src.device_mesh, src.placements,
                                       run_check=False, shape=src.shape, stride=src.stride()))
            self._buffers[key] = held
        with torch.no_grad():  # to_local() is a view of the host copy
            held.to_local().copy_(local, non_blocking=local.is_cuda)
        return held


def fill_local_shards(target: Any, saved: Any) -> Any:
    """Copy ``saved`` (state copied with ``keep_placement=False``: every DTensor held as this rank's local
    shard) into ``target`` (the same state from ``get_*_state_dict``, whose tensors and DTensors are the
    live ones) in place; non-tensor values are taken from ``saved``.

    Raises:
        KeyError, RuntimeError: ``saved`` does not have the structure or the shard shapes of ``target``.
    """
    if isinstance(target, torch.Tensor):
        local = target.to_local() if isinstance(target, DTensor) else target
        with torch.no_grad():
            local.copy_(saved)
        return target
    if isinstance(target, dict):
        for key in target:
            target[key] = fill_local_shards(target[key], saved[key])
        return target
    if isinstance(target, list):
        return [fill_local_shards(t, s) for t, s in zip(target, saved, strict=True)]
    return copy.deepcopy(saved)
