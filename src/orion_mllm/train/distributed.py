"""Process groups and parallelism, applied from outside the model code (torchtitan style).

``init_distributed`` reads the standard torchrun environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``...), so single-node and multi-node launches need nothing else:
NCCL on GPUs, gloo on CPUs. A plain ``python``/``orion train`` launch is one process and uses no
process group at all.

``parallelize`` shards the student with FSDP2 ``fully_shard``: one unit per decoder layer, then the
root (``OrionModel``: embeddings, LM head, vision tower, vision head). The teacher is sharded the
same way (a ``KLTeacher`` root); its LM head stays whole on every rank
because the chunked KL reads that weight directly, outside any module's forward. Activation
checkpointing wraps each decoder layer when asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistState:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistState:
    """Join the torchrun process group if launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistState(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(state: DistState) -> None:
    if state.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], state: DistState) -> list[float]:
    """Sum a few numbers over ranks (float64, on the communication device)."""
    if not state.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=state.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, state: DistState) -> int:
    if not state.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj, state: DistState):
    """Rank 0's value of a small picklable object on every rank."""
    if not state.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _decoder_layers(text_model: nn.Module) -> list[nn.Module]:
    return list(text_model.layers)


def apply_activation_checkpointing(text_model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = text_model.layers
    for i, layer in enumerate(list(layers)):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def parallelize(
    model: nn.Module,
    teacher: nn.Module | None,
    state: DistState,
    *,
    activation_checkpointing: bool = False,
    bf16: bool = False,
) -> None:
    """Shard student (and teacher) with FSDP2 in place; a no-op for FSDP on a single process.

    ``model`` is an ``OrionModel``; ``teacher`` a ``KLTeacher`` (or None).
    With ``bf16`` the sharded parameters are all-gathered in bf16 and gradients reduced in fp32.
    """
    text_model = model.backbone.model.language_model
    if activation_checkpointing:
        apply_activation_checkpointing(text_model)
    if not state.distributed:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(state.device.type, (state.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for layer in _decoder_layers(text_model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    # The training step runs the frozen tower once per step, outside the model's forward
    # (``train.step.encode_step_images``): FSDP must gather the root unit's shards for that call too.
    register_fsdp_forward_method(model, "encode_images")
    if teacher is not None:  # a KLTeacher
        backbone = teacher.backbone
        t_text = backbone.model.language_model
        if backbone.lm_head.weight is t_text.embed_tokens.weight:
            # Tied embeddings: the KL reads the LM head weight directly, so it must stay whole
            # while the embedding table is sharded. The teacher is frozen, so untying changes nothing.
            backbone.lm_head.weight = nn.Parameter(
                backbone.lm_head.weight.detach().clone(), requires_grad=False
            )
        for layer in _decoder_layers(t_text):
            fully_shard(layer, **kwargs)
        # Root unit: embeddings + final norm, gathered around the teacher's forward. The LM head is
        # left out (whole on every rank): the chunked KL reads it outside any forward.
        fully_shard(teacher, ignored_params={backbone.lm_head.weight}, **kwargs)
