"""The algorithm interface shared by Co-Reg and every baseline (DomainBed / PLENCH style).

The trainer owns data, engines (backward, gradient sync, optimizer and LR steps), evaluation,
checkpoints and logs; a method owns its networks and per-sample state and answers:

  state_fields()                     per-sample state it keeps (FieldSpec per name)
  begin_epoch(epoch, ctx)            the per-epoch sweep (Co-Reg: co-divide) -> metrics
  plan_epoch(epoch, ctx)             its passes: which network, how many steps, and how samples
                                     route into each batch part (a predicate on the state,
                                     e.g. "w2 > 0.5" = P of network 2)   -> [PassSpec]
  update(batch)                      the losses of one step             -> StepOutput
                                     (with `writes`: new per-sample rows of `step_state`
                                     fields, e.g. PRODEN's confidences, seen next epoch)
  after_step(batch, out)             updates after the optimizer step (EMA, queues, prototypes)
  predict_each(x)                    logits for evaluation
  state_dict() / load_state_dict()   everything but the optimizers and the per-sample state

Randomness of a step is per stream (`batch.rng.gens[i]` for the i-th local stream) plus one
generator every rank shares (`batch.rng.shared`), so a batch is augmented the same way whether
its streams sit on one rank or several. `per_stream(fn, x, part, batch)` applies a batched
augmentation chunk by chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from coreg_dist.augment import RANDAUG_OPS, strong_augment, weak_augment
from coreg_dist.data.stream import PassSpec, Route, seed_of
from coreg_dist.methods._moco import canonical_order
from coreg_dist.methods.registry import get_method, list_methods, register_method  # noqa: F401
from coreg_dist.models import build_network
from coreg_dist.state import FieldSpec


@dataclass
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int = 0                 # training samples (global), known before the first epoch
    flip: bool = True                  # horizontal flips preserve the class (train.flip)


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    return g


class PassRng:
    """The random streams of one pass on this rank: a torch generator per local stream and one
    numpy generator identical on every rank. Seeds come from (seed, epoch, pass, stream)."""

    def __init__(self, seed: int, epoch: int, pass_index: int, streams: List[int], n_streams: int):
        self.streams, self.n_streams = list(streams), n_streams
        self.gens = [make_generator(seed_of(seed, epoch, pass_index, s, 7)) for s in self.streams]
        self.shared = np.random.default_rng(seed_of(seed, epoch, pass_index, 9))

    def state_dict(self) -> Dict:
        return {"streams": self.streams, "gens": [g.get_state() for g in self.gens],
                "shared": self.shared.bit_generator.state}

    def load_state_dict(self, s: Dict) -> None:
        if list(s["streams"]) != self.streams:
            raise ValueError(f"random state saved for streams {s['streams']}, this rank has {self.streams}")
        for g, st in zip(self.gens, s["gens"]):
            g.set_state(st)
        self.shared.bit_generator.state = s["shared"]


@dataclass
class BatchPart:
    x: torch.Tensor                    # (n, C, H, W) float in [0, 1] on the device
    Y: Optional[torch.Tensor]          # (n, K) float candidate multi-hot
    true: torch.Tensor                 # (n,) long, -1 unknown (logging only, never learning)
    keys: List[str]
    attach: Dict[str, torch.Tensor] = field(default_factory=dict)
    soft: Optional[torch.Tensor] = None  # (n, K) the annotators' mean distribution (soft_labels)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Batch:
    spec: PassSpec
    epoch: int
    step: int                          # step within the pass
    parts: Dict[str, BatchPart]
    sizes: Dict[str, List[int]]        # per part: rows contributed by each local stream
    rng: PassRng
    progress: float = 0.0              # step / steps of the pass, for within-epoch ramps


@dataclass
class StepOutput:
    net: int                           # the network whose engine steps
    loss: torch.Tensor
    logs: Dict[str, float] = field(default_factory=dict)
    extra: Dict = field(default_factory=dict)      # what after_step needs
    # New per-sample state rows of this step's samples (the fields in `Method.step_state`):
    # {part: {field: (n, C) dense rows for a per-candidate field, (n, ...) otherwise}}. They are
    # read back from the next epoch on (train/step_writes.py).
    writes: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)


def per_stream(fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], x: torch.Tensor,
               sizes: List[int], gens: List[torch.Generator]) -> torch.Tensor:
    """Apply a batched random op stream by stream, each chunk with its stream's generator."""
    if len(sizes) == 1:
        return fn(x, gens[0])
    return torch.cat([fn(c, g) for c, g in zip(x.split(sizes), gens)])


