"""The user's own model and data through `trainlab bench` (--model/--data, --import) and `--config run.toml` for
bench and compress, with the resolved configuration written next to the results."""

import json
import sys
import textwrap

import pytest

from trainlab.cli import main

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    from trainlab.lab.workloads.base import register_workload

    def make_model():
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def make_batch(batch_size, generator):
        x = torch.randn(batch_size, 6, generator=generator)
        return x, (x[:, :3].argmax(1))

    def batches():
        g = torch.Generator().manual_seed(0)
        return [make_batch(8, g) for _ in range(10)]

    def mse_on_onehot(model, batch):
        return nn.functional.mse_loss(model(batch[0]), nn.functional.one_hot(batch[1], 3).float())
    """
)

REGISTERING_MODULE = textwrap.dedent(
    """
    import dataclasses
    from trainlab.lab.workloads.base import _WORKLOADS, register_workload
    from trainlab.lab.user_workload import user_workload

    if "my-task" not in _WORKLOADS:
        @register_workload("my-task")
        def my_task():
            w = user_workload("user_bench_fixture:make_model", "user_bench_fixture:make_batch", steps=20)
            return dataclasses.replace(w, name="my-task")
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_bench_fixture.py").write_text(USER_MODULE)
    (tmp_path / "user_bench_registering.py").write_text(REGISTERING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_bench_fixture"


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_bench_a_user_model_on_user_batches(user_module, tmp_path):
    out = tmp_path / "out"
    code = main(["bench", "--model", f"{user_module}:make_model", "--data", f"{user_module}:make_batch",
                 "--algorithms", "adamw,sgd", "--steps", "30", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    runs = _results(out)
    assert [(r["workload"], r["algorithm"]) for r in runs] == [("make_model", "adamw"), ("make_model", "sgd")]
    adamw = runs[0]
    assert adamw["metric"] == "evaluation loss" and not adamw["higher_is_better"]
    assert adamw["curve"][-1]["metric"] < adamw["curve"][0]["metric"]  # it learns on the held-out batches
    assert adamw["steps_to_target"] is None  # no --target: nothing to reach


def test_a_list_of_batches_holds_out_its_last_fifth_and_a_custom_loss(user_module, tmp_path):
    from trainlab.lab.user_workload import user_workload

    w = user_workload(f"{user_module}:make_model", f"{user_module}:batches", loss=f"{user_module}:mse_on_onehot")
    assert w.batch_size == 8 and w.loss.__name__ == "mse_on_onehot"
    import torch
    from user_bench_fixture import batches

    drawn = {id(w.make_batch(8, torch.Generator().manual_seed(s))) for s in range(200)}
    held_out = batches()[-2:]  # the last fifth of 10
    assert len(drawn) == 8  # training draws from the first 8 only
    torch.manual_seed(0)
    model = w.make_model()
    with torch.no_grad():
        expected = sum(float(w.loss(model, b)) for b in held_out) / 2
    assert w.evaluate(model) == pytest.approx(expected)


def test_a_workload_registered_by_imported_user_code(user_module, tmp_path):
    out = tmp_path / "out"
    code = main(["bench", "--import", "user_bench_registering", "--workload", "my-task", "--algorithms", "adamw",
                 "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0 and _results(out)[0]["workload"] == "my-task" and _results(out)[0]["steps"] == 20


def test_bench_options_from_a_toml_file_with_the_command_line_winning(user_module, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "run.toml"
    config.write_text(textwrap.dedent(f"""
        model = "{user_module}:make_model"
        data = "{user_module}:make_batch"
        algorithms = ["adamw", "sgd"]
        steps = 30
        schedule = "wsd"
        out = "{out}"
        quiet = true
        [hp]
        lr = 0.02
        [hp.sgd]
        momentum = 0.5
    """))  # fmt: skip
    assert main(["bench", "--config", str(config), "--algorithms", "sgd"]) == 0
    runs = _results(out)
    assert [r["algorithm"] for r in runs] == ["sgd"] and runs[0]["steps"] == 30 and runs[0]["schedule"] == "wsd"
    assert runs[0]["hyperparameters"]["lr"] == 0.02 and runs[0]["hyperparameters"]["momentum"] == 0.5
    resolved = json.loads((out / "run.json").read_text())["config"]
    assert resolved["schedule"] == "wsd" and resolved["hyperparameters"] == {"lr": 0.02, "sgd": {"momentum": 0.5}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("algoritms = ['adamw']", "unknown option 'algoritms'; did you mean algorithms?"),
        ("steps = 'many'", "steps = 'many'"),
        ("quiet = 'yes'", "quiet is a flag"),
        ("steps = [", "not valid TOML"),
    ],
)
def test_bad_config_files_are_named(tmp_path, capsys, text, message):
    config = tmp_path / "run.toml"
    config.write_text(text)
    assert main(["bench", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_compress_options_from_a_toml_file(user_module, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "compress.toml"
    config.write_text(f'model = "{user_module}:make_model"\nmethod = "rtn"\nbits = 4\nout = "{out}"\nquiet = true\n')
    assert main(["compress", "--config", str(config), "--group-size", "2"]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["method"] == "rtn" and run["level"] == 4 and run["group_size"] == 2
    resolved = json.loads((out / "run.json").read_text())
    assert resolved["config"]["bits"] == 4.0 and resolved["config"]["config"] == str(config)
    assert resolved["provenance"]["schema_version"] == 2


def test_compress_finds_an_unwritable_out_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["compress", "--workload", "digits-mlp", "--method", "rtn", "--bits", "4", "--out", str(blocker / "o")]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "cannot be written" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_schedule_options_from_the_command_line_and_a_config_file(user_module, tmp_path, capsys):
    base = ["bench", "--model", f"{user_module}:make_model", "--data", f"{user_module}:make_batch",
            "--algorithms", "sgd", "--steps", "20", "--quiet", "--schedule", "wsd"]  # fmt: skip
    assert main([*base, "--schedule-option", "decay=0.2", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--schedule wsd: unknown option(s) ['decay']" in err and "decay_fraction" in err
    assert not (tmp_path / "a").exists()
    config = tmp_path / "run.toml"
    config.write_text("[schedule-option]\ndecay_fraction = 0.5\nmin_lr_ratio = 0.0\n")
    assert main([*base, "--config", str(config), "--out", str(tmp_path / "b")]) == 0
    resolved = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert resolved["schedule_options"] == {"decay_fraction": 0.5, "min_lr_ratio": 0.0}


def test_workloads_registered_by_an_installed_package_entry_point(user_module, tmp_path, monkeypatch):
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[trainlab.workloads]\nmy-task = user_bench_registering\n")
    from trainlab.lab.workloads import base

    monkeypatch.delitem(base._WORKLOADS, "my-task", raising=False)  # registered only by loading the entry point
    monkeypatch.delitem(sys.modules, "user_bench_registering", raising=False)
    out = tmp_path / "out"
    code = main(["bench", "--workload", "my-task", "--algorithms", "adamw", "--out", str(out), "--quiet"])
    assert code == 0 and _results(out)[0]["workload"] == "my-task"
