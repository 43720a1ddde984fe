"""The streaming Segmenter with the model as trained (`base`, optimize=False) against variants, side by side in
one process (alternating per frame), per-stage medians. Threads: T (default 1), frames: N (default 12), size: S.

    .venv/bin/python benchmarks/inference_copy.py lmrc-lite F 'opt={"optimize":true}'
    .venv/bin/python benchmarks/inference_copy.py lmrc-lite F 'fold={"prep":{"fold":true,"channels_last":false}}' \
        'cl={"prep":{"fold":true,"channels_last":true}}'
    TORCHINDUCTOR_COMPILE_THREADS=1 N=14 .venv/bin/python benchmarks/inference_copy.py lmrc-lite F \
        'opt={"optimize":true}' 'compiled={"optimize":true,"compile":true}'
"""
import sys, os, torch, json
from lmrc.eval.bench import build_model, synthetic_video, measure
from lmrc.inference.segmenter import Segmenter
from lmrc.model.inference import prepare_for_inference
torch.set_num_threads(int(os.environ.get("T", "1")))
name, setting = sys.argv[1], sys.argv[2]
frames = int(os.environ.get("N", "12")); size = int(os.environ.get("S", "480"))
m = build_model(name, setting)
variants = {"base": dict(optimize=False)}
for v in sys.argv[3:]:
    k, _, val = v.partition("=")
    variants[k] = json.loads(val)
segs = {}
for k, kw in variants.items():
    prep = kw.pop("prep", None)
    if prep is not None:
        s = Segmenter(m, size=size, optimize=False); s.model = prepare_for_inference(m, **prep); segs[k] = s
    else:
        segs[k] = Segmenter(m, size=size, **kw)
print("load", os.getloadavg())
runs = measure(segs, synthetic_video(frames), 4)
for k, r in runs.items():
    s = r.summary(4)
    print(f"{k:>10} {s['ms_per_frame']:8.1f} ms  mean {s['ms_per_frame_mean']:8.1f} ", " ".join(f"{a[:6]}={b:.0f}" for a, b in s["stages_ms"].items()))
print("load", os.getloadavg())
