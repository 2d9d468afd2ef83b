"""Subject + style fusion inside a FreeFuse session: which runtime layers carry a style, and for each of their
calls the token weights with the chosen branch (the maths is freefuse.style; this file gathers the tensors).

The style LoRAs are one more owner of the runtime deltas (the last column of the token weights), taken out of
Forge's merge like the subjects. Selection runs only in masked calls (phase 1 runs every LoRA off, as the
official code does; before a "continue" capture both branches run everywhere). Counters stay on the device and
are read once, when the session ends.
"""

from __future__ import annotations

import torch

from freefuse import call_weights as cw
from freefuse import style


class StyleFusion:
    def __init__(self, session, layers):
        settings = session.settings
        self.session = session
        self.selector = settings.style_selector
        self.floor = float(settings.style_floor)
        self.max_tokens = int(settings.style_tokens)
        self.ramp = settings.style_ramp
        self.n_subjects = len(session.plan.subjects)
        self.style_owner = self.n_subjects
        styled = [layer for layer in layers if _owns(layer.delta, self.style_owner)]
        self.styled = {id(layer) for layer in styled}
        self.row_of = {id(layer): k for k, layer in enumerate(styled)}  # a row per styled layer, in model order
        self.steps = max(1, session.plan.sigmas.numel() - 1)
        self.wins: torch.Tensor | None = None  # [steps, layers, C] subject wins per step, layer and region (device)
        self.decisions: torch.Tensor | None = None  # [steps, layers, C] decisions made there
        self.klora = _klora_scores(layers, self.styled, self.n_subjects) if self.selector == "klora" else {}

    def applies(self, layer) -> bool:
        return self.selector != "sum" and id(layer) in self.styled

    def weights(self, layer, delta, x, output, ranks, weights):
        """The token weights of this layer call with each region's branch chosen (``weights``: the session's,
        style column last; None means all ones)."""
        call = self.session.call
        shape = call.shape
        if weights is None:  # "global" layers: one vector per row
            weights = torch.ones(shape.rows, self.n_subjects + 1, device=x.device, dtype=x.dtype)
        if self.selector == "klora":
            u, u_text = self._klora(layer, call.step)
            self._count(u[None], torch.ones_like(u[None], dtype=torch.bool), layer, call.step)
            return style.fixed_weights(weights, layer.layout, shape.n_txt, u, u_text, self.floor)
        cond_rows = self.session.cached(("cond rows", shape, x.device), lambda: _cond_rows(shape, x.device))
        fused, u, decided = style.fuse_layer(
            weights,
            output,
            _deltas_at(layer.layout, delta, x, ranks),
            layout=layer.layout,
            n_txt=shape.n_txt,
            cond_rows=cond_rows,
            n_chunks=len(shape.cond_or_uncond),
            metric=self.selector,
            max_tokens=self.max_tokens,
            floor=self.floor,
        )
        self._count(u, decided, layer, call.step)
        return fused

    def _count(self, u, decided, layer, step: int) -> None:
        """Add one call's decisions ``u`` / ``decided`` ``[B, C]`` to its step and layer (on the device: no sync)."""
        wins, made = (u * decided).sum(0), decided.float().sum(0)  # [C]
        if self.wins is None:
            self.wins = wins.new_zeros(self.steps, len(self.row_of), wins.shape[0])
            self.decisions = torch.zeros_like(self.wins)
        at = (min(step, self.steps - 1), self.row_of[id(layer)])
        self.wins[at] += wins.to(self.wins)
        self.decisions[at] += made.to(self.decisions)

    def _klora(self, layer, step: int) -> tuple[torch.Tensor, float]:
        steps = max(1, self.session.plan.sigmas.numel() - 1)
        ramp = style.klora_ramp(min(1.0, step / steps), self.ramp)
        scores = self.klora.get(id(layer))
        if scores is None:
            return torch.zeros(self.n_subjects), 0.0
        subject, versus, balance, text = scores
        u = [float(style.klora_uses_subject(subject[i], versus[i], balance[i], ramp)) for i in range(self.n_subjects)]
        u_text = float(style.klora_uses_subject(text[0], text[1], text[2], ramp))
        return torch.tensor(u), u_text

    def report(self) -> tuple[list[float | None], torch.Tensor | None]:
        """Per subject region the share of decisions the subject won (None: no decision was made), and the style's
        share per step, layer and region ``[steps, layers, C]`` (NaN where nothing was decided), on the CPU."""
        if self.wins is None:
            return [None] * self.n_subjects, None
        wins, made = self.wins.float().cpu(), self.decisions.float().cpu()  # the one sync
        totals = [
            w / m if m > 0 else None for w, m in zip(wins.sum((0, 1)).tolist(), made.sum((0, 1)).tolist(), strict=True)
        ]
        style_share = torch.where(made > 0, 1.0 - wins / made.clamp(min=1e-9), torch.full_like(made, float("nan")))
        return totals, style_share


def _cond_rows(shape, device) -> torch.Tensor:
    """The rows whose decisions count: the cond rows, or an uncond-only chunk's own rows."""
    rows = cw.cond_rows(shape)
    return (rows if rows.numel() else torch.arange(shape.images)).to(device)


def _owns(delta, owner: int) -> bool:
    return bool((delta.rank_owner == owner).any()) or any(d[0] == owner for d in getattr(delta, "dense", ()))


def _deltas_at(layout: str, delta, x, ranks):
    """deltas_at(rows, tokens) -> delta_of(owner): that owner's delta [len(rows), n, F] at those rows and
    tokens (the rows and tokens are gathered once, each owner's delta made when asked for)."""
    if layout == "conv":
        by_pixel = ranks.flatten(2).transpose(1, 2)  # [rows, h*w, R]

        def at(rows, tokens):
            picked = style.at_tokens(by_pixel, rows, tokens)
            return lambda owner: delta.owner_delta(None, picked, owner)

        return at
    if x.ndim == 2:  # "global": one vector per row is one token
        x, ranks = x[:, None], ranks[:, None]

    def at(rows, tokens):
        x_picked, ranks_picked = style.at_tokens(x, rows, tokens), style.at_tokens(ranks, rows, tokens)
        return lambda owner: delta.owner_delta(x_picked, ranks_picked, owner)

    return at


def _klora_scores(layers, styled: set[int], n_subjects: int) -> dict:
    """K-LoRA's scores per styled layer (freefuse.style.klora_layer, strengths and alpha folded in), with the
    balance of each subject (and of the subjects summed) over all styled layers: id(layer) -> (S_c per subject,
    S_s against each, balance per subject, (S summed, S_s against it, its balance))."""
    owners = range(n_subjects + 1)
    numbers = {
        id(layer): style.klora_layer(
            [layer.delta.owner_weight(o) for o in owners], [int((layer.delta.rank_owner == o).sum()) for o in owners]
        )
        for layer in layers
        if id(layer) in styled
    }
    balances = [style.klora_balance([n["subjects"][i][2] for n in numbers.values()]) for i in range(n_subjects)]
    text_balance = style.klora_balance([n["text"][2] for n in numbers.values()])
    return {
        key: (
            [s[0] for s in n["subjects"]],
            [s[1] for s in n["subjects"]],
            balances,
            (n["text"][0], n["text"][1], text_balance),
        )
        for key, n in numbers.items()
    }
