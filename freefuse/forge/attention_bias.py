"""The attention bias of one FreeFuse session: where it applies, its factors per call, and which form runs.

The maths is the core's (freefuse.bias builds the factors, freefuse.attention runs attention with them); this
file picks the call's rows, text length and image grid, caches per call shape, and falls back from the channels
form to the dense mask once, with a message, if the attention call refuses the wider head dimension.

The form follows the layout unless a caller sets one: FLUX's joint attention takes the channels (its dense bias
is (T + N)^2 per image, 85 MB at 1024x1024, and keeps attention off its fastest kernels); a UNet's cross
attention takes the dense bias, which is only N x 77 there, while widening its 64-wide heads by a quarter costs
more (measured in benchmarks/bench_blocks.py).
"""

from __future__ import annotations

import logging

import torch

from freefuse import call_weights as cw
from freefuse.attention import attention_bias_channels, attention_bias_dense, channel_extras
from freefuse.bias import BiasFactors, call_bias_factors

log = logging.getLogger("freefuse")
DEFAULT_FORMS = {"joint": "channels", "cross": "dense"}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class SessionBias:
    def __init__(self, session, form: str | None = None):
        self.session = session
        self.form = form  # "channels", "dense", or None: the layout's default (DEFAULT_FORMS)
        self._said = False

    def grid(self, family, **where) -> tuple[int, int] | None:
        """The image grid the current call's bias applies at, or None where no bias applies."""
        session = self.session
        call = session.call
        if call is None or call.mode != cw.MASKED or not session.settings.attention_bias:
            return None
        return family.bias_grid(session, **where)

    def attend(self, layout: str, grid: tuple[int, int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Attention of q ``[B, H, L_q, D]`` over k, v ``[B, H, L_k, D]`` with the current call's bias. What the
        form needs (extra channels, or the dense bias in q's dtype) is built once per call shape."""
        where = (layout, self._shape(grid), q.device, q.dtype)
        if (self.form or DEFAULT_FORMS[layout]) == "channels":
            extras = self.session.cached(
                ("channel extras", *where, q.shape[-1]),
                lambda: channel_extras(self._factors(layout, grid, q.device), q.shape[-1], q.dtype, q.device),
            )
            try:
                out = attention_bias_channels(q, k, v, extras)
            except OUT_OF_MEMORY:
                raise  # the dense form needs more memory, not less
            except RuntimeError as err:
                self.form = "dense"
                self.session.messages.append(
                    f"the attention bias ran as a dense mask (the attention call refused extra channels: {err})"
                )
            else:
                if not self._said:
                    self._said = True
                    log.info("FreeFuse: attention bias as extra channels (head dim %d -> %d)", q.shape[-1],
                             q.shape[-1] + extras.query.shape[-1])  # fmt: skip
                return out
        dense = self.session.cached(
            ("dense bias", *where), lambda: self._factors(layout, grid, q.device).dense().to(q.dtype)
        )
        return attention_bias_dense(q, k, v, dense)

    def _factors(self, layout: str, grid: tuple[int, int], device) -> BiasFactors:
        session, settings = self.session, self.session.settings
        call = session.call

        def build():
            factors = call_bias_factors(
                layout,
                session.masks_at(grid).masks.flatten(2),
                session.positions,
                session.plan.n_txt_cond,
                call.shape.n_txt,
                call.shape.cond_or_uncond,
                neg_scale=settings.bias_scale,
                pos_scale=settings.bias_positive_scale,
                positive=settings.bias_positive,
                bidirectional=settings.bias_bidirectional,
            )
            return BiasFactors(factors.query.to(device), factors.key.to(device))

        return session.cached((layout, "bias factors", self._shape(grid), device), build)

    def _shape(self, grid):
        return self.session.call.shape, tuple(grid)
