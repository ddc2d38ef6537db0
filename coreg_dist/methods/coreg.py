"""Co-Reg (Wang et al., AAAI-25 / arXiv 2506.03229), every component switchable.

    coreg-train --config configs/demo.yaml                              # the full method
    coreg-train --config configs/demo.yaml coreg.contrastive=false      # an ablation
    torchrun --nproc_per_node=2 -m train.cli --config configs/demo.yaml # the same on 2 ranks

One epoch, after warm-up (docs/coreg-method.md section 2):
  begin_epoch   co-divide, a streamed sweep over the rank's shards for both networks: weak-view
                predictions -> [DA with the all-reduced mean] -> masked prediction and division
                loss into each shard's state -> [min-max with the all-reduced min/max] -> history
                -> 2-component GMM fitted on all ranks' losses (all-reduced sufficient statistics)
                -> w_k and the split P_k / U_k in the state. Both splits before any training.
                The first one also counts the candidate sets' pairs (their companion share):
                with co_divide=auto (the default) sets that are habitual groups are not divided
                (every sample P, w = 1), nor with co_divide=false.
  plan_epoch    network B trains on the split of A (cross use): |P_A| / B + 1 steps; each batch
                takes B samples routed by "w_A > 0.5" (P) and B by "w_A <= 0.5" (U).
  update        co-pseudo-labels (no grad; P's from A's committed prediction refined by B's;
                p_refine switches to B's own) -> MixUp of 2 strong views of x and u -> L_pseu;
                prototype loss, noisy contrastive loss (after warm_up + feature_start) over the
                global batch (queries gathered with their gradient).
  after_step    prototype EMA and MoCo queue from all ranks' samples, key-encoder EMA.
Warm-up epochs train each network with partial CE + negative entropy on all samples.

Distributed: every global quantity goes through the collectives object (`self.coll`); with
`data.streams` fixed and `model.sync_bn=true`, one process and W ranks train the same networks
(up to float summation order): augmentation and MixUp draw per stream, the contrastive loss sees
the global batch, prototypes and queues are updated with every rank's samples in rank order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from coreg_dist.config import ConfigError
from coreg_dist.data.stream import PassSpec, Route
from coreg_dist.gmm import fit_gmm_1d, posterior_low_mean
from coreg_dist.labels import CandidatePairs
from coreg_dist.losses import (co_guess_unlabeled, distribution_align, division_loss,
                               label_space_loss, linear_rampup, masked_prediction, minmax_normalize,
                               mixup, negative_entropy, noisy_supcon_loss, partial_ce,
                               prototype_loss, refine_labeled, sharpen, update_prototypes,
                               weigh_outside)
from coreg_dist.methods._moco import MoCoQueue, copy_to_key, ema_to_key, key_encoder
from coreg_dist.methods.base import Batch, DataInfo, Method, StepOutput
from coreg_dist.methods.registry import register_method
from coreg_dist.output_prior import candidate_mass, target_prior
from coreg_dist.state import FieldSpec


@dataclass
class CoRegConfig:
    """Every Co-Reg component, switchable for the paper's ablations. Defaults follow the authors'
    code except the robustness switches (divide_per_class, the weak single-batch warm-up,
    pce_weight on P, MixUp off, co_divide by the candidate sets) chosen on the benchmark grid
    (README, "Robustness"); configs/coreg-published.yaml sets them back to the published method."""
    warm_up: int = 10                 # epochs of partial-CE warm-up
    warmup_neg_entropy: bool = True
    # The authors warm up on strong views with twice the batch: fine for 50 epochs of 60,000
    # images, but a 4,000-image pool then gets 32 steps per epoch and ends the warm-up at 60%
    # where partial CE on weak views is at 70% (docs/robustness.md). Weak views, one batch: as
    # partial CE.
    warmup_view: str = "weak"         # weak | strong (the authors): the warm-up's augmentation
    warmup_batch_factor: int = 1      # warm-up batch = this x train.batch_size ([C] 2)
    label_space_view: str = "strong"  # [C] strong: MixUp over two new strong views | weak: over
                                      # the two weak views the pseudo-labels came from (DivideMix)
    divide_view: str = "weak"         # the co-divide sweep's input: weak view | none (DivideMix's
                                      # eval_train: the image as it is)
    # co-divide
    # true (the published method) | false: every sample is P with w = 1 | auto (the default): false
    # where the candidate sets are ambiguous, true elsewhere. Ambiguous: habitual groups
    # (companion share, labels.CandidatePairs, at least auto_share) or large (at least
    # auto_set_size candidates on average), both measured at the first co-divide. There the
    # division loss, -log of the largest candidate probability, measures how far the networks
    # are from choosing among the candidates, not whether the set is wrong: the GMM sends clean
    # sets to U, where they lose them. Measured (docs/robustness.md): not dividing gains 1.9
    # points on CLIP
    # top-3 (share 0.74, 3.0 candidates), 0.5 on synthetic q=0.25 (3.25) and 1.3 on a held-out
    # column (4.15, configs/grids/heldout.yaml), on 12 epochs; on 20 epochs of q=0.25 (the
    # reproduction cell) dividing was 1.0 ahead: long schedules may want true. On the sets of
    # 1.45-1.63 candidates dividing is level or ahead, and auto trains exactly as true there.
    co_divide: Any = "auto"
    # When a network's division starts: epoch (the published method: at the first co-divide,
    # warm_up) | separated (from the first co-divide whose GMM components are at least
    # divide_separation apart, Ashman's D, GMM1D.separation; until then every sample is P with
    # w = 1, as co_divide=false; once started it stays on). The GMM is fitted, and the loss
    # history kept, from warm_up either way. Measured (README, seed 0): on CLIP top-3 D fell
    # from 2.2 to 1.6 while the networks trained undivided, so it never started; on the CLIP
    # union it stays below 2.5; eta 0.3 starts at once. Not the default.
    divide_start: str = "epoch"
    divide_separation: float = 2.5
    distribution_alignment: bool = True
    da_prior: str = "uniform"         # DA's target distribution: uniform (the authors' default) |
                                      # candidates (the mean of each sample's candidate set spread
                                      # evenly over it: the annotators' class balance)
    da_prior_temperature: float = 1.0 # prior <- normalise(prior ** this) (the authors' prior_T)
    # The loss the GMM divides on: max (the authors': -log of the largest candidate probability)
    # | sum (-log of the mass on the candidate set: an ambiguous set whose mass stays inside is
    # not taken for noise; max sends such clean samples to U, where they lose their set).
    division_loss: str = "max"
    minmax_normalize: bool = True
    loss_history: int = 5             # epochs of division loss averaged
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    p_threshold: float = 0.5
    # Off in the published method. Measured (docs/robustness.md): on Fashion-MNIST the division
    # loss of easy
    # classes (trousers, sandals, sneakers) is far below that of hard ones (T-shirt, coat, shirt),
    # so one GMM over all samples puts almost no hard-class sample in P and those classes are
    # forgotten within an epoch. With this switch each sample's loss is min-max normalised within
    # its pseudo-class (the masked argmax) before the GMM: every class keeps its cleanest samples.
    divide_per_class: bool = True
    cross_use: bool = True            # false: each network trains on its own split
    # co-pseudo-labels
    # true (the published method) | false: targets from the network's own predictions only |
    # auto: false where the candidate sets are not habitual groups (their companion share,
    # measured as for p_refine=auto, below auto_share), true where they are. Measured
    # (docs/robustness.md):
    # own targets gain on the CLIP union and the 6-epoch demo cell (shares 0.44) and are level on
    # the synthetic columns, but collapse Co-Reg on CLIP top-3 (share 0.74). Not the default:
    # `make demo`'s 9 epochs ended 2.1 points below true.
    co_pseudo_label: Any = True
    refine_labeled: bool = True
    # P's refinement w * p_masked + (1 - w) * p_B: all (the published method: network B's
    # prediction over every class) | candidates (B's prediction restricted to S, as
    # co_divide=false's targets are) | own (B's current prediction restricted to S alone, as
    # with co_pseudo_label=false, while U keeps its co-guesses: p_masked is A's prediction
    # committed at the epoch's co-divide, an epoch old by its end) | own_aligned (own, after
    # distribution alignment with B's mean prediction of this epoch's co-divide, as p_masked is;
    # with distribution_alignment=false it is own) | auto (own_aligned, or all where the candidate
    # sets are habitual groups: their companion share, labels.CandidatePairs, measured over every
    # rank at the first co-divide, at least auto_share). Measured (docs/robustness.md): own_aligned
    # is the best P target on the CLIP union and level on the synthetic columns (shares 0.09-0.44)
    # but collapses on CLIP top-3 (share 0.74), where A's committed prediction carries Co-Reg.
    # Not the default: on `make demo`'s 9 epochs its accuracy swung 2 points from epoch to epoch
    # and ended 2.2 below all's.
    p_refine: str = "all"
    # The companion share from which the sets count as habitual groups: there the auto switches
    # keep the published targets (p_refine, co_pseudo_label) and do not divide (co_divide).
    auto_share: float = 0.6
    auto_set_size: float = 2.5        # co_divide=auto: from this many candidates per set on
                                      # average, no division (0: off, the share alone decides)
    co_guess_unlabeled: bool = True
    sharpen_temperature: float = 0.5
    use_unlabeled: bool = True        # false: discard U (ablation)
    # U's co-guesses: all (the published method: over every class) | candidates (restricted to
    # S) | adaptive (classes outside S weighted by lambda = the share of U whose prediction lies
    # outside S at this epoch's co-divide: label-free, measured per network on every rank).
    # Measured (docs/robustness.md): restriction helps where U's sets mostly hold the label (CLIP
    # top-3:
    # 16% of U predicted outside S) and costs where they do not (CLIP union: 49%).
    u_guess: str = "all"
    # Off in the published method (0). A partial-CE term on the weak views of the P batch (and of
    # U with pce_unlabeled) next to the pseudo-label losses: each sample is pulled toward its set
    # while the networks are still weak, so Co-Reg never learns less than partial CE does on
    # short schedules of small collections (docs/robustness.md).
    pce_weight: float = 1.0
    pce_unlabeled: bool = False       # the term on U too (off: P only; U's candidate sets are
                                      # mostly wrong: U is where co-divide puts the noisy sets)
    # label space
    # [C] on: MixUp (alpha 4) over P and U. Off here: on the grid's short schedules it slowed
    # learning in 3 of the 4 columns (docs/robustness.md; it pays on the CLIP union, +0.3 to
    # +0.6); configs/coreg-published.yaml turns it back on.
    mixup: bool = False
    mixup_alpha: float = 4.0
    lambda_u: float = 1.0
    rampup_epochs: int = 16
    # feature space
    feature_start: int = 10           # feature terms back-propagated after warm_up + this many epochs
    prototypes: bool = True
    proto_weight: float = 0.1
    proto_temperature: float = 0.3
    proto_momentum: float = 0.999
    contrastive: bool = True
    noisy_contrastive: bool = True    # false: plain SupCon masks (ablation)
    cont_weight: float = 0.1
    cont_temperature: float = 0.07
    queue_size: int = 8192
    moco_momentum: float = 0.999
    ensemble: bool = True             # predict with logits_1 + logits_2




@register_method("coreg", config=CoRegConfig)
class CoReg(Method):
    num_networks = 2

    def __init__(self, cfg, info: DataInfo, device: str, coll):
        super().__init__(cfg, info, device, coll)
        c = getattr(cfg, self.name)   # this method's section: coreg, or a subclass's (dividemix)
        self.c = c
        for key, value, allowed in (("warmup_view", c.warmup_view, ("strong", "weak")),
                                    ("label_space_view", c.label_space_view, ("strong", "weak")),
                                    ("divide_view", c.divide_view, ("weak", "none")),
                                    ("u_guess", c.u_guess, ("all", "candidates", "adaptive")),
                                    ("p_refine", c.p_refine, ("all", "candidates", "own", "own_aligned", "auto")),
                                    ("da_prior", c.da_prior, ("uniform", "candidates")),
                                    ("divide_start", c.divide_start, ("epoch", "separated")),
                                    ("division_loss", c.division_loss, ("max", "sum"))):
            if value not in allowed:
                raise ConfigError(f"config key '{self.name}.{key}': unknown value '{value}' "
                                  f"({' | '.join(allowed)})")
        for key in ("co_divide", "co_pseudo_label"):
            value = c[key]
            if not (value is True or value is False or value == "auto"):
                raise ConfigError(f"config key '{self.name}.{key}': unknown value '{value}' "
                                  "(true | false | auto)")
        if c.warmup_batch_factor < 1:
            raise ConfigError(f"config key '{self.name}.warmup_batch_factor': {c.warmup_batch_factor} "
                              "(>= 1)")
        # Two networks, same architecture, different initialisation, one engine each.
        self.nets = [self.make_network(cfg.run.seed * 2 + 1), self.make_network(cfg.run.seed * 2 + 2)]
        self.keys = [key_encoder(n) for n in self.nets]
        self.queues = [MoCoQueue(c.queue_size, cfg.model.proj_dim, device) for _ in self.nets]
        # [C] one set of prototypes shared by both networks; they start at zero.
        self.prototypes = torch.zeros(info.num_classes, cfg.model.proj_dim, device=device)
        self.u_outside_weight = [1.0, 1.0]   # set by plan_epoch from the split's totals
        self.history_len = 0          # co-divide epochs recorded in the loss history
        self.da_mean, self.da_prior = [None, None], None   # set by each co-divide (begin_epoch)
        # the auto switches' readings of the candidate sets: measured at the first co-divide, kept
        self.companion_share, self.mean_set_size = None, None
        self.dividing = [c.divide_start == "epoch"] * 2   # coreg.divide_start: started, per network

    def state_fields(self) -> Dict[str, FieldSpec]:
        H = max(1, self.c.loss_history)
        fields = {"cover": FieldSpec((), "int8", -1)}            # true label in S (-1 unknown)
        for k in range(2):
            fields[f"pred{k}"] = FieldSpec(dtype="float32", per_candidate=True)  # masked DA prediction
            fields[f"w{k}"] = FieldSpec((), "float32", 1.0)        # GMM clean posterior of net k
            fields[f"hist{k}"] = FieldSpec((H,), "float32", np.nan)  # normalised division-loss history
            fields[f"loss{k}"] = FieldSpec((), "float32", np.nan)    # this epoch's division loss
            fields[f"avg{k}"] = FieldSpec((), "float32", np.nan)     # history mean: the GMM's input
            fields[f"hit{k}"] = FieldSpec((), "int8", -1)            # masked argmax == true label
            fields[f"plab{k}"] = FieldSpec((), "int32", -1)          # masked argmax (pseudo-class)
            # The unrestricted argmax (what U's co-guess follows): inside S or not, and right or
            # not, for the authors' in-/out-of-candidate accuracy of U.
            fields[f"uin{k}"] = FieldSpec((), "int8", -1)
            fields[f"uhit{k}"] = FieldSpec((), "int8", -1)
        return fields

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def _copy_to_key(self, k: int) -> None:
        copy_to_key(self.engines[k], self.keys[k], self.nets[k])

    @torch.no_grad()
    def _ema_key(self, k: int) -> None:
        ema_to_key(self.engines[k], self.keys[k], self.nets[k], self.c.moco_momentum)

    def networks(self):
        return self.nets

    def modules(self):
        return self.nets + self.keys

    def predict_each(self, x):
        out = super().predict_each(x)
        if not self.c.ensemble:
            out.pop("ensemble", None)
        return out

    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.c.warm_up

    def features_on(self, epoch: int) -> bool:
        return epoch >= self.c.warm_up + self.c.feature_start

    # ------------------------------------------------------------------ co-divide
    @torch.no_grad()
    def begin_epoch(self, epoch: int, ctx) -> Dict:
        self.epoch = epoch
        if self.in_warmup(epoch):
            return {}
        for k in range(2):
            self._copy_to_key(k)      # [C] key encoder re-copied at each epoch after warm-up
            self.nets[k].eval()
        c, K = self.c, self.info.num_classes
        update = ctx.state_update(reset=("loss0", "loss1", "hit0", "hit1", "cover",
                                         "uin0", "uin1", "uhit0", "uhit1"))
        # DA's statistics of this co-divide, kept for the epoch (coreg.p_refine=own_aligned)
        self.da_mean, self.da_prior = [None, None], None
        if c.distribution_alignment:
            # The DA mean is over every sample of every rank: one sweep for the sums first.
            sums, n = np.zeros((3, K)), 0          # net 1, net 2, candidate sets
            for item in ctx.sweep(tag=100):
                if not len(item.part):
                    continue
                for k in range(2):
                    p = F.softmax(self.forward(k, self._divide_input(item.part.x, item.generator(k))), 1)
                    sums[k] += p.sum(0).double().cpu().numpy()
                if c.da_prior == "candidates":
                    sums[2] += candidate_mass(item.part.Y)
                n += len(item.part)
            sums, n = self.coll.sum(sums), self.coll.sum(n)
            self.da_mean = [torch.as_tensor(sums[k] / max(n, 1), dtype=torch.float32, device=self.device)
                            for k in range(2)]
            self.da_prior = self._da_prior(sums[2])
        # Per pseudo-class min / max of the division loss (coreg.divide_per_class), kept while
        # sweeping: no second pass over the state files.
        cls_lo, cls_hi = np.full((2, K), np.inf), np.full((2, K), -np.inf)
        # the auto switches: the sets' companion share and size, counted once, in this sweep (no
        # pass of its own); again after a checkpoint that predates the size, which has the share
        pairs = CandidatePairs(K) if self._reads_sets and self.mean_set_size is None else None
        for item in ctx.sweep(tag=100):          # the same generators: the same weak views
            part, values = item.part, {}
            if len(part):
                Y = part.Y
                if pairs is not None:
                    pairs.add(Y.cpu().numpy())
                known = part.true >= 0
                cover = Y[torch.arange(len(part), device=Y.device), part.true.clamp_min(0)] > 0
                values["cover"] = torch.where(known, cover.to(torch.int8), torch.full_like(cover, -1, dtype=torch.int8))
                for k in range(2):
                    p = F.softmax(self.forward(k, self._divide_input(part.x, item.generator(k))), 1)
                    if self.da_mean[k] is not None:
                        p = distribution_align(p, prior=self.da_prior, mean=self.da_mean[k])
                    masked = masked_prediction(p, Y)
                    values[f"pred{k}"] = masked[Y > 0]            # per candidate, in class order
                    values[f"loss{k}"] = division_loss(p, Y, reduce=c.division_loss)
                    values[f"plab{k}"] = masked.argmax(1).to(torch.int32)
                    hit = (values[f"plab{k}"] == part.true).to(torch.int8)
                    values[f"hit{k}"] = torch.where(known, hit, torch.full_like(hit, -1))
                    top = p.argmax(1)
                    values[f"uin{k}"] = (Y.gather(1, top[:, None])[:, 0] > 0).to(torch.int8)
                    uhit = (top == part.true).to(torch.int8)
                    values[f"uhit{k}"] = torch.where(known, uhit, torch.full_like(uhit, -1))
            values = {n: v.cpu().numpy() for n, v in values.items()}
            if c.divide_per_class and len(part):
                for k in range(2):
                    cls, loss = values[f"plab{k}"], values[f"loss{k}"]
                    ok = np.isfinite(loss)
                    np.minimum.at(cls_lo[k], cls[ok], loss[ok])
                    np.maximum.at(cls_hi[k], cls[ok], loss[ok])
            update.put(item.shard, part.keys, values)
            if item.last:
                update.end_shard(item.shard)
        update.finish_sweep()
        metrics = {}
        if pairs is not None:
            pairs.all_reduce(self.coll)
            self.companion_share = pairs.companion_share()
            self.mean_set_size = pairs.mean_set_size()
        if self._reads_sets:
            metrics.update(companion_share=self.companion_share, mean_set_size=self.mean_set_size)
        if c.p_refine == "auto":
            metrics["p_refine_own"] = int(self.p_refine_mode != "all")
        if c.co_pseudo_label == "auto":
            metrics["co_pseudo_label"] = int(self.co_pseudo_label_on)
        if c.co_divide == "auto":
            metrics["co_divide"] = int(self.co_divide_on)
        if self.co_divide_on:
            self.history_len += 1
            for k in range(2):
                metrics.update(self._divide(k, update, (cls_lo[k], cls_hi[k])))
        else:
            self._all_in_p(update, range(2))
        thr = c.p_threshold
        totals = update.commit(lambda st: self._shard_counts(st, thr))
        metrics.update(self._split_metrics(totals))
        return metrics

    @property
    def _reads_sets(self) -> bool:
        """Whether a switch is auto: then the first co-divide reads the candidate sets."""
        return "auto" in (self.c.p_refine, self.c.co_pseudo_label, self.c.co_divide)

    def _resolve(self, key: str, ambiguous, plain, by_size: bool = False):
        """coreg.<key>, with auto resolved by the candidate sets read at the first co-divide:
        `ambiguous` where they are habitual groups (companion share at least coreg.auto_share;
        with by_size also where they hold coreg.auto_set_size candidates or more on average, if
        that is > 0), `plain` elsewhere. Among habitual groups the co-pseudo-labels carry Co-Reg;
        on habitual or large sets dividing costs."""
        value = self.c[key]
        if value != "auto":
            return value
        if self.companion_share is None:
            raise RuntimeError(f"coreg.{key}=auto is resolved at the first co-divide")
        large = by_size and 0 < self.c.auto_set_size <= self.mean_set_size
        return ambiguous if self.companion_share >= self.c.auto_share or large else plain

    @property
    def p_refine_mode(self) -> str:
        return self._resolve("p_refine", "all", "own_aligned")

    @property
    def co_divide_on(self) -> bool:
        return bool(self._resolve("co_divide", False, True, by_size=True))

    @property
    def co_pseudo_label_on(self) -> bool:
        return bool(self._resolve("co_pseudo_label", True, False))

    def _da_prior(self, candidate_sums: np.ndarray):
        """DA's target: None (uniform) or the candidate sets' class balance ** temperature."""
        c = self.c
        if c.da_prior == "uniform":
            return None
        return target_prior("candidates", candidate_sums, len(candidate_sums),
                            c.da_prior_temperature).to(self.device, torch.float32)

    def _divide(self, k: int, update, class_range) -> Dict:
        c = self.c
        if c.divide_per_class:        # [C] each over every rank
            lo, hi = self.coll.min(class_range[0]), self.coll.max(class_range[1])
        else:
            lo, hi = update.local_range(f"loss{k}")
            lo, hi = self.coll.min(lo), self.coll.max(hi)     # global min / max
        H = max(1, c.loss_history)
        slot = (self.history_len - 1) % H

        def record(st):
            loss = st.arrays[f"loss{k}"]
            if c.minmax_normalize and c.divide_per_class:
                cls = np.clip(st.arrays[f"plab{k}"], 0, None)
                loss = minmax_normalize(loss, lo[cls], hi[cls])
            elif c.minmax_normalize:
                loss = minmax_normalize(loss, lo, hi)
            st.arrays[f"hist{k}"][:, slot] = loss
            hist = st.arrays[f"hist{k}"]
            seen = ~np.isnan(hist).all(axis=1)
            avg = np.full(len(st), np.nan, dtype=np.float32)
            avg[seen] = np.nanmean(hist[seen], axis=1)
            st.arrays[f"avg{k}"] = avg
        update.map(record)
        gmm, info = fit_gmm_1d(update.chunks(f"avg{k}"), max_iter=c.gmm_max_iter, tol=c.gmm_tol,
                               reg_covar=c.gmm_reg_covar, allreduce=self.coll.allreduce_fn())
        # the same GMM on every rank: every rank takes the same decision
        separation = gmm.separation
        self.dividing[k] = self.dividing[k] or separation >= c.divide_separation
        stats = {f"gmm_means_net{k + 1}": [float(m) for m in gmm.means],
                 f"gmm_weights_net{k + 1}": [float(w) for w in gmm.weights],
                 f"gmm_vars_net{k + 1}": [float(v) for v in gmm.variances],
                 f"gmm_iter_net{k + 1}": int(info["n_iter"]),
                 f"gmm_separation_net{k + 1}": separation, f"divided_net{k + 1}": int(self.dividing[k])}
        if not self.dividing[k]:
            self._all_in_p(update, [k])
            return stats

        def weigh(st):
            avg = st.arrays[f"avg{k}"]
            w = np.zeros(len(st), dtype=np.float32)    # a sample never seen (corrupt image) is U
            ok = ~np.isnan(avg)
            if ok.any():
                w[ok] = np.asarray(posterior_low_mean(gmm, avg[ok]), dtype=np.float32)
            if "fixed" in st.arrays:
                w[st.arrays["fixed"] >= 0] = 1.0     # [D] few-shot clean labels are always P
            st.arrays[f"w{k}"] = w
        update.map(weigh)
        return stats

    @staticmethod
    def _all_in_p(update, nets) -> None:
        """Every sample P with w = 1 in the splits of `nets`: no division (co_divide off, or not
        started under divide_start=separated)."""
        update.map(lambda st: [st.arrays[f"w{k}"].fill(1.0) for k in nets])

    @staticmethod
    def _shard_counts(st, thr: float) -> Dict[str, int]:
        # Samples the trainer marked bad (undecodable) belong to neither part.
        good = st.arrays["bad"] == 0 if "bad" in st.arrays else np.ones(len(st), dtype=bool)
        out = {"n": int(good.sum())}
        for k in range(2):
            P = (st.arrays[f"w{k}"] > thr) & good
            U = ~P & good
            out[f"p{k}"], out[f"u{k}"] = int(P.sum()), int(U.sum())
            for part, m in (("p", P), ("u", U)):
                hit, cover = st.arrays[f"hit{k}"][m], st.arrays["cover"][m]
                out[f"{part}{k}_known"] = int((hit >= 0).sum())
                out[f"{part}{k}_hit"] = int((hit == 1).sum())
                out[f"{part}{k}_cover"] = int((cover == 1).sum())
            uin, uhit = st.arrays[f"uin{k}"][U], st.arrays[f"uhit{k}"][U]
            for side, m in (("in", uin == 1), ("out", uin == 0)):
                out[f"u{k}_{side}"] = int(m.sum())
                out[f"u{k}_{side}_known"] = int((m & (uhit >= 0)).sum())
                out[f"u{k}_{side}_hit"] = int((m & (uhit == 1)).sum())
        return out

    @staticmethod
    def _split_metrics(t: Dict[str, int]) -> Dict:
        """|P|, |U|, pseudo-label accuracy and candidate coverage of each network's split."""
        out = {}
        for k in range(2):
            out[f"n_p_net{k + 1}"], out[f"n_u_net{k + 1}"] = t[f"p{k}"], t[f"u{k}"]
            for part in ("p", "u"):
                known = t[f"{part}{k}_known"]
                if known:
                    out[f"{part}_label_acc_net{k + 1}"] = t[f"{part}{k}_hit"] / known
                    out[f"{part}_coverage_net{k + 1}"] = t[f"{part}{k}_cover"] / known
            # [C] U's unrestricted prediction inside / outside its candidate set: how many, how right
            for side in ("in", "out"):
                out[f"u_{side}_cand_n_net{k + 1}"] = t.get(f"u{k}_{side}", 0)
                known = t.get(f"u{k}_{side}_known", 0)
                if known:
                    out[f"u_{side}_cand_acc_net{k + 1}"] = t[f"u{k}_{side}_hit"] / known
        return out

    def _divide_input(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.weak_one(x, gen) if self.c.divide_view == "weak" else x

    def regularizer(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """An extra term on the label-space logits (every mixed row); none in Co-Reg."""
        return None

    def _u_outside_weight(self, totals: Dict[str, int], k: int) -> float:
        """Weight of the classes outside S in U's co-guesses (coreg.u_guess) for network k's
        split: from the split's totals, so a resumed epoch gets the same value."""
        if self.c.u_guess != "adaptive":
            return 1.0 if self.c.u_guess == "all" else 0.0
        n_in, n_out = totals.get(f"u{k}_in", 0), totals.get(f"u{k}_out", 0)
        return n_out / (n_in + n_out) if n_in + n_out else 1.0

    # ------------------------------------------------------------------ plan
    def plan_epoch(self, epoch: int, ctx) -> List[PassSpec]:
        B, N = self.cfg.train.batch_size, ctx.num_train
        if self.in_warmup(epoch):     # [C] warm-up: all samples, one network after the other
            WB = self.c.warmup_batch_factor * B
            return [PassSpec(f"warmup_net{k + 1}", k, steps=max(1, math.ceil(N / WB)),
                             routes=(Route("x", WB),)) for k in range(2)]
        self.u_outside_weight = [self._u_outside_weight(ctx.totals, k) for k in range(2)]
        passes = []
        for b in range(2):
            a = 1 - b if self.c.cross_use else b
            P, U = ctx.totals[f"p{a}"], ctx.totals[f"u{a}"]
            thr = self.c.p_threshold
            if P == 0:                # degenerate split: learn from all samples as P
                routes = (Route("x", B),)
                P, U = N, 0
            else:
                routes = (Route("x", B, field=f"w{a}", op=">", value=thr, count_key=f"p{a}"),)
            if self.c.use_unlabeled and U > 0:
                routes += (Route("u", B, field=f"w{a}", op="<=", value=thr, count_key=f"u{a}"),)
            passes.append(PassSpec(f"train_net{b + 1}", b, steps=P // B + 1, routes=routes,
                                   attach=(f"w{a}", f"pred{a}")))
        return passes

    # ------------------------------------------------------------------ update
    def update(self, batch: Batch) -> StepOutput:
        if self.in_warmup(self.epoch):
            return self._warmup_step(batch)
        return self._train_step(batch)

    def _warmup_step(self, batch: Batch) -> StepOutput:
        k = batch.spec.net
        self.nets[k].train()
        view = self.weak if self.c.warmup_view == "weak" else self.strong
        logits = self.forward(k, view(batch, "x"))
        lce = partial_ce(logits, batch.parts["x"].Y)
        loss = lce + negative_entropy(logits) if self.c.warmup_neg_entropy else lce
        return StepOutput(k, loss, {"loss/warmup": loss.item(), "loss/pce": lce.item()})

    def _mixup_perm(self, batch: Batch, has_u: bool) -> torch.Tensor:
        """One permutation per stream over that stream's rows of [x_s1, x_s2, u_s1, u_s2]."""
        sx = batch.sizes["x"]
        su = batch.sizes["u"] if has_u else [0] * len(sx)
        nx, nu = sum(sx), sum(su)
        blocks = [(0, sx), (nx, sx), (2 * nx, su), (2 * nx + nu, su)]
        perm = torch.arange(2 * nx + 2 * nu)
        for i, g in enumerate(batch.rng.gens):
            rows = torch.cat([torch.arange(start + sum(sizes[:i]), start + sum(sizes[:i + 1]))
                              for start, sizes in blocks])
            perm[rows] = rows[torch.randperm(len(rows), generator=g)]
        return perm

    def _train_step(self, batch: Batch) -> StepOutput:
        c, b = self.c, batch.spec.net
        a = 1 - b if c.cross_use else b
        net_b, net_a = self.nets[b], self.nets[a]
        px = batch.parts["x"]
        pu = batch.parts.get("u")
        x, Y = px.x, px.Y
        nB = len(x)
        has_u = pu is not None
        p_masked, w = px.attach[f"pred{a}"], px.attach[f"w{a}"]

        # --- co-pseudo-labels, no grad: [C] the trained network in train mode, the other in eval.
        with torch.no_grad():
            net_b.train()
            net_a.eval()
            xw = [self.weak(batch, "x"), self.weak(batch, "x")]
            lb_x1, z_weak = self.forward(b, xw[0], with_proj=True)
            pb_x = [F.softmax(lb_x1, 1), F.softmax(self.forward(b, xw[1]), 1)]
            p_refine, copl = self.p_refine_mode, self.co_pseudo_label_on
            if not copl or p_refine in ("own", "own_aligned"):
                # the network's own candidate-restricted prediction
                pb = (pb_x[0] + pb_x[1]) / 2
                if copl and p_refine == "own_aligned" and self.da_mean[b] is not None:
                    pb = distribution_align(pb, prior=self.da_prior, mean=self.da_mean[b])
                tx = sharpen(masked_prediction(pb, Y), c.sharpen_temperature)
            elif c.refine_labeled:
                pb_ref = pb_x if p_refine == "all" else [masked_prediction(p, Y) for p in pb_x]
                tx = refine_labeled(p_masked, w, pb_ref, T=c.sharpen_temperature)
            else:
                tx = sharpen(p_masked, c.sharpen_temperature)
            if has_u:
                uw = [self.weak(batch, "u"), self.weak(batch, "u")]
                pb_u = [F.softmax(self.forward(b, v), 1) for v in uw]
                if copl and c.co_guess_unlabeled:
                    pa_u = [F.softmax(self.forward(a, v), 1) for v in uw]
                    tu = co_guess_unlabeled(pa_u, pb_u, T=c.sharpen_temperature)
                else:
                    tu = sharpen((pb_u[0] + pb_u[1]) / 2, c.sharpen_temperature)
                if c.u_guess != "all":
                    tu = weigh_outside(tu, pu.Y, self.u_outside_weight[a])

        # --- label-space consistency: MixUp over two strong views of x and of u.
        net_b.train()
        if c.label_space_view == "weak":
            xs, us = xw, (uw if has_u else [])
        else:
            xs = [self.strong(batch, "x"), self.strong(batch, "x")]
            us = [self.strong(batch, "u"), self.strong(batch, "u")] if has_u else []
        inputs = torch.cat(xs + us)
        targets = torch.cat([tx, tx] + ([tu, tu] if has_u else []))
        if c.mixup:
            # lambda from the generator every rank shares, the permutation per stream.
            lam = float(batch.rng.shared.beta(c.mixup_alpha, c.mixup_alpha))
            inputs, targets, lam, _ = mixup(inputs, targets, lam=lam,
                                            perm=self._mixup_perm(batch, has_u).to(inputs.device))
        nl = 2 * nB
        feats_on = self.features_on(self.epoch)
        want_z = feats_on and c.prototypes
        out = self.forward(b, inputs, with_proj=want_z)
        logits, z_mix = out if want_z else (out, None)
        ramp = linear_rampup(self.epoch - c.warm_up, c.rampup_epochs)
        empty = logits[:0]
        loss, lx, lu = label_space_loss(logits[:nl], targets[:nl],
                                        logits[nl:] if has_u else empty,
                                        targets[nl:] if has_u else targets[:0],
                                        c.lambda_u, ramp)
        logs = {"loss/x": lx.item(), "loss/u": lu.item()}
        reg = self.regularizer(logits)
        if reg is not None:
            loss = loss + reg
            logs["loss/reg"] = reg.item()
        if c.pce_weight > 0:
            with_u = has_u and c.pce_unlabeled
            weak_views = torch.cat([xw[0]] + ([uw[0]] if with_u else []))
            cand = torch.cat([Y] + ([pu.Y] if with_u else []))
            lpce = partial_ce(self.forward(b, weak_views), cand)
            loss = loss + c.pce_weight * lpce
            logs["loss/pce"] = lpce.item()

        # --- feature-space consistency.
        parts = ["x", "u"] if has_u else ["x"]
        hard = torch.cat([tx] + ([tu] if has_u else [])).argmax(1)
        is_p = torch.cat([torch.ones(nB, dtype=torch.bool, device=x.device)] +
                         ([torch.zeros(len(pu), dtype=torch.bool, device=x.device)] if has_u else []))
        if want_z:
            is_lab = torch.zeros(len(inputs), dtype=torch.bool, device=x.device)
            is_lab[:nl] = True
            lp = prototype_loss(z_mix, self.prototypes, targets, is_lab, T=c.proto_temperature,
                                lambda_u=c.lambda_u)
            loss = loss + c.proto_weight * lp
            logs["loss/proto"] = lp.item()
        extra = {"b": b, "z_weak": z_weak, "tx": tx}
        if c.contrastive:
            with torch.no_grad():
                self.keys[b].train()
                _, keys = self.forward(b, torch.cat([xs[1]] + ([us[1]] if has_u else [])),
                                       with_proj=True, module=self.keys[b])
            keys_all = self.gather_rows(keys, batch, parts)
            hard_all = self.gather_rows(hard, batch, parts)
            is_p_all = self.gather_rows(is_p, batch, parts)
            extra.update(keys=keys_all, hard=hard_all, is_p=is_p_all)
            if feats_on:
                # queries: strong view 1 with gradient, gathered with it: the contrast set is the
                # global batch, as on one device; keys: EMA encoder on strong view 2.
                _, q = self.forward(b, torch.cat([xs[0]] + ([us[0]] if has_u else [])), with_proj=True)
                q_all = self.gather_rows(q, batch, parts, grad=True)
                qf, ql, qp = self.queues[b].view()
                anchors = self.own_rows(batch, parts) if self.coll.distributed else None
                lc = noisy_supcon_loss(q_all, keys_all, qf, hard_all, is_p_all, ql, qp,
                                       T=c.cont_temperature, noisy=c.noisy_contrastive,
                                       anchor_idx=anchors)
                loss = loss + c.cont_weight * lc
                logs["loss/cont"] = lc.item()
        logs["loss/total"] = loss.item()
        if px.true is not None and bool((px.true >= 0).all()):
            logs["pseudo_acc_x"] = float((tx.argmax(1) == px.true).float().mean())
        return StepOutput(b, loss, logs, extra)

    @torch.no_grad()
    def after_step(self, batch: Batch, out: StepOutput) -> None:
        if self.in_warmup(self.epoch):
            return
        c, e = self.c, out.extra
        if c.prototypes:              # weak-view features of the P samples, every rank's
            z = self.gather_rows(e["z_weak"], batch, ["x"])
            t = self.gather_rows(e["tx"], batch, ["x"])
            self.prototypes = update_prototypes(self.prototypes, z, t, m=c.proto_momentum)
        if c.contrastive:
            self.queues[e["b"]].push(e["keys"], e["hard"], e["is_p"])
            self._ema_key(e["b"])

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict:
        return {"nets": [n.state_dict() for n in self.nets],
                "keys": [k.state_dict() for k in self.keys],
                "queues": [q.state_dict() for q in self.queues],
                "prototypes": self.prototypes, "history_len": self.history_len,
                # a mid-epoch resume does not redo the co-divide: its DA statistics travel here
                "da_mean": None if self.da_mean[0] is None else torch.stack(self.da_mean),
                "da_prior": self.da_prior, "companion_share": self.companion_share,
                "mean_set_size": self.mean_set_size, "dividing": list(self.dividing)}

    def load_state_dict(self, s: Dict) -> None:
        for i in range(2):
            self.nets[i].load_state_dict(s["nets"][i])
            self.keys[i].load_state_dict(s["keys"][i])
            self.queues[i].load_state_dict(s["queues"][i])
        self.prototypes = s["prototypes"].to(self.device)
        self.history_len = int(s["history_len"])
        m, p = s.get("da_mean"), s.get("da_prior")     # absent in checkpoints before them
        self.da_mean = [None, None] if m is None else list(m.to(self.device))
        self.da_prior = None if p is None else p.to(self.device)
        self.companion_share, self.mean_set_size = s.get("companion_share"), s.get("mean_set_size")
        if "dividing" in s:                            # absent in checkpoints before divide_start
            self.dividing = [bool(d) for d in s["dividing"]]
