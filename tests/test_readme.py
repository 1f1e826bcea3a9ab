"""The README's tables name every setting and every method the code has."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings
from training.methods import METHODS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_configuration_table_lists_every_setting_with_its_default():
    for name, field in Settings.model_fields.items():
        row = next(
            (
                line
                for line in README.splitlines()
                if line.startswith(f"| `CREDENCE_{name.upper()}`")
            ),
            "",
        )
        assert row, f"README has no row for CREDENCE_{name.upper()}"
        assert f"`--{name.replace('_', '-')}`" in row
        assert f"`{field.default}`" in row, f"README's default for {name} is not {field.default}"


def test_methods_table_lists_every_method():
    for name in METHODS:
        rows = [line for line in README.splitlines() if line.startswith("| `")]
        assert any(f"`{name}`" in row.split("|")[1] for row in rows), name


def test_architectures_table_lists_every_architecture_and_method():
    from training.architectures import ARCHITECTURES

    table = README.split("| architecture |", 1)[1].split("\n\n", 1)[0]
    header = table.splitlines()[0]
    for name in METHODS:
        assert f"`{name}`" in header, name
    for name in ARCHITECTURES:
        assert f"| `{name}`" in table, name
