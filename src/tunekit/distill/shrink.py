"""`tunekit shrink`: a student made from the teacher by keeping a subset of its decoder layers.

Layer dropping gives a student that shares the teacher's tokenizer, embeddings, head and (for the kept layers)
weights, so it exists offline and starts far closer to the teacher than a random init would (as in
DistilBERT, Sanh et al. 2019, which kept every other layer). `every=3` keeps round(L/3) layers spread evenly
from the first to the last: the first and last layers are the ones layer-pruning studies keep (Gromov et al.
2024, "The Unreasonable Ineffectiveness of the Deeper Layers", drop a block of deep layers before the last one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from ..methods import count_parameters
from ..methods.targets import decoder_layers
from .teacher import DistillError


def layers_to_keep(n_layers: int, every: int | None = None, layers: list[int] | None = None) -> list[int]:
    """Sorted layer indices: an explicit list (negative = from the end), or round(n/every) evenly spaced ones
    that include the first and the last layer."""
    if (every is None) == (layers is None):
        raise DistillError("choose the kept layers with exactly one of --every N or --layers i,j,k")
    if layers is not None:
        keep = sorted({i + n_layers if i < 0 else i for i in layers})
        bad = [i for i in keep if not 0 <= i < n_layers]
        if bad or not keep:
            raise DistillError(f"--layers {layers}: the teacher has layers 0..{n_layers - 1}")
        return keep
    if every < 1:
        raise DistillError(f"--every must be >= 1, got {every}")
    count = max(1, round(n_layers / every))
    if count == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def drop_layers_(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder layers `keep` in `model` (mutates it), renumbering what indexes the KV cache."""
    config = model.config.get_text_config()
    path, layers = decoder_layers(model)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # attention modules index the KV cache by it
                module.layer_idx = new_index
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(parent, path.rpartition(".")[2], kept)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


def shrink(model: str, out: str, every: int | None = None, layers: list[int] | None = None,
           adapter: str | None = None, dtype: str = "float32") -> dict:
    """Write a student (a transformers model folder) with the kept layers of `model` (+ `adapter`, merged first)."""
    from ..inference import attach_adapter, tokenizer_source
    from ..models import DTYPES, load_model, load_tokenizer

    t0 = time.perf_counter()
    teacher = load_model(model, dtype="float32")
    if adapter is not None:
        teacher = attach_adapter(teacher, Path(adapter), torch.device("cpu"), merge=True)
    n_layers = teacher.config.get_text_config().num_hidden_layers
    keep = layers_to_keep(n_layers, every, layers)
    teacher_params = count_parameters(teacher)[1]
    student = drop_layers_(teacher, keep).to(DTYPES[dtype])
    student_params = count_parameters(student)[1]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir, safe_serialization=True)
    tok = load_tokenizer(tokenizer_source(model, adapter))
    tok.save_pretrained(out_dir)
    report = {"teacher": model, "teacher_adapter": adapter, "teacher_layers": n_layers, "kept_layers": keep,
              "teacher_params": teacher_params, "student_params": student_params,
              "param_ratio": student_params / teacher_params, "dtype": dtype,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "shrink.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(r: dict) -> str:
    return (f"student: {len(r['kept_layers'])} of {r['teacher_layers']} layers {r['kept_layers']}\n"
            f"parameters: {r['student_params']:,} (teacher {r['teacher_params']:,}, ratio {r['param_ratio']:.2f}; "
            f"embeddings and head are kept whole)")
