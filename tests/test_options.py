"""One options schema: every ConvertOptions field is a CLI flag and a flow parameter, alike."""
from __future__ import annotations

import json
import typing

import pytest

from ckptflow.flows.cli.convert import convert_options
from ckptflow.flows.cli.parser import build_parser
from ckptflow.flows.params import ConvertOptions, Recipe, flag_of

FIELDS = ConvertOptions.model_fields


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["convert", "watch"])
def test_every_field_is_a_flag_with_the_models_default_choices_and_help(command):
    sub = _subparser(command)
    by_flag = {s: a for a in sub._actions for s in a.option_strings}
    for name, info in FIELDS.items():
        action = by_flag.get(flag_of(name, info).name)
        assert action is not None, f"{command}: no flag for {name}"
        assert action.dest == name and action.default == info.default, name
        assert action.help and info.description and action.help.startswith(info.description), name
        if typing.get_origin(info.annotation) is typing.Literal:
            assert tuple(action.choices) == typing.get_args(info.annotation), name
    # a bare command line yields exactly the model's defaults
    args = build_parser().parse_args([command, "a", "b"])
    assert ConvertOptions(**convert_options(args)) == ConvertOptions()


def test_every_field_is_a_convert_flow_parameter_with_the_same_default_and_constraints():
    from ckptflow.flows.convert import convert_flow

    props = convert_flow.parameters.properties
    model = ConvertOptions.model_json_schema()["properties"]
    # `runtime` (the CLI's in-process Runtime) is a parameter with no schema: a deployment's form
    # never shows it (test_ops: test_deployed_parameter_schemas_have_no_runtime…)
    assert set(props) == {"source", "dest", "work", "storage_options", *FIELDS}
    for name, info in FIELDS.items():
        assert props[name].get("default") == json.loads(json.dumps(info.default)), name
        for key in ("pattern", "enum", "minimum"):
            assert props[name].get(key) == model[name].get(key), (name, key)
        assert json.dumps(props[name].get("anyOf")) == json.dumps(model[name].get("anyOf")), name


def test_the_watch_flow_takes_the_same_model_whole():
    from ckptflow.flows.watch import watch_flow

    schema = watch_flow.parameters.model_dump()
    options = schema["definitions"]["ConvertOptions"]["properties"]
    assert set(options) == set(FIELDS)
    assert {n: options[n].get("default") for n in FIELDS} == json.loads(ConvertOptions().model_dump_json())


def test_recipe_is_the_byte_changing_part_of_the_options():
    opts = ConvertOptions(dequant=True, mp=2, allow_dtypes=["x"], max_workers=4, checksum=True)
    assert opts.recipe() == Recipe(dequant=True, mp=2, allow_dtypes=("x",))
    assert set(opts.recipe_key()) == set(Recipe.model_fields)
    assert "max_workers" not in opts.recipe_key()


@pytest.mark.parametrize("bad, flag", [({"max_shard_size": "5G"}, "max_shard_size"), ({"mp": 0}, "mp"),
                                       ({"device": "gpu"}, "device"), ({"task_runner": "gpu"}, "task_runner")])
def test_a_value_is_refused_alike_by_the_flag_and_the_flow_parameter(bad, flag):
    """'5G' once passed the flow's parameter check and then failed in the planner."""
    from pydantic import ValidationError
    from prefect.exceptions import ParameterTypeError

    from ckptflow.flows.convert import convert_flow

    with pytest.raises(ValidationError, match=flag):
        ConvertOptions(**bad)
    with pytest.raises(ParameterTypeError, match=flag):
        convert_flow.validate_parameters({"source": "a", "dest": "b", **bad})


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions
               if not a.help and a.dest != "help"]
    assert missing == []
