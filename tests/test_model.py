"""The network: shapes of every setting and size, the reads against their equations, losses, weights I/O."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmrc.config import ABLATION_SETTINGS, ModelConfig, model_config
from lmrc.errors import LmrcError
from lmrc.inference.fast_path import fast_local_memory_read, fast_sequential_local_memory_read, prepare_for_inference
from lmrc.model.aggregate import soft_aggregate, soft_aggregate_probabilities
from lmrc.model.comparator import similarity_comparison_block
from lmrc.model.memory_reads import global_memory_read, local_memory_read, sequential_local_memory_read
from lmrc.model.network import LMRC, MemoryInput, crop_padding, pad_to_multiple
from lmrc.model.weights import load_model, load_stcn_checkpoint, load_weights, save_weights
from lmrc.train.losses import cross_entropy, scale_loss
from lmrc.utils.workspace import Workspace

KEYS_FILE = Path(__file__).parent / "data" / "stcn_state_dict_keys.txt"


def _model(name: str = "lmrc-lite", setting: str = "F", **kw) -> LMRC:
    torch.manual_seed(0)
    return LMRC(model_config(name, setting=setting, **kw), pretrained_backbone=False)


@pytest.mark.parametrize("setting", list(ABLATION_SETTINGS))
@pytest.mark.parametrize("name", ["lmrc-lite", "lmrc-r50"])
def test_training_pass_shapes_for_every_setting(name, setting):
    model = _model(name, setting)
    images = torch.rand(2, 3, 3, 64, 80)
    masks = (torch.rand(2, 2, 64, 80) > 0.7).float()
    out = model(images, masks, torch.tensor([[True, True], [True, False]]))
    for frame in (out.local_frame, out.query_frame):
        assert frame.logits.shape == (2, 2, 64, 80)
        assert frame.probs.shape == (2, 3, 64, 80)
        torch.testing.assert_close(frame.probs.sum(1), torch.ones(2, 64, 80))
        assert torch.all(frame.probs[1, 2] < 1e-3)  # the padding object gets no probability
    expected = {"L2", "L3", "L4", "S2", "S3"} if setting == "F" else ({"L2", "L3", "L4"} if setting == "E" else set())
    assert set(out.query_frame.reliability) == expected
    for h in out.query_frame.reliability.values():
        assert torch.all((h > 0) & (h < 1))


def test_gradients_reach_every_trained_module_through_the_predicted_local_memory():
    model = _model("lmrc-lite", "F")
    images = torch.rand(1, 3, 3, 64, 64)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:40, 20:44] = 1
    out = model(images, masks)
    out.query_frame.agg_logits.logsumexp(1).mean().backward()
    for name in ("key_encoder.key_proj.r2.weight", "value_encoder.fuse_mask.r2.weight", "comparator.weights.S2.conv.weight",
                 "decoder.stage2.readout_conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [(37, 53), (48, 64), (17, 100)])
def test_any_input_size_pads_to_16_and_crops_back(size):
    image = torch.rand(1, 3, *size)
    padded, pads = pad_to_multiple(image)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    assert torch.equal(crop_padding(padded, pads), image)
    model = _model("lmrc-lite", "F").eval()
    frame = model.encode_key(padded)
    mask = torch.zeros(1, 3, *padded.shape[-2:])
    mask[:, 0, 4:12, 4:12] = 1
    values = model.encode_value(padded, frame, mask)
    memory = MemoryInput(frame.keys[4].flatten(2), values[4].flatten(3), frame.keys, values)
    with torch.no_grad():
        out = model.read_and_decode(frame, memory)
    assert crop_padding(out.probs, pads).shape == (1, 4, *size)


def test_global_memory_read_matches_equations_1_to_3():
    torch.manual_seed(1)
    q, mk, mv = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 60), torch.randn(2, 6, 60)
    scale = 0.5
    sim = -torch.cdist(q.flatten(2).transpose(1, 2), mk.transpose(1, 2)).pow(2) * scale  # B x HW x M, eq. (1)
    expected = (torch.softmax(sim, -1) @ mv.transpose(1, 2)).transpose(1, 2).reshape(2, 6, 5, 7)  # eq. (2)-(3)
    result = global_memory_read(q, mk, mv, scale, comparator_top_k=5)
    torch.testing.assert_close(result.readout, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.similarity_top_k, sim.topk(5, -1).values.transpose(1, 2).reshape(2, 5, 5, 7), atol=1e-4, rtol=1e-5)
    chunked = global_memory_read(q, mk, mv, scale, comparator_top_k=5, chunk_size=4)
    torch.testing.assert_close(chunked.readout, result.readout)
    # top-k read: only the best k memory positions per query contribute.
    top = global_memory_read(q, mk, mv, scale, read_top_k=3)
    values, idx = sim.topk(3, -1)
    w = torch.zeros_like(sim).scatter_(-1, idx, torch.softmax(values, -1))
    torch.testing.assert_close(top.readout, (w @ mv.transpose(1, 2)).transpose(1, 2).reshape(2, 6, 5, 7), atol=1e-5, rtol=1e-5)


def test_top_k_global_read_gathers_what_the_masked_softmax_weighs():
    """The sparse top-k read (k gathered value rows per query) against eq. (2)-(3) with all but the k best
    similarities of each row set to -inf: values, the comparator's top-k, chunking, and gradients."""
    torch.manual_seed(2)
    q, mk, mv = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 60), torch.randn(2, 6, 60)
    scale, k = 0.5, 7

    def masked_reference(q, mk, mv):
        sim = -torch.cdist(q.flatten(2).transpose(1, 2), mk.transpose(1, 2)).pow(2) * scale
        kth = sim.topk(k, -1).values[..., -1:]
        affinity = torch.softmax(sim.masked_fill(sim < kth, float("-inf")), -1)
        return (affinity @ mv.transpose(1, 2)).transpose(1, 2).reshape(2, 6, 5, 7), sim

    expected, sim = masked_reference(q, mk, mv)
    for chunk in (None, 4):
        result = global_memory_read(q, mk, mv, scale, read_top_k=k, comparator_top_k=5, chunk_size=chunk)
        torch.testing.assert_close(result.readout, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.similarity_top_k, sim.topk(5, -1).values.transpose(1, 2).reshape(2, 5, 5, 7),
                                   atol=1e-4, rtol=1e-5)
    # a comparator asking for more than the read keeps still gets its own top-k
    wide = global_memory_read(q, mk, mv, scale, read_top_k=3, comparator_top_k=5)
    torch.testing.assert_close(wide.similarity_top_k, sim.topk(5, -1).values.transpose(1, 2).reshape(2, 5, 5, 7),
                               atol=1e-4, rtol=1e-5)
    # gradients reach query, keys and values as through the masked dense softmax
    inputs = [t.clone().double().requires_grad_() for t in (q, mk, mv)]
    reference_inputs = [t.clone().double().requires_grad_() for t in (q, mk, mv)]
    weights = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    (global_memory_read(*inputs, scale, read_top_k=k).readout * weights).sum().backward()
    (masked_reference(*reference_inputs)[0] * weights).sum().backward()
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad, want.grad)


