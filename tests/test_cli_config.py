"""Training commands take every config field as a flag, and nothing is copied by hand."""

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from glassbox.cli import app
from glassbox.cli_config import config_command, field_docs
from glassbox.train.diffusion import DiffusionTrainConfig
from glassbox.train.pretrain import PretrainConfig

COMMON = {
    "out", "data", "max_steps", "max_minutes", "resume", "seed", "device", "compile",
    "checkpoint_interval", "keep_last", "lr", "batch_size", "log_interval",
}  # fmt: skip


def flags_of(*path: str) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {opt for p in command.params for opt in p.opts if opt.startswith("--")}


@pytest.mark.parametrize(
    "path,cls", [(("pretrain",), PretrainConfig), (("diffuse", "train"), DiffusionTrainConfig)]
)
def test_every_config_field_has_a_flag_and_help(path, cls):
    flags = flags_of(*path)
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in flags, f"{cls.__name__}.{f.name} has no flag"
    assert {"--config", "--print-config"} <= flags
    docs = field_docs(cls)
    assert not [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]


def test_model_help_lists_every_preset():
    from glassbox.config import PRESETS

    help = field_docs(PretrainConfig)["model"]
    assert all(name in help for name in PRESETS), help


def test_the_same_idea_has_the_same_flag_in_every_training_command():
    for cls in (PretrainConfig, DiffusionTrainConfig):
        assert COMMON <= {f.name for f in dataclasses.fields(cls)}, cls.__name__


@dataclasses.dataclass
class Toy:
    """A config for testing the generator."""

    n: int = 3
    """A count."""
    rate: float | None = 0.5
    """A rate; none turns it off."""
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    """Names."""
    flag: bool = False
    """A switch."""
    extra: dict = dataclasses.field(default_factory=dict)
    """JSON overrides."""


def run_toy(*args: str, tmp_path=None):
    seen = {}
    toy = typer.Typer()
    toy.command("toy")(config_command(Toy, lambda cfg, explicit: seen.update(cfg=cfg, ex=explicit)))
    toy.command("other")(lambda: None)
    result = CliRunner().invoke(toy, ["toy", *args])
    return result, seen


def test_flags_parse_each_type_and_report_what_was_given(tmp_path):
    result, seen = run_toy("--n", "5", "--rate", "none", "--names", "x", "--names", "y",
                           "--flag", "--extra", '{"k": 1}')  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == Toy(n=5, rate=None, names=["x", "y"], flag=True, extra={"k": 1})
    assert seen["ex"] == {"n", "rate", "names", "flag", "extra"}
    result, seen = run_toy()
    assert seen["cfg"] == Toy() and seen["ex"] == set()


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("n: 7\nrate: 1e-3\nnames: [p, q]\n")
    result, seen = run_toy("--config", str(tmp_path / "c.yaml"), "--n", "9")
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == Toy(n=9, rate=1e-3, names=["p", "q"])  # YAML's "1e-3" is a float here
    assert seen["ex"] == {"n", "rate", "names"}
    result, seen = run_toy("--n", "many")
    assert result.exit_code != 0 and "cfg" not in seen
