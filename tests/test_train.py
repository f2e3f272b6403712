"""examples/train.py (the package examples/trainer) end to end, for a few steps: plain, planned,
compressed, resumed, interrupted, DDP with two gloo processes, and the data errors a user meets first.

Most runs import the package and call its ``main(argv)`` in this process (no second start-up of
torch); the DDP job runs under ``torch.distributed.run`` in subprocesses. Shapes are tiny: the
zoo ResNet-18 at width 4 on 8x8 images, or a four-layer CNN.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import memfit

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ResNet-18 (CIFAR stem) at width 4 on 8x8 synthetic images: a couple of seconds a run.
SYNTHETIC = [
    "--data",
    "synthetic",
    "--synthetic-size",
    "96",
    "--image-size",
    "8",
    "--width",
    "4",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--progress",
    "lines",
]
# A four-layer CNN given as package.module:factory (fast to plan and to compress).
TINY = [
    "--model",
    "tests.test_train:tiny_net",
    "--data",
    "synthetic",
    "--synthetic-size",
    "64",
    "--image-size",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--progress",
    "none",
]


def tiny_net(num_classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU x3 and a classifier: what the compress test trains (factory for --model)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16), *block(16, 16), *block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes)
    )


@pytest.fixture(scope="module")
def train():
    """The package examples/train.py runs, imported as the script imports it."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        yield importlib.import_module("trainer")
    finally:
        sys.path.remove(str(SCRIPT.parent))
        for name in [n for n in sys.modules if n == "trainer" or n.startswith("trainer.")]:
            del sys.modules[name]


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def state(out: Path, name: str = "checkpoint.pt") -> dict:
    return memfit.checkpoint.load(out / name)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG file"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=f"{key} differs")


def _feasible_minimum_mb(train, argv: list[str]) -> float:
    """The least budget memfit can plan the script's model for (at tiny shapes kernel workspaces
    hold much of the peak, so a fixed fraction of it may be out of reach on some machines)."""
    args = train.arguments.resolve(train.build_parser().parse_args(argv))
    data = train.data.load_data(args)
    model = train.planning.create_model(args, data.num_classes)
    return memfit.minimum(model, data.x_train[: args.batch_size], optimizer=train.planning.optimizer_factory(args))


# ------------------------------------------------------------------------------ single process


def test_planned_resnet_on_digits_matches_the_unplanned_one(train, tmp_path, capsys):
    """Same seed, same math: a planned ResNet (CIFAR stem) trains to the unplanned test accuracy
    and to the same parameters; the plan is printed, the plots and the checkpoint are usable."""
    common = [
        "--data",
        "digits",
        "--image-size",
        "8",
        "--width",
        "4",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--progress",
        "none",
    ]
    assert train.main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain = metrics(tmp_path / "plain")
    budget = 0.5 * (plain["memory"]["predicted_peak_mb"] + _feasible_minimum_mb(train, common))
    assert train.main([*common, "--budget-mb", f"{budget:.4f}", "--out", str(tmp_path / "planned")]) == 0
    printed = capsys.readouterr().out
    assert "Peak before -> after (MiB, predicted)" in printed
    assert "(MiB, predicted)" in printed and "(MiB, measured)" in printed

    planned = metrics(tmp_path / "planned")
    assert not plain["plan"]["planned"] and planned["plan"]["planned"]
    assert planned["plan"]["checkpointed_segments"] > 0
    assert planned["plan"]["predicted_peak_before_mb"] == pytest.approx(plain["memory"]["predicted_peak_mb"], rel=1e-3)
    assert planned["memory"]["predicted_peak_mb"] <= budget
    assert planned["memory"]["measured_peak_mb"] <= budget
    assert planned["memory"]["measured_peak_mb"] < plain["memory"]["measured_peak_mb"]

    accuracy = [m["final"]["test_accuracy"] for m in (plain, planned)]
    assert accuracy[0] == accuracy[1]
    assert accuracy[0] > 0.5, f"2 epochs on digits should beat chance by far, got {accuracy[0]:.3f}"
    assert [e["test_loss"] for e in plain["epochs"]] == [e["test_loss"] for e in planned["epochs"]]
    assert_same_parameters(state(tmp_path / "plain")["model"], state(tmp_path / "planned")["model"])

    for out in (tmp_path / "plain", tmp_path / "planned"):
        assert_png(out / "memory.png")
        assert_png(out / "curves.png")
    # The checkpoint's model loads into the plain zoo model.
    net = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=4)
    net.load_state_dict(state(tmp_path / "planned")["model"])
    assert planned["files"]["checkpoint.pt"] == (tmp_path / "planned" / "checkpoint.pt").stat().st_size