def test_similarity_comparison_block_is_equation_9_and_cannot_overflow():
    local, glob = torch.tensor([-3.0, -1.0, 0.0, -2.5]), torch.tensor([-1.0, -3.0, 0.0, -2.0])
    literal = 1.5 * (local.exp() - glob.exp()) / (local.exp() + glob.exp())
    torch.testing.assert_close(similarity_comparison_block(local, glob, alpha=3.0), literal)
    far = similarity_comparison_block(torch.tensor([-1e4, 0.0, float("-inf")]), torch.tensor([0.0, -1e4, -5.0]), alpha=3.0)
    torch.testing.assert_close(far, torch.tensor([-1.5, 1.5, -1.5]))


def test_soft_aggregation_values():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # p = 0.5, 0.75
    agg_logits, probs = soft_aggregate(logits)
    p = torch.tensor([0.125, 0.5, 0.75])  # background = 0.5 * 0.25
    odds = p / (1 - p)
    torch.testing.assert_close(probs.flatten(), odds / odds.sum())
    torch.testing.assert_close(soft_aggregate_probabilities(logits), probs)


def test_soft_aggregate_probabilities_are_soft_aggregates():
    """The inference form (normalised odds) against the training form (softmax of log-odds), with saturated
    logits (the clamp) and objects marked invalid."""
    logits = torch.randn(2, 3, 17, 23) * 8
    logits[0, 0, :3] = 40.0
    logits[1, 2, :3] = -40.0
    valid = torch.tensor([[True, True, False], [True, True, True]])
    for v in (None, valid):
        torch.testing.assert_close(soft_aggregate_probabilities(logits, v), soft_aggregate(logits, v)[1],
                                   rtol=1e-5, atol=1e-6)


