"""Reindex: the planner on plain numbers, then real files with hostile layouts, executed and read back."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptflow.storage.checkpoint import Checkpoint, scan_checkpoint
from ckptflow.storage.files import INDEX_NAME, index_document, write_json
from ckptflow.storage.safetensors_format import Header, TensorInfo
from ckptflow.storage.urls import open_location
from ckptflow.tasks.run.execute import write_shard
from ckptflow.tasks.plan.model import PlanError, StagePlan
from ckptflow.tasks.plan.sizes import SIZE_PATTERN, parse_size
from ckptflow.tasks.planners.reindex import (group_of, load_fused_groups, moved_bytes, moved_tensors, natural_key,
                                         plan_reindex)

GROUPS = load_fused_groups(None)
L0 = "model.layers.0."


# ---- helpers --------------------------------------------------------------------------------

def fake_ckpt(files: dict[str, list[tuple[str, int]]]) -> Checkpoint:
    """A Checkpoint from (name, byte size) pairs: the planner needs no bytes."""
    headers = {}
    for f, entries in files.items():
        tensors, off = {}, 64
        for name, n in entries:
            tensors[name] = TensorInfo(name, "U8", (n,), off, off + n)
            off += n
        headers[f] = Header(f, off, 64, tensors)
    return Checkpoint("mem://x", {f: h.file_size for f, h in headers.items()}, headers)


def layout(plan: StagePlan) -> dict[str, list[str]]:
    return {s.file: [t.name for t in s.tensors] for s in plan.shards}


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    t = torch.randn(shape, generator=g) * (100 if dtype == torch.float8_e4m3fn else 0.02)
    return t.clamp(-448, 448).to(dtype) if dtype == torch.float8_e4m3fn else t.to(dtype)


def write_real(path, files: dict[str, list[tuple[str, tuple[int, ...]]]], dtype=torch.bfloat16,
               config: dict | None = None) -> None:
    """Shards with save_file (which orders tensors its own way) + an index with total_size."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for f, entries in files.items():
        state = {n: make_tensor(shape, dtype, g) for n, shape in entries}
        save_file(state, str(path / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in state})
        total += sum(t.numel() * t.element_size() for t in state.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "test"}))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def reindex_and_check(src, dst, max_shard_size: int | str = "5GB", groups=GROUPS) -> tuple[StagePlan, Checkpoint]:
    """Plan, execute every shard with write_shard, write the index, and check what must hold."""
    ckpt = scan_checkpoint(open_location(str(src)))
    plan = plan_reindex(ckpt, parse_size(max_shard_size), groups)
    assert plan == plan_reindex(ckpt, parse_size(max_shard_size), groups)  # deterministic
    out = open_location(str(dst))
    for shard in plan.shards:
        write_shard(shard, open_location(str(src)), out)
    write_json(out, INDEX_NAME, index_document(plan.weight_map(), plan.total_size))
    shutil.copy(src / "config.json", dst / "config.json")
    written: dict[str, str] = {}
    total = 0
    for shard in plan.shards:  # read the headers back as raw JSON, not through ckptflow's parser
        with open(dst / shard.file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        written.update({name: shard.file for name in header})
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    # the index we would write is exact, and nothing is lost or duplicated
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(s.file for s in plan.shards)
    assert written == plan.weight_map() and set(written) == set(ckpt.tensors())
    assert total == plan.total_size == sum(i.nbytes for _, i in ckpt.tensors().values())
    # every tensor byte-identical to its source
    for name, (sf, _) in ckpt.tensors().items():
        with safe_open(str(src / sf), "pt") as a, safe_open(str(dst / written[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(as_bytes(x), as_bytes(y)), name
    # every fused group in one output file
    files_of: dict[str, set[str]] = {}
    for name, f in written.items():
        if (gid := group_of(name, groups)) is not None:
            files_of.setdefault(gid, set()).add(f)
    assert all(len(fs) == 1 for fs in files_of.values()), {g: fs for g, fs in files_of.items() if len(fs) > 1}
    # a source file that already satisfied the constraints keeps all its tensors together
    limit = parse_size(max_shard_size)
    src_groups: dict[str, set[str]] = {}
    for name, (sf, _) in ckpt.tensors().items():
        if (gid := group_of(name, groups)) is not None:
            src_groups.setdefault(gid, set()).add(sf)
    for sf, h in ckpt.headers.items():
        whole = all(len(src_groups.get(group_of(n, groups), {sf})) == 1 for n in h.tensors)
        if whole and sum(i.nbytes for i in h.tensors.values()) <= limit:
            assert len({written[n] for n in h.tensors}) == 1, f"{sf} was split up"
    # shards stay under the limit unless a warning says why
    for s in plan.shards:
        assert s.nbytes <= limit or any(s.file in w for w in plan.warnings), s.file
    return plan, ckpt


# ---- groups, sizes, the table format ---------------------------------------------------------

@pytest.mark.parametrize("name,gid", [
    (L0 + "self_attn.q_proj.weight", "qkv:model.layers.0.self_attn."),
    (L0 + "self_attn.v_proj.bias", "qkv:model.layers.0.self_attn."),
    (L0 + "self_attn.k_proj.weight_scale_inv", "qkv:model.layers.0.self_attn."),
    (L0 + "self_attn.q_a_proj.weight", "mla_qkv_a:model.layers.0.self_attn."),
    (L0 + "self_attn.kv_a_proj_with_mqa.weight_scale_inv", "mla_qkv_a:model.layers.0.self_attn."),
    ("layers.5.attn.wkv_a.weight", "mla_qkv_a_inference:layers.5.attn."),
    ("model.layers.3.mlp.experts.17.up_proj.weight", "gate_up:model.layers.3.mlp.experts.17."),
    ("model.layers.3.mlp.shared_experts.gate_proj.weight", "gate_up:model.layers.3.mlp.shared_experts."),
    (L0 + "mlp.gate_proj.weight", "gate_up:model.layers.0.mlp."),
    ("model.layers.1.block_sparse_moe.experts.2.w3.weight", "w1_w3:model.layers.1.block_sparse_moe.experts.2."),
    ("layers.0.attention.wq.weight", "qkv_meta:layers.0.attention."),
    ("model.layers.3.mlp.gate.weight", None), (L0 + "self_attn.q_a_layernorm.weight", None),
    (L0 + "self_attn.q_b_proj.weight", None), (L0 + "self_attn.o_proj.weight", None),
    ("layers.0.ffn.w2.weight", None), ("lm_head.weight", None),
])
def test_default_groups(name, gid):
    assert group_of(name, GROUPS) == gid


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size(" 2 kib ") == 2048
    assert parse_size(123) == 123 and parse_size("123") == 123 and parse_size("10B") == 10
    for bad in ("5G", "five GB", "", "-1GB", "0", 0, -5, True, 1.5, None, "1e9", "5 GB extra"):
        with pytest.raises(PlanError, match="is not a positive size"):
            parse_size(bad)


def test_the_size_pattern_is_the_parsers_grammar():
    """Flow parameters are checked against SIZE_PATTERN (Prefect's schema), planners call
    parse_size: a size one accepts and the other refuses ('5G' once did) cannot exist."""
    import re

    for text in ("5GB", "500MB", "1.5GiB", " 2 kib ", "123", "10B", ".5tb", "1.GB", "5G", "5 GB extra",
                 "five GB", "", "1e9", "5KiBB", "5iB", "0x10", "-1GB"):
        try:
            parse_size(text)
            parsed = True
        except PlanError:
            parsed = False
        assert parsed == bool(re.match(SIZE_PATTERN, text)), text


def test_custom_groups_file(tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"_comment": "mine", "groups": [
        {"name": "fp8", "pattern": r"^(?P<module>.*)\.(?:weight|weight_scale_inv)$"},  # default key
        {"name": "pair", "pattern": r"^(?P<a>x|y)\.(?P<member>p|q)\.(?P<b>\d+)$", "key": ["a", "b"]},
    ]}))
    groups = load_fused_groups(str(path))
    assert group_of("m.o_proj.weight_scale_inv", groups) == "fp8:m.o_proj"
    assert group_of("x.q.3", groups) == group_of("x.p.3", groups) == "pair:x|3"
    assert group_of("m.q_proj.bias", groups) is None
    ckpt = fake_ckpt({"a.safetensors": [("o.weight", 100), ("n.bias", 10)],
                      "b.safetensors": [("o.weight_scale_inv", 4), ("x.p.1", 5)], "c.safetensors": [("x.q.1", 5)]})
    assert layout(plan_reindex(ckpt, 1000, groups)) == {
        "model-00001-of-00002.safetensors": ["o.weight", "n.bias", "o.weight_scale_inv"],
        "model-00002-of-00002.safetensors": ["x.p.1", "x.q.1"]}


@pytest.mark.parametrize("doc,problem", [
    ('{"groups": [{"name": "qkv", "pattern": "^(?P<m>.*(q|k_proj"}]}', "is not a valid regex: missing ), unterminated"),
    ("{nope", "not valid JSON"),
    ('[{"name": "a"}]', 'expected an object {"groups"'),
    ('{"groups": [{"name": "a", "pattern": "x", "key": "m"}]}', "key ['m'] is not a named capture"),
    ('{"groups": [{"name": "a", "pattern": "x", "keys": "m"}]}', "unknown key(s) ['keys']"),
    ('{"groups": [{"name": "a", "pattern": "x"}, {"name": "a", "pattern": "y"}]}', "used once"),
    ('{"groups": [{"name": "a", "pattern": ""}]}', "'pattern' must be a non-empty regex"),
])
def test_bad_groups_file_names_file_and_problem(tmp_path, doc, problem):
    path = tmp_path / "bad.json"
    path.write_text(doc)
    with pytest.raises(PlanError) as err:
        load_fused_groups(str(path))
    assert str(err.value).startswith(f"fused-groups table {path}:") and problem in str(err.value)
    with pytest.raises(PlanError, match="fused-groups table .*missing.json: file not found"):
        load_fused_groups(str(tmp_path / "missing.json"))


# ---- the planner on plain numbers ------------------------------------------------------------

def test_split_group_goes_to_the_file_with_most_of_its_bytes():
    q, k, v = (L0 + f"self_attn.{p}_proj.weight" for p in "qkv")
    ckpt = fake_ckpt({"model-1.safetensors": [("embed", 500), (q, 64)],
                      "model-2.safetensors": [("o", 64), (k, 16), (v, 16)],
                      "model-3.safetensors": [("head", 500)]})
    plan = plan_reindex(ckpt, 10**6)
    assert layout(plan) == {"model-00001-of-00003.safetensors": ["embed", q, k, v],  # q's 64 B > k+v's 32
                            "model-00002-of-00003.safetensors": ["o"],
                            "model-00003-of-00003.safetensors": ["head"]}
    assert (moved_tensors(plan, ckpt), moved_bytes(plan, ckpt)) == (2, 32)
    assert plan.stage == "reindex" and plan.config is None and plan.dropped == () and plan.warnings == ()
    assert all(t.transform == "copy" and len(t.sources) == 1 for s in plan.shards for t in s.tensors)


def test_no_room_goes_to_first_file_with_room_then_a_new_file():
    g, u = "m.layers.0.mlp.gate_proj.weight", "m.layers.0.mlp.up_proj.weight"
    g1, u1 = g.replace("0", "1"), u.replace("0", "1")
    ckpt = fake_ckpt({"a.safetensors": [("x", 100), (g, 30), (g1, 30)],
                      "b.safetensors": [("z", 100), (u, 30), (u1, 30)],
                      "c.safetensors": [("y", 40)]})
    plan = plan_reindex(ckpt, 150)
    # neither pair (60 B) fits back into a or b (100 B kept each); c has room for one; then a new file
    assert layout(plan) == {"model-00001-of-00004.safetensors": ["x"],
                            "model-00002-of-00004.safetensors": ["z"],
                            "model-00003-of-00004.safetensors": [g, u, "y"],
                            "model-00004-of-00004.safetensors": [g1, u1]}
    assert moved_tensors(plan, ckpt) == 4
    # a tie in held bytes goes to the first file; a file left with nothing but that group survives
    ckpt = fake_ckpt({"a.safetensors": [("x", 90), (g, 30), (g1, 30)], "b.safetensors": [(u, 30), (u1, 30)]})
    assert layout(plan_reindex(ckpt, 150)) == {"model-00001-of-00002.safetensors": ["x", g, u],
                                               "model-00002-of-00002.safetensors": [g1, u1]}


def test_oversize_group_gets_its_own_shard_and_a_warning():
    q, k, v = (L0 + f"self_attn.{p}_proj.weight" for p in "qkv")
    ckpt = fake_ckpt({"a.safetensors": [("embed", 50), (q, 80)], "b.safetensors": [(k, 80), (v, 80), ("o", 50)]})
    plan = plan_reindex(ckpt, 100)
    assert layout(plan) == {"model-00001-of-00003.safetensors": ["embed"], "model-00002-of-00003.safetensors": ["o"],
                            "model-00003-of-00003.safetensors": [q, k, v]}
    assert plan.warnings == ("group 'qkv:model.layers.0.self_attn.' (3 tensors) is 240 bytes, over max_shard_size "
                             "(100); it gets a shard of its own, model-00003-of-00003.safetensors",)


def test_over_full_file_sheds_fewest_bytes_and_whole_groups_only():
    g, u = L0 + "mlp.gate_proj.weight", L0 + "mlp.up_proj.weight"
    ckpt = fake_ckpt({"a.safetensors": [("n1", 10), (g, 40), (u, 40), ("n2", 25), ("n3", 60)]})
    plan = plan_reindex(ckpt, 120)   # 175 bytes: shedding n3 (60) is the cheapest way under 120
    assert layout(plan) == {"model-00001-of-00002.safetensors": ["n1", g, u, "n2"],
                            "model-00002-of-00002.safetensors": ["n3"]}
    # no single unit ends the excess (80): the largest goes (50), then the smallest that does (30)
    ckpt = fake_ckpt({"a.safetensors": [("w", 50), ("x", 40), ("y", 30), ("z", 20)]})
    assert layout(plan_reindex(ckpt, 60)) == {"model-00001-of-00003.safetensors": ["x", "z"],
                                              "model-00002-of-00003.safetensors": ["w"],
                                              "model-00003-of-00003.safetensors": ["y"]}


def test_files_in_numeric_order_and_errors():
    ckpt = fake_ckpt({f"model-{i}.safetensors": [(f"t{i}", 10)] for i in (1, 10, 2)})
    assert [s.tensors[0].name for s in plan_reindex(ckpt).shards] == ["t1", "t2", "t10"]
    assert sorted(["m-10", "m-9", "m-1"], key=natural_key) == ["m-1", "m-9", "m-10"]
    with pytest.raises(PlanError, match=r"'t1' in a.safetensors and b.safetensors"):
        plan_reindex(fake_ckpt({"a.safetensors": [("t1", 1)], "b.safetensors": [("t1", 1)]}))
    broken = Checkpoint("mem://x", {}, {}, header_errors={"c.safetensors": "truncated"})
    with pytest.raises(PlanError, match="c.safetensors: truncated"):
        plan_reindex(broken)


# ---- real files, hostile layouts, executed and read back ---------------------------------------

H, KV, FF = 64, 16, 96


def attn(i: int, parts: str = "qkv", bias: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}.self_attn."
    rows = {"q": H, "k": KV, "v": KV}
    return [(p + f"{x}_proj.weight", (rows[x], H)) for x in parts] + \
        ([(p + f"{x}_proj.bias", (rows[x],)) for x in parts] if bias else [])


def test_qkv_in_three_non_adjacent_shards(tmp_path):
    p = L0 + "self_attn."
    files = {"model-00001-of-00005.safetensors": [("model.embed_tokens.weight", (256, H))] + attn(0, "q"),
             "model-00002-of-00005.safetensors": [(p + "o_proj.weight", (H, H)), (L0 + "input_layernorm.weight", (H,))],
             "model-00003-of-00005.safetensors": attn(0, "k"),
             "model-00004-of-00005.safetensors": [(L0 + f"mlp.{m}_proj.weight", (FF, H))
                                                  for m in ("gate", "up", "down")],
             "model-00005-of-00005.safetensors": attn(0, "v") + [("lm_head.weight", (256, H))]}
    write_real(tmp_path / "src", files)
    plan, ckpt = reindex_and_check(tmp_path / "src", tmp_path / "out")
    assert [s.file for s in plan.shards] == [f"model-0000{k}-of-00004.safetensors" for k in (1, 2, 3, 4)]
    assert layout(plan)["model-00001-of-00004.safetensors"][-4:] == [p + "k_proj.bias", p + "k_proj.weight",
                                                                     p + "v_proj.bias", p + "v_proj.weight"]
    assert moved_tensors(plan, ckpt) == 4


def test_numeric_vs_alphabetical_order(tmp_path):
    """Shards cut in alphabetical tensor order (layers.10 before layers.2), files named without padding."""
    names = sorted(n for i in range(12) for n in attn(i) + [(f"model.layers.{i}.mlp.gate_proj.weight", (FF, H)),
                                                             (f"model.layers.{i}.mlp.up_proj.weight", (FF, H))])
    files = {f"model-{k + 1}.safetensors": names[k * 7:(k + 1) * 7] for k in range(math.ceil(len(names) / 7))}
    assert len(files) >= 10
    write_real(tmp_path / "src", files)
    plan, ckpt = reindex_and_check(tmp_path / "src", tmp_path / "out", "40KB")
    origins = [sorted({t.sources[0].file for t in s.tensors}, key=natural_key)[0] for s in plan.shards]
    assert origins == sorted(origins, key=natural_key)  # model-2's tensors come before model-10's
    assert 0 < moved_tensors(plan, ckpt) < len(names) // 2


def test_expert_gate_up_split_across_shards(tmp_path):
    p = "model.layers.1.mlp."
    experts = [f"experts.{e}." for e in range(8)] + ["shared_experts."]
    files = {"model-00001-of-00003.safetensors": [(p + e + "gate_proj.weight", (FF, H)) for e in experts],
             "model-00002-of-00003.safetensors": [(p + e + "up_proj.weight", (FF, H)) for e in experts]
             + [(p + "gate.weight", (8, H))],
             "model-00003-of-00003.safetensors": [(p + e + "down_proj.weight", (H, FF)) for e in experts]}
    write_real(tmp_path / "src", files)
    plan, _ = reindex_and_check(tmp_path / "src", tmp_path / "out", 150_000)  # a file holds ≤ 6 experts' pairs
    # pairs (24 KiB each) fill the gate file (first of two equal holders), the rest join the router's
    assert [len(s.tensors) for s in plan.shards] == [12, 7, 9]


def test_mla_pairs_split_fp8_with_scales(tmp_path):
    p = L0 + "self_attn."
    files = {"a.safetensors": [(p + "q_a_proj.weight", (96, H)), ("layers.0.attn.wq_a.weight", (96, H))],
             "b.safetensors": [(p + "kv_a_proj_with_mqa.weight", (80, H)), ("layers.0.attn.wkv_a.weight", (80, H))],
             "c.safetensors": [(p + "q_a_proj.weight_scale_inv", (1, 1)),
                               (p + "kv_a_proj_with_mqa.weight_scale_inv", (1, 1)),
                               (p + "o_proj.weight", (H, H))]}
    write_real(tmp_path / "src", files, dtype=torch.float8_e4m3fn)
    plan, ckpt = reindex_and_check(tmp_path / "src", tmp_path / "out")
    first = {n for f in "ab" for n, _ in files[f"{f}.safetensors"]}
    assert set(layout(plan)["model-00001-of-00002.safetensors"]) == first | {
        p + "kv_a_proj_with_mqa.weight_scale_inv", p + "q_a_proj.weight_scale_inv"}
    assert moved_tensors(plan, ckpt) == 4


def test_group_larger_than_limit_real(tmp_path):
    files = {"a.safetensors": attn(0, "q") + [("model.norm.weight", (H,))], "b.safetensors": attn(0, "kv") + attn(1)}
    write_real(tmp_path / "src", files)
    plan, _ = reindex_and_check(tmp_path / "src", tmp_path / "out", 8000)  # qkv = 10 KiB
    assert len(plan.warnings) == 2 and all("it gets a shard of its own" in w for w in plan.warnings)
    assert [len(s.tensors) for s in plan.shards] == [1, 6, 6]


def test_qwen_style_checkpoint_loads_in_transformers_with_same_logits(tmp_path):
    """Every q_proj in one shard, every k/v in another, gate and up apart: transformers loads the output."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    pick = {"q_proj": 1, "k_proj": 2, "v_proj": 2, "gate_proj": 3, "up_proj": 4}
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for n, t in state.items():
        parts.setdefault(next((s for key, s in pick.items() if f".{key}." in n), 5), {})[n] = t
    src = tmp_path / "src"
    src.mkdir()
    for k, part in parts.items():
        save_file(part, str(src / f"model-{k:05d}-of-00005.safetensors"), metadata={"format": "pt"})
    (src / INDEX_NAME).write_text(json.dumps(index_document(
        {n: f"model-{k:05d}-of-00005.safetensors" for k, p in parts.items() for n in p},
        sum(t.numel() * t.element_size() for t in state.values()))))
    cfg.save_pretrained(src)
    plan, _ = reindex_and_check(src, tmp_path / "out", "60KB")
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 5, 9, 3, 77]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_deepseek_v3_fp8_with_scales_in_the_next_shard(tmp_path):
    from ckptflow.flows.demo.synthetic import DeepSeekDims, make_deepseek_v3_fp8

    make_deepseek_v3_fp8(open_location(str(tmp_path / "src")), DeepSeekDims(num_hidden_layers=4))
    for limit in ("5GB", "300KB"):
        plan, ckpt = reindex_and_check(tmp_path / "src", tmp_path / f"out-{limit}", limit)
        mla = [t.name for t in plan.shards[1].tensors if ".self_attn." in t.name and "_a_proj" in t.name]
        assert len(mla) == 4  # q_a_proj and kv_a_proj_with_mqa with their scales, together
        assert moved_tensors(plan, ckpt) > 0
