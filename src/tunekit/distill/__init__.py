"""Teacher -> student distillation: shrink a teacher into a student, offline teacher data, logit KD, on-policy.

    tunekit shrink --model smollm2-135m --adapter runs/demo/lora --every 3 --out students/s10
    tunekit distill --config configs/distill-logit.yaml
"""

from .losses import DIVERGENCES, KDSpec, divergence, kd_loss_sum
from .shrink import layers_to_keep, shrink
from .teacher import DistillError, check_same_tokenizer

__all__ = ["DIVERGENCES", "DistillError", "KDSpec", "check_same_tokenizer", "divergence", "distill", "kd_loss_sum",
           "layers_to_keep", "shrink"]


def distill(cfg):
    """Run cfg (a Config with a distill section): offline mode writes the teacher data first, then trains on it."""
    from pathlib import Path

    from ..engine import train

    d = cfg.distill
    if d is None:
        raise DistillError("tunekit distill needs a distill section: distill.teacher and distill.mode at least")
    if d.mode == "offline":
        if not d.teacher:
            raise DistillError("distill.teacher is not set: name the teacher model (alias, folder, .gguf or hub id)")
        from .teacher_data import write_teacher_data

        if cfg.train.threads:
            import torch

            torch.set_num_threads(cfg.train.threads)

        out = d.teacher_data or str(Path(cfg.train.output_dir) / "teacher_data.jsonl")
        if cfg.data.train != out:  # a resumed run already points at its teacher data
            write_teacher_data(d, cfg.data.train, out, device=cfg.train.device, progress=cfg.train.progress)
        cfg = cfg.model_copy(deep=True)
        cfg.distill.teacher_data = out
        cfg.data.train = out
    return train(cfg)
