"""Writing GGUF files: tensor types per ``--outtype`` and an atomic write.

The type rules are llama.cpp's converter's (``ModelBase.prepare_tensors`` in
``conversion/base.py``): 1-D tensors and ``*_norm.weight`` stay F32; everything else takes the
outtype; a Q8_0 tensor whose rows are not a multiple of 32 values falls back to F16.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import gguf
import numpy as np
from torch import Tensor

from ..errors import LoraError

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, Q]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}


def check_outtype(outtype: str) -> tuple[gguf.LlamaFileType, Q]:
    """(file type, tensor type) of ``outtype``; ``LoraError`` for an unknown one."""
    if outtype not in OUTTYPES:
        raise LoraError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}.")
    return OUTTYPES[outtype]


def add_tensor(writer: gguf.GGUFWriter, name: str, value: Tensor, outtype: str) -> None:
    """Add ``value`` (float) to ``writer`` as ``name``, encoded as the converter would."""
    data = value.detach().float().cpu().numpy()
    qtype = check_outtype(outtype)[1]
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = Q.F32
    try:
        encoded = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # rows not a multiple of the block size
        qtype = Q.F16
        encoded = gguf.quants.quantize(data, qtype)
    writer.add_tensor(name, np.ascontiguousarray(encoded), raw_dtype=qtype)


def write_atomic(writer: gguf.GGUFWriter, path: str | os.PathLike) -> Path:
    """Write ``writer``'s header, metadata and tensors to ``path`` in one rename.

    The file is written beside ``path`` under a hidden temporary name, fsynced and renamed, so
    ``path`` holds the old file or the complete new one, never a part.
    """
    out = Path(path)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as err:
        _abandon(writer, tmp)
        raise LoraError(
            f"Could not write {out} ({err.strerror or err}); nothing was written there. "
            "Free space or choose another --output."
        ) from err
    except BaseException:
        _abandon(writer, tmp)
        raise
    return out


def _abandon(writer: gguf.GGUFWriter, tmp: Path) -> None:
    if writer.fout is not None:
        for f in writer.fout:
            with contextlib.suppress(OSError):  # a full disk fails the flush of close()
                f.close()
    tmp.unlink(missing_ok=True)
