"""`--config FILE` (issue 29 §4): every option of tile, train, predict, evaluate and adapt from YAML,
the command line winning, one line for a bad file, and the `config.yaml` a run writes repeating
it exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import tiny_checkpoint
from histodg.cli import main
from histodg.cli.config_file import key_of, resolved

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"

# each command with settings away from their defaults, repeatable options and several arguments included
CASES = {
    "tile": ["a.svs", "b.svs", "-o", "stores", "--mpp", "1.0", "--tile-size", "128", "--label", "tumor=1",
             "--label", "stroma=2", "--organ", "colon", "--qc", "flag", "--workers", "3", "--compression", "jpeg",
             "--min-tissue", "0.4", "--shard", "2/4"],
    "train": ["s1", "s2", "-o", "run", "--pretrain", "organ", "--finetune", "union", "--hp", "dsbn=true", "--hp",
              "shallow=false", "--val-domain", "lung", "--val-domain", "scanner-d", "--steps", "7", "--lr", "0.002",
              "--no-augment", "--method", "sds"],
    "predict": ["best.pt", "a.svs", "b.svs", "-o", "preds", "--tta", "none", "--overlap", "0.25", "--geojson-tiles",
                "--batch-size", "3", "--adapt", "bn", "--threshold", "0.4", "--backend", "tiffslide"],
    "evaluate": ["best.pt", "stores", "--tta", "none", "--batch-size", "4", "--domain-axis", "scanner", "--adapt", "bn"],
    "adapt": ["best.pt", "--source", "s", "--target", "t1", "--target", "t2", "-o", "adapted", "--hp", "self_train=true",
              "--hp", "global=false", "--steps", "5", "--lr", "0.001"],
}


def parse(command: str, args: list) -> dict:
    """The parameters `histodg COMMAND ARGS` resolves to (Click's parsing alone: nothing runs)."""
    with main.commands[command].make_context(command, [str(a) for a in args]) as ctx:
        return {k: _plain(v) for k, v in ctx.params.items()}


def _plain(v):
    if isinstance(v, Path):
        return str(v.absolute())
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def written(command: str, args: list, path: Path) -> Path:
    with main.commands[command].make_context(command, [str(a) for a in args]) as ctx:
        path.write_text(yaml.safe_dump(resolved(ctx)))
    return path


@pytest.mark.parametrize("command", sorted(CASES))
def test_the_written_settings_repeat_the_command_exactly(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    direct = parse(command, CASES[command])
    config = written(command, CASES[command], tmp_path / "config.yaml")
    assert parse(command, ["--config", config]) == direct
    params = {p.name: p for p in main.commands[command].params}
    away = [k for k, v in direct.items() if v not in (None, [], False) and v != _plain(params[k].default)]
    assert len(away) >= 5, away  # the case sets things: the comparison above could fail


def test_the_command_line_wins_over_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = written("predict", CASES["predict"], tmp_path / "config.yaml")
    p = parse("predict", ["--config", config, "--tta", "flip", "other.pt", "other.svs"])
    assert p["tta"] == "flip" and p["inputs"] == [str(Path("other.svs").absolute())]
    assert p["checkpoint"] == str(Path("other.pt").absolute())
    assert p["threshold"] == 0.4 and p["adapt"] == "bn"  # the rest from the file
    # option names with underscores, and the parameter's own name (`out_dir` for -o/--out), are keys too
    (tmp_path / "u.yaml").write_text("out_dir: elsewhere\nmpp_tolerance: 0.1\ninputs: a.svs\n")
    p = parse("tile", ["--config", tmp_path / "u.yaml"])
    assert p["out_dir"] == str(Path("elsewhere").absolute()) and p["mpp_tolerance"] == 0.1
    assert p["inputs"] == [str(Path("a.svs").absolute())]  # one value for a list: a list of one


@pytest.mark.parametrize("text, message", [
    ("inputs: [a.svs]\nout: x\nspeed: 3\n", "unknown key 'speed' for `histodg tile`"),
    ("inputs: [a.svs]\nout: x\nmpp: fast\n", "mpp: 'fast' is not a valid float"),
    ("inputs: [a.svs]\nout: [x, y]\n", "out: one value expected, got a list"),
    ("inputs: [a.svs]\nout: x\nqc: sometimes\n", "qc: 'sometimes' is not one of"),
    ("inputs: [[a.svs]]\nout: x\n", "inputs: a value must be a number, a string or a boolean"),
    ("- a\n- b\n", "must be a mapping of option names to values"),
    ("out: x\n  bad: : :\n", "not valid YAML at line 2"),
])
def test_a_bad_config_is_one_line_naming_the_file_and_the_key(cli, tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    r = cli("tile", "--config", tmp_path / "c.yaml")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "c.yaml") in lines[0] and message in lines[0], r.stderr


def test_a_config_cannot_run_code(cli, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "c.yaml").write_text(f"out: !!python/object/apply:os.system ['touch {marker}']\ninputs: [a.svs]\n")
    r = cli("tile", "--config", tmp_path / "c.yaml")
    assert r.exit_code == 1 and "not valid YAML" in r.stderr and not marker.exists()
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    r = cli("tile", "--config", tmp_path / "big.yaml", "a.svs", "-o", tmp_path / "o")
    assert r.exit_code == 1 and "larger than 1 MB" in r.stderr


@pytest.mark.parametrize("command", sorted(CASES))
def test_each_example_config_is_a_valid_config_of_its_command(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = EXAMPLES / f"{command}.yaml"
    assert example.read_text().startswith(f"# histodg {command} --config examples/configs/{command}.yaml")
    p = parse(command, ["--config", example])
    keys = yaml.safe_load(example.read_text())
    names = {key_of(q): q.name for q in main.commands[command].params}
    assert len(keys) >= 2 and set(keys) <= set(names)
    def path_or_value(v):
        return str(Path(v).absolute()) if isinstance(v, str) and "/" in v else v

    for key, value in keys.items():  # each value arrives as given (paths compared as absolute paths)
        got = p[names[key]]
        assert (list(map(path_or_value, got)) if isinstance(got, list) else path_or_value(got)) == (
            list(map(path_or_value, value)) if isinstance(value, list) else path_or_value(value)), key


@pytest.mark.slow
def test_tile_and_predict_write_their_settings_and_rerun_from_them(cli, cmu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tile.yaml").write_text(f"inputs: [{cmu}]\nout: stores\nmpp: 4.0\ntile-size: 64\norgan: colon\n")
    r = cli("tile", "--config", "tile.yaml", "--qc", "flag")
    assert r.exit_code == 0, r.output
    made = yaml.safe_load((tmp_path / "stores" / "config.yaml").read_text())
    assert made["mpp"] == 4.0 and made["qc"] == "flag" and made["organ"] == "colon"
    assert made["out"] == str(tmp_path / "stores") and "overwrite" not in made and "json" not in made
    r = cli("tile", "--config", tmp_path / "stores" / "config.yaml", "--json")
    assert r.exit_code == 0 and '"skipped"' in r.output  # the same settings: the store is reused, not refused
    r = cli("tile", "--config", tmp_path / "stores" / "config.yaml", "--mpp", "2.0")  # other settings: refused
    assert r.exit_code == 1
    assert yaml.safe_load((tmp_path / "stores" / "config.yaml").read_text())["mpp"] == 4.0  # not the refused run's
    ck = tiny_checkpoint(tmp_path / "best.pt", mpp=4.0, tile=64)
    r = cli("predict", ck, cmu, "-o", "preds", "--tta", "none", "--device", "cpu")
    assert r.exit_code == 0, r.output
    made = yaml.safe_load((tmp_path / "preds" / "config.yaml").read_text())
    assert made["checkpoint"] == str(ck) and made["tta"] == "none" and made["inputs"] == [str(cmu)]
    r = cli("predict", "--config", tmp_path / "preds" / "config.yaml", "--json")
    assert r.exit_code == 0 and '"skipped"' in r.output


def test_a_refused_train_leaves_the_runs_config_alone(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "config.yaml").write_text("steps: 1\n")
    r = cli("train", tmp_path / "none", "-o", run)  # no stores there: refused before anything is written
    assert r.exit_code == 1 and "not a patch store" in r.stderr
    assert (run / "config.yaml").read_text() == "steps: 1\n"