@pytest.fixture(scope="module")
def uninterrupted(train, tmp_path_factory) -> Path:
    """Two epochs of the synthetic run, from start to end."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main([*SYNTHETIC, "--out", str(out)]) == 0
    return out


def test_ctrl_c_saves_and_resume_continues_from_the_saved_step(train, uninterrupted, tmp_path, monkeypatch, capsys):
    """Ctrl-C saves a checkpoint; --resume continues from the saved step (here twice: up to
    --max-steps, then to the end) and ends with the parameters of the uninterrupted run.

    With the script's handler (main thread) the step in progress finishes first; a
    KeyboardInterrupt during a step's forward/backward keeps the state of the step before."""
    real = train.steps.train_step
    calls = {"n": 0}
    use_signal = threading.current_thread() is threading.main_thread()

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 and not use_signal:
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(train.steps, "train_step", interrupted_step)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    assert train.main([*SYNTHETIC, "--out", str(out)]) == 130
    assert signal.getsignal(signal.SIGINT) is before  # the script's handler is gone again
    assert state(out)["progress"]["step"] == (4 if use_signal else 3)
    monkeypatch.setattr(train.steps, "train_step", real)
    capsys.readouterr()

    # 6 steps an epoch: --max-steps 7 stops one step into the second epoch.
    assert train.main([*SYNTHETIC, "--out", str(out), "--resume", "--max-steps", "7"]) == 0
    assert "resumed from" in capsys.readouterr().out
    saved = state(out)
    assert (saved["progress"]["step"], saved["progress"]["epoch"], saved["progress"]["step_in_epoch"]) == (7, 1, 1)
    assert saved["optimizer"]["state"] and len(saved["progress"]["history"]) == 1
    assert metrics(out)["final"]["stopped"] == "max_steps"

    assert train.main([*SYNTHETIC, "--out", str(out), "--resume"]) == 0
    resumed, reference = state(out), state(uninterrupted)
    assert resumed["progress"]["step"] == reference["progress"]["step"] == 12
    assert_same_parameters(resumed["model"], reference["model"])
    assert_same_parameters(resumed["optimizer"]["state"][0], reference["optimizer"]["state"][0])
    assert metrics(out)["final"]["test_accuracy"] == metrics(uninterrupted)["final"]["test_accuracy"]


def test_compressed_ternary_run_saves_packed_and_resumes(train, tmp_path, capsys):
    """--compress ternary with a plan: trains the EC2T model (phase 2 in the last epoch), writes
    it packed with memfit.save beside the optimizer state, and resumes from them."""
    out = tmp_path / "ternary"
    args = [*TINY, "--compress", "ternary", "--budget-mb", "90%", "--out", str(out)]
    assert train.main([*args, "--max-steps", "3"]) == 0  # 4 steps an epoch: stop in the first
    assert not (out / "checkpoint.pt").exists()
    assert state(out, "train_state.pt")["progress"]["step"] == 3
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "EC2T phase 2" in printed

    m = metrics(out)
    assert m["model"]["compressed"] and m["plan"]["planned"]
    assert m["final"]["step"] == 8 and m["final"]["completed"]
    assert m["memory"]["measured_peak_mb"] > 0 and m["memory"]["predicted_peak_mb"] <= m["plan"]["budget_mb"]
    assert m["files"]["model.memfit"] == (out / "model.memfit").stat().st_size
    assert_png(out / "memory.png")
    assert_png(out / "curves.png")

    # The packed file holds the trained model: it computes what the training state computes.
    loaded = memfit.load(out / "model.memfit", model=tiny_net()).eval()
    trained = memfit.compress(tiny_net(), "ternary")
    trained.load_state_dict(state(out, "train_state.pt")["model"])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.eval()(x))


# ------------------------------------------------------------------------------------- errors


