"""Hyper-parameters read from state-dict keys and shapes, shared by the upscaler architectures."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from modules.errors import CheckpointError


def seq_len(sd: Mapping[str, object], prefix: str) -> int:
    """How many entries `prefix.N.…` has: the largest N plus one (0 when there are none)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = [int(m.group(1)) for key in sd if (m := pattern.match(key))]
    return max(found) + 1 if found else 0


def shuffle_scale(conv_out: int, in_ch: int, family: str) -> tuple[int, int]:
    """(scale, output channels) of a conv feeding one pixel shuffle: conv_out = out_ch * scale².

    Output channels are taken equal to the input's when that fits, else 3, 4 or 1 (as published models are).
    """
    for out_ch in dict.fromkeys((in_ch, 3, 4, 1)):
        scale = math.isqrt(conv_out // out_ch)
        if conv_out % out_ch == 0 and scale * scale * out_ch == conv_out:
            return scale, out_ch
    raise CheckpointError(f"{family}: the upsampling conv has {conv_out} outputs, which is not "
                          "channels x scale² for 1, 3 or 4 channels")
