"""UltraEdit: training-free lifelong editing by a closed-form ridge update per turn (EDITORS.md 8).

A *turn* is one ``apply`` with a batch of B requests. For every edited module m (a linear map
v = k W, W stored (d_in, d_out) here; Llama's Linear keeps Wᵀ):

1. cache: one forward and backward of "{prompt} {target}" per ``batch_size_once`` requests, with
   L = cross-entropy over the target tokens (mean over all target tokens of the mini-batch). At the
   cached positions it records the module's input k (d_in) and the gradient of L with respect to
   the module's output ∇v = ∂L/∂v (d_out). Rows over the turn: K (N, d_in), G (N, d_out).
   ``token: ans`` caches the positions that predict a target token (the last prompt token up to
   the target's second-to-last token: the original's ``labels != -100``); ``token: mask`` caches
   every non-pad token (EasyEdit's yamls).
2. lifelong normaliser: running mean μ and standard deviation σ of the rows z = [k; ∇v]
   (d_in + d_out), one per weight shape (modules of equal shape share it, as in the original),
   updated with every mini-batch of every turn and never reset within a stream. This is the
   method's only state besides the weights.
3. pseudo-targets in normalised space: ẑ = (z − μ)/(σ + ε) = [k̂; ∇̂v] with μ, σ after this turn's
   rows, and per row

       v̂ = −lr · ‖k̂‖² · ∇̂v                                   (N, d_out)

4. ridge solve on the RAW keys (not k̂), then W += ΔW:

       ΔW = (KᵀK + λI)⁻¹ Kᵀ V̂                                 (d_in, d_out), λ = ``ridge`` (1 in the original)

   computed as Kᵀ (KKᵀ + λI)⁻¹ V̂ when N < d_in (same matrix, the N×N system is smaller).

All modules' ΔW come from the same forward/backward passes (the model before the turn), then all
are written. Both are in float64: the normaliser accumulates sums over a whole stream (thousands of
rows) and the raw-key Gram matrix KᵀK + λI has condition number up to (σ_max(K)² + λ)/λ, 10⁴–10⁶
for real keys with λ = 1, which float32 (ε ≈ 6e-8) would resolve only to a few digits.

Semantics: paper / original code (XiaojieGu/UltraEdit@0beb222, editor/ultraedit.py, nets.py
RunningMeanStd) by default, ``token: ans``; ``token: mask`` takes the positions easyedit@14cea82's
yamls cache (its loss is the same target cross-entropy; provenance() records which). Deviations:
the normaliser is the exact merge of means and sums of squared deviations (Chan et al.), σ with
n − 1 (the original adds n_b·var_unbiased per batch, i.e. overcounts each batch's within-variance by
n_b/(n_b − 1), and is NaN for a one-row batch); ε = 1.19e-7 (float32's, as the original in fp32).

State and protocols: the normaliser lives across ``apply`` calls (a sequential run is one stream).
``restore()`` puts the weights back bit for bit AND resets the normaliser: in the single protocol
(edit, evaluate, restore) each edit is an independent one-turn stream, so no statistics of other
records' prompts leak into an edit. Note that in a one-turn stream the rows are normalised by their
own mean, so an edit with a single cached row writes nothing (its k̂ is 0).

Hyper-parameters (defaults = the original's llama3-8b configuration):
``inner_params`` full module names (empty: the rule below), ``lr`` 1e-6, ``token`` ans, ``ridge`` 1,
``batch_size_once`` 10. Rule for a model without a YAML: Llama-like models edit
mlp.gate_proj in layers 11–15 and mlp.up_proj in layers 18–24 of 32 (llama3-8b-instruct),
scaled to the model's depth; other families edit the MLP output projection in layers 18–26 of 28
(gpt-j-6B, whose fc_out is GPT-2's c_proj), scaled likewise.

Per model (editors/hparams/ultraedit-*.yaml): the embedded world model edits the last layer's
c_proj with ``token: mask`` and lr 1.5e-3 (tuning table in its YAML); SmolLM2 the scaled Llama bands,
mask, lr 3e-5; Llama-3-8B, GPT-J and Mistral-7B the references' modules and lr.

Diagnostics: ``sites()`` names every written module with C = I (the ridge solves with KᵀK + λI, no
key covariance). Where a written module is its layer's rewrite module (GPT-2 c_proj, Llama
down_proj) the outcome carries a :class:`LayerTrace` with one row per request: the key at the last
prompt token (the position that predicts the target's first token), δ = v̂ there and
v* = W_before k (+ bias) + δ; rows at the other cached positions are written but not traced. The
weight diagnostics watch every module named in ``sites()`` (keys = its input); sites other than the
rewrite module get the observed interference only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from knowbench.devices import input_device, like
from knowbench.editor import ChangeKind, EditOutcome, EditRequest, LayerTrace, RunContext, Site, WeightEditor

from .ft import target_batch
from .hparams_yaml import YamlHparams

SEMANTICS = "paper (XiaojieGu/UltraEdit@0beb222 editor/ultraedit.py)"
EPS = float(torch.finfo(torch.float32).eps)  # the original's ε: finfo of its float32 features


@dataclass
class UltraEditHparams:
    inner_params: list[str] = field(default_factory=list)  # full module names; [] = the depth rule
    lr: float = 1e-6  # v̂ = −lr·‖k̂‖²·∇̂v
    token: Literal["ans", "mask"] = "ans"  # cached positions: target-predicting (original) or all (EasyEdit)
    ridge: float = 1.0  # λ in (KᵀK + λI)⁻¹KᵀV̂
    batch_size_once: int = 10  # requests per forward/backward of the cache step


# -- the lifelong normaliser ---------------------------------------------------------------------
class RunningMoments:
    """Running mean and standard deviation of rows, merged exactly batch by batch (float64).

    For n rows seen with mean μ and M = Σ(x − μ)², a batch of b rows with mean μ_b and M_b gives
    μ' = μ + b(μ_b − μ)/n', M' = M + M_b + n·b(μ_b − μ)²/n', n' = n + b; σ = √(M/(n − 1))."""

    def __init__(self, dim: int):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).cpu()
        b = x.shape[0]
        if b == 0:
            return
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        n = self.n + b
        delta = mb - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + m2b + delta.pow(2) * (self.n * b / n)
        self.n = n

    @property
    def std(self) -> torch.Tensor:
        if self.n < 2:
            return torch.zeros_like(self.m2)  # one row has no spread: (x − μ) is 0 anyway
        return (self.m2 / (self.n - 1)).clamp(min=0).sqrt()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) - self.mean.to(x.device)) / (self.std.to(x.device) + EPS)


