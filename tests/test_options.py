"""Every option of a command that builds a config arrives in the config field of its name,
and every field has its option (``embcam.arguments.config_from``): set each option to a
value unlike its default, parse, build, and look."""
import argparse
from dataclasses import fields

from embcam.arguments import config_from
from embcam.cli import add_explain_arguments, explain_config
from embcam.evaluation import chen
from embcam.job.pipeline import ExplainConfig


def assert_round_trip(parser, build, config_class, required: dict, renamed=(), console_only=()):
    """``build(parser.parse_args(argv))`` for each option alone (plus the ``required`` ones)."""
    renamed, config_fields, seen = dict(renamed), {f.name for f in fields(config_class)}, set()
    for action in parser._actions:
        if action.dest in {"help", *console_only}:
            continue
        field = renamed.get(action.dest, action.dest)
        assert field in config_fields, f"{action.option_strings} has no {config_class.__name__} field"
        if action.nargs == 0:  # a flag
            argv, expected = [action.option_strings[0]], True
        elif action.choices:
            value = next(c for c in action.choices if c != action.default)
            argv, expected = [action.option_strings[0], value], value
        elif action.type in (int, float):
            value = action.type(7) if action.default != 7 else action.type(8)
            argv, expected = [action.option_strings[0], str(value)], value
        elif isinstance(action, argparse._AppendAction):
            argv, expected = [action.option_strings[0], "a", action.option_strings[0], "b.py"], ["a", "b.py"]
        else:
            argv, expected = [action.option_strings[0], f"value-of-{action.dest}"], f"value-of-{action.dest}"
        others = [arg for name, value in required.items() if name != action.dest for arg in (f"--{name}", value)]
        got = getattr(build(parser.parse_args(others + argv)), field)
        assert got == expected, (action.option_strings, got, expected)
        seen.add(field)
    assert config_fields - seen == set(), f"fields without an option: {sorted(config_fields - seen)}"


def test_every_explain_option_reaches_its_config_field():
    parser = argparse.ArgumentParser()
    add_explain_arguments(parser)
    assert_round_trip(parser, explain_config, ExplainConfig, {"manifest": "m", "out": "o"},
                      renamed={"allowed_prefix": "allowed_prefixes"},  # --allowed-prefix P ... -> the list
                      console_only={"no_progress", "verbose", "confine_uris"})


def test_every_chen_baseline_option_reaches_its_config_field():
    assert_round_trip(chen.build_parser(), lambda args: config_from(chen.ChenConfig, args), chen.ChenConfig,
                      {"manifest": "m", "out": "o"}, console_only={"no_progress"})
