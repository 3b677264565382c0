"""A/B of fp32 LoRA training speed with and without oneDNN-packed fp32 frozen weights (train.packed_weights_fp32),
demo preset, 8 steps per run, runs alternated in one process. Run it as an AVX2-only CPU would with:
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 TUNEKIT_CPU_FLAGS=avx2,fma,sse4_2 \
    python benchmarks/fp32_packing_ab.py off on off on
"""
import json, os, sys
from tunekit.api import train
from tunekit.config import load_config
from tunekit.demo.invoices import write_demo_dataset
from tunekit.demo.pipeline import PRESET
data = write_demo_dataset("runs/fp32-ab/data", n_test=10)
out = {}
for mode in sys.argv[1:]:
    cfg = load_config(PRESET, {"data.train": str(data["train"]), "train.output_dir": f"runs/fp32-ab/{mode}",
                               "train.max_steps": 8, "train.save_every": 0, "train.packed_weights_fp32": mode,
                               "data.val_fraction": 0.0, "train.pii": "off"})
    r = train(cfg)
    out[mode] = {"tokens_per_s": round(r.tokens_per_s, 1), "precision": r.precision}
    print(json.dumps(out), flush=True)
print(json.dumps({"env": {k: os.environ.get(k) for k in ("TUNEKIT_CPU_FLAGS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}, **out}))
