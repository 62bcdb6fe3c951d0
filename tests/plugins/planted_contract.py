"""Two attentions with planted contract bugs that the ONNX parity gate cannot see (torch and
onnxruntime run the same wrong code): one peeks one token ahead, one whose cache drops its
first entry once it holds 20 tokens. ``gptkit export`` must refuse both."""

from typing import Literal

import torch
import torch.nn as nn

from gptkit import hookimpl
from gptkit.components.attention import MHASpec

__version__ = "0.1"


class PeekAhead(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, positions, past=None, key_mask=None):
        y, present = self.inner(x, positions, past, key_mask)
        ahead = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
        return y + 0.5 * ahead, present  # position t sees token t + 1


class DropsFirst(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, positions, past=None, key_mask=None):
        if past is not None and past[0].size(2) >= 20:
            past = (past[0][:, :, 1:], past[1][:, :, 1:])  # loses the first token
        return self.inner(x, positions, past, key_mask)


class PeekAheadSpec(MHASpec):
    kind: Literal["peek_ahead"] = "peek_ahead"  # type: ignore[assignment]

    def build(self, model, *, positional):
        return PeekAhead(super().build(model, positional=positional))


class DropsFirstSpec(MHASpec):
    kind: Literal["drops_first"] = "drops_first"  # type: ignore[assignment]

    def build(self, model, *, positional):
        return DropsFirst(super().build(model, positional=positional))


@hookimpl
def gptkit_register_attention(register):
    register(PeekAheadSpec)
    register(DropsFirstSpec)
