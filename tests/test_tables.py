"""The JSON tables: one placeholder language, one loader (built-in by name, or any fsspec URL),
and one message per bad row naming the table, the row and the fix."""
from __future__ import annotations

import json
import re

import fsspec
import pytest
import torch

from ckptflow.flows.cli import main
from ckptflow.flows.cli.parser import build_parser
from ckptflow.flows.megatron import megatron_flow, megatron_preflight
from ckptflow.tasks.megatron.load import load_megatron
from ckptflow.tasks.megatron.mapping import MegatronConvertError, convert_megatron
from ckptflow.tasks.presets.dtype_exceptions import DTYPE_EXCEPTIONS, DtypeExceptions
from ckptflow.tasks.presets.fused_groups import load_fused_groups
from ckptflow.tasks.presets.megatron import MEGATRON_TABLES, load_megatron_table
from ckptflow.tasks.presets.mp import Split, load_preset, map_name, parse_preset
from ckptflow.tasks.presets.patterns import NameMatcher, PatternError, regex_of, target_fields
from ckptflow.tasks.presets.tables import MAX_TABLE_BYTES, TableError, load_table, read_table
from tests.megatron_fixtures import megatron_args, megatron_models, rank_file, tiny_gpt2, write_tree


def put(url: str, text: str | bytes) -> str:
    with fsspec.open(url, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return url


def test_one_placeholder_language_first_whole_match_wins():
    m = NameMatcher(["a.{layer}.{x|y}.w", "a.{layer}.{expert}.w", "a.{layer}.x.w.{expert}", "b"])
    assert m.match("a.3.x.w") == (0, {"layer": "3"})        # {x|y} captures nothing
    assert m.match("a.3.y.w") == (0, {"layer": "3"})
    assert m.match("a.3.17.w") == (1, {"layer": "3", "expert": "17"})
    assert m.match("a.3.x.w.5") == (2, {"layer": "3", "expert": "5"})  # row 0 matches only a prefix
    assert m.match("b") == (3, {}) and m.match("bb") is None and m.match("a.3.z.w") is None
    assert re.fullmatch(regex_of("p.{a.b|c}"), "p.a.b") and not re.fullmatch(regex_of("p.{a.b|c}"), "p.aXb")
    for bad, why in [("x.{lyer}", "{lyer} is not a placeholder"), ("x.{layer}.{layer}", "twice"),
                     ("x.{a|}", "empty spelling"), ("x.{layer", "unmatched brace"), ("x}", "unmatched brace")]:
        with pytest.raises(PatternError, match=re.escape(why)):
            regex_of(bad)
    assert target_fields("h.{layer}.{expert}", ("layer", "expert")) == ("layer", "expert")
    for bad in ("h.{expert}", "h.{}", "h.{layer:03d}", "h.{layer!r}", "h.{layer"):
        with pytest.raises(PatternError):
            target_fields(bad, ("layer",))
    # MP presets read {a|b} too now (the Megatron table always did).
    preset = parse_preset({"rules": [["m.{layer}.{q|k}_proj.weight", "l{layer}.qk", "COLUMN"]]}, "inline")
    hit = map_name(preset, "m.2.k_proj.weight")
    assert (hit.target, hit.rule.split, hit.captures) == ("l2.qk", Split.COLUMN, {"layer": "2"})


def test_preset_from_s3_url(s3_options):
    opts, bucket = s3_options["options"], s3_options["bucket"]
    url = f"s3://{bucket}/presets/mine.json"
    fs = fsspec.filesystem("s3", **opts)
    with fs.open(f"{bucket}/presets/mine.json", "w") as f:
        json.dump({"rules": [["x.{layer}.w", "y.{layer}", "ROW"], ["x.{layer}.b", None]]}, f)
    preset = load_preset(url, opts)
    assert (preset.name, preset.source) == ("mine", url)
    assert map_name(preset, "x.4.w").target == "y.4" and map_name(preset, "x.4.b").target is None
    with fs.open(f"{bucket}/presets/bad.json", "w") as f:
        json.dump({"rules": [["x.{layer}.w", "y.{layer}", "ROW"], ["x.{layer}.b", "z", "SIDEWAYS"]]}, f)
    with pytest.raises(TableError) as err:
        load_preset(f"s3://{bucket}/presets/bad.json", opts)
    assert str(err.value) == (f"preset s3://{bucket}/presets/bad.json: rules[1] ['x.{{layer}}.b', 'z', "
                              "'SIDEWAYS']: split must be one of COLUMN, ROW, REPLICATED, EXPERT")
    with pytest.raises(TableError, match=re.escape(f"preset s3://{bucket}/nope.json: no such file and no "
                                                   "such built-in preset (deepseek-v3, deepseek_v3, llama)")):
        load_preset(f"s3://{bucket}/nope.json", opts)


@pytest.mark.parametrize("load,noun,doc,row,fix", [
    (load_preset, "preset", {"rules": [["a", "b", "ROW"], ["c.{layer}", "d.{expert}", "ROW"]]},
     "rules[1] ['c.{layer}', 'd.{expert}', 'ROW']", "uses a placeholder its pattern does not capture: {expert}"),
    (load_fused_groups, "fused-groups table", {"_c": "x", "groups": [
        {"name": "a", "pattern": "^(?P<m>.*)x"}, {"name": "b", "pattern": "^(?P<m>.*)y", "key": "mod"}]},
     "groups[1] {'key': 'mod', 'name': 'b', 'pattern': '^(?P<m>.*)y'}", "key ['mod'] is not a named capture"),
    (load_megatron_table, "Megatron table", {"rules": [
        {"source": "a.{layer}", "target": "h.{layer}", "tp": "ROW"}, {"source": "b", "tp": "row"}]},
     "rules[1] {'source': 'b', 'tp': 'row'}", "'tp' must be one of COLUMN, ROW, REPLICATED"),
    (lambda url: load_table(DTYPE_EXCEPTIONS, DtypeExceptions, url), "dtype-exceptions table",
     {"_c": "x", "llama": ["ok$"], "qwen2": ["(unclosed"]}, "", "qwen2: '(unclosed' is not a valid regex"),
])
def test_bad_row_in_each_table_names_table_row_and_fix(load, noun, doc, row, fix):
    url = put(f"memory://tables/{noun.split()[0]}.json", json.dumps(doc))
    with pytest.raises(TableError) as err:
        load(url)
    msg = str(err.value)
    assert msg.startswith(f"{noun} {url}: {row}{': ' if row else ''}") and fix in msg and "\n" not in msg, msg


def test_user_tables_are_bounded_and_strict():
    for text, why in [(b" " * (MAX_TABLE_BYTES + 1), "larger than 1 MiB"),
                      ('{"groups": [], "groups": []}', "has the key 'groups' twice"),
                      ('{"groups": [{"name": "a", "pattern": NaN}]}', "contains NaN, which is not JSON"),
                      ("[" * 100_000, "nested deeper than any real file"),
                      ('{"groups": [{"name": "\\udc80", "pattern": "x"}]}', "lone UTF-16 surrogate")]:
        url = put("memory://tables/hostile.json", text)
        with pytest.raises(TableError, match=re.escape(f"fused-groups table {url}: ") + ".*" + re.escape(why)):
            load_fused_groups(url)


def test_builtin_tables_are_named_not_pathed():
    assert read_table(MEGATRON_TABLES, "gpt2")[1] == "built-in Megatron table"
    assert load_megatron_table().label == "built-in Megatron table"
    assert load_preset("deepseek_v3").source == "deepseek-v3"  # the alias names the same table
    assert len(load_fused_groups()) == 6


def _checkpoint_with_extra_buffer(tmp_path, model):
    """A TP=1 Megatron checkpoint with one tensor name the built-in table does not know."""
    (rank,) = megatron_models(model, 3.0, tp=1)
    rank["language_model"]["encoder"]["layers.0.self_attention.rotary_inv_freq"] = torch.ones(4)
    return str(write_tree(tmp_path / "ckpt", [rank_file(rank, megatron_args(model, tp=1), 3.0)]))


def _table_with_extra_row(url: str, about: str = "mine") -> str:
    doc = read_table(MEGATRON_TABLES, "gpt2")[0]
    doc["about"] = about
    doc["rules"].insert(0, {"source": "language_model.{transformer|encoder}.layers.{layer}."
                                      "{attention|self_attention}.rotary_inv_freq", "target": None, "tp": "REPLICATED"})
    return put(url, json.dumps(doc))


def test_megatron_table_from_memory_url(tmp_path):
    model = tiny_gpt2(seed=5)
    src = _checkpoint_with_extra_buffer(tmp_path, model)
    with pytest.raises(MegatronConvertError) as err:
        convert_megatron(load_megatron(src), {"vocab_size": 100})
    msg = str(err.value)
    assert "1 tensor(s) match no rule of built-in Megatron table: model.language_model.encoder.layers.0." \
           "self_attention.rotary_inv_freq" in msg and "tasks/presets" not in msg
    advice = re.search(r"pass one with (--\w+) FILE\|URL", msg).group(1)
    args = build_parser().parse_args(["megatron", src, str(tmp_path / "out"), advice, "memory://t.json"])
    assert args.table == "memory://t.json"  # the option the advice names exists
    url = _table_with_extra_row("memory://tables/gpt2-rotary.json")
    cfg = put("memory://tables/cfg.json", '{"vocab_size": 100}')
    assert megatron_preflight(src, cfg, table=url)["vocab_size"] == 100
    state, config = convert_megatron(load_megatron(src), {"vocab_size": 100}, load_megatron_table(url))
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], want[k]) for k in want)


