"""FT-L and FT-M: constrained fine-tuning of one MLP weight (DESIGN section 6).

Only W (d_out, d_in), the rewrite module's weight at ``layer`` (the MLP output projection), is
trained; every other parameter is frozen. With prompt tokens x and target tokens y = (y_1..y_m):

    FT-M   L(W) = −(1/m) Σ_j log p_W(y_j | x, y_<j)         cross-entropy on the target, prompt masked
    FT-L   L(W) = −(1/m) Σ_j log p_W(y_j | x)               every target token scored at the last
                                                             prompt position (the reference's FT-L)

W ← W − Adam(∇L), ``num_steps`` steps at ``lr``, early stop below ``stop_loss``. With
``norm_constraint`` > 0, W is clamped element-wise to W₀ ± norm_constraint after each step.
A float16 / bfloat16 W is trained through a float32 copy (Adam's ε = 1e-8 is 0 in float16, which
turns the first step into NaN; bfloat16 would round most steps away) and rounded into W after each
step; a float32 W is trained in place.
Defaults follow the reference for Llama-2 (layer 21 of 32, 25 steps, lr 5e-4); other models use
the same layer fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from knowbench.devices import input_device
from knowbench.editor import ChangeKind, EditOutcome, EditRequest, RunContext, Site, WeightEditor
from knowbench.scoring import _fit, _max_positions, target_spans
from knowbench.tokens import pad_batch, pad_id

from .hparams_yaml import YamlHparams


@dataclass
class FTHparams:
    layer: int = -1  # -1: the reference's layer fraction (21/32) of this model's depth
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float = 0.0  # 0 disables the clamp
    stop_loss: float = 1e-2


def target_batch(tok: Any, model: Any, requests: list[EditRequest], editor: str):
    """Token ids of "{prompt} {target}" (right-padded), the mask, labels only on the target tokens
    (−100 elsewhere) and the (ids, target start) spans. A prompt too long for the model's context
    loses tokens at its start (as scoring does); a target that cannot fit is a ValueError naming
    the editor and the record. Shared by the editors trained on the target's NLL (FT, LoRA)."""
    spans = target_spans(tok, [(r.prompt, r.target_new) for r in requests])
    limit, bos = _max_positions(model), getattr(tok, "bos_token_id", None)
    try:
        spans = [_fit(ids, start, limit, r.record_index, bos) for r, (ids, start) in zip(requests, spans)]
    except ValueError as exc:
        raise ValueError(f"{editor}: {exc}") from None
    # right padding keeps positions 0..n-1 without explicit position ids
    input_ids, mask, _, _ = pad_batch([ids for ids, _ in spans], pad_id(tok), "right")
    labels = torch.full_like(input_ids, -100)
    for row, (ids, start) in enumerate(spans):
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
    return input_ids, mask, labels, spans


def _default_layer(n_layers: int) -> int:
    return min(n_layers - 1, int(n_layers * 21 / 32))


class _FineTune(YamlHparams, WeightEditor):
    hparams_cls: ClassVar[type] = FTHparams
    kind: ClassVar[ChangeKind] = ChangeKind.WEIGHTS
    supports_batch: ClassVar[bool] = True
    last_position_only: ClassVar[bool] = False


    def __init__(self, model: Any, tokenizer: Any, hparams: FTHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        self.layer = hparams.layer if hparams.layer >= 0 else _default_layer(self.adapter.n_layers)
        self.param_name = self.adapter.rewrite_param_name(self.layer)

    def sites(self) -> list[Site]:
        """The one trained weight; fine-tuning solves with no second moment."""
        return [Site(self.layer, self.adapter.rewrite_name(self.layer), self.param_name, second_moment=None)]

    def _batch(self, requests: list[EditRequest]):
        return target_batch(self.tok, self.model, requests, self.name)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, spans) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        if not self.last_position_only:
            # position t predicts token t+1
            lp = logp[:, :-1]
            tgt = labels[:, 1:]
            keep = tgt != -100
            gathered = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            per_row = (gathered * keep).sum(1) / keep.sum(1)
            return -per_row.mean()
        losses = []
        for row, (ids, start) in enumerate(spans):
            target = torch.tensor(ids[start:])
            losses.append(-logp[row, start - 1, target].mean())
        return torch.stack(losses).mean()

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        hp: FTHparams = self.hparams
        weight = self.param(self.param_name)
        original = self.original(self.param_name)
        input_ids, mask, labels, spans = self._batch(requests)
        input_ids, mask, labels = (t.to(input_device(self.model)) for t in (input_ids, mask, labels))

        frozen = [p for p in self.model.parameters() if p.requires_grad and p is not weight]
        for p in frozen:
            p.requires_grad_(False)
        weight.requires_grad_(True)
        # the optimiser's copy: W itself in float32/64, else a float32 master copy (see the docstring)
        low = weight.dtype in (torch.float16, torch.bfloat16)
        master = weight.detach().float().requires_grad_(True) if low else weight
        lo_hi = (original.float() - hp.norm_constraint, original.float() + hp.norm_constraint) if low else None
        opt = torch.optim.Adam([master], lr=hp.lr, weight_decay=hp.weight_decay)
        losses: list[float] = []
        try:
            with torch.enable_grad():
                for _ in range(hp.num_steps):
                    opt.zero_grad(set_to_none=True)
                    logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                    loss = self._loss(logits, labels, spans)
                    losses.append(float(loss.detach()))
                    if losses[-1] < hp.stop_loss:
                        break
                    loss.backward()
                    if low:
                        master.grad = weight.grad.float()
                    opt.step()
                    with torch.no_grad():
                        if hp.norm_constraint > 0:
                            eps = hp.norm_constraint
                            if low:
                                master.copy_(torch.clamp(master, *lo_hi))
                            else:
                                weight.copy_(torch.clamp(weight, original - eps, original + eps))
                        if low:
                            weight.copy_(master)  # rounded into W's dtype
        finally:
            for p in frozen:
                p.requires_grad_(True)
            weight.grad = None
        return EditOutcome(
            changed_params=[self.param_name],
            info={"layer": self.layer, "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]},
        )


class FTM(_FineTune):
    name = "ft-m"


class FTL(_FineTune):
    name = "ft-l"
    last_position_only = True
