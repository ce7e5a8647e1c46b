"""benchmarks/flops.py: the floor's FLOP count against a by-hand number and against torch's
FlopCounterMode on a tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vispo.models.tiny import build_tiny_vlm

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "flops.py"


@pytest.fixture(scope="module")
def fl():
    spec = importlib.util.spec_from_file_location("flops_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look modules up by name
    spec.loader.exec_module(module)
    return module


def _tiny(fl):
    return fl.Shapes(
        hidden=4,
        layers=2,
        heads=2,
        kv_heads=1,
        head_dim=2,
        intermediate=6,
        vocab=10,
        v_hidden=4,
        v_depth=2,
        v_intermediate=8,
        v_patch_dim=12,
        merge=2,
        window=1,
        v_full=(1,),
    )


def test_counts_match_a_hand_computation(fl):
    s = _tiny(fl)
    # Text, per token and layer: q 4x4, k and v 4x2 each, o 4x4, gate/up/down 4x6 each:
    # 16 + 16 + 16 + 72 = 120 multiply-adds -> 240 FLOPs; two layers: 480.
    assert fl.text_linear(s, 1) == 480
    # Attention: 4 * heads 2 * head_dim 2 = 16 per (query, key) pair and layer; two layers.
    assert fl.text_attention(s, 1) == 32
    assert fl.head(s, 1) == 80  # 2 * 4 * 10
    # One 4x4-patch image: 16 patches. Patch embedding 2*12*4*16 = 1536. Per block: qkv 4x12,
    # proj 4x4, MLP 3 x 4x8 -> 160 multiply-adds per patch: 2*160*16*2 blocks = 10240.
    # Block 0 is windowed (1 merged token = 4 patches per window, 4 windows): 4*4*(4*4^2) =
    # 1024; block 1 full: 4*4*16^2 = 4096. Merger: 4 merged tokens of width 16 -> 16x16 and
    # 16x4: 2*(256+64)*4 = 2560. Total 19456.
    grids = [(1, 4, 4)]
    assert fl.vision_attention(s, grids) == 1024 + 4096
    assert fl.vision_forward(s, grids) == 1536 + 10240 + 1024 + 4096 + 2560
    # A group: 6 prompt tokens and responses of 3 and 1 tokens. Prefix: 6 tokens with
    # 1+2+...+6 = 21 causal pairs: 6*480 + 21*32 = 3552, head at its last position 80. The
    # 3-token response feeds 2 positions after 6: 2*480 + (2*6 + 3)*32 = 1440, head 2*80; the
    # 1-token one feeds nothing.
    g = fl.Group(prompt_tokens=6, grids=((1, 4, 4),), responses=(3, 1))
    fwd = 19456 + 3552 + 80 + 1440 + 160
    assert fl.forward(s, [g]) == fwd == 24688
    assert fl.forward_backward(s, [g]) == 3 * fwd
    assert fl.forward_backward(s, [g], vision_trainable=False) == 3 * fwd - 2 * 19456
    # Shared prefix: two groups cost twice one group, however many responses share a prompt.
    assert fl.forward(s, [g, g]) == 2 * fwd


def test_windows_are_cut_at_the_image_edge(fl):
    s = _tiny(fl)
    wide = fl.Shapes(**{**s.__dict__, "window": 2})
    # A 6x4-patch image: merged grid 3x2; windows of 2x2 merged tokens: one 2x2, one 1x2.
    assert fl._windows(wide, 6, 4) == [16, 8]


def test_shapes_and_counts_agree_with_torch_flop_counter(fl):
    """FlopCounterMode counts the matmuls and the patch embedding's convolution, but not the
    CPU attention kernel (it has no formula for it): so the counter equals the count minus
    its attention terms, which the hand test above covers."""
    torch.manual_seed(0)
    model, _ = build_tiny_vlm("qwen2_5_vl", seed=0, min_pixels=112 * 112, max_pixels=112 * 112)
    s = fl.Shapes.of(model)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.vocab) == (64, 2, 4, 2, 1024)
    grids = [(1, 8, 8)]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.model.visual(torch.randn(64, s.v_patch_dim), grid_thw=torch.tensor(grids))
    expected = fl.vision_forward(s, grids) - fl.vision_attention(s, grids)
    assert fc.get_total_flops() == expected
    ids = torch.randint(10, 100, (1, 12))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids)  # logits at all 12 positions
    assert fc.get_total_flops() == fl.text_linear(s, 12) + fl.head(s, 12)


def test_matmul_throughput_is_positive_and_best_of_shapes(fl):
    out = fl.matmul_throughput([(32, 16, 8), (64, 32, 16)], repeats=2)
    assert set(out["per_shape"]) == {"32x16x8", "64x32x16"}
    assert out["peak"] == max(out["per_shape"].values()) > 0