@pytest.mark.slow
def test_megatron_flow_with_table_url_caches_by_content(prefect_harness, tmp_path):
    model = tiny_gpt2(seed=6)
    src = _checkpoint_with_extra_buffer(tmp_path, model)
    url = _table_with_extra_row("memory://tables/flow.json")
    cfg = put("memory://tables/flow-cfg.json", '{"vocab_size": 100}')
    kw = dict(dest=str(tmp_path / "hf"), work=str(tmp_path / "work"), config=cfg, table=url)
    assert megatron_flow(src, **kw)["import_cached"] is False
    assert megatron_flow(src, **kw)["import_cached"] is True
    _table_with_extra_row(url, about="edited")  # same URL, other content: imported again
    assert megatron_flow(src, **kw)["import_cached"] is False


def test_cli_bad_table_is_one_error_line_before_dest(tmp_path, capsys):
    model = tiny_gpt2(seed=7)
    src = _checkpoint_with_extra_buffer(tmp_path, model)
    doc = read_table(MEGATRON_TABLES, "gpt2")[0]
    doc["rules"][2]["transpose"] = "yes"
    url = put("memory://tables/cli-bad.json", json.dumps(doc))
    out = tmp_path / "out"
    assert main(["megatron", src, str(out), "--table", url, "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: Megatron table {url}: rules[2] {{"), err
    assert err.rstrip().endswith("'qkv', 'transpose', 'vocab' and 'optional' must be true or false (or absent: false)")
    assert not out.exists()
