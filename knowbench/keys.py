"""Keys and values of the rewrite module, read with hooks, and the forward pass reused below an edit.

Notation (DESIGN 6): at layer l the rewrite module is the MLP output projection W; its *input* at
the last token of the subject is the key k, its output the value v = W k (+ bias). What reads keys
(the superposition diagnostics and study, and the locate-then-edit editors built on them) needs:

* where the subject's last token is in a tokenized prompt, under BOS tokens, prefixes and padding
  (:func:`subject_index`);
* k and v for a batch of rows at chosen positions (:func:`record`), and the residual stream that
  enters a block, kept so that the layers *below* it never run again while later blocks are rerun
  (:class:`Recording`, :meth:`Recording.replay`);
* the LM head on selected rows of the residual stream (:func:`lm_logits`).

Rows are padded on the right internally (:func:`knowbench.tokens.pad_batch`),
whatever the tokenizer's padding side, with explicit position ids, so a row's token positions are the
ones it has alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .arch import ArchAdapter
from .devices import like


class StopForward(Exception):
    """Raised by a hook once everything needed has been captured; the caller swallows it."""


# -- positions ---------------------------------------------------------------------------------
def subject_index(
    tok: Any, text: str, subject: str, start_char: int = 0, fact_token: str = "subject_last"
) -> int:
    """Token index (in ``tok(text)`` with special tokens, e.g. Llama's BOS) of the subject's last
    token, for the first occurrence of ``subject`` at or after ``start_char``.

    ``fact_token="last"`` gives the text's last token instead (the reference's other choice).
    """
    return subject_indices(tok, [text], [subject], [start_char], fact_token)[0][1]


def subject_indices(
    tok: Any,
    texts: Sequence[str],
    subjects: Sequence[str],
    start_chars: Sequence[int] | None = None,
    fact_token: str = "subject_last",
) -> list[tuple[list[int], int]]:
    """For each text: its token ids (with special tokens) and the index of the lookup token."""
    if fact_token not in ("subject_last", "last"):
        raise ValueError(f"fact_token must be 'subject_last' or 'last', got {fact_token!r}")
    start_chars = list(start_chars) if start_chars is not None else [0] * len(texts)
    fast = bool(getattr(tok, "is_fast", False))
    enc = tok(
        list(texts), add_special_tokens=True, return_offsets_mapping=fast,
        return_special_tokens_mask=True,
    )
    out = []
    for i, (text, subject, s0) in enumerate(zip(texts, subjects, start_chars)):
        ids = list(enc["input_ids"][i])
        special = list(enc["special_tokens_mask"][i])
        end_tok = len(ids)
        while end_tok > 0 and special[end_tok - 1]:  # trailing EOS is not part of the text
            end_tok -= 1
        if fact_token == "last":
            out.append((ids, end_tok - 1))
            continue
        pos = text.find(subject, s0) if subject else -1
        if pos < 0:
            raise ValueError(f"subject {subject!r} does not occur in {text[s0:]!r}")
        last_char = pos + len(subject) - 1
        if fast:
            offsets = enc["offset_mapping"][i]
            hits = [
                j for j in range(end_tok)
                if not special[j] and offsets[j][0] <= last_char < offsets[j][1]
            ]
            if not hits:  # tokenizers that trim spaces from offsets: last token starting before the end
                hits = [j for j in range(end_tok) if not special[j] and offsets[j][0] <= last_char]
            idx = hits[-1]
        else:  # slow tokenizer: tokenize the text up to the subject's end and count
            head = tok(text[: last_char + 1], add_special_tokens=True)["input_ids"]
            while head and head[-1] in getattr(tok, "all_special_ids", ()) and len(head) > 1:
                head = head[:-1]
            idx = len(head) - 1
        out.append((ids, idx))
    return out


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# -- recording a forward pass ------------------------------------------------------------------
@dataclass
class Recording:
    """What one forward pass left behind.

    keys[l] / values[l]: rewrite-module input / output at the requested positions, (n_pos, d).
    block_out[l]: the output of block l at *all* positions (B, T, d) (for replay from l + 1).
    calls[l]: the (args, kwargs) block l was called with, so it can be called again alone.
    """

    adapter: ArchAdapter
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    block_in: dict[int, torch.Tensor] = field(default_factory=dict)
    block_out: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, tuple[tuple, dict]] = field(default_factory=dict)

    def replay(
        self,
        hidden: torch.Tensor,
        start: int,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Run blocks start..stop (inclusive; default: the last) on ``hidden`` with the recorded
        masks and position embeddings; returns the residual stream after block ``stop``.

        Hooks registered on the model's modules fire as in a normal forward pass."""
        stop = self.adapter.n_layers - 1 if stop is None else stop
        for layer in range(start, stop + 1):
            if layer not in self.calls:
                raise RuntimeError(f"block {layer} was not recorded; record from a lower block")
            args, kwargs = self.calls[layer]
            if args:
                hidden = _first(self.adapter.block(layer)(hidden, *args[1:], **kwargs))
            else:
                hidden = _first(self.adapter.block(layer)(**{**kwargs, "hidden_states": hidden}))
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.adapter, hidden)