def test_scale_loss_on_known_keys():
    keys = {4: torch.full((1, 2, 2, 2), 1.0), 3: torch.full((1, 2, 4, 4), 2.0), 2: torch.zeros(1, 2, 8, 8)}
    # |k4|^2 = 2, |k3|^2 = 8, |k2|^2 = 0: (2 - 8)^2 + (2 - 0)^2 = 40 at every position.
    assert scale_loss(keys).item() == pytest.approx(40.0)
    keys[3][0, :, 0, 0] = 1.0  # only the top-left child of each cell counts as i'
    assert scale_loss(keys).item() == pytest.approx((4 + 40 * 3) / 4)


def test_cross_entropy_kinds():
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[0, 0], [0, 1]]])
    assert cross_entropy(logits, target).item() == pytest.approx(math.log(2))
    logits[0, 1, 1, 1] = 5.0  # the object pixel becomes easy: balanced CE weighs it by the share of background
    pixel = torch.tensor([math.log(2)] * 3 + [math.log(1 + math.exp(-5.0))])
    weights = torch.tensor([0.25] * 3 + [0.75])
    assert cross_entropy(logits, target, "balanced").item() == pytest.approx(float((weights * pixel).sum() / weights.sum()), rel=1e-5)
    assert cross_entropy(logits, target, "bootstrapped", bootstrap_ratio=0.5).item() == pytest.approx(math.log(2), rel=1e-5)


def _stcn_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    state = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, rest = line.split(" ", 1)
        shape = tuple(int(x) for x in rest[rest.index("(") + 1: rest.index(")")].split(",") if x.strip())
        state[name] = torch.randint(0, 5, shape) if "num_batches" in name else torch.randn(shape)
    return state


def test_stcn_checkpoint_loads_into_lmrc_r50_encoders(tmp_path):
    model = _model("lmrc-r50", "F")
    state = _stcn_state_dict()
    torch.save(state, tmp_path / "stcn.pth")
    report = load_stcn_checkpoint(model, tmp_path / "stcn.pth")
    ours = model.state_dict()
    torch.testing.assert_close(ours["key_encoder.trunk.layer1.0.conv1.weight"], state["key_encoder.res2.0.conv1.weight"])
    torch.testing.assert_close(ours["key_encoder.key_proj.r4.weight"], state["key_proj.key_proj.weight"])
    torch.testing.assert_close(ours["value_encoder.trunk.layer3.1.conv2.bias"], state["value_encoder.layer3.1.conv2.bias"])
    assert all(k.startswith(("value_encoder.fuser.", "key_comp.", "decoder.")) for k in report.ignored)
    assert len(report.used) + len(report.ignored) == len(state)
    assert "decoder.predict.weight" in report.new and "key_encoder.key_proj.r2.weight" in report.new
    assert not any(k.startswith("key_encoder.trunk.layer1.") for k in report.new)
    # single-object STCN stage: a 4-channel value conv1 is padded with a zero channel
    state["value_encoder.conv1.weight"] = state["value_encoder.conv1.weight"][:, :4]
    load_stcn_checkpoint(model, state)
    assert torch.all(model.state_dict()["value_encoder.trunk.conv1.weight"][:, 4] == 0)


