"""FP8 → BF16: the planner on plain numbers, the CPU path bit for bit, whole-checkpoint output."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.planners.dequant import plan_dequant
from ckptflow.tasks.run.execute import write_shard
from ckptflow.tasks.kernels.fp8_cpu import torch_weight_dequant
from ckptflow.tasks.plan.model import PlanError

from .helpers import fake_ckpt


def reference(w: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """Plain PyTorch, written from the definition: bf16(float32(w) * scale of its block)."""
    if s.numel() == 1:
        return (w.to(torch.float32) * s.reshape(())).to(torch.bfloat16)
    bm, bn = block
    rows, cols = w.shape[-2:]
    full = s.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)[..., :rows, :cols]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))



def test_plan_finds_scales_in_other_shards_and_drops_them():
    ckpt = fake_ckpt({
        "a.safetensors": [("l.0.w.weight", "F8_E4M3", (300, 260)), ("l.0.norm.weight", "BF16", (260,))],
        "b.safetensors": [("l.0.w.weight_scale_inv", "F32", (3, 3))],
    }, config={"torch_dtype": "bfloat16", "quantization_config": {"weight_block_size": [128, 128]}})
    plan = plan_dequant(ckpt)
    assert [s.file for s in plan.shards] == ["a.safetensors"]  # b held only a scale
    w, norm = plan.shards[0].tensors
    assert (w.name, w.dtype, w.shape, w.transform) == ("l.0.w.weight", "BF16", (300, 260), "dequant_fp8")
    assert [s.file for s in w.sources] == ["a.safetensors", "b.safetensors"]
    assert (norm.transform, norm.dtype) == ("copy", "BF16")
    assert plan.dropped == ("l.0.w.weight_scale_inv",)
    assert plan.total_size == 300 * 260 * 2 + 260 * 2
    assert plan.weight_map() == {"l.0.w.weight": "a.safetensors", "l.0.norm.weight": "a.safetensors"}
    assert plan.config == {"torch_dtype": "bfloat16"}


def test_plan_reports_every_bad_scale_at_once():
    ckpt = fake_ckpt({"a.safetensors": [
        ("x.weight", "F8_E4M3", (256, 256)),                      # no scale at all
        ("y.weight", "F8_E4M3", (300, 260)), ("y.weight_scale_inv", "F32", (2, 3)),  # wrong shape
        ("z.weight", "F8_E4M3", (10, 10)), ("z.weight_scale_inv", "F16", (1, 1)),   # unknown scale dtype
    ]})
    with pytest.raises(PlanError) as err:
        plan_dequant(ckpt)
    msg = str(err.value)
    assert "3 tensor(s) cannot be dequantized" in msg
    assert "'x.weight' is F8_E4M3 but its scale 'x.weight_scale_inv' is not in the checkpoint" in msg
    assert "y.weight: scale shape [2, 3] does not match weight [300, 260] with 128×128 blocks (expected [3, 3])" in msg
    assert "'z.weight_scale_inv' is F16; fp8-block scales must be BF16 or F32 or F8_E8M0" in msg


def test_plan_can_pass_fp8_through_when_asked():
    ckpt = fake_ckpt({"a.safetensors": [("x.weight", "F8_E4M3", (4, 4))]},
                     config={"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}})
    plan = plan_dequant(ckpt, allow_missing_scale=True)
    assert plan.shards[0].tensors[0].dtype == "F8_E4M3"
    assert "quantization_config" in plan.config  # the FP8 tensor still needs it
    assert plan.warnings == ("x.weight: no scale found, kept as FP8",)


@pytest.mark.parametrize("shape, block", [((300, 260), (128, 128)), ((1, 1), (128, 128)), ((129, 127), (128, 128)),
                                          ((576, 7168), (128, 128)), ((3, 130, 200), (128, 128)),
                                          ((100, 70), (64, 32))])
def test_cpu_path_is_bit_exact_on_ragged_shapes(shape, block):
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)  # NaN codes too
    sshape = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    s = torch.rand(sshape, generator=g) * 10.0 ** torch.randint(-30, 30, sshape, generator=g)
    s.view(-1)[0] = 0.0
    if s.numel() > 1:
        s.view(-1)[1] = -2.5
    assert same_bits(torch_weight_dequant(w, s, block), reference(w, s, block))


def test_cpu_path_max_values_nan_e5m2_and_per_tensor_scale():
    codes = torch.tensor([[0x7E, 0xFE, 0x7F, 0xFF, 0x00, 0x80, 0x01, 0x08]], dtype=torch.uint8)
    w = codes.view(torch.float8_e4m3fn)
    assert same_bits(torch_weight_dequant(w, torch.tensor([[1e38]])), reference(w, torch.tensor([[1e38]])))
    w5 = torch.randint(0, 256, (130, 129), dtype=torch.uint8).view(torch.float8_e5m2)
    s5 = torch.rand(2, 2)
    assert same_bits(torch_weight_dequant(w5, s5), reference(w5, s5))
    scalar = torch.tensor(0.37)
    assert same_bits(torch_weight_dequant(w5, scalar), reference(w5, scalar))


@pytest.mark.parametrize("chunk", [16 << 20, 3000])  # 3000: many row-block and copy chunks
def test_whole_checkpoint_matches_reference(demo_ckpt, tmp_path, monkeypatch, chunk):
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", chunk)
    src = open_location(str(demo_ckpt))
    ckpt = scan_checkpoint(src)
    plan = plan_dequant(ckpt)
    dst = open_location(str(tmp_path / "out"))
    for shard in plan.shards:
        record = write_shard(shard, src, dst, digest=True)
        assert record.size == (tmp_path / "out" / shard.file).stat().st_size
    index = ckpt.weight_map()
    checked = 0
    for shard in plan.shards:
        with safe_open(str(tmp_path / "out" / shard.file), "pt") as out:
            assert out.metadata() == {"format": "pt"}
            for name in out.keys():
                got = out.get_tensor(name)
                with safe_open(str(demo_ckpt / index[name]), "pt") as f:
                    orig = f.get_tensor(name)
                if orig.dtype == torch.float8_e4m3fn:
                    with safe_open(str(demo_ckpt / index[name + "_scale_inv"]), "pt") as f:
                        scale = f.get_tensor(name + "_scale_inv")
                    assert same_bits(got, reference(orig, scale)), name
                    checked += 1
                else:
                    assert torch.equal(got, orig), name
    assert checked == len(plan.dropped) > 50


def test_scale_shapes_of_stacked_experts(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, 0x7E, (4, 130, 260), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    s = torch.rand(4, 2, 3, generator=g)
    save_file({"experts.w": w, "experts.w_scale_inv": s}, tmp_path / "model.safetensors")
    src = open_location(str(tmp_path))
    plan = plan_dequant(scan_checkpoint(src))
    write_shard(plan.shards[0], src, open_location(str(tmp_path / "out")))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["experts.w"]
        assert same_bits(f.get_tensor("experts.w"), reference(w, s))


def test_streamed_triton_path_writes_the_same_bytes(demo_ckpt, tmp_path, monkeypatch):
    """The device path of the executor (chunks → kernel → bytes), run by the Triton interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 40_000)
    src = open_location(str(demo_ckpt))
    plan = plan_dequant(scan_checkpoint(src))
    shard = max(plan.shards, key=lambda s: sum(t.transform == "dequant_fp8" for t in s.tensors))
    a = write_shard(shard, src, open_location(str(tmp_path / "cpu")), digest=True)
    b = write_shard(shard, src, open_location(str(tmp_path / "triton")), digest=True, backend="triton")
    assert a.sha256 == b.sha256 and a.size == b.size