def lm_logits(adapter: ArchAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for selected residual-stream rows (..., d) after the last block: final norm, LM head."""
    logits = adapter.lm_head(adapter.final_norm(hidden))
    cap = getattr(adapter.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(
    model: nn.Module,
    adapter: ArchAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_layers: Sequence[int] = (),
    block_out_layers: Sequence[int] = (),
    calls_from: int | None = None,
    block_in_layers: Sequence[int] = (),
    stop_after: int | None = None,
    replay_from: tuple["Recording", int, torch.Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Recording:
    """One forward pass with hooks (no gradients).

    ``positions`` = (rows, cols) where keys/values are gathered (all positions if None, flattened by
    the attention mask). ``calls_from``: record the call of every block from there up.
    ``stop_after``: abandon the pass once block ``stop_after`` (and every key wanted) is done.
    ``replay_from`` = (recording, start block, hidden): instead of a full forward pass, rerun blocks
    from ``start`` on ``hidden`` with the recording's calls (layers below are not run again).
    ``model_kwargs`` replace the default ``use_cache=False`` (e.g. a KV cache of earlier columns).
    """
    rec = Recording(adapter)
    handles = []
    key_layers = sorted(set(key_layers))
    last_needed = max([*key_layers, *block_out_layers, *block_in_layers, -1])
    if stop_after is not None:
        last_needed = max(last_needed, stop_after)
    if positions is not None:
        rows, cols = positions
    else:
        flat = attention_mask.bool()

    def pick(t: torch.Tensor) -> torch.Tensor:
        # indices on the tensor's device: a block of a model spread over devices may live elsewhere
        t = t.detach()
        return t[like(rows, t), like(cols, t)] if positions is not None else t[like(flat, t)]

    for layer in key_layers:
        def hook(mod, args, out, layer=layer):
            rec.keys[layer] = pick(args[0])
            rec.values[layer] = pick(_first(out))
        handles.append(adapter.rewrite_module(layer).register_forward_hook(hook))
    for layer in block_out_layers:
        def hook(mod, args, out, layer=layer):
            rec.block_out[layer] = _first(out).detach()
        handles.append(adapter.block(layer).register_forward_hook(hook))
    pre_layers = set(block_in_layers)
    if calls_from is not None:
        pre_layers |= set(range(calls_from, adapter.n_layers))
    for layer in sorted(pre_layers):
        def pre(mod, args, kwargs, layer=layer):
            hs = args[0] if args else kwargs["hidden_states"]
            if layer in block_in_layers:
                rec.block_in[layer] = hs.detach()
            if calls_from is not None and layer >= calls_from:
                rec.calls[layer] = (args, {k: v for k, v in kwargs.items() if k != "hidden_states"})
        handles.append(adapter.block(layer).register_forward_pre_hook(pre, with_kwargs=True))
    if stop_after is not None and last_needed >= 0:
        # registered last, so the block's other hooks have run when it fires
        def stop_hook(mod, args, out):
            raise StopForward
        handles.append(adapter.block(last_needed).register_forward_hook(stop_hook))

    with _hooks(handles), torch.no_grad():
        try:
            if replay_from is not None:
                src, start, hidden = replay_from
                src.replay(hidden, start, last_needed if stop_after is not None else None)
            else:
                model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    **(model_kwargs or {"use_cache": False}),
                )
        except StopForward:
            pass
    return rec
