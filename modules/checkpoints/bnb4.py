"""bitsandbytes 4-bit weights (NF4, FP4) as Forge's `*-bnb-nf4.safetensors` files store them, read and
dequantized in plain torch (bitsandbytes is not needed).

For a quantized weight `X.weight` a file holds (bitsandbytes' `QuantState.as_dict(packed=True)`):
- `X.weight`: uint8, two 4-bit codes per byte, the first element in the high nibble;
- `X.weight.quant_map`: the 16 float32 values the codes stand for (NF4's or FP4's table);
- `X.weight.absmax`: one float32 scale per block of `blocksize` elements (the last block may be short),
  or, with double quantization, one uint8 code per block into `X.weight.nested_quant_map` (256 float32
  values), scaled per group of `nested_blocksize` blocks by `X.weight.nested_absmax` (float32) and
  shifted by `nested_offset`;
- `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 bytes of a JSON object with
  `quant_type`, `blocksize`, `dtype`, `shape` and, when nested, `nested_blocksize`, `nested_dtype`,
  `nested_offset`.

An element i of the flattened weight is `quant_map[code_i] * absmax[i // blocksize]`, computed in float32
and rounded once to the compute dtype, as bitsandbytes does.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from modules.errors import CheckpointError

MARKER = ".quant_state.bitsandbytes__"
FORMATS = {"nf4": "NF4", "fp4": "FP4"}  # quant_type -> packed format name
AUX_LEAVES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_MAX_STATE_BYTES = 1 << 16


@dataclass(frozen=True)
class Bnb4State:
    """The scales of one 4-bit weight; `nested_start` counts the blocks of the first nested group
    that belong to an earlier part (a weight split along its rows, e.g. FLUX's fused qkv)."""

    blocksize: int
    quant_map: torch.Tensor  # (16,) float32
    absmax: torch.Tensor  # (blocks,) float32, or uint8 codes when nested
    nested_absmax: torch.Tensor | None = None  # (groups,) float32
    nested_quant_map: torch.Tensor | None = None  # (256,) float32
    offset: torch.Tensor | None = None  # () float32
    nested_blocksize: int = 256
    nested_start: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> Bnb4State:
        return replace(self, **tensors)


def block_scales(state: Bnb4State) -> torch.Tensor:
    """float32 absmax per block, the double quantization undone (bitsandbytes' arithmetic, step by step)."""
    if state.nested_absmax is None:
        return state.absmax.float()
    n, lead, size = state.absmax.numel(), state.nested_start, state.nested_blocksize
    groups = -(-(lead + n) // size)
    codes = torch.zeros(groups * size, device=state.absmax.device)  # whole groups, this part's blocks at `lead`
    codes[lead:lead + n] = state.nested_quant_map[state.absmax.long()]
    scaled = codes.view(groups, size) * state.nested_absmax[:groups, None]
    return scaled.view(-1)[lead:lead + n] + state.offset


def dequantize(data: torch.Tensor, state: Bnb4State, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The float weight of packed 4-bit `data`, on its device, in `dtype`."""
    n = math.prod(shape)
    byte = torch.arange(256, device=data.device)
    pairs = torch.stack([state.quant_map[byte >> 4], state.quant_map[byte & 15]], dim=1)  # high nibble first
    values = pairs.index_select(0, data.reshape(-1).int()).reshape(-1)[:n]
    scales = block_scales(state)
    full = n - n % state.blocksize
    values[:full].view(-1, state.blocksize).mul_(scales[:full // state.blocksize, None])
    if full < n:
        values[full:].mul_(scales[-1])
    return values.to(dtype).reshape(shape)


def slice_state(state: Bnb4State, first_block: int, blocks: int) -> Bnb4State:
    """The scales of blocks first_block .. first_block + blocks (a part of the weight along dim 0)."""
    absmax = state.absmax[first_block:first_block + blocks]
    if state.nested_absmax is None:
        return replace(state, absmax=absmax)
    start = state.nested_start + first_block
    g0, g1 = start // state.nested_blocksize, -(-(start + blocks) // state.nested_blocksize)
    return replace(state, absmax=absmax, nested_absmax=state.nested_absmax[g0:g1],
                   nested_start=start - g0 * state.nested_blocksize)


def cat_states(states: list[Bnb4State]) -> Bnb4State:
    """The scales of parts joined along dim 0 (nested ones are resolved to float32: one small tensor)."""
    first = states[0]
    if any(s.blocksize != first.blocksize for s in states):
        raise CheckpointError("4-bit weights of different block sizes cannot be joined")
    absmax = torch.cat([block_scales(s) for s in states])
    return Bnb4State(first.blocksize, first.quant_map, absmax)


# ---------------------------------------------------------------- files

def quant_types(keys: list[str] | dict[str, Any]) -> dict[str, str]:
    """weight key -> quant type ('nf4', 'fp4', or whatever else the file names) for each 4-bit weight."""
    return {k.split(MARKER)[0]: k.split(MARKER)[1] for k in keys if MARKER in k}


def aux_keys(weights: dict[str, str]) -> set[str]:
    """The scale and state keys that belong to the 4-bit weights (they must not be converted or built)."""
    return {f"{w}.{leaf}" for w in weights for leaf in AUX_LEAVES} | {f"{w}{MARKER}{t}" for w, t in weights.items()}


def _header_tensor(path: Path, data_start: int, entry: dict[str, Any]) -> bytes:
    begin, end = entry["data_offsets"]
    if end - begin > _MAX_STATE_BYTES:
        raise ValueError(f"{end - begin} bytes")
    with path.open("rb") as f:
        f.seek(data_start + begin)
        return f.read(end - begin)


def _numel(header: dict[str, Any], key: str) -> int | None:
    entry = header.get(key)
    return math.prod(entry["shape"]) if isinstance(entry, dict) and "shape" in entry else None


def read_quant_state(path: Path, header_len: int, header: dict[str, Any], weight: str, qtype: str
                     ) -> dict[str, Any]:
    """The JSON quant state of `weight`, checked against the tensors the header lists; CheckpointError
    naming the file and the tensor for anything bitsandbytes could not load either."""
    name = Path(path).name
    if qtype not in FORMATS:
        raise CheckpointError(f"{name}: tensor {weight} uses bitsandbytes quantization {qtype!r}, which Atelier "
                              f"does not read (it reads {', '.join(FORMATS)}); use an NF4, GGUF or fp8 file "
                              "of this model")
    try:
        raw = _header_tensor(Path(path), 8 + header_len, header[f"{weight}{MARKER}{qtype}"])
        state = json.loads(raw.decode("utf-8"))
        shape = tuple(int(s) for s in state["shape"])
        blocksize = int(state["blocksize"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as err:
        raise CheckpointError(f"{name}: the quant_state of {weight} is not valid bitsandbytes JSON "
                              f"({type(err).__name__}: {str(err)[:80]}); the file is corrupt. Download it "
                              "again.") from err
    _check_sizes(name, header, weight, qtype, state, shape, blocksize)
    return {**state, "quant_type": qtype}


def _check_sizes(name: str, header: dict[str, Any], weight: str, qtype: str, state: dict[str, Any],
                 shape: tuple[int, ...], blocksize: int) -> None:
    n = math.prod(shape)
    blocks = -(-n // blocksize) if blocksize > 0 else 0
    nested = "nested_offset" in state
    nested_blocksize = int(state.get("nested_blocksize", 256)) if nested else 256
    need = {weight: -(-n // 2), f"{weight}.quant_map": 16, f"{weight}.absmax": blocks}
    if nested:
        need |= {f"{weight}.nested_quant_map": 256, f"{weight}.nested_absmax": -(-blocks // max(nested_blocksize, 1))}
    problems = []
    if state.get("quant_type", qtype) != qtype:
        problems.append(f"its state says {state.get('quant_type')!r} but its key says {qtype!r}")
    if blocksize not in BLOCKSIZES or nested_blocksize <= 0 or min(shape, default=0) <= 0:
        problems.append(f"block size {blocksize}, shape {list(shape)}")
    problems += [f"{k.removeprefix(weight) or 'the data'} has {_numel(header, k)} elements, needs {count}"
                 for k, count in need.items() if _numel(header, k) != count]
    if problems:
        raise CheckpointError(f"{name}: the 4-bit weight {weight} is inconsistent ({'; '.join(problems)}); "
                              "the file is corrupt or not a bitsandbytes checkpoint. Download it again.")


def build_state(sd: dict[str, torch.Tensor], weight: str, state: dict[str, Any]) -> Bnb4State:
    """A weight's scales from the file's tensors (popped from `sd`) and its JSON state."""
    for leaf in AUX_LEAVES:
        sd.setdefault(f"{weight}.{leaf}", None)
    absmax, quant_map = sd.pop(f"{weight}.absmax"), sd.pop(f"{weight}.quant_map").float()
    nested_absmax, nested_map = sd.pop(f"{weight}.nested_absmax"), sd.pop(f"{weight}.nested_quant_map")
    if "nested_offset" not in state:
        return Bnb4State(int(state["blocksize"]), quant_map, absmax.float())
    return Bnb4State(int(state["blocksize"]), quant_map, absmax, nested_absmax.float(), nested_map.float(),
                     torch.tensor(float(state["nested_offset"]), dtype=torch.float32),
                     int(state.get("nested_blocksize", 256)))