def test_weight_dequant_backends_agree(monkeypatch):
    from ckptflow.tasks.kernels.dispatch import _gpu_lut_dequant, weight_dequant

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(5)
    for shape, sshape in (((300, 260), (3, 3)), ((2, 129, 127), (2, 2, 1)), ((5, 7), ())):
        w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
        s = torch.rand(sshape, generator=g) + 0.1
        ref = weight_dequant(w, s, backend="torch")
        assert same_bits(ref, reference(w, s))
        assert same_bits(_gpu_lut_dequant(w, s, (128, 128), torch.bfloat16), ref)  # the GPU table path, on CPU
        if s.dim() == w.dim():
            assert same_bits(weight_dequant(w, s, backend="triton"), ref)
    with pytest.raises(ValueError, match="backend must be one of"):
        weight_dequant(w, s, backend="cuda")


@pytest.mark.parametrize("chunk", [16 << 20, 100])
def test_slice_transform_cuts_any_dim_byte_exact(tmp_path, monkeypatch, chunk):
    from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef

    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", chunk)
    t = torch.arange(4 * 6 * 5, dtype=torch.int16).reshape(4, 6, 5)
    f8 = torch.randint(0, 255, (7, 9), dtype=torch.uint8).view(torch.float8_e4m3fn)
    save_file({"t": t, "f8": f8}, tmp_path / "src.safetensors")
    src = open_location(str(tmp_path))
    h = scan_checkpoint(src).headers["src.safetensors"]
    cuts = [("t", 0, 1, 3), ("t", 1, 2, 5), ("t", 2, 1, 4), ("f8", 0, 3, 7), ("f8", 1, 0, 3)]
    outs = []
    for name, dim, a, b in cuts:
        info = h.tensors[name]
        shape = list(info.shape)
        shape[dim] = b - a
        outs.append(OutputTensor(f"{name}.{dim}.{a}", info.dtype, tuple(shape), "slice",
                                 (SourceRef.of("src.safetensors", info),), (("dim", dim), ("start", a), ("stop", b))))
    write_shard(ShardPlan("out.safetensors", tuple(outs)), src, open_location(str(tmp_path / "o")))
    with safe_open(str(tmp_path / "o" / "out.safetensors"), "pt") as f:
        for (name, dim, a, b), o in zip(cuts, outs):
            want = {"t": t, "f8": f8}[name].narrow(dim, a, b - a)
            assert torch.equal(f.get_tensor(o.name).view(torch.uint8), want.contiguous().view(torch.uint8))
