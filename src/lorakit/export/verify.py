"""``--verify``: read a written merged GGUF back, tensor by tensor, against lorakit's model.

Each GGUF tensor is decoded (``gguf.quants.dequantize``), put back in the Hugging Face layout
(``ArchMap.to_hf``: q/k rows, transposes, Gemma's norm shift undone) and compared with the
merged model's parameter. The report gives, per tensor kind and GGUF type, the largest
``|GGUF - lorakit|`` and the largest ``|weight|``; a row passes when its error is within what
the encoding allows, relative to the tensor's largest value:

    F32   2^-23   (exact, up to the rounding of Gemma's w + 1)
    F16   2^-11   (round to nearest, 10 mantissa bits)
    BF16  2^-8    (7 mantissa bits)
    Q8_0  1/127   (blocks of 32 scaled by their largest value / 127, the scale itself F16)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LoraError
from ..tables import format_table
from .archs import ArchMap
from .gguf_read import Header

RELATIVE = {"F32": 2.0**-23, "F16": 2.0**-11, "BF16": 2.0**-8, "Q8_0": 1.0 / 127 + 2.0**-11}


@dataclass
class Row:
    """Every tensor of one kind (``attn_q.weight``, all blocks) and GGUF type."""

    kind: str
    qtype: str
    tensors: int = 0
    largest_diff: float = 0.0
    largest_value: float = 0.0

    @property
    def ok(self) -> bool:
        return self.largest_diff <= RELATIVE.get(self.qtype, 0.0) * max(self.largest_value, 1e-30)


@dataclass
class Verified:
    """The comparison of a GGUF file with the merged model it was written from."""

    path: str
    rows: list[Row] = field(default_factory=list)
    not_from_model: list[str] = field(default_factory=list)  # rope_freqs, ...

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def __str__(self) -> str:
        table = [("tensor", "type", "count", "largest |GGUF - lorakit|", "largest |w|", "")]
        for r in self.rows:
            table.append(
                (
                    r.kind,
                    r.qtype,
                    str(r.tensors),
                    f"{r.largest_diff:.3g}",
                    f"{r.largest_value:.3g}",
                    "ok" if r.ok else "TOO LARGE",
                )
            )
        lines = [
            f"verify {self.path}: read back against lorakit's merged model",
            *format_table(table),
        ]
        if self.not_from_model:
            lines.append("not from the model's parameters: " + ", ".join(self.not_from_model))
        return "\n".join(lines)


def verify_gguf(merged: nn.Module, path: str | os.PathLike) -> Verified:
    """Compare the GGUF at ``path`` with ``merged`` (a plain model, adapters folded in).

    Raises:
        LoraError: a parameter with no tensor in the file, or a tensor of another shape.
    """
    arch = ArchMap(merged)
    expected = {arch.gguf_name(n): (n, p) for n, p in merged.named_parameters()}
    header = Header(path)
    missing = sorted(set(expected) - {t.name for t in header.tensors})
    if missing:
        raise LoraError(f"{path} lacks {', '.join(missing[:5])}: not this model's GGUF.")
    report, rows = Verified(str(path)), {}
    for info in header.tensors:
        if info.name not in expected:
            report.not_from_model.append(info.name)
            continue
        hf_name, param = expected[info.name]
        stored = torch.from_numpy(header.tensor(info))
        back = arch.to_hf(hf_name, stored)
        if back.shape != param.shape:
            raise LoraError(f"{path}: {info.name} is {tuple(back.shape)}, {hf_name} {param.shape}")
        kind = re.sub(r"^blk\.\d+\.", "", info.name)
        row = rows.setdefault((kind, info.qtype.name), Row(kind, info.qtype.name))
        row.tensors += 1
        diff = (back.double() - param.detach().double().cpu()).abs().max().item()
        row.largest_diff = max(row.largest_diff, diff)
        row.largest_value = max(row.largest_value, stored.abs().max().item())
    report.rows = sorted(rows.values(), key=lambda r: (r.kind, r.qtype))
    return report
