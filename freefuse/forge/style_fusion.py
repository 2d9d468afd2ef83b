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
        self.styled = {id(layer) for layer in layers if _owns(layer.delta, self.style_owner)}
        self.wins: torch.Tensor | None = None  # [C] subject wins in each region, on the device
        self.decisions: torch.Tensor | None = None  # [C] decisions made in each region
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
        self._count(u, decided)
        return fused

    def _count(self, u, decided) -> None:
        wins, made = (u * decided).sum(0), decided.float().sum(0)  # [C], on the device: no sync here
        self.wins = wins if self.wins is None else self.wins + wins.to(self.wins.device)
        self.decisions = made if self.decisions is None else self.decisions + made.to(self.decisions.device)

    def _klora(self, layer, step: int) -> tuple[torch.Tensor, float]:
        steps = max(1, self.session.plan.sigmas.numel() - 1)
        ramp = style.klora_ramp(min(1.0, step / steps), self.ramp)
        scores = self.klora.get(id(layer))
        if scores is None:
            return torch.zeros(self.n_subjects), 0.0
        subject, versus, balance, text = scores
        u = [float(style.klora_uses_subject(subject[i], versus[i], balance[i], ramp)) for i in range(self.n_subjects)]
        u_text = float(style.klora_uses_subject(text[0], text[1], text[2], ramp))
        made = torch.ones(self.n_subjects)
        self._count(torch.tensor(u)[None], made[None].bool())
        return torch.tensor(u), u_text

    def report(self) -> list[float | None]:
        """Per subject region: the share of decisions the subject won (None: no decision was made)."""
        if self.wins is None:
            return [None] * self.n_subjects
        wins, made = self.wins.float().cpu().tolist(), self.decisions.float().cpu().tolist()  # the one sync
        return [w / m if m > 0 else None for w, m in zip(wins, made, strict=True)]


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
            picked = by_pixel[rows][:, tokens]
            return lambda owner: delta.owner_delta(None, picked, owner)

        return at
    if x.ndim == 2:  # "global": one vector per row is one token
        x, ranks = x[:, None], ranks[:, None]

    def at(rows, tokens):
        x_picked, ranks_picked = x[rows][:, tokens], ranks[rows][:, tokens]
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
