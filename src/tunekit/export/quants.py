"""Which GGML type each tensor gets for a `--quant` choice, and the encoders that produce its bytes.

    quant name (q4_k_m, q8_0, ...) + tensor name/shape -> GGMLQuantizationType -> bytes for gguf-py's writer

Encoders: F32/F16/BF16 and the legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) through gguf-py's numpy
quantizers; the k-quants (Q4_K, Q5_K, Q6_K, ...) have no encoder in gguf-py, so they go through llama.cpp's own
`ggml_quantize_chunk`, called with ctypes from the llama.cpp library that the `xllamacpp` wheel ships.

The per-tensor mix of the *_k_m types follows llama.cpp's published rule for those presets (facts, not code,
from llama.cpp's `llama_tensor_get_type`): the output matrix (or the tied token embedding) gets Q6_K, attn_v and
ffn_down get Q6_K in the first and last eighth of the layers and every third layer between, the rest the
preset's type; a tensor whose rows are not a multiple of 256 (k-quant super-block) falls back to Q5_0 (for Q4_K),
Q5_1 (Q5_K) or Q8_0 (Q6_K), as llama.cpp does. One-dimensional tensors (norms, biases) stay F32.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType
from gguf import quants as gguf_quants

# --quant name -> (default type, llama.cpp file type recorded in general.file_type)
QUANTS: dict[str, tuple[T, LlamaFileType]] = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q6_k": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k_m": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
K_TYPES = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.Q4_0, T.Q2_K: T.Q4_0}
NUMPY_TYPES = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16}


class QuantError(ValueError):
    """A quant type the writer does not support, or a k-quant without llama.cpp's library."""


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise QuantError(f"--quant {quant!r} is not supported; choose one of: {', '.join(QUANTS)}")


def more_bits(layer: int, n_layer: int) -> bool:
    """The layers llama.cpp's *_M presets give more bits: first and last eighth, and every third in between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, tied_output: bool) -> T:
    """The GGML type of one tensor. shape: the numpy (row-major) shape, rows last: (out, in)."""
    check_quant(quant)
    base = QUANTS[quant][0]
    if len(shape) == 1 or base == T.F32:
        return T.F32
    chosen = base
    if quant.endswith("_k_m"):
        if name == "output.weight" or (tied_output and name == "token_embd.weight"):
            chosen = T.Q6_K
        elif name.endswith(("attn_v.weight", "ffn_down.weight")):
            layer = int(name.split(".")[1])
            chosen = T.Q6_K if more_bits(layer, n_layer) else base
    row = shape[-1]
    if chosen in K_TYPES and row % 256:
        chosen = K_FALLBACK[chosen]
    block = GGML_QUANT_SIZES[chosen][0]
    if row % block:
        chosen = T.F16  # rows that do not fill a 32-wide block: llama.cpp keeps such tensors unquantized too
    return chosen


def encode(array: np.ndarray, qtype: T) -> np.ndarray:
    """array (rows..., n_per_row) float32 -> what gguf-py's add_tensor takes for qtype (raw bytes for blocks)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F32:
        return array
    if qtype == T.F16:
        return array.astype(np.float16)
    if qtype in NUMPY_TYPES:
        return gguf_quants.quantize(array, qtype)
    if qtype in K_TYPES:
        return ggml_quantize(array, qtype)
    raise QuantError(f"no encoder for {qtype.name}")


@functools.cache
def ggml_library() -> ctypes.CDLL:
    """llama.cpp's library from the xllamacpp wheel (it exports ggml_quantize_chunk)."""
    try:
        import xllamacpp
    except ImportError as e:
        raise QuantError("k-quants (q4_k_m, q5_k_m, q6_k) use llama.cpp's quantizer, which tunekit takes from the "
                         "`xllamacpp` wheel: pip install xllamacpp (or choose q8_0 / q4_0 / q5_0 ...)") from e
    lib = ctypes.CDLL(str(next(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return lib


def ggml_quantize(array: np.ndarray, qtype: T) -> np.ndarray:
    """(rows, n) float32 -> (rows, n / block * bytes_per_block) uint8, by llama.cpp's ggml_quantize_chunk."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_per_row = array.shape[-1]
    rows = array.size // n_per_row
    out = np.empty((rows, n_per_row // block * type_size), dtype=np.uint8)
    written = ggml_library().ggml_quantize_chunk(int(qtype), array.ctypes.data, out.ctypes.data, 0, rows, n_per_row,
                                                 None)
    if written != out.nbytes:
        raise QuantError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out.reshape(*array.shape[:-1], out.shape[-1])