class Method:
    name = ""
    num_networks = 1
    step_state: tuple = ()             # state fields its steps write (StepOutput.writes)
    soft_labels = False                # true: batches carry the column's scores (BatchPart.soft)

    def __init__(self, cfg, info: DataInfo, device: str, coll):
        self.cfg, self.info, self.device, self.coll = cfg, info, device, coll
        self.engines: List = []
        self.epoch = 0

    # ------------------------------------------------------------------ shared helpers
    def make_network(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = build_network(self.cfg.model.backbone, self.info.num_classes, self.info.in_channels,
                            self.info.image_size, proj_dim=self.cfg.model.proj_dim)
        net = net.to(self.device)
        if self.cfg.model.sync_bn:        # after .to(): on CUDA torch's SyncBatchNorm, else ours
            from coreg_dist.models.sync_bn import convert_sync_batchnorm
            net = convert_sync_batchnorm(net)
        if self.cfg.model.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def attach_engines(self, engines: List) -> None:
        self.engines = list(engines)

    def lr_at(self, epoch: int) -> float:
        """Cosine from lr to lr * lr_min_ratio over lr_period epochs ([C] 800; 0 = the run)."""
        t = self.cfg.train
        period = t.lr_period or t.epochs
        lo = t.lr * t.lr_min_ratio
        return lo + (t.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(epoch, period) / period))

    def weak(self, batch: Batch, part: str, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = batch.parts[part].x if x is None else x
        t = self.cfg.train
        return per_stream(lambda c, g: weak_augment(c, pad=t.crop_pad, flip=self.info.flip, generator=g),
                          x, batch.sizes[part], batch.rng.gens)

    def strong(self, batch: Batch, part: str, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = batch.parts[part].x if x is None else x
        t = self.cfg.train
        ops = tuple(t.randaug_list) or RANDAUG_OPS     # empty list = every op
        return per_stream(lambda c, g: strong_augment(c, pad=t.crop_pad, flip=self.info.flip,
                                                      n_ops=t.randaug_ops,
                                                      cutout=None if t.cutout < 0 else t.cutout,
                                                      cutout_fill=float(t.cutout_fill), ops=ops,
                                                      generator=g),
                          x, batch.sizes[part], batch.rng.gens)

    def weak_one(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Weak view of a sweep batch (one generator: the shard's)."""
        return weak_augment(x, pad=self.cfg.train.crop_pad, flip=self.info.flip, generator=gen)

    # ------------------------------------------------------------------ global batches
    def _canonical(self, batch: Batch, parts: List[str]):
        """(order, anchors) for `parts`, cached per pass: `order` reorders an all-gathered batch
        the way one process holds it; `anchors` = where this rank's rows land in it."""
        key = tuple(parts)
        cache = getattr(self, "_order", None)
        if cache is None or cache[0] is not batch.spec:
            cache = self._order = (batch.spec, {})
        if key not in cache[1]:
            W, r = self.coll.world_size, self.coll.rank
            per = {p: batch.sizes[p][0] for p in parts}
            order = canonical_order(per, parts, batch.rng.n_streams, W)
            where = torch.empty_like(order)
            where[order] = torch.arange(len(order))
            n = len(order) // W
            cache[1][key] = (order.to(self.device), where[r * n:(r + 1) * n].to(self.device))
        return cache[1][key]

    def gather_rows(self, t: torch.Tensor, batch: Batch, parts: List[str], grad: bool = False) -> torch.Tensor:
        """All ranks' rows of `parts` (t: this rank's, in part then stream order), in the order
        one process would hold them: queue and prototype updates do not depend on the world size."""
        out = self.coll.all_gather(t, grad=grad)
        if not self.coll.distributed:
            return out
        return out[self._canonical(batch, parts)[0]]

    def own_rows(self, batch: Batch, parts: List[str]) -> Optional[torch.Tensor]:
        """Where this rank's rows sit in `gather_rows`' result (None in one process)."""
        return self._canonical(batch, parts)[1] if self.coll.distributed else None

    def forward(self, k: int, x: torch.Tensor, with_proj: bool = False, module: nn.Module = None):
        return self.engines[k].forward(x, with_proj=with_proj, module=module)

    # ------------------------------------------------------------------ interface
    def state_fields(self) -> Dict[str, FieldSpec]:
        return {}

    def begin_epoch(self, epoch: int, ctx) -> Dict:
        self.epoch = epoch
        return {}

    def plan_epoch(self, epoch: int, ctx) -> List[PassSpec]:
        """Default: one pass over every sample per epoch, batch B, network 0."""
        B = self.cfg.train.batch_size
        return [PassSpec("train", 0, steps=max(1, math.ceil(ctx.num_train / B)), routes=(Route("x", B),))]

    def begin_pass(self, spec: PassSpec) -> None:
        pass

    def update(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def after_step(self, batch: Batch, out: StepOutput) -> None:
        pass

    def networks(self) -> List[nn.Module]:
        raise NotImplementedError

    def modules(self) -> List[nn.Module]:
        """Every module with state (networks, and e.g. EMA key encoders)."""
        return self.networks()

    def rank_buffers(self) -> List[Dict[str, torch.Tensor]]:
        """This rank's buffers (BatchNorm running statistics evolve per rank between the points
        where the trainer averages them): a mid-epoch checkpoint keeps each rank's own."""
        return [{n: b.detach().clone() for n, b in m.named_buffers()} for m in self.modules()]

    @torch.no_grad()
    def load_rank_buffers(self, saved: List[Dict[str, torch.Tensor]]) -> None:
        for m, bufs in zip(self.modules(), saved):
            for n, b in m.named_buffers():
                b.copy_(bufs[n])

    @torch.no_grad()
    def predict_each(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Logits of each network (and their ensemble, where there are two)."""
        out = {}
        for i, net in enumerate(self.networks()):
            net.eval()
            out[f"net{i + 1}"] = self.forward(i, x)
        if len(out) > 1:
            out["ensemble"] = sum(out.values())
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        each = self.predict_each(x)
        return each.get("ensemble", each["net1"])

    def state_dict(self) -> Dict:
        return {"nets": [n.state_dict() for n in self.networks()]}

    def load_state_dict(self, state: Dict) -> None:
        for n, s in zip(self.networks(), state["nets"]):
            n.load_state_dict(s)


def build_method(name: str, cfg, info: DataInfo, device: str, coll) -> Method:
    return get_method(name)(cfg, info, device, coll)


__all__ = ["Batch", "BatchPart", "DataInfo", "Method", "PassRng", "StepOutput", "build_method",
           "list_methods", "per_stream", "register_method"]