# -- the closed form -----------------------------------------------------------------------------
def ridge_update(keys: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """ΔW = (KᵀK + λI)⁻¹ Kᵀ V̂ (d_in, d_out) for keys K (N, d_in) and targets V̂ (N, d_out), float64.
    When N < d_in it is solved as Kᵀ(KKᵀ + λI)⁻¹V̂ (push-through identity), an N×N system."""
    k = keys.to(torch.float64)
    v = targets.to(torch.float64)
    n, d = k.shape
    if n < d:
        gram = k @ k.T + ridge * torch.eye(n, dtype=k.dtype, device=k.device)  # (N, N)
        return k.T @ torch.cholesky_solve(v, torch.linalg.cholesky(gram))
    gram = k.T @ k + ridge * torch.eye(d, dtype=k.dtype, device=k.device)  # (d_in, d_in)
    return torch.cholesky_solve(k.T @ v, torch.linalg.cholesky(gram))


def pseudo_targets(keys: torch.Tensor, grads: torch.Tensor, norm: RunningMoments, lr: float) -> torch.Tensor:
    """V̂ = −lr·‖k̂‖²·∇̂v (N, d_out) from raw rows, with [k̂; ∇̂v] = norm.normalise([k; ∇v])."""
    z = norm.normalise(torch.cat([keys, grads], dim=-1).to(torch.float64))
    k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], dim=-1)
    return -lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat


