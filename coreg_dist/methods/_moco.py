"""The MoCo pieces Co-Reg and PiCO share: a key queue, a key encoder (a frozen copy of a
network, moved by an exponential moving average), and the order that makes a gathered batch
the same as one process's."""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
from torch import nn


def key_encoder(net: nn.Module) -> nn.Module:
    """A copy of `net` that never gets gradients: the momentum (key) encoder."""
    key = copy.deepcopy(net)
    for p in key.parameters():
        p.requires_grad_(False)
    return key


@torch.no_grad()
def copy_to_key(engine, key: nn.Module, net: nn.Module) -> None:
    with engine.full_parameters():       # whole on every rank, even under ZeRO-3
        for pk, pq in zip(key.parameters(), net.parameters()):
            pk.copy_(pq)
    for bk, bq in zip(key.buffers(), net.buffers()):
        bk.copy_(bq)


@torch.no_grad()
def ema_to_key(engine, key: nn.Module, net: nn.Module, m: float) -> None:
    """key <- m key + (1 - m) net (parameters); buffers copied (MoCo, PiCO)."""
    with engine.full_parameters():
        for pk, pq in zip(key.parameters(), net.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
    for bk, bq in zip(key.buffers(), net.buffers()):
        bk.copy_(bq)


class MoCoQueue:
    """A ring buffer of keys with their hard pseudo-labels and P/U flags."""

    def __init__(self, size: int, dim: int, device: str):
        self.feats = torch.zeros(size, dim, device=device)
        self.labels = torch.zeros(size, dtype=torch.long, device=device)
        self.is_p = torch.zeros(size, dtype=torch.bool, device=device)
        self.ptr, self.filled, self.size = 0, 0, size

    def view(self):
        n = self.filled
        return (self.feats[:n], self.labels[:n], self.is_p[:n]) if n else (None, None, None)

    @torch.no_grad()
    def push(self, feats, labels, is_p) -> None:
        n = min(len(feats), self.size)
        feats, labels, is_p = feats[-n:], labels[-n:], is_p[-n:]
        idx = (self.ptr + torch.arange(n, device=self.feats.device)) % self.size
        self.feats[idx], self.labels[idx], self.is_p[idx] = feats, labels, is_p
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def state_dict(self):
        return {"feats": self.feats, "labels": self.labels, "is_p": self.is_p,
                "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, s):
        self.feats.copy_(s["feats"]), self.labels.copy_(s["labels"]), self.is_p.copy_(s["is_p"])
        self.ptr, self.filled = int(s["ptr"]), int(s["filled"])


def canonical_order(per_stream: Dict[str, int], parts: List[str], n_streams: int, world: int) -> torch.Tensor:
    """Index that reorders an all-gathered batch (rank by rank: each rank's parts, each part
    stream by stream) into the order one process holding every stream has (part by part,
    stream by stream), so that queue and prototype updates do not depend on the world size."""
    local = n_streams // world
    rank_rows = sum(per_stream[p] * local for p in parts)
    idx = []
    for p in parts:
        part_off = sum(per_stream[q] * local for q in parts[:parts.index(p)])
        for s in range(n_streams):
            r, j = s % world, s // world
            start = r * rank_rows + part_off + j * per_stream[p]
            idx.extend(range(start, start + per_stream[p]))
    return torch.as_tensor(idx, dtype=torch.long)