def test_malformed_cifar_archive_is_a_clear_error(train, tmp_path, capsys):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar archive")
    code = train.main(["--data", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "malformed cifar10 archive" in err and "cifar-10-python.tar.gz" in err and str(tmp_path) in err

    # A well-formed archive with the wrong contents, and no archive at all, are reported too.
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(__file__, arcname="cifar-100-python/README")
    assert train.main(["--data", "cifar100", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]) != 0
    assert "cifar-100-python.tar.gz" in capsys.readouterr().err
    assert train.main(["--data", "cifar10", "--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "no cifar10 data" in err and "put cifar-10-python.tar.gz" in err


def test_inconsistent_options_are_refused(train, tmp_path, capsys):
    assert train.main([*TINY, "--compress", "auto", "--out", str(tmp_path)]) == 2
    assert "--budget-mb" in capsys.readouterr().err
    assert train.main([*TINY, "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--budget-mb", "lots"])


@pytest.mark.parametrize(
    "case", ["out is a file", "out under a file", "init a packed file", "device tpu", "negative batch"]
)
def test_bad_options_name_the_flag_and_exit_2(train, tmp_path, capsys, case):
    (tmp_path / "file").write_text("")
    memfit.save(tiny_net(), tmp_path / "x.memfit")
    flag, argv = {
        "out is a file": ("--out", ["--out", str(tmp_path / "file")]),
        "out under a file": ("--out", ["--out", str(tmp_path / "file" / "run")]),
        "init a packed file": ("--init", ["--init", str(tmp_path / "x.memfit"), "--out", str(tmp_path / "o")]),
        "device tpu": ("--device", ["--device", "tpu"]),
        "negative batch": ("--batch-size", ["--batch-size", "-1"]),
    }[case]
    assert train.main([*TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and "Traceback" not in err


def test_a_flipped_bit_in_a_checkpoint_is_refused_by_resume_and_init(train, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--max-steps", "1", "--out", str(out)]) == 0
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert train.main([*TINY, "--resume", "--out", str(out)]) == 2
    assert "--resume" in (err := capsys.readouterr().err) and "corrupted" in err
    assert train.main([*TINY, "--init", str(path), "--out", str(tmp_path / "again")]) == 2
    assert "--init" in (err := capsys.readouterr().err) and "corrupted" in err


# ----------------------------------------------------------------------------------------- DDP


def test_ddp_two_gloo_processes_end_with_equal_replicas(tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo, 127.0.0.1): a planned model, a DistributedSampler
    shard each; rank 0 gathers every replica's parameter digest, and they are equal."""
    out = tmp_path / "ddp"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(SCRIPT),
        *TINY,
        "--budget-mb",
        "90%",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gradient_as_bucket_view" in proc.stdout and "Replicas' parameters: equal" in proc.stdout

    m = metrics(out)
    assert m["world_size"] == 2 and m["plan"]["planned"]
    assert len(m["replicas"]["param_digests"]) == 2 and m["replicas"]["equal"]
    assert "buckets included" in m["memory"]["predicted_how"]
    assert m["memory"]["predicted_peak_mb"] <= m["plan"]["budget_mb"]
    assert m["memory"]["measured_peak_mb"] <= m["plan"]["budget_mb"], "a DDP process's measured step exceeds the budget"
    assert m["final"]["completed"] and m["final"]["step"] == 2 * (32 // 16)  # 64 images, 32 a process
    assert_png(out / "memory.png")


def tiny_net_without_batchnorm(num_classes: int = 10) -> nn.Module:
    """Conv-ReLU x3 and a classifier: nothing depends on how the batch is split."""
    layers: list[nn.Module] = []
    for cin, cout in ((3, 16), (16, 16), (16, 32)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def test_accumulating_four_micro_batches_trains_like_the_whole_batch_within_budget(train, tmp_path, capsys):
    args = [
        "--model",
        "tests.test_train:tiny_net_without_batchnorm",
        "--data",
        "synthetic",
        "--synthetic-size",
        "64",
        "--image-size",
        "16",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--progress",
        "none",
        "--optimizer",
        "sgd",
    ]
    assert train.main([*args, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    assert train.main([*args, "--accumulate", "4", "--budget-mb", "97%", "--out", str(tmp_path / "micro")]) == 0
    whole, micro = state(tmp_path / "whole")["model"], state(tmp_path / "micro")["model"]
    for k, v in whole.items():
        torch.testing.assert_close(micro[k], v, atol=1e-5, rtol=1e-4, msg=k)
    metrics = json.loads((tmp_path / "micro" / "metrics.json").read_text())
    assert metrics["memory"]["measured_peak_mb"] <= metrics["plan"]["budget_mb"], metrics["memory"]