# -- which modules ---------------------------------------------------------------------------------
def _band(lo: int, hi: int, of: int, n_layers: int) -> list[int]:
    """Layers lo..hi of an ``of``-layer reference model, scaled to n_layers (order kept, no repeats)."""
    out: list[int] = []
    for l in range(lo, hi + 1):
        s = min(n_layers - 1, int(l * n_layers / of + 0.5))  # half up: no banker's rounding
        if s not in out:
            out.append(s)
    return out


def default_modules(model: nn.Module, adapter: Any) -> list[str]:
    """The depth rule of the module docstring."""
    n = adapter.n_layers
    names = dict(model.named_modules())
    mlp0 = adapter.mlp_name(0)
    if f"{mlp0}.gate_proj" in names and f"{mlp0}.up_proj" in names:
        gate = [f"{adapter.mlp_name(l)}.gate_proj" for l in _band(11, 15, 32, n)]
        up = [f"{adapter.mlp_name(l)}.up_proj" for l in _band(18, 24, 32, n)]
        return gate + up
    return [adapter.rewrite_name(l) for l in _band(18, 26, 28, n)]


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores W as (d_in, d_out) and computes x W + b."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class UltraEdit(YamlHparams, WeightEditor):
    name: ClassVar[str] = "ultraedit"
    hparams_cls: ClassVar[type] = UltraEditHparams
    kind: ClassVar[ChangeKind] = ChangeKind.WEIGHTS
    supports_batch: ClassVar[bool] = True


    def __init__(self, model: Any, tokenizer: Any, hparams: UltraEditHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        if hparams.token not in ("ans", "mask"):
            raise ValueError(f"ultraedit: token must be 'ans' or 'mask', got {hparams.token!r}")
        if hparams.batch_size_once < 1:
            raise ValueError("ultraedit: batch_size_once must be at least 1")
        if not hparams.ridge > 0:
            raise ValueError(f"ultraedit: ridge must be positive (KᵀK + λI must be invertible), got {hparams.ridge}")
        names = [m[: -len(".weight")] if m.endswith(".weight") else m for m in hparams.inner_params]
        names = names or default_modules(model, self.adapter)
        modules = dict(model.named_modules())
        missing = [m for m in names if m not in modules]
        if missing:
            raise ValueError(f"ultraedit: the model has no module(s) {', '.join(missing)} (inner_params)")
        bad = [m for m in names if not (isinstance(modules[m], nn.Linear) or _is_conv1d(modules[m]))]
        if bad:
            raise ValueError(f"ultraedit: {', '.join(bad)} are neither nn.Linear nor Conv1D modules")
        if len(set(names)) != len(names):
            raise ValueError("ultraedit: inner_params names a module twice")
        self.modules: list[str] = names
        self._mod: dict[str, nn.Module] = {m: modules[m] for m in names}
        self._layer: dict[str, int] = {m: self._layer_of(m) for m in names}
        self.norms: dict[tuple[int, int], RunningMoments] = {}
        self.turns = 0
        self._last: dict[str, Any] = {}  # the last turn's cache and solve, for tests and diagnostics

    # -- names and shapes --------------------------------------------------------------------------
    def _layer_of(self, module: str) -> int:
        prefix = self.adapter.spec.blocks + "."
        if module.startswith(prefix):
            head = module[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
        return -1

    def shape(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a module, whatever its storage layout."""
        w = self._mod[module].weight
        return (w.shape[0], w.shape[1]) if _is_conv1d(self._mod[module]) else (w.shape[1], w.shape[0])

    def normaliser(self, module: str) -> RunningMoments:
        shape = self.shape(module)
        if shape not in self.norms:
            self.norms[shape] = RunningMoments(shape[0] + shape[1])
        return self.norms[shape]

    def sites(self) -> list[Site]:
        """Every written module; the update solves with C = I (a ridge on raw keys)."""
        return [Site(self._layer[m], m, m + ".weight", second_moment="identity") for m in self.modules]

    # -- 1. cache k and ∇v ---------------------------------------------------------------------------
    def cache(self, requests: list[EditRequest]) -> dict[str, Any]:
        """Run the cache step of a turn and update the normalisers (steps 1–2).

        Returns {"keys": {module: (N, d_in)}, "grads": {module: (N, d_out)}, "anchors": [row of each
        request's last prompt token], "loss": mean CE per mini-batch}, rows float64 on the CPU."""
        hp: UltraEditHparams = self.hparams
        keys: dict[str, list[torch.Tensor]] = {m: [] for m in self.modules}
        grads: dict[str, list[torch.Tensor]] = {m: [] for m in self.modules}
        anchors: list[int] = []
        losses: list[float] = []
        n_rows = 0
        device = input_device(self.model)
        for c0 in range(0, len(requests), hp.batch_size_once):
            chunk = requests[c0 : c0 + hp.batch_size_once]
            input_ids, mask, labels, spans = target_batch(self.tok, self.model, chunk, self.name)
            rows, cols = [], []
            for r, (ids, start) in enumerate(spans):
                first = 0 if hp.token == "mask" else start - 1
                anchors.append(n_rows + (start - 1 - first))
                for p in range(first, len(ids) if hp.token == "mask" else len(ids) - 1):
                    rows.append(r)
                    cols.append(p)
                n_rows += (len(ids) if hp.token == "mask" else len(ids) - 1) - first
            where = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            k_b, g_b, loss = self._forward_backward(input_ids.to(device), mask.to(device), labels.to(device), where)
            losses.append(loss)
            for m in self.modules:
                keys[m].append(k_b[m])
                grads[m].append(g_b[m])
                # the original's order: every mini-batch, every module, into its shape's normaliser
                self.normaliser(m).update(torch.cat([k_b[m], g_b[m]], dim=-1))
        return {
            "keys": {m: torch.cat(keys[m]) for m in self.modules},
            "grads": {m: torch.cat(grads[m]) for m in self.modules},
            "anchors": anchors,
            "loss": losses,
        }

    def _forward_backward(self, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                          where: tuple[torch.Tensor, torch.Tensor]):
        """Module inputs and ∂L/∂(module output) at ``where`` for one mini-batch (float64, CPU).

        Each edited module's output gets a zero leaf added (v + 0): ∂L/∂0 = ∂L/∂v, and the graph
        through v stays whole, so modules above and below see the ordinary model."""
        inputs: dict[str, torch.Tensor] = {}
        zeros: dict[str, torch.Tensor] = {}

        def hook_for(name: str):
            def hook(module, args, out):
                inputs[name] = args[0].detach()
                z = torch.zeros_like(out, requires_grad=True)
                zeros[name] = z
                return out + z
            return hook

        handles = [self._mod[m].register_forward_hook(hook_for(m)) for m in self.modules]
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                # position t predicts token t+1; the mean over every target token of the mini-batch
                lp, tgt = logits[:, :-1], labels[:, 1:]
                if lp.dtype in (torch.float16, torch.bfloat16):
                    lp = lp.float()  # the softmax in at least float32
                keep = tgt != -100
                loss = F.cross_entropy(lp[keep], tgt[keep])
                got = torch.autograd.grad(loss, [zeros[m] for m in self.modules], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        k_out, g_out = {}, {}
        for m, g in zip(self.modules, got):
            if g is None:  # a module the loss does not reach (cannot happen below the head)
                g = torch.zeros_like(zeros[m])
            # the positions on each module's own device (a model may be spread over several)
            k_out[m] = inputs[m][tuple(like(w, inputs[m]) for w in where)].detach().to(torch.float64).cpu()
            g_out[m] = g[tuple(like(w, g) for w in where)].detach().to(torch.float64).cpu()
        return k_out, g_out, float(loss.detach())

    # -- 2–4. normalise, solve, write -----------------------------------------------------------------
    def solve(self, module: str, keys: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔW (d_in, d_out), V̂ (N, d_out)) for one module from its turn's raw rows, float64."""
        v_hat = pseudo_targets(keys, grads, self.normaliser(module), float(self.hparams.lr))
        return ridge_update(keys, v_hat, float(self.hparams.ridge)), v_hat

    def write(self, module: str, delta: torch.Tensor) -> str:
        """W += ΔW, ΔW given as (d_in, d_out); Linear weights are stored transposed."""
        name = module + ".weight"
        w = self.param(name)  # saves the original on first touch
        upd = delta if _is_conv1d(self._mod[module]) else delta.T
        with torch.no_grad():
            w.add_(upd.to(dtype=w.dtype, device=w.device))
        return name

    def _before(self, module: str, keys: torch.Tensor) -> torch.Tensor:
        """The module's current output k W + b at keys (n, d_in), float64."""
        mod = self._mod[module]
        w = mod.weight.detach().to(torch.float64).cpu()
        out = keys @ (w if _is_conv1d(mod) else w.T)
        if getattr(mod, "bias", None) is not None:
            out = out + mod.bias.detach().to(torch.float64).cpu()
        return out

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        if not requests:
            return EditOutcome(changed_params=[], info={"turn": self.turns})
        cached = self.cache(requests)
        deltas, targets = {}, {}
        for m in self.modules:  # every ΔW from the same passes, then all are written
            deltas[m], targets[m] = self.solve(m, cached["keys"][m], cached["grads"][m])
        anchors = torch.tensor(cached["anchors"])
        traces, changed, norms = [], [], []
        for m in self.modules:
            layer = self._layer[m]
            traced = layer >= 0 and m == self.adapter.rewrite_name(layer)
            if traced:
                k_a = cached["keys"][m][anchors]
                before = self._before(m, k_a)
            changed.append(self.write(m, deltas[m]))
            if traced:
                resid = targets[m][anchors]
                traces.append(LayerTrace(layer, m, k_a.float(), (before + resid).float(), resid.float()))
            norms.append(float(deltas[m].norm()))
        self.turns += 1
        self._last = {"cache": cached, "deltas": deltas, "targets": targets}
        info = {
            "turn": self.turns,
            "rows": int(cached["keys"][self.modules[0]].shape[0]),
            "loss": round(sum(cached["loss"]) / len(cached["loss"]), 5),
            "update_norm_mean": round(sum(norms) / len(norms), 6),
            "normaliser_rows": {f"{a}x{b}": n.n for (a, b), n in self.norms.items()},
        }
        return EditOutcome(changed_params=changed, traces=traces, info=info)

    # -- state -----------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Original weights back bit for bit, and a fresh stream: the normalisers start empty."""
        super().restore()
        self.norms = {}
        self.turns = 0
        self._last = {}

    def report(self) -> dict[str, Any]:
        return {"turns": self.turns, **{f"normaliser_rows_{a}x{b}": n.n for (a, b), n in self.norms.items()}}

    def provenance(self) -> dict[str, Any]:
        hp: UltraEditHparams = self.hparams
        sem = SEMANTICS if hp.token == "ans" else SEMANTICS + " with easyedit@14cea82's token: mask"
        return {
            "semantics": sem,
            "modules": self.modules,
            "cached_positions": "target-predicting tokens (last prompt token .. second-to-last target token)"
            if hp.token == "ans" else "every non-pad token of prompt + target",
            "normaliser": "per weight shape, exact running mean/std (n-1), float64; reset by restore()",
            "solve": "ridge on raw keys, float64 Cholesky",
            "deviations": [
                "normaliser merges sums of squared deviations exactly (the original overcounts a batch's "
                "within-variance by n_b/(n_b-1))",
                "loss: mean cross-entropy over the target tokens of each mini-batch of batch_size_once requests",
            ],
        }
