"""Co-Reg (Wang et al., AAAI-25 / arXiv 2506.03229), every component switchable.

    coreg-train --config configs/demo.yaml                              # the full method
    coreg-train --config configs/demo.yaml coreg.contrastive=false      # an ablation

One epoch, after warm-up (method page section 2):
  begin_epoch   co-divide for each network k: weak-view predictions of every sample, [DA],
                masked prediction (kept per sample), division loss, [min-max], 5-epoch history,
                2-component GMM -> w_k and the split P_k / U_k. Both splits before any training.
  plan_epoch    network B trains on the split of A (cross use): |P_A| / batch steps.
  update        co-pseudo-labels (no grad) -> MixUp of 2 strong views of x and u -> L_pseu;
                prototype loss, noisy contrastive loss (after warm_up + feature_start);
                prototype EMA update, MoCo queue, key-encoder EMA.
Warm-up epochs train each network with partial CE + negative entropy on all samples.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from coreg_dist.gmm import fit_gmm_1d, posterior_low_mean
from coreg_dist.losses import (co_guess_unlabeled, distribution_align, division_loss,
                               label_space_loss, linear_rampup, masked_prediction, minmax_normalize,
                               mixup, noisy_supcon_loss, partial_ce, negative_entropy,
                               prototype_loss, refine_labeled, sharpen, update_prototypes)
from coreg_dist.methods.base import (Batch, DataInfo, Method, PoolPasses, Step, register_method,
                                     seeded_generator)
from coreg_dist.state import FieldSpec, SampleState


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


@register_method("coreg")
class CoReg(Method):
    num_networks = 2

    def __init__(self, cfg, info: DataInfo, device: str):
        super().__init__(cfg, info, device)
        c = cfg.coreg
        self.c = c
        # Two networks, same architecture, different initialisation, one optimiser each.
        self.nets = [self.make_network(cfg.run.seed * 2 + 1), self.make_network(cfg.run.seed * 2 + 2)]
        self.opts = [self.make_optimizer(n) for n in self.nets]
        self.keys = [self._key_encoder(n) for n in self.nets]
        self.queues = [MoCoQueue(c.queue_size, cfg.model.proj_dim, device) for _ in self.nets]
        # [C] one set of prototypes shared by both networks; they start at zero.
        self.prototypes = torch.zeros(info.num_classes, cfg.model.proj_dim, device=device)
        self.history_len = 0          # co-divide epochs recorded in the loss history
        K, H = info.num_classes, max(1, c.loss_history)
        fields = {}
        for k in range(2):
            fields[f"pred{k}"] = FieldSpec((K,), "float32", 0.0)   # masked DA prediction of net k
            fields[f"w{k}"] = FieldSpec((), "float32", 1.0)         # GMM clean posterior of net k
            fields[f"hist{k}"] = FieldSpec((H,), "float32", np.nan)  # division-loss history
        self.sample_state = SampleState(fields)
        for shard, keys in zip(info.shard_names, info.shard_keys):
            self.sample_state.add_shard(shard, keys)
        self.few_shot_idx = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ helpers
    def _key_encoder(self, net):
        key = copy.deepcopy(net)
        for p in key.parameters():
            p.requires_grad_(False)
        return key

    @torch.no_grad()
    def _copy_to_key(self, k: int) -> None:
        for pk, pq in zip(self.keys[k].parameters(), self.nets[k].parameters()):
            pk.copy_(pq)
        for bk, bq in zip(self.keys[k].buffers(), self.nets[k].buffers()):
            bk.copy_(bq)

    @torch.no_grad()
    def _ema_key(self, k: int) -> None:
        m = self.c.moco_momentum
        for pk, pq in zip(self.keys[k].parameters(), self.nets[k].parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        for bk, bq in zip(self.keys[k].buffers(), self.nets[k].buffers()):
            bk.copy_(bq)

    def networks(self):
        return self.nets

    def predict_each(self, x):
        out = super().predict_each(x)
        if not self.c.ensemble:
            out.pop("ensemble", None)
        return out

    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.c.warm_up

    def features_on(self, epoch: int) -> bool:
        return epoch >= self.c.warm_up + self.c.feature_start

    def set_few_shot(self, idx: np.ndarray) -> None:
        """Samples with a manual label: Y was made one-hot by the trainer; here they are forced
        into P with w = 1 for both networks [D]."""
        self.few_shot_idx = np.asarray(idx, dtype=np.int64)

    # ------------------------------------------------------------------ co-divide
    @torch.no_grad()
    def begin_epoch(self, epoch, Y_all, true_all, passes: PoolPasses) -> Dict:
        self.epoch = epoch
        self._Y_all = Y_all
        if self.in_warmup(epoch):
            return {}
        for k in range(2):
            self._copy_to_key(k)      # [C] key encoder re-copied at each epoch after warm-up
        metrics = {}
        if not self.c.co_divide:
            for k in range(2):
                self.sample_state.set_all(f"w{k}", np.ones(len(Y_all), np.float32))
                self._store_predictions(k, epoch, passes)
            return self._split_metrics(Y_all, true_all)
        losses = [self._store_predictions(k, epoch, passes) for k in range(2)]
        self.history_len += 1
        for k in range(2):
            metrics.update(self._divide(k, losses[k]))
        metrics.update(self._split_metrics(Y_all, true_all))
        return metrics

    def _store_predictions(self, k: int, epoch: int, passes: PoolPasses) -> np.ndarray:
        """Weak-view predictions of net k on every sample -> [DA] -> masked prediction (kept per
        sample); returns the division loss of every sample."""
        net = self.nets[k]
        net.eval()
        gen = seeded_generator(self.cfg.run.seed, epoch, 100 + k)
        st = self.sample_state
        name = f"pred{k}"
        for idx, x, Y in passes(self.cfg.train.eval_batch_size):
            x = self.weak(x, gen)
            st.scatter(name, idx, F.softmax(self.forward(net, x), dim=1).cpu().numpy())
        probs = torch.from_numpy(st.all(name))
        if self.c.distribution_alignment:
            # The mean over all samples is a global quantity (an all-reduce in multi-rank runs).
            probs = distribution_align(probs, mean=probs.mean(0))
        Y_all = torch.from_numpy(self._Y_all).float()
        st.set_all(name, masked_prediction(probs, Y_all).numpy().astype(np.float32))
        return division_loss(probs, Y_all).numpy()

    def _divide(self, k: int, loss: np.ndarray) -> Dict:
        c, st = self.c, self.sample_state
        if c.minmax_normalize:
            loss = minmax_normalize(loss, loss.min(), loss.max())
        H = max(1, c.loss_history)
        hist = st.all(f"hist{k}")
        hist[:, (self.history_len - 1) % H] = loss
        st.set_all(f"hist{k}", hist)
        avg = np.nanmean(hist, axis=1)
        gmm, info = fit_gmm_1d(avg, max_iter=c.gmm_max_iter, tol=c.gmm_tol, reg_covar=c.gmm_reg_covar)
        w = np.asarray(posterior_low_mean(gmm, avg), dtype=np.float32)
        if len(self.few_shot_idx):
            w[self.few_shot_idx] = 1.0
        st.set_all(f"w{k}", w)
        return {f"gmm_means_net{k + 1}": [float(m) for m in gmm.means],
                f"gmm_iter_net{k + 1}": int(info["n_iter"])}

    def _split_metrics(self, Y_all, true_all) -> Dict:
        """|P|, |U|, pseudo-label accuracy and candidate coverage of each network's split."""
        out = {}
        known = true_all >= 0
        for k in range(2):
            P = self.sample_state.all(f"w{k}") > self.c.p_threshold
            out[f"n_p_net{k + 1}"], out[f"n_u_net{k + 1}"] = int(P.sum()), int((~P).sum())
            if known.any():
                pred = self.sample_state.all(f"pred{k}").argmax(1)
                cover = Y_all[np.arange(len(Y_all)), np.maximum(true_all, 0)]
                for part, m in (("p", P & known), ("u", ~P & known)):
                    if m.any():
                        out[f"{part}_label_acc_net{k + 1}"] = float((pred[m] == true_all[m]).mean())
                        out[f"{part}_coverage_net{k + 1}"] = float(cover[m].mean())
        return out

    # ------------------------------------------------------------------ plan
    def plan_epoch(self, epoch: int, n: int) -> List[Step]:
        self.set_lr(self.opts, epoch)
        rng = np.random.default_rng([self.cfg.run.seed, epoch, 7])
        self.gens = [seeded_generator(self.cfg.run.seed, epoch, 200 + k) for k in range(2)]
        self.mix_rng = np.random.default_rng([self.cfg.run.seed, epoch, 9])
        B = self.cfg.train.batch_size
        steps: List[Step] = []
        if self.in_warmup(epoch):
            for k in range(2):        # [C] warm-up: all samples, batch 2x
                order = rng.permutation(n)
                steps += [Step(k, order[i:i + 2 * B]) for i in range(0, n, 2 * B)]
            return steps
        for b in range(2):
            a = 1 - b if self.c.cross_use else b
            P = np.flatnonzero(self.sample_state.all(f"w{a}") > self.c.p_threshold)
            U = np.flatnonzero(self.sample_state.all(f"w{a}") <= self.c.p_threshold)
            if len(P) == 0:           # degenerate split: learn from all samples as P
                P, U = np.arange(n), np.zeros(0, dtype=np.int64)
            P = rng.permutation(P)
            U = rng.permutation(U)
            n_iter = len(P) // B + 1
            use_u = self.c.use_unlabeled and len(U) > 0
            for i in range(n_iter):
                lab = P[np.arange(i * B, (i + 1) * B) % len(P)]
                unl = U[np.arange(i * B, (i + 1) * B) % len(U)] if use_u else None
                steps.append(Step(b, lab, unl))
        return steps

    # ------------------------------------------------------------------ update
    def update(self, batch: Batch) -> Dict[str, float]:
        if self.in_warmup(self.epoch):
            return self._warmup_step(batch)
        return self._train_step(batch)

    def _step(self, k: int, loss: torch.Tensor) -> None:
        self.opts[k].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[k].step()

    def _warmup_step(self, batch: Batch) -> Dict[str, float]:
        k = batch.step.net
        net = self.nets[k]
        net.train()
        x = self.strong(batch.x, self.gens[k])
        logits = self.forward(net, x)
        lce = partial_ce(logits, batch.Y)
        loss = lce + negative_entropy(logits) if self.c.warmup_neg_entropy else lce
        self._step(k, loss)
        return {"loss/warmup": loss.item(), "loss/pce": lce.item()}

    def _train_step(self, batch: Batch) -> Dict[str, float]:
        c, b = self.c, batch.step.net
        a = 1 - b if c.cross_use else b
        net_b, net_a = self.nets[b], self.nets[a]
        gen = self.gens[b]
        x, Y, u = batch.x, batch.Y, batch.u
        nB = len(x)
        has_u = u is not None
        weak = lambda t: self.weak(t, gen)
        strong = lambda t: self.strong(t, gen)
        idx = batch.step.labeled
        p_masked = torch.from_numpy(self.sample_state.gather(f"pred{a}", idx)).to(x.device)
        w = torch.from_numpy(self.sample_state.gather(f"w{a}", idx)).to(x.device)

        # --- co-pseudo-labels, no grad: [C] the trained network in train mode, the other in eval.
        with torch.no_grad():
            net_b.train()
            net_a.eval()
            xw = [weak(x), weak(x)]
            lb_x1, z_weak = self.forward(net_b, xw[0], with_proj=True)
            pb_x = [F.softmax(lb_x1, 1), F.softmax(self.forward(net_b, xw[1]), 1)]
            if c.co_pseudo_label:
                if c.refine_labeled:
                    tx = refine_labeled(p_masked, w, pb_x, T=c.sharpen_temperature)
                else:
                    tx = sharpen(p_masked, c.sharpen_temperature)
            else:   # the network's own candidate-restricted prediction
                tx = sharpen(masked_prediction((pb_x[0] + pb_x[1]) / 2, Y), c.sharpen_temperature)
            if has_u:
                uw = [weak(u), weak(u)]
                pb_u = [F.softmax(self.forward(net_b, v), 1) for v in uw]
                if c.co_pseudo_label and c.co_guess_unlabeled:
                    pa_u = [F.softmax(self.forward(net_a, v), 1) for v in uw]
                    tu = co_guess_unlabeled(pa_u, pb_u, T=c.sharpen_temperature)
                else:
                    tu = sharpen((pb_u[0] + pb_u[1]) / 2, c.sharpen_temperature)

        # --- label-space consistency: MixUp over two strong views of x and of u.
        net_b.train()
        xs = [strong(x), strong(x)]
        us = [strong(u), strong(u)] if has_u else []
        inputs = torch.cat(xs + us)
        targets = torch.cat([tx, tx] + ([tu, tu] if has_u else []))
        if c.mixup:
            inputs, targets, lam, _ = mixup(inputs, targets, alpha=c.mixup_alpha, generator=gen,
                                            rng=self.mix_rng)
        nl = 2 * nB
        feats_on = self.features_on(self.epoch)
        want_z = feats_on and c.prototypes
        out = self.forward(net_b, inputs, with_proj=want_z)
        logits, z_mix = out if want_z else (out, None)
        ramp = linear_rampup(self.epoch - c.warm_up, c.rampup_epochs)
        empty = logits[:0]
        loss, lx, lu = label_space_loss(logits[:nl], targets[:nl],
                                        logits[nl:] if has_u else empty,
                                        targets[nl:] if has_u else targets[:0],
                                        c.lambda_u, ramp)
        logs = {"loss/x": lx.item(), "loss/u": lu.item()}

        # --- feature-space consistency.
        hard = torch.cat([tx] + ([tu] if has_u else [])).argmax(1)
        is_p = torch.cat([torch.ones(nB, dtype=torch.bool, device=x.device)] +
                         ([torch.zeros(len(u), dtype=torch.bool, device=x.device)] if has_u else []))
        if want_z:
            is_lab = torch.zeros(len(inputs), dtype=torch.bool, device=x.device)
            is_lab[:nl] = True
            lp = prototype_loss(z_mix, self.prototypes, targets, is_lab, T=c.proto_temperature,
                                lambda_u=c.lambda_u)
            loss = loss + c.proto_weight * lp
            logs["loss/proto"] = lp.item()
        keys = None
        if c.contrastive:
            with torch.no_grad():
                self.keys[b].train()
                _, keys = self.forward(self.keys[b], torch.cat([xs[1]] + ([us[1]] if has_u else [])),
                                       with_proj=True)
            if feats_on:
                # queries: strong view 1 with gradient; keys: EMA encoder on strong view 2.
                _, q = self.forward(net_b, torch.cat([xs[0]] + ([us[0]] if has_u else [])),
                                    with_proj=True)
                qf, ql, qp = self.queues[b].view()
                lc = noisy_supcon_loss(q, keys, qf, hard, is_p, ql, qp, T=c.cont_temperature,
                                       noisy=c.noisy_contrastive)
                loss = loss + c.cont_weight * lc
                logs["loss/cont"] = lc.item()
        self._step(b, loss)
        logs["loss/total"] = loss.item()

        with torch.no_grad():
            if c.prototypes:          # weak-view features of the P samples
                self.prototypes = update_prototypes(self.prototypes, z_weak, tx, m=c.proto_momentum)
            if c.contrastive:
                self.queues[b].push(keys, hard, is_p)
                self._ema_key(b)
        if batch.true is not None:
            logs["pseudo_acc_x"] = float((tx.argmax(1) == batch.true).float().mean())
        return logs

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict:
        return {"nets": [n.state_dict() for n in self.nets],
                "opts": [o.state_dict() for o in self.opts],
                "keys": [k.state_dict() for k in self.keys],
                "queues": [q.state_dict() for q in self.queues],
                "prototypes": self.prototypes, "history_len": self.history_len,
                "few_shot_idx": self.few_shot_idx}

    def load_state_dict(self, s: Dict) -> None:
        for i in range(2):
            self.nets[i].load_state_dict(s["nets"][i])
            self.opts[i].load_state_dict(s["opts"][i])
            self.keys[i].load_state_dict(s["keys"][i])
            self.queues[i].load_state_dict(s["queues"][i])
        self.prototypes = s["prototypes"].to(self.device)
        self.history_len = int(s["history_len"])
        self.few_shot_idx = np.asarray(s["few_shot_idx"], dtype=np.int64)
