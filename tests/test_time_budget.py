"""--time-budget: the run, k-NN evaluations included, ends inside the budget with its schedule run
whole, the measured step count is recorded in config.json, and --resume keeps it."""
import json
import time

import pytest

from fastbyol import train as train_mod
from fastbyol.schedules import lr_at, tau_at

RUN = ["--arch", "cnn4", "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "16",
       "--knn-samples", "32", "--knn-k", "5", "--workers", "0", "--log-every", "10",
       "--ckpt-every", "100", "--knn-every", "20"]
BUDGET_MIN = 0.5
SLACK = 1.5  # not a speed test: a shared 2-core machine's rate drifts between calibration and the run


def run(args):
    train_mod.main([str(a) for a in args])


def test_a_budgeted_run_ends_inside_its_budget_with_the_schedule_complete(tiny_folder, tmp_path):
    out = tmp_path / "budget"
    start = time.perf_counter()
    run(["--data", tiny_folder, "--time-budget", BUDGET_MIN, "--out", out, *RUN])
    wall = time.perf_counter() - start
    assert wall <= 60 * BUDGET_MIN * SLACK
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    steps = config["steps"]
    # Sized from the rate (at least two epochs even on a loaded machine), and run to the end.
    assert steps >= 8 and summary["steps"] == steps
    assert config["epochs"] == pytest.approx(steps / 4)  # 64 images / batch 16: 4 steps an epoch
    assert config["tau_base"] == (0.97 if config["epochs"] < 63 else 0.99)  # the preset of that length
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [line for line in lines if "lr" in line]
    assert trained[-1]["step"] == steps
    # The last step's lr and tau are the schedule's last values (to 0 and to 1), as pure functions say.
    warmup = max(1, round(0.1 * steps))
    peak = config["lr"] * 16 / 256
    assert trained[-1]["lr"] == pytest.approx(lr_at(steps - 1, steps, warmup, peak))
    assert trained[-1]["lr"] < 0.01 * peak
    assert trained[-1]["tau"] == pytest.approx(tau_at(steps - 1, steps, config["tau_base"]))
    assert 1 - trained[-1]["tau"] < 0.01 * (1 - config["tau_base"])
    # k-NN at random init, every --knn-every 20 epochs (4 steps each) before the last step, and at the end.
    assert len([line for line in lines if "knn_top1" in line]) == 2 + (steps - 1) // (20 * 4)


def test_resume_keeps_the_measured_step_count(tiny_folder, tmp_path, caplog):
    out = tmp_path / "resumed"
    run(["--data", tiny_folder, "--time-budget", BUDGET_MIN, "--stop-at-step", 2, "--out", out, *RUN])
    steps = json.loads((out / "config.json").read_text())["steps"]
    caplog.clear()
    run(["--data", tiny_folder, "--resume", "--stop-at-step", 4, "--out", out, *RUN])
    assert "s/step after compilation" not in caplog.text  # no second calibration
    assert json.loads((out / "config.json").read_text())["steps"] == steps


def test_the_step_count_is_the_most_that_fits():
    """steps_for_budget against a brute-force count of what the run spends."""
    def spent(steps, step_s, knn_s, ckpt_s, per_epoch, knn_every, ckpt_every):
        epochs_with_knn = [e for e in range(1, steps // per_epoch + 1)
                           if knn_every and e % knn_every == 0 and e * per_epoch < steps]
        checkpoints = steps // ckpt_every + 1
        return steps * step_s + (2 + len(epochs_with_knn)) * knn_s + checkpoints * ckpt_s

    for case in [(100.0, 0.1, 5.0, 0.5, 30, 1, 200), (60.0, 0.013, 2.0, 0.1, 7, 3, 50),
                 (3.0, 0.5, 1.0, 0.0, 4, 0, 1000), (1.0, 0.5, 1.0, 0.0, 4, 0, 1000)]:
        seconds, rest = case[0], case[1:]
        steps = train_mod.steps_for_budget(seconds, *rest)
        assert steps == 0 or spent(steps, *rest) <= seconds
        assert spent(steps + 1, *rest) > seconds


def test_time_budget_with_epochs_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--time-budget", 5, "--epochs", 3])
    assert exit_info.value.code == 2
    assert "--time-budget 5.0: sizes the run itself" in capsys.readouterr().err
