"""The streaming Segmenter with the model as trained (`base`, optimize=False) against variants, side by side in
one process (alternating per frame), per-stage medians. Threads: T (default 1), frames: N (default 12), size: S,
precision: P (fp32 or bf16, default fp32).
SEQ=name runs the shipped weights on that DAVIS sequence (frames and first mask under DAVIS, default
../shared/data/davis2016) instead of random weights on the synthetic video; NOBASE=1 leaves `base` out.

    .venv/bin/python benchmarks/inference_copy.py lmrc-lite F 'opt={"optimize":true}'
    .venv/bin/python benchmarks/inference_copy.py lmrc-lite F 'fold={"prep":{"fold":true,"channels_last":false}}' \
        'cl={"prep":{"fold":true,"channels_last":true}}'
    TORCHINDUCTOR_COMPILE_THREADS=1 N=14 .venv/bin/python benchmarks/inference_copy.py lmrc-lite F \
        'opt={"optimize":true}' 'compiled={"optimize":true,"compile":true}'
    SEQ=soccerball NOBASE=1 T=2 .venv/bin/python benchmarks/inference_copy.py lmrc-lite F \
        'before={"prep":{"project_values":false}}' 'after={"prep":{"project_values":true}}'
    P=bf16 T=2 N=20 NOBASE=1 .venv/bin/python benchmarks/inference_copy.py lmrc-lite F \
        'unpacked={"prep":{"pack":false}}' 'packed={"prep":{"pack":true}}'
A variant's "none" lists attributes of the inference copy set to None after it is built, e.g. keys and values left
in the encoders' bf16 instead of float32:
    P=bf16 T=2 N=25 NOBASE=1 .venv/bin/python benchmarks/inference_copy.py lmrc-lite F 'f32={}' \
        'bf16={"none":["key_encoder.nchw_dtype","value_encoder.nchw_dtype"]}'
"""
import sys, os, torch, json
from lmrc.utils.memory import reuse_freed_memory
from lmrc.eval.bench import build_model, synthetic_video, video_frames, measure
from lmrc.inference.segmenter import Segmenter
from lmrc.inference.fast_path import prepare_for_inference
from lmrc.model.weights import load_model
reuse_freed_memory()  # as the command line does
torch.set_num_threads(int(os.environ.get("T", "1")))
name, setting = sys.argv[1], sys.argv[2]
frames = int(os.environ.get("N", "12")); size = int(os.environ.get("S", "480"))
precision = os.environ.get("P", "fp32")
seq, davis = os.environ.get("SEQ"), os.environ.get("DAVIS", "../shared/data/davis2016")
if seq:
    m = load_model(name)
    video = list(video_frames(f"{davis}/JPEGImages/480p/{seq}", f"{davis}/Annotations/480p/{seq}/00000.png", 10**6))
else:
    m = build_model(name, setting)
    video = list(synthetic_video(frames))
variants = {} if os.environ.get("NOBASE") else {"base": dict(optimize=False)}
for v in sys.argv[3:]:
    k, _, val = v.partition("=")
    variants[k] = json.loads(val)
segs = {}
for k, kw in variants.items():
    prep, nones = kw.pop("prep", None), kw.pop("none", [])
    if prep is not None:
        s = Segmenter(m, size=size, precision=precision, optimize=False)
        s.model = prepare_for_inference(m, timer=s.timer, dtype=s._autocast_dtype, **prep)
        segs[k] = s
    else:
        segs[k] = Segmenter(m, size=size, precision=precision, **kw)
    for path in nones:
        owner, _, name = path.rpartition(".")
        setattr(segs[k].model.get_submodule(owner) if owner else segs[k].model, name, None)
print("load", os.getloadavg())
runs = measure(segs, iter(video), 4)
for k, r in runs.items():
    s = r.summary(4)
    print(f"{k:>10} {s['ms_per_frame']:8.1f} ms  mean {s['ms_per_frame_mean']:8.1f} ", " ".join(f"{a[:6]}={b:.0f}" for a, b in s["stages_ms"].items()))
print("load", os.getloadavg())
