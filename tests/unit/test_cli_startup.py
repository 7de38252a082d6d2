"""Start-up cost of the command line: typer's pydantic coercion is bypassed for parameters
click already gives in their final type (cli._PlainValue), and the values still arrive as
typer would give them.

Runs in subprocesses: whether pydantic was imported is a property of a fresh interpreter.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from ovlfsck import cli

RUN = textwrap.dedent("""
    import json, sys
    from ovlfsck import cli
    seen = {}
    original = cli.run_check
    def spy(*args, **kw):
        seen.update(zip(("options", "lower", "upper", "work"), args))
        seen["severity"] = [[str(x) for x in s] for s in args[9]]
        return original(*args, **kw)
    cli.run_check = spy
    try:
        cli.main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    print(json.dumps({"code": code, "pydantic": "pydantic" in sys.modules,
                      "seen": {k: v for k, v in seen.items() if k in ("lower", "upper", "work",
                                                                     "options", "severity")}}))
""")


def run(*args):
    out = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture
def layers(tmp_path):
    for name in ("l1", "l2", "u", "w"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_check_does_not_import_pydantic_and_values_arrive(layers):
    res, err = run("check", "-n", "-q", "--lower", str(layers / "l1"), "--lower", str(layers / "l2"),
                   "--upper", str(layers / "u"), "--work", str(layers / "w"),
                   "--severity", "orphan-whiteout=ignore")
    assert res["code"] == 0, err
    assert res["pydantic"] is False
    seen = res["seen"]
    assert seen["lower"] == [str(layers / "l1"), str(layers / "l2")]
    assert seen["upper"] == str(layers / "u") and seen["work"] == str(layers / "w")
    assert seen["options"] == [] and len(seen["severity"]) == 1 and "ignore" in seen["severity"][0][1].lower()


def test_defaults_when_options_are_absent(layers):
    res, err = run("check", "-n", "-q", "-o", f"lowerdir={layers / 'l1'}")
    assert res["code"] == 0, err
    seen = res["seen"]
    assert seen["lower"] == [] and seen["upper"] is None and seen["work"] is None
    assert seen["options"] == [f"lowerdir={layers / 'l1'}"]


def test_other_shapes_go_to_typers_coercion(monkeypatch):
    import typer._coercion

    built = []

    class Typers:
        def coerce(self, value, param=None, ctx=None):
            return ("typer", value)

    def build(descriptor):
        built.append(descriptor)
        return Typers()

    monkeypatch.setattr(typer._coercion, "build_runtime_param", build)

    class Param:
        multiple = False
        nargs = 1

    desc = object()
    plain = cli._PlainValue("text", desc)
    assert plain.coerce("x", Param(), None) == "x"
    assert plain.coerce(None, Param(), None) is None
    flag = cli._PlainValue("flag", desc)
    assert flag.coerce(True, Param(), None) is True
    many = cli._PlainValue("list", desc)
    assert many.coerce(("a", "b"), Param(), None) == ["a", "b"]
    assert many.coerce(None, Param(), None) == []
    assert built == []  # none of those needed typer's coercion
    # Anything of another shape is typer's to coerce (built once per parameter).
    assert plain.coerce(5, Param(), None) == ("typer", 5)
    assert flag.coerce("yes", Param(), None) == ("typer", "yes")
    assert many.coerce(("a", 1), Param(), None) == ("typer", ("a", 1))
    assert plain.coerce(6, Param(), None) == ("typer", 6)
    assert built == [desc, desc, desc]
