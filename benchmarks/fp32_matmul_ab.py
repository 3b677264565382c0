"""fp32 products of the SmolLM2-135M decoder shapes (2,048 rows, forward): MKL (F.linear) vs oneDNN's packed product,
medians of 8 alternated rounds in one process, GFLOP/s, and the max |difference|. Cap the ISA with
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 to see the AVX2 code paths.
"""
import os, time, json, statistics, torch
import torch.nn.functional as F
torch.manual_seed(0)
T = 2048
shapes = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30}
cases = {}
for (o, i), c in shapes.items():
    x = torch.randn(T, i); w = torch.randn(o, i)
    fns = {"mkl": lambda x=x, w=w: F.linear(x, w)}
    try:
        pw = torch.ops.mkldnn._reorder_linear_weight(w)
        fns["onednn_packed"] = lambda x=x, pw=pw: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")
        err = (fns["onednn_packed"]() - F.linear(x, w)).abs().max().item()
    except Exception as e:
        err = f"{type(e).__name__}: {str(e)[:100]}"
    cases[(o, i, c)] = (fns, err)
times = {k: [] for k in ("mkl", "onednn_packed")}
for rnd in range(8):
    for name in times:
        tot = 0.0
        for (o, i, c), (fns, err) in cases.items():
            if name not in fns: tot = None; break
            f = fns[name]; f(); best = 1e9
            for _ in range(3):
                t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
            tot += c * best
        times[name].append(tot)
fl = sum(c * 2 * T * o * i for (o, i, c) in cases)
out = {"caps": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")},
       "max_abs_err": [e for _, e in cases.values()]}
for name, ts in times.items():
    if ts and ts[0] is not None:
        out[name + "_gflops_median"] = round(fl / statistics.median(ts) / 1e9, 1)
print(json.dumps(out))