def test_wrong_checkpoint_layouts_are_refused(tmp_path):
    model = _model("lmrc-r50", "F")
    with pytest.raises(LmrcError, match="layout"):
        load_stcn_checkpoint(model, _model("lmrc-lite").state_dict())
    bad = _stcn_state_dict()
    bad["key_encoder.conv1.weight"] = torch.randn(32, 3, 7, 7)
    with pytest.raises(LmrcError, match="shapes"):
        load_stcn_checkpoint(model, bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LmrcError, match="junk.pth"):
        load_stcn_checkpoint(model, tmp_path / "junk.pth")
    with pytest.raises(LmrcError, match="lmrc-r50 only"):
        load_stcn_checkpoint(_model("lmrc-lite"), _stcn_state_dict())


def test_weights_roundtrip_and_mismatch_errors(tmp_path, monkeypatch):
    model = _model("lmrc-lite", "F")
    path = tmp_path / "lite.safetensors"
    digest = save_weights(model, path)
    loaded = load_model("lmrc-lite", path)
    assert loaded.config.setting == "F" and not loaded.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(LmrcError, match="setting F"):
        load_weights(_model("lmrc-lite", "A"), path)
    with pytest.raises(LmrcError, match="--model lmrc-lite"):
        load_model("lmrc-r50", path)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(raw))
    with pytest.raises(LmrcError, match="corrupt"):
        load_model("lmrc-lite", tmp_path / "corrupt.safetensors")
    assert len(digest) == 64
    monkeypatch.setenv("LMRC_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setattr("lmrc.model.weights._REPO_WEIGHTS", tmp_path / "none")
    with pytest.raises(LmrcError, match="no weights for lmrc-r50"):
        load_model("lmrc-r50")


def test_lite_value_encoder_reads_masks_and_frame_features_not_the_image():
    model = _model("lmrc-lite").eval()
    assert model.config.value_trunk == "mask" and model.config.value_fusion_kernel == 1
    image = torch.rand(1, 3, 64, 96)
    masks = torch.zeros(1, 2, 64, 96)
    masks[:, 0, 10:30, 20:50] = 1
    masks[:, 1, 35:60, 50:90] = 1
    with torch.no_grad():
        frame = model.encode_key(image)
        values = model.encode_value(image, frame, masks)
        other_image = model.encode_value(torch.rand(1, 3, 64, 96), frame, masks)
        other_masks = model.encode_value(image, frame, masks.flip(1))
    for r in (2, 3, 4):
        torch.testing.assert_close(other_image[r], values[r])  # the image only enters through F_r
        assert not torch.allclose(other_masks[r], values[r])
        # a 1x1 fusion: the frame part at a pixel depends on F_r at that pixel only
        fused = model.value_encoder.fuse_frame[f"r{r}"]
        assert fused.kernel_size == (1, 1)


def test_older_lite_weights_keep_their_value_encoder():
    from lmrc.model.encoders import LightValueTrunk
    from lmrc.model.weights import default_weights_path, weights_config

    path = default_weights_path("lmrc-lite")
    if path is None:
        pytest.skip("weights/lmrc-lite.safetensors is absent")
    if weights_config(path).value_trunk != "image_and_mask":
        pytest.skip("the shipped lmrc-lite file already holds the mask-only value encoder")
    model = load_model("lmrc-lite")
    assert type(model.value_encoder.trunk) is LightValueTrunk and model.value_encoder.trunk.reads_image
    assert model.value_encoder.fuse_frame["r2"].kernel_size == (3, 3)


def test_value_encoder_options_are_checked():
    with pytest.raises(LmrcError, match="value_trunk"):
        ModelConfig(backbone="resnet50", value_trunk="mask")
    with pytest.raises(LmrcError, match="value_fusion_kernel"):
        ModelConfig(value_fusion_kernel=5)


def test_config_rejects_unknown_settings():
    with pytest.raises(LmrcError, match="Table 4"):
        ModelConfig(setting="G")


def test_lite_trunk_equals_the_original_efficientnet_lite0_after_padding_folding():
    from lmrc.model.encoders import EfficientNetLite0Trunk, _efficientnet_lite0

    trunk, net = EfficientNetLite0Trunk(pretrained=True).eval(), _efficientnet_lite0(True).eval()
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        y = net._swish(net._bn0(net._conv_stem((x - 0.5) / 0.5)))
        for block in net._blocks[:11]:
            y = block(y)
        assert torch.equal(trunk(x)[4], y)


def test_comparator_works_when_memory_or_window_is_smaller_than_k():
    model = _model("lmrc-lite", "F", window_radius=0, comparator_top_k=5).eval()
    image = torch.rand(1, 3, 32, 32)  # stage 4 is 2 x 2: a one-frame memory has 4 < k positions
    frame = model.encode_key(image)
    values = model.encode_value(image, frame, torch.ones(1, 1, 32, 32))
    with torch.no_grad():
        out = model.read_and_decode(frame, MemoryInput(frame.keys[4].flatten(2), values[4].flatten(3), frame.keys, values))
    assert out.reliability["L4"].shape == (1, 1, 2, 2)


def test_inference_top_k_is_free_to_differ_from_the_weights(tmp_path):
    """The global read's top-k is an inference setting (InferenceConfig.top_k), not the weights': files written
    when ModelConfig still held it (global_read_top_k) load, the stored value is ignored."""
    import argparse
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lmrc.inference.config import InferenceConfig, inference_config_from_args

    path, old = tmp_path / "lite.safetensors", tmp_path / "old.safetensors"
    model = _model("lmrc-lite", "F")
    save_weights(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps({**json.loads(meta["config"]), "global_read_top_k": None})  # what the file says is not used
    save_file(tensors, str(old), metadata=meta)
    assert not hasattr(load_model("lmrc-lite", old).config, "global_read_top_k")
    torch.testing.assert_close(load_model("lmrc-lite", old).state_dict(), model.state_dict())
    assert InferenceConfig().top_k == 20  # STCN's inference default

    def parsed(k):
        return inference_config_from_args(argparse.Namespace(top_k=k)).top_k

    assert parsed(None) == 20 and parsed(7) == 7 and parsed(0) is None  # all: eq. (2)
    with pytest.raises(LmrcError, match=">= 1, or 0"):
        parsed(-1)


@pytest.mark.parametrize("k", [5, 30])  # 30 > 25 window positions: the smallest is repeated, as in training
def test_local_reads_without_autograd_equal_the_training_path(k):
    g = torch.Generator().manual_seed(0)
    q, key, value = (torch.randn(1, c, 12, 18, generator=g) for c in (16, 16, 10))
    coarse = torch.softmax(torch.randn(1, 25, 6, 9, generator=g), 1)
    leaves = [t.clone().requires_grad_() for t in (q, key, value)]
    train_l = local_memory_read(*leaves, 2, 0.25, comparator_top_k=k)
    train_s = sequential_local_memory_read(*leaves, coarse, 2, 0.25, comparator_top_k=k)
    with torch.no_grad():
        inf_l = fast_local_memory_read(q, key, value, 2, 0.25, comparator_top_k=k)
        inf_s = fast_sequential_local_memory_read(q, key, value, coarse, 2, 0.25, Workspace(), comparator_top_k=k)
        no_aff = fast_local_memory_read(q, key, value, 2, 0.25, keep_affinity=False)
    assert train_l.readout.grad_fn is not None and inf_l.readout.grad_fn is None
    for train, inf in ((train_l, inf_l), (train_s, inf_s)):
        torch.testing.assert_close(inf.readout, train.readout.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inf.similarity_top_k, train.similarity_top_k.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf_l.affinity, train_l.affinity.detach(), atol=1e-5, rtol=1e-5)
    assert inf_s.affinity is None and no_aff.affinity is None and no_aff.similarity_top_k is None


@pytest.mark.parametrize("backend", ["auto", "plain"])  # plain: the path CUDA tensors take (no native kernels)
def test_read_and_decode_without_autograd_equals_the_autograd_path(backend, monkeypatch):
    # no_grad: inference kernels, weighed readouts written straight into the decoder's input; with grad: the
    # autograd kernels, the comparator's weighed copies and one concatenation per stage
    monkeypatch.setenv("LMRC_LOCAL_WINDOW", backend)
    model = _model("lmrc-lite", "F").eval()
    # the fast path alone (no module rewrites): the same weights, the fused read_and_decode
    inference = prepare_for_inference(model, fold=False, channels_last=False, project_values=False)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 64, 96, generator=g)
    frame = model.encode_key(image)
    masks = torch.rand(1, 2, 64, 96, generator=g)
    values = model.encode_value(image, frame, masks)
    memory = MemoryInput(frame.keys[4].flatten(2), values[4].flatten(3), frame.keys, values)
    with torch.no_grad():
        fast = inference.read_and_decode(frame, memory)
    slow = model.read_and_decode(frame, memory)
    assert slow.logits.grad_fn is not None
    torch.testing.assert_close(fast.logits, slow.logits.detach(), atol=1e-4, rtol=1e-4)
    assert fast.reliability.keys() == slow.reliability.keys() == {"L2", "L3", "L4", "S2", "S3"}
    for name in fast.reliability:
        torch.testing.assert_close(fast.reliability[name], slow.reliability[name].detach(), atol=1e-5, rtol=1e-5)

    # the reused workspace buffers work under inference_mode and no_grad alike, and do not leak between calls
    with torch.inference_mode():
        again = inference.read_and_decode(frame, memory)
    with torch.no_grad():
        other = inference.read_and_decode(frame, MemoryInput(memory.global_keys, memory.global_values, frame.keys,
                                                         {r: v.flip(1) for r, v in values.items()}))
    torch.testing.assert_close(again.logits, fast.logits, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(other.logits, fast.logits)


def test_grown_weights_compute_what_the_smaller_setting_did(tmp_path):
    """A -> C/D/E/F (the paper starts LMRC from STCN): copied tensors, new reads switched off, same masks."""
    from lmrc.inference.segmenter import Segmenter
    from lmrc.model.weights import grow_weights

    torch.manual_seed(1)
    small = _model("lmrc-lite", "A").eval()
    path = tmp_path / "A.safetensors"
    save_weights(small, path)
    rng = torch.Generator().manual_seed(0)
    video = [torch.rand(3, 40, 56, generator=rng) for _ in range(4)]
    first = torch.zeros(40, 56, dtype=torch.uint8)
    first[8:24, 10:30] = 1
    first[26:36, 30:50] = 2

    def run(model):
        seg = Segmenter(model, size=48, precision="fp32")
        return torch.stack([seg.step(f, first if i == 0 else None) for i, f in enumerate(video)])

    expected = run(small)
    for setting in ("C", "D", "E", "F"):
        torch.manual_seed(2)  # new modules get weights unlike A's
        grown = _model("lmrc-lite", setting)
        grow_weights(grown, path)
        torch.testing.assert_close(run(grown.eval()), expected, atol=1e-5, rtol=0)
        # the new reads can learn: their zero projections receive gradients
        grown.train()
        out = grown(torch.rand(1, 3, 3, 32, 32), (torch.rand(1, 1, 32, 32) > 0.5).float())
        out.query_frame.agg_logits.sum().backward()
        assert grown.decoder.stage4.readout_conv.weight.grad[:, 256:].abs().sum() > 0
        assert grown.decoder.stage2.readout_conv.weight.grad.abs().sum() > 0
    # a larger setting's grown stage-4 projection keeps A's columns for the global read
    torch.testing.assert_close(grown.decoder.stage4.readout_conv.weight[:, :256], small.decoder.stage4.readout_conv.weight)


def test_growing_refuses_other_sizes_and_settings_that_are_not_smaller(tmp_path):
    from lmrc.model.weights import grow_weights

    path = tmp_path / "E.safetensors"
    save_weights(_model("lmrc-lite", "E"), path)
    with pytest.raises(LmrcError, match="subset of the reads"):
        grow_weights(_model("lmrc-lite", "D"), path)  # E's comparator is not in D
    with pytest.raises(LmrcError, match="subset of the reads"):
        grow_weights(_model("lmrc-lite", "A"), path)
    with pytest.raises(LmrcError, match="backbone"):
        grow_weights(_model("lmrc-r50", "F"), path)
    grow_weights(_model("lmrc-lite", "F"), path)
