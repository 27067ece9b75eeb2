"""Studies: tiny studies end to end (variants x learning rates x seeds), the LR rule, shards that
partition the runs and merge into the same report, resumption without retraining, reports with
mean / spread / standard error, relative paths, and clear errors for bad study files and flags."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from hybridkit.build import build_model
from hybridkit.cli import main
from hybridkit.errors import HybridkitError, RecipeError
from hybridkit.kernels.attention.fa4 import fa4_head_dim_ok
from hybridkit.layers.attention import Attention
from hybridkit.recipe import dump_recipe, load_recipe
from hybridkit.study import (
    RESULT_FILE,
    Slot,
    expected_seconds,
    load_study,
    parse_only,
    plan_study,
    report_study,
    run_name,
    run_study,
    select_slots,
)
from hybridkit.summary import summarize
from hybridkit.train.metrics import read_metrics
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

STUDIES = sorted((Path(__file__).parent.parent / "hybridkit/recipes/studies").glob("*.yaml"))
CPU_STUDIES = {"lengthgen_quickstart"}  # the rest are sized for a GPU

BASE = {
    "name": "tiny",
    "seed": 0,
    "model": tiny_model("m a", vocab=32),
    "task": {
        "kind": "mqar",
        "vocab_size": 32,
        "seq_len": 16,
        "num_kv_pairs": 2,
        "eval_examples": 16,
    },
    "train": {
        "steps": 20,
        "batch_size": 8,
        "log_every": 5,
        "checkpoint_every": 10,
        "device": "cpu",
        "tensorboard": False,
    },
    "eval": {"decode_examples": 1},
}

STUDY = {
    "name": "tiny-study",
    "description": "two variants, two learning rates",
    "base": "recipes/base.yaml",
    "set": ["train.warmup_steps=2"],
    "variants": {"hybrid": [], "mamba": ["model.layout=m m"]},
    "lrs": [1e-3, 3e-3],
    "seeds": [0],
    "lengths": [16, 32],
    "select_examples": 16,
}

CELL = re.compile(r"\d+\.\d ± \d+\.\d \[\d+\.\d, \d+\.\d\]")  # mean ± stderr [min, max]
TIMES = ("train_wall_time_s", "eval_wall_time_s", "device_time_s")


def write_study(tmp_path: Path, **changes) -> Path:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    dump_recipe(load_recipe(BASE), tmp_path / "recipes" / "base.yaml")
    study = {**STUDY, **changes}
    study = {k: v for k, v in study.items() if v is not None}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_dirs(out: Path) -> list[str]:
    return sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/*/final.json"))


def without_times(value):
    """``results.json`` minus wall-clock times, which differ between two runs of the same work."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def report_without_times(out: Path) -> str:
    return re.sub(r"\d+ s\b", "T s", (out / "report.md").read_text())


def trained(printed: str) -> int:
    """How many runs an invocation trained, from its ``[study] k/n training ...`` lines."""
    return len(re.findall(r"^\[study\] \d+/\d+ training ", printed, re.M))


def refuse_work(monkeypatch) -> None:
    """Make any training or evaluation an error (for runs that must be skipped)."""

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained or evaluated again")

    for name in ("Trainer", "evaluate_run", "held_out_eval"):
        monkeypatch.setattr(f"hybridkit.study.{name}", refuse)


# --- end to end ---------------------------------------------------------------------------------
def test_study_end_to_end_lr_rule_seeds_and_rerun(tmp_path, capsys, monkeypatch):
    study = write_study(tmp_path, seeds=[0, 1])
    out = tmp_path / "out"
    args = ["study", str(study), "-o", str(out), "--no-progress", "--device", "cpu"]
    assert main([*args, "--set", "train.steps=12"]) == 0
    printed = capsys.readouterr().out
    assert trained(printed) == 6 and "# Study: tiny-study" in printed
    # what every run was given, the command line's --set included, and how long they trained
    results = json.loads((out / "results.json").read_text())
    assert results["set"] == ["train.warmup_steps=2", "train.steps=12"]
    assert results["train_steps"] == [12]
    assert (
        "`train.warmup_steps=2`, `train.steps=12`; trained for 12 steps."
        in (out / "report.md").read_text()
    )

    # The LR rule: both LRs at the first seed, the held-out choice at seed 0, seed 1 at it only.
    results = json.loads((out / "results.json").read_text())
    expected = []
    for name in ("hybrid", "mamba"):
        sel = results["lr_selection"][name]
        assert set(sel["scores"]) == {"0.001", "0.003"} and sel["seed"] == 0
        scores = {float(lr): s for lr, s in sel["scores"].items()}
        best = max(scores, key=lambda lr: (scores[lr], -lr))  # ties go to the smaller LR
        assert sel["chosen"] == best == results["variants"][name]["lr"]
        for rec_lr in scores:
            heldout = json.loads((out / name / run_name(rec_lr, 0) / RESULT_FILE).read_text())
            assert heldout["heldout"]["ex_match"] == scores[rec_lr]
        expected += [f"{name}/lr0.001-seed0", f"{name}/lr0.003-seed0", f"{name}/lr{best:g}-seed1"]
    assert run_dirs(out) == sorted(expected)
    assert load_recipe(out / "mamba/lr0.003-seed0/recipe.yaml").model.layout == "m m"
    assert load_recipe(out / "hybrid/lr0.001-seed0/recipe.yaml").train.lr == 1e-3
    assert load_recipe(out / "hybrid" / expected[2].split("/")[1] / "recipe.yaml").seed == 1

    # results.json: relative paths only, per-seed values, mean/spread/stderr per cell.
    assert results["complete"] and results["runs_finished"] == results["runs_total"] == 6
    assert results["missing"] == [] and results["base"] == "recipes/base.yaml"
    for text in [(out / "results.json").read_text()] + [
        p.read_text() for p in out.glob("*/*/*.json")
    ]:
        assert str(tmp_path) not in text
    for name, v in results["variants"].items():
        assert v["seeds"] == [0, 1] and v["train_length"] == 16 and v["params"] > 0
        assert v["runs"] == [f"{name}/lr{v['lr']:g}-seed0", f"{name}/lr{v['lr']:g}-seed1"]
        assert all((out / run / RESULT_FILE).is_file() for run in v["runs"])
        assert set(v["by_length"]) == {"16", "32"}
        for cell in v["by_length"].values():
            assert cell["n"] == 16
            for metric in ("ex_match", "tok_acc", "scaled_acc"):
                stats = cell[metric]
                assert len(stats["per_seed"]) == 2
                assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
            p = cell["ex_match"]["mean"]
            assert cell["ex_match"]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 16))
    assert json.loads((out / expected[0] / "eval.json").read_text())["run"] == "."
    assert results["variants"]["hybrid"]["kv_bytes_per_token"] > 0
    assert results["variants"]["mamba"]["kv_bytes_per_token"] == 0  # no attention layer

    report = (out / "report.md").read_text()
    assert "# Study: tiny-study" in report and "two variants" in report
    assert "Runs finished: 6 of 6." in report and "(chosen)" in report
    rows = {}  # the first table's row of each variant
    for row in report.splitlines():
        if row.startswith("| "):
            rows.setdefault(row.split("|")[1].strip(), row)
    for name in ("hybrid", "mamba"):
        assert rows[name].count("±") == 2 and len(CELL.findall(rows[name])) == 2
        assert "| 2/2 |" in rows[name]
    assert "| 16 | 32 |" in report  # one column per evaluation length
    assert "![length generalisation](lengthgen.png)" in report
    png = (out / "lengthgen.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000

    # Re-running trains and evaluates nothing: finished runs are skipped, files untouched.
    mtimes = {d: (out / d / "model.safetensors").stat().st_mtime_ns for d in expected}
    refuse_work(monkeypatch)
    again = run_study(study, out, overrides=["train.steps=12"], device="cpu", progress=False)
    assert trained(capsys.readouterr().out) == 0
    assert again == results
    assert {d: (out / d / "model.safetensors").stat().st_mtime_ns for d in expected} == mtimes


def test_sharded_study_then_report_equals_unsharded(tmp_path, capsys):
    # One variant keeps it fast; the runs: lr 1e-3 and 3e-3 at seed 0, then seed 1 at the choice.
    fast = ["train.warmup_steps=2", "train.steps=10"]
    study = write_study(tmp_path, variants={"hybrid": []}, seeds=[0, 1], lengths=[16], set=fast)
    whole, sharded, merged = tmp_path / "whole", tmp_path / "sharded", tmp_path / "merged"
    run_study(study, whole, device="cpu", progress=False)
    capsys.readouterr()

    # Shard 0 of 2 gets the seed-1 run, whose LR sweep is half in shard 1: it waits, and the
    # report is partial and says what is missing.
    first = run_study(study, sharded, device="cpu", progress=False, shard="0/2")
    printed = capsys.readouterr().out
    assert trained(printed) == 1 and "waiting: hybrid seed=1 chosen lr" in printed
    assert not first["complete"] and first["runs_finished"] == 1
    missing = {(m["variant"], m["seed"], m["lr"]): m["why"] for m in first["missing"]}
    assert missing == {
        ("hybrid", 0, 3e-3): "not started",
        ("hybrid", 1, None): "waiting for the LR choice",
    }
    assert "partial" in (sharded / "report.md").read_text()
    assert "## Missing runs" in (sharded / "report.md").read_text()
    run_study(study, sharded, device="cpu", progress=False, shard="1/2")
    assert trained(capsys.readouterr().out) == 1
    run_study(study, sharded, device="cpu", progress=False, shard=(0, 2))  # now it can run
    assert trained(capsys.readouterr().out) == 1

    assert main(["study", str(study), "-o", str(sharded), "--report"]) == 0
    expected = json.loads((whole / "results.json").read_text())
    got = json.loads((sharded / "results.json").read_text())
    assert got["complete"] and without_times(got) == without_times(expected)
    assert report_without_times(sharded) == report_without_times(whole)

    # The records alone (what comes back from a GPU machine) merge into the same report.
    for record in sharded.glob(f"*/*/{RESULT_FILE}"):
        target = merged / record.relative_to(sharded)
        target.parent.mkdir(parents=True)
        shutil.copy(record, target)
    report_study(study, merged)
    got = json.loads((merged / "results.json").read_text())
    assert without_times(got) == without_times(expected)
    assert report_without_times(merged) == report_without_times(whole)


def test_time_budget_defers_runs_that_would_not_finish(tmp_path, capsys, cli_error):
    """A budget shorter than one run: the first run starts (nothing to judge by), the next is
    deferred and listed; a later call with the same budget defers it again (its variant's
    finished run says it cannot fit), one with a budget that fits runs it and skips the
    finished one."""
    fast = ["train.warmup_steps=2", "train.steps=10"]
    study = write_study(tmp_path, variants={"hybrid": []}, lengths=[16], set=fast)
    out = tmp_path / "out"
    first = run_study(study, out, device="cpu", progress=False, time_budget=1e-6)
    printed = capsys.readouterr().out
    assert trained(printed) == 1 and "deferred: hybrid seed=0 lr=0.003" in printed
    assert "1 deferred (time budget)" in printed and first["runs_finished"] == 1
    again = run_study(study, out, device="cpu", progress=False, time_budget=1e-6)
    printed = capsys.readouterr().out
    assert trained(printed) == 0 and "finished runs took up to" in printed
    assert not again["complete"]
    second = run_study(study, out, device="cpu", progress=False, time_budget=3600)
    assert trained(capsys.readouterr().out) == 1 and second["complete"]
    message = cli_error("study", str(study), "-o", str(out), "--time-budget", "0")
    assert "--time-budget must be a positive" in message


def test_time_budget_judges_a_run_by_its_variants_recorded_runs(tmp_path, capfd, monkeypatch):
    """Before this call has timed a run, a run whose variant's finished runs took longer than
    the budget left is deferred (serial and ``--jobs`` alike; a GPU call that started such runs
    lost them at its end); a run that is already part trained is not judged by them, and a
    budget that fits starts it."""
    import hybridkit.study_jobs as study_jobs

    fast = ["train.warmup_steps=2", "train.steps=10"]
    study = write_study(tmp_path, variants={"hybrid": []}, seeds=[0, 1, 2], lrs=[1e-3],
                        lengths=[16], set=fast)  # fmt: skip
    out = tmp_path / "out"
    run_study(study, out, device="cpu", progress=False, only=["seed=0"])
    record_path = out / "hybrid" / run_name(1e-3, 0) / "result.json"
    record = json.loads(record_path.read_text())
    record["train_wall_time_s"], record["eval_wall_time_s"] = 900.0, 100.0
    record_path.write_text(json.dumps(record))
    capfd.readouterr()

    def no_process(*a, **k):
        raise AssertionError("a deferred run started a worker")

    monkeypatch.setattr(study_jobs.multiprocessing, "get_context", lambda *_: no_process)
    for jobs in (1, 2):
        got = run_study(study, out, device="cpu", progress=False, time_budget=600, jobs=jobs)
        printed = capfd.readouterr().out
        assert trained(printed) == 0 and "2 deferred (time budget)" in printed, printed
        assert "its variant's finished runs took up to 1000 s" in printed
        assert got["runs_finished"] == 1
    monkeypatch.undo()
    assert expected_seconds("started (resumes from its checkpoint)", {"hybrid": [1e3]},
                            Slot("hybrid", 1, None)) == 0.0  # fmt: skip
    assert expected_seconds("not started", {"hybrid": [1e3, 5.0]}, Slot("hybrid", 2, None)) == 1e3
    got = run_study(study, out, device="cpu", progress=False, time_budget=2000)
    assert trained(capfd.readouterr().out) == 2 and got["complete"]


def test_a_run_that_would_train_past_the_budget_stops_early(tmp_path, capsys):
    """The first run starts (nothing to judge it by); its trainer, timing its first steps,
    finds it would train past the budget, stops with a checkpoint, and the run counts as
    deferred; its projected time defers the next run before it starts."""
    long = ["train.warmup_steps=2", "train.steps=100000", "train.log_every=1"]
    study = write_study(tmp_path, variants={"hybrid": []}, lengths=[16], set=long)
    out = tmp_path / "out"
    got = run_study(study, out, device="cpu", progress=False, time_budget=0.5)
    printed = capsys.readouterr().out
    assert trained(printed) == 1 and "2 deferred (time budget)" in printed, printed
    assert "checkpoint saved" in printed and "the slowest run took" in printed
    assert got["runs_finished"] == 0
    assert len(list(out.glob("hybrid/*/checkpoints/latest"))) == 1


@pytest.mark.slow  # ~25 s: seven runs in pools of spawned worker processes
def test_jobs_run_side_by_side_and_match_the_serial_study(tmp_path, capfd):
    """``jobs=3``: the three runs (an LR sweep of two, then seed 1 at the chosen LR) in worker
    processes give the serial study's records; the seed-1 run was held until the sweep ended
    (one invocation completes the study, nothing reported waiting)."""
    fast = ["train.warmup_steps=2", "train.steps=10"]
    study = write_study(tmp_path, variants={"hybrid": []}, seeds=[0, 1], lengths=[16], set=fast)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run_study(study, serial, device="cpu", progress=False)
    capfd.readouterr()
    got = run_study(study, parallel, device="cpu", progress=False, jobs=3)
    printed = capfd.readouterr().out
    assert got["complete"] and "waiting:" not in printed and ", 0 waiting" in printed
    assert len(re.findall(r"^\[study\] \d+/3 training ", printed, re.M)) == 3
    want = json.loads((serial / "results.json").read_text())
    assert without_times(json.loads((parallel / "results.json").read_text())) == without_times(want)
    again = run_study(study, parallel, device="cpu", progress=False, jobs=3)
    assert trained(capfd.readouterr().out) == 0 and without_times(again) == without_times(want)

    # A budget shorter than a run: the two sweep runs start together (nothing to judge by yet);
    # the seed-1 run, held behind them, is then deferred, and a later call runs it.
    budget = tmp_path / "budget"
    first = run_study(study, budget, device="cpu", progress=False, jobs=2, time_budget=1e-6)
    printed = capfd.readouterr().out
    assert "1 deferred (time budget)" in printed and first["runs_finished"] == 2
    assert run_study(study, budget, device="cpu", progress=False, jobs=2)["complete"]


def test_jobs_skip_finished_runs_without_a_worker_and_report_a_failed_run(tmp_path, monkeypatch):
    """A run that fails in its worker (here: a text task whose file is missing, which only the
    trainer opens; the planner checks what it can, such as the vocabulary) is reported by name
    after the other run finished; a second call finds the good run finished and starts no
    worker process for it."""
    import hybridkit.study_jobs as jobs

    fast = ["train.warmup_steps=2", "train.steps=10"]
    missing = tmp_path / "missing.txt"
    text = f"task={{kind: text, path: '{missing}', seq_len: 16, eval_examples: 16}}"
    variants = {"good": [], "bad": ["model.vocab_size=258", text]}
    study = write_study(tmp_path, variants=variants, lrs=[1e-3], lengths=[16], set=fast)
    out = tmp_path / "out"
    with pytest.raises(HybridkitError, match=r"1 study run\(s\) failed: bad seed=0") as info:
        run_study(study, out, device="cpu", progress=False, jobs=2)
    assert "task.path" in str(info.value) and "missing.txt" in str(info.value)
    assert run_dirs(out) == ["good/" + run_name(1e-3, 0)]

    def no_process(*a, **k):
        raise AssertionError("a worker process was started for a finished run")

    monkeypatch.setattr(jobs, "_child", no_process)
    again = run_study(study, out, device="cpu", progress=False, jobs=2, only=["variant=good"])
    assert again["runs_finished"] == 1


def run_fake(
    todo: list, out: Path, jobs: int, status_of=lambda slot: "not started", budget=None
) -> dict:
    """The scheduler on ``tests.helpers.fake_study_worker``'s pretend runs (``budget``: the
    time budget in seconds from now, and the matching deadline)."""
    from hybridkit.study_jobs import run_parallel
    from tests.helpers import fake_study_worker

    deadline = None if budget is None else time.time() + budget
    return run_parallel(
        todo, out, study_path="s.yaml", overrides=[], plugins=[], device="cpu", jobs=jobs,
        time_budget=budget, start=time.monotonic(), status_of=status_of,
        worker=fake_study_worker, deadline=deadline,
    )  # fmt: skip


@pytest.mark.slow  # ~3 s: one spawned worker
def test_jobs_a_run_stopped_by_the_deadline_judges_the_runs_after_it(tmp_path, capsys):
    """A worker whose trainer stopped for the deadline comes back deferred with its projected
    time (1,000 s, past the 100 s budget), and the runs queued after it are deferred without a
    worker."""
    todo = [Slot("late", 0, 1e-3), Slot("ok", 0, 1e-3), Slot("ok", 1, 1e-3)]
    counts = run_fake(todo, tmp_path, jobs=1, budget=100.0)
    printed = capsys.readouterr().out
    assert counts == {"done": 0, "ran": 0, "waiting": 0, "deferred": 3}, counts
    assert printed.count("the slowest run took 1000 s") == 2


@pytest.mark.slow  # ~14 s: six spawned workers
def test_runs_too_slow_side_by_side_go_back_and_run_fewer_at_once(tmp_path, capsys):
    """Two runs stopped by the deadline beside each other (projected 150 s, so 75 s alone at
    best, inside the 100 s budget) are not final: the runs at a time drop to one, each goes
    back to the queue and finishes alone, one after the other. Two runs whose best case alone
    (1,000 s / 2) cannot fit are deferred at once, without a retry."""
    todo = [Slot("crowded", 0, 1e-3), Slot("crowded", 1, 1e-3)]
    counts = run_fake(todo, tmp_path, jobs=2, budget=100.0)
    printed = capsys.readouterr().out
    assert counts == {"done": 0, "ran": 2, "waiting": 0, "deferred": 0}, (counts, printed)
    assert printed.count("not final: stopped beside 1 other run(s)") == 2, printed
    assert "at most 1 run(s) at a time" in printed and "slowest" not in printed
    spans = sorted(
        tuple(map(float, (tmp_path / f"crowded-{s}-ran").read_text().split())) for s in (0, 1)
    )
    assert spans[0][1] <= spans[1][0], spans  # the second tries ran one after the other
    late = [Slot("late", 0, 1e-3), Slot("late", 1, 1e-3)]
    counts = run_fake(late, tmp_path, jobs=2, budget=100.0)
    printed = capsys.readouterr().out
    assert counts["deferred"] == 2 and "not final" not in printed, (counts, printed)


@pytest.mark.slow  # ~8 s: three spawned workers, one of them twice
def test_a_dead_worker_takes_only_its_own_run_and_is_started_once_more(tmp_path, capsys):
    """A worker process that dies (a crash, the OOM killer) costs only its own run: the run
    beside it goes on, the dead one is started once more (it would resume from its checkpoint)
    and is reported as failed when its process dies again."""
    todo = [Slot("crash", 0, 1e-3), Slot("slow", 0, 1e-3), Slot("ok", 1, 1e-3)]
    with pytest.raises(HybridkitError, match=r"crash seed=0 lr=0.001: its worker process died tw"):
        run_fake(todo, tmp_path, jobs=2)
    printed = capsys.readouterr().out
    assert "1/3 lost with its worker process (exit status 3)" in printed
    assert "starting it once more" in printed
    assert printed.count("failed:") == 1 and "failed: crash" in printed
    assert "died twice (exit status 3)" in printed
    assert "2/3 lost" not in printed and "3/3 lost" not in printed  # slow and ok went on


@pytest.mark.slow  # ~4 s: three spawned workers
def test_an_error_in_a_worker_is_reported_and_the_other_runs_finish(tmp_path, capsys):
    todo = [Slot("raise", 0, 1e-3), Slot("ok", 0, 1e-3), Slot("ok", 1, 1e-3)]
    with pytest.raises(
        HybridkitError,
        match=r"^1 study run\(s\) failed: raise seed=0 lr=0.001: "
        r"RecipeError: invalid recipe x.yaml:\n  model.d_model: too big",
    ):
        run_fake(todo, tmp_path, jobs=3)
    printed = capsys.readouterr().out
    assert printed.count("failed:") == 1 and "starting it once more" not in printed


def test_workers_may_start_processes_and_an_interrupted_call_stops_its_workers(tmp_path):
    """A run's trainer starts a process of its own on CUDA (batch prefetch), so the workers must
    not be daemons; and when the call itself stops (Ctrl-C, an error in the scheduler) the
    workers still running are stopped with it, not left behind."""
    import multiprocessing

    assert run_fake([Slot("parent", 0, 1e-3)], tmp_path, jobs=2)["ran"] == 1

    def status_of(slot):
        if slot.variant == "ok":  # asked once the slow run is going
            raise KeyboardInterrupt
        return "not started"

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_fake([Slot("slow", 0, 1e-3), Slot("ok", 0, 1e-3)], tmp_path, 2, status_of)
    assert time.monotonic() - t0 < 3.0  # the slow run's three seconds were cut short
    assert multiprocessing.active_children() == []


@pytest.mark.slow  # ~10 s: two spawned workers, each with its own prefetch process
def test_jobs_with_batch_prefetch(tmp_path, capfd):
    """On CUDA each run's trainer starts its batch-prefetch process from inside its worker
    process (``train.prefetch`` auto), which a daemonic worker could not: two runs side by side
    with prefetch forced on (here on the CPU) both finish, the worker making their batches."""
    fast = ["train.warmup_steps=2", "train.steps=10", "train.prefetch=true"]
    study = write_study(tmp_path, variants={"hybrid": []}, seeds=[0], lengths=[16], set=fast)
    got = run_study(study, tmp_path / "jobs", device="cpu", progress=False, jobs=2)
    printed = capfd.readouterr()
    assert got["complete"] and got["runs_finished"] == 2, printed.out[-2000:]
    assert "failed" not in printed.out and "train.prefetch:" not in printed.err  # no fallback


def test_jobs_scheduler_holds_chosen_lr_runs_behind_their_sweep():
    from hybridkit.study_jobs import _blocked

    sweep, other = Slot("a", 0, 1e-3), Slot("b", 0, 1e-3)
    later = Slot("a", 1, None)
    assert _blocked(later, [sweep]) and not _blocked(later, [other])
    assert not _blocked(sweep, [sweep]) and not _blocked(Slot("a", 1, 1e-3), [sweep])


def test_runs_start_longest_first_within_the_lr_rule(tmp_path):
    """A call starts the LR-sweep runs before the chosen-LR runs (which wait for them), and in
    each group the variants without a finished run first, then the slowest variant first (by
    its finished runs' wall time), so the runs a time-limited call cuts off are short ones."""
    from hybridkit.study import start_order

    def finished(variant: str, lr: float, train_s: float) -> None:
        path = tmp_path / variant / run_name(lr, 0) / RESULT_FILE
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"train_wall_time_s": train_s, "eval_wall_time_s": 1.0}))

    finished("fast", 1e-3, 10.0)
    finished("slow", 1e-3, 300.0)
    finished("slow", 3e-3, 100.0)  # mean 201 s
    (tmp_path / "broken" / "x").mkdir(parents=True)
    (tmp_path / "broken" / "x" / RESULT_FILE).write_text("{not json")
    slots = [Slot(v, 0, lr) for v in ("fast", "slow", "new", "broken") for lr in (1e-3, 3e-3)]
    slots += [Slot(v, seed, None) for seed in (1, 2) for v in ("fast", "slow", "new")]
    order = start_order(slots, tmp_path)
    assert order[:8] == [Slot(v, 0, lr) for v in ("new", "broken", "slow", "fast")
                         for lr in (1e-3, 3e-3)]  # fmt: skip
    assert order[8:] == [Slot(v, seed, None) for v in ("new", "slow", "fast") for seed in (1, 2)]
    assert sorted(order, key=slots.index) == slots  # the same runs, reordered


def test_shards_partition_the_runs(tmp_path):
    study = write_study(
        tmp_path, variants={"a": [], "b": [], "c": ["model.layout=m m"]}, seeds=[0, 1, 2]
    )
    plan = plan_study(study)
    slots = plan.slots
    # the LR sweep (first seed, every LR) comes first, then the other seeds at the chosen LR
    assert slots[:6] == [Slot(v, 0, lr) for v in "abc" for lr in (1e-3, 3e-3)]
    assert slots[6:] == [Slot(v, s, None) for s in (1, 2) for v in "abc"]
    for only in (None, {"seed": {1, 2}}, {"variant": {"c"}}, {"variant": {"a"}, "seed": {0}}):
        selected = select_slots(slots, only)
        for n in range(1, len(slots) + 2):
            shards = [select_slots(slots, only, (i, n)) for i in range(n)]
            flat = [s for shard in shards for s in shard]
            assert len(flat) == len(set(flat)) == len(selected)  # disjoint
            assert set(flat) == set(selected)  # together: everything selected
            assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    # one LR: nothing to choose, so later seeds name their LR up front
    assert all(s.lr == 1e-3 for s in plan_study(write_study(tmp_path, lrs=[1e-3])).slots)


def test_only_and_list(tmp_path, capsys):
    study = write_study(tmp_path, seeds=[0, 1], lrs=[3e-3], lengths=[16])
    out = tmp_path / "out"
    args = ["study", str(study), "-o", str(out), "--no-progress"]
    assert main([*args, "--only", "variant=mamba,seed=1"]) == 0
    assert run_dirs(out) == ["mamba/lr0.003-seed1"]
    capsys.readouterr()
    assert main([*args, "--list", "--only", "seed=0,1", "--shard", "1/2"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("mamba seed=0 lr=0.003") and "not started" in listed[0]
    assert listed[1].startswith("mamba seed=1 lr=0.003") and "finished" in listed[1]
    assert listed[2].startswith("2 run(s) selected")


def test_interrupted_study_resumes_only_the_unfinished_run(tmp_path, capsys, monkeypatch):
    study = write_study(
        tmp_path, variants={"hybrid": []}, lrs=[3e-3], lengths=[16], description=None
    )
    out = tmp_path / "out"
    run_study(study, out, device="cpu", progress=False)
    run = out / "hybrid" / "lr0.003-seed0"
    first = json.loads((run / "final.json").read_text())
    record = json.loads((run / RESULT_FILE).read_text())
    # Simulate a kill after the last checkpoint but before final.json was written.
    for name in ("final.json", "eval.json", RESULT_FILE):
        (run / name).unlink()
    latest = (run / "checkpoints" / "latest").read_text()
    ckpt_mtime = (run / "checkpoints" / latest / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert "started" in main_list(study, out, capsys)
    run_study(study, out, device="cpu", progress=False)
    printed = capsys.readouterr().out
    assert "training hybrid" in printed and "resumed from" in printed
    second = json.loads((run / "final.json").read_text())
    assert second["step"] == first["step"] == 20
    assert second["final_eval"] == first["final_eval"]
    # the finished checkpoint was not rewritten and nothing was trained again
    assert (run / "checkpoints" / "latest").read_text() == latest
    assert (run / "checkpoints" / latest / "model.safetensors").stat().st_mtime_ns == ckpt_mtime
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [5, 10, 15, 20]
    assert json.loads((run / RESULT_FILE).read_text())["results"] == record["results"]

    # Killed after training, before the evaluation finished: evaluated, not trained.
    (run / RESULT_FILE).unlink()
    assert "trained, not evaluated" in main_list(study, out, capsys)
    monkeypatch.setattr("hybridkit.study.Trainer", refuse_training)
    run_study(study, out, device="cpu", progress=False)
    assert "evaluating hybrid" in capsys.readouterr().out
    assert json.loads((run / RESULT_FILE).read_text())["results"] == record["results"]

    # New evaluation lengths re-evaluate the finished run, still without training it.
    again = write_study(
        tmp_path, variants={"hybrid": []}, lrs=[3e-3], lengths=[16, 32], description=None
    )
    assert "other settings" in main_list(again, out, capsys)
    run_study(again, out, device="cpu", progress=False)
    assert set(
        json.loads((out / "results.json").read_text())["variants"]["hybrid"]["by_length"]
    ) == {
        "16",
        "32",
    }


def test_a_changed_recipe_sets_the_old_run_aside_and_trains_again(tmp_path, capsys, monkeypatch):
    """A finished run, or a half-trained one, whose recipe the study has since changed (more
    steps here) is neither reported nor resumed: its folder is moved to ``<run>.stale-1`` and the
    run trains from scratch. A change that does not alter what is learned (the log cadence, the
    device) keeps a finished run finished."""
    fast = ["train.warmup_steps=2", "train.steps=10"]
    kw = dict(variants={"hybrid": []}, lrs=[3e-3], lengths=[16], description=None)
    study = write_study(tmp_path, set=fast, **kw)
    out = tmp_path / "out"
    run_study(study, out, device="cpu", progress=False)
    run = out / "hybrid" / "lr0.003-seed0"
    old = json.loads((run / RESULT_FILE).read_text())

    logging_only = write_study(tmp_path, set=[*fast, "train.log_every=2"], **kw)
    refuse_work(monkeypatch)
    assert run_study(logging_only, out, device="cpu", progress=False)["runs_finished"] == 1
    monkeypatch.undo()

    longer = write_study(tmp_path, set=["train.warmup_steps=2", "train.steps=12"], **kw)
    capsys.readouterr()
    assert "trained with another recipe" in main_list(longer, out, capsys)
    assert run_study(longer, out, device="cpu", progress=False)["runs_finished"] == 1
    assert "moved to lr0.003-seed0.stale-1" in capsys.readouterr().out
    assert json.loads((run / "final.json").read_text())["step"] == 12
    assert json.loads((out / "hybrid" / "lr0.003-seed0.stale-1" / RESULT_FILE).read_text()) == old
    assert (
        json.loads((run / RESULT_FILE).read_text())["recipe_fingerprint"]
        != old["recipe_fingerprint"]
    )

    # half-trained (no final.json / result.json) under another recipe: not resumed either
    for name in ("final.json", "eval.json", RESULT_FILE):
        (run / name).unlink()
    study = write_study(tmp_path, set=fast, **kw)  # (write_study rewrites the one study file)
    run_study(study, out, device="cpu", progress=False)
    printed = capsys.readouterr().out
    assert "moved to lr0.003-seed0.stale-2" in printed and "resumed from" not in printed
    assert json.loads((run / "final.json").read_text())["step"] == 10


def test_a_killed_rerun_of_a_changed_study_leaves_no_complete_report(tmp_path, monkeypatch):
    """The re-run of a changed study sets its old run aside and is killed while training the
    new one: the report on disk no longer says the study is complete with the old run's
    numbers (it was rewritten when the invocation started)."""
    kw = dict(variants={"hybrid": []}, lrs=[3e-3], lengths=[16], description=None)
    study = write_study(tmp_path, set=["train.warmup_steps=2", "train.steps=10"], **kw)
    out = tmp_path / "out"
    assert run_study(study, out, device="cpu", progress=False)["complete"]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("hybridkit.study.Trainer", killed)
    longer = write_study(tmp_path, set=["train.warmup_steps=2", "train.steps=12"], **kw)
    with pytest.raises(KeyboardInterrupt):
        run_study(longer, out, device="cpu", progress=False)
    report = json.loads((out / "results.json").read_text())
    assert not report["complete"] and report["runs_finished"] == 0
    assert "this report is partial" in (out / "report.md").read_text()


def test_run_copied_back_without_weights_trains_again(tmp_path, capsys):
    """A GPU call brings a run's small files back (final.json, metrics) but not its weights or
    checkpoints: the study trains it again instead of failing in its evaluation."""
    study = write_study(
        tmp_path, variants={"hybrid": []}, lrs=[3e-3], lengths=[16], description=None
    )
    out = tmp_path / "out"
    run_study(study, out, device="cpu", progress=False)
    run = out / "hybrid" / "lr0.003-seed0"
    want = json.loads((run / RESULT_FILE).read_text())["results"]
    shutil.rmtree(run / "checkpoints")
    for name in ("model.safetensors", "eval.json", RESULT_FILE):
        (run / name).unlink()
    capsys.readouterr()
    assert "weights missing" in main_list(study, out, capsys)
    run_study(study, out, device="cpu", progress=False)
    assert "training hybrid" in capsys.readouterr().out
    assert json.loads((run / RESULT_FILE).read_text())["results"] == want
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [5, 10, 15, 20]


def test_evaluation_settings_and_stale_caches_decide_what_is_evaluated_again(
    tmp_path, capsys, monkeypatch
):
    """Changing the evaluation (lengths from the recipe, examples per length) re-evaluates a
    finished run without training it; an ``eval.json`` of other lengths (``hybridkit eval
    --lengths``), with other overrides (``--set``) or of a checkpoint the study then trained past
    is never reused; a record
    without a fingerprint is damaged, not another recipe's run."""
    from hybridkit.eval.report import evaluate_run

    kw = dict(variants={"hybrid": []}, lrs=[3e-3], lengths=None, description=None)
    study = write_study(tmp_path, set=["train.warmup_steps=2", "train.steps=10"], **kw)
    out = tmp_path / "out"
    run_study(study, out, device="cpu", progress=False)
    run = out / "hybrid" / "lr0.003-seed0"
    record = json.loads((run / RESULT_FILE).read_text())
    default = [8, 16, 32, 64, 128]  # the task's eval_lengths
    assert record["evaluation"] == {"lengths": default, "examples": 16}

    # the recipe's eval section changes what is evaluated, not what the run learned
    more = write_study(
        tmp_path, set=["train.warmup_steps=2", "train.steps=10", "eval.examples=8"], **kw
    )
    monkeypatch.setattr("hybridkit.study.Trainer", refuse_training)
    run_study(more, out, device="cpu", progress=False)
    record = json.loads((run / RESULT_FILE).read_text())
    assert {r["examples"] for r in record["results"]} == {8.0}
    monkeypatch.undo()

    # an eval.json at other lengths is not the study's
    evaluate_run(run, lengths=[64], device="cpu")
    (run / RESULT_FILE).unlink()
    run_study(more, out, device="cpu", progress=False)
    results = json.loads((run / RESULT_FILE).read_text())["results"]
    assert [r["length"] for r in results] == default

    # nor one of the study's lengths and examples with other overrides (an ablation through
    # ``hybridkit eval --set``), which eval.json and eval.md record
    ablation = ["eval.examples=8", "eval.batch_size=3"]
    assert evaluate_run(run, lengths=default, overrides=ablation, device="cpu")["overrides"] == (
        ablation
    )
    assert "`eval.batch_size=3`" in (run / "eval.md").read_text()
    (run / RESULT_FILE).unlink()
    run_study(more, out, device="cpu", progress=False)
    assert json.loads((run / "eval.json").read_text())["overrides"] == ["eval.examples=8"]

    # a record without a fingerprint: evaluated again, not set aside and retrained
    (run / RESULT_FILE).write_text(json.dumps({"variant": "hybrid", "seed": 0}))
    capsys.readouterr()
    monkeypatch.setattr("hybridkit.study.Trainer", refuse_training)
    run_study(more, out, device="cpu", progress=False)
    assert "another recipe" not in capsys.readouterr().out
    monkeypatch.undo()

    # an eval.json of a half-trained run's checkpoint (``hybridkit eval RUN``), then the study
    # resumes it: the final weights are evaluated, not that checkpoint
    from hybridkit.study import plan_study
    from hybridkit.train.trainer import Trainer

    out2 = tmp_path / "out2"
    run2 = out2 / "hybrid" / "lr0.003-seed0"
    recipe = plan_study(more).recipe("hybrid", 3e-3, 0)
    recipe.train.checkpoint_every = 5  # the cadence is no part of the run's fingerprint
    Trainer(recipe, run2, resume=None, progress=False, stop_after=5).fit()
    assert (run2 / "checkpoints" / "latest").is_file() and not (run2 / "final.json").exists()
    early = evaluate_run(run2, device="cpu")["results"]
    run_study(more, out2, device="cpu", progress=False)
    final = evaluate_run(run2, device="cpu", out_dir=tmp_path / "fresh")["results"]
    record = json.loads((run2 / RESULT_FILE).read_text())["results"]
    assert [r["tok_acc"] for r in record] == [r["tok_acc"] for r in final]
    assert [r["tok_acc"] for r in record] != [r["tok_acc"] for r in early]


def refuse_training(*a, **k):
    raise AssertionError("a trained run was trained again")


def main_list(study: Path, out: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["study", str(study), "-o", str(out), "--list"]) == 0
    return capsys.readouterr().out


# --- reports from records ------------------------------------------------------------------------
def fake_record(variant: str, seed: int, lr: float, acc: list[float], heldout: float) -> dict:
    """A finished run's result.json with chosen accuracies at lengths 16 and 32 (100 answers)."""
    results = [
        {
            "length": n,
            "tokens": n,
            "ex_match": a,
            "tok_acc": a,
            "scaled_acc": (a - 0.5) / 0.5,
            "scored": 100.0,
            "examples": 100.0,
        }
        for n, a in zip((16, 32), acc, strict=True)
    ]
    return {
        "variant": variant,
        "seed": seed,
        "lr": lr,
        "run": f"{variant}/{run_name(lr, seed)}",
        "select_examples": 16,
        "lengths_requested": [16, 32],
        "heldout": {"ex_match": heldout, "tok_acc": heldout},
        "task": "mqar",
        "train_length": 16,
        "chance": 0.5,
        "results": results,
        "params": 1000,
        "state_bytes_per_seq": 64,
        "kv_bytes_per_token": 0,
        "steps": 20,
        "train_wall_time_s": 1.0,
        "eval_wall_time_s": 0.5,
    }


def put(out: Path, record: dict, study: Path) -> None:
    """Write ``record`` as a finished run of ``study`` (its recipe's fingerprint included)."""
    plan = plan_study(study)
    key = (record["variant"], record["lr"], record["seed"])
    record["recipe_fingerprint"] = plan.fingerprint(*key)
    record["evaluation"] = plan.evaluation(*key)
    path = out / record["run"] / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_report_cells_mean_spread_stderr_and_missing_runs(tmp_path, capsys):
    study = write_study(tmp_path, seeds=[0, 1, 2])
    out = tmp_path / "out"
    # hybrid: the sweep prefers 3e-3 on held-out data although 1e-3 scores higher on the test
    # sets -- the report must follow the held-out choice. Seeds 1 and 2 ran at 3e-3.
    put(out, fake_record("hybrid", 0, 1e-3, [0.9, 0.9], heldout=0.2), study)
    put(out, fake_record("hybrid", 0, 3e-3, [0.5, 0.4], heldout=0.3), study)
    put(out, fake_record("hybrid", 1, 3e-3, [0.7, 0.2], heldout=0.0), study)
    put(out, fake_record("hybrid", 2, 3e-3, [0.6, 0.3], heldout=0.0), study)
    put(
        out, fake_record("hybrid", 1, 1e-3, [1.0, 1.0], heldout=1.0), study
    )  # not part of the study
    # mamba: only one LR of the sweep finished, so nothing is reported and seeds 1-2 wait.
    put(out, fake_record("mamba", 0, 1e-3, [0.3, 0.1], heldout=0.5), study)
    assert main(["study", str(study), "-o", str(out), "--report"]) == 0
    assert "5 of 8 runs finished; 3 missing" in capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert not results["complete"] and list(results["variants"]) == ["hybrid"]
    hybrid = results["variants"]["hybrid"]
    assert hybrid["lr"] == 3e-3 and hybrid["seeds"] == [0, 1, 2]
    cell = hybrid["by_length"]["16"]["ex_match"]
    assert cell["per_seed"] == [0.5, 0.7, 0.6]
    assert cell["mean"] == pytest.approx(0.6) and cell["std"] == pytest.approx(0.1)
    assert (cell["min"], cell["max"]) == (0.5, 0.7)
    assert cell["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 100))
    scaled = hybrid["by_length"]["16"]["scaled_acc"]
    assert scaled["mean"] == pytest.approx(0.2)
    assert scaled["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 100) / 0.5)
    assert results["lr_selection"]["mamba"]["chosen"] is None
    missing = {(m["variant"], m["seed"], m["lr"]): m["why"] for m in results["missing"]}
    assert missing[("mamba", 0, 3e-3)] == "not started"
    assert missing[("mamba", 1, None)] == "waiting for the LR choice"
    assert set(missing) == {("mamba", 0, 3e-3), ("mamba", 1, None), ("mamba", 2, None)}

    report = (out / "report.md").read_text()
    assert "| hybrid | 3/3 |" in report
    assert "60.0 ± 4.9 [50.0, 70.0]" in report  # length 16
    assert "30.0 ± 4.6 [20.0, 40.0]" in report  # length 32
    assert "| 0.50 |" in report  # 2x / 1x of the means
    assert "Runs finished: 5 of 8 -- this report is partial" in report
    assert "- mamba seed 0 lr 0.003 (`mamba/lr0.003-seed0`): not started" in report
    assert "- mamba seed 1 chosen lr: waiting for the LR choice" in report
    assert "lr 0.003: 30.0 (chosen)" in report and "- mamba: lr 0.001: 50.0" in report
    # every finished run's time, the unchosen sweep runs included (1.5 s each; the record
    # outside the study's runs is not one of them)
    assert results["device_time_s"] == pytest.approx(5 * 1.5)
    assert (out / "lengthgen.png").stat().st_size < 200_000


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.pop("heldout"),
        lambda r: r["heldout"].pop("ex_match"),
        lambda r: r.update(chance="0.5"),
        lambda r: r.update(train_wall_time_s=None),
        lambda r: r["results"][1].pop("tok_acc"),
        lambda r: r["results"][0].update(examples=float("nan")),
        lambda r: r.update(results=[]),
        lambda r: r.update(params=True),
    ],
)
def test_a_record_lacking_a_field_the_report_reads_counts_as_missing(tmp_path, capsys, damage):
    """A result.json that parses but was cut, edited or written by another version: the report
    lists the run as missing instead of failing with a KeyError / TypeError."""
    study = write_study(tmp_path, seeds=[0])
    out = tmp_path / "out"
    for variant in ("hybrid", "mamba"):
        for lr in (1e-3, 3e-3):
            put(out, fake_record(variant, 0, lr, [0.9, 0.8], heldout=0.5 + lr), study)
    path = out / "mamba" / run_name(3e-3, 0) / RESULT_FILE
    record = json.loads(path.read_text())
    damage(record)
    path.write_text(json.dumps(record))
    assert main(["study", str(study), "-o", str(out), "--report"]) == 0
    assert "3 of 4 runs finished; 1 missing" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["hybrid"]  # mamba's LR sweep is not complete


def test_damaged_eval_and_heldout_caches_are_made_again(tmp_path):
    from hybridkit.study_records import valid_eval, valid_heldout

    good = fake_record("hybrid", 0, 1e-3, [0.9, 0.8], heldout=0.5)
    payload = {k: good[k] for k in ("task", "train_length", "chance", "results")}
    assert valid_eval(payload) and valid_eval({**payload, "decode": {"x": 1}})
    assert not valid_eval({}) and not valid_eval({**payload, "train_length": 0})
    assert not valid_eval({**payload, "results": [{"length": 16}]})
    heldout = {"select_examples": 16, **good["results"][0]}
    assert valid_heldout(heldout, "ex_match") and not valid_heldout(heldout, "bits")
    assert not valid_heldout({"select_examples": 16, "ex_match": 1.0}, "ex_match")


def test_sweep_crosses_variants_and_reports_against_the_key(tmp_path):
    sweep = {"key": "task.num_kv_pairs", "values": [1, 2, 4], "name": "D", "label": "pairs"}
    study = write_study(tmp_path, sweep=sweep, lrs=[1e-3], seeds=[0, 1])
    plan = plan_study(study)
    assert list(plan.variants) == [f"{v}-D{d}" for v in ("hybrid", "mamba") for d in (1, 2, 4)]
    assert plan.recipe("mamba-D4", 1e-3, 1).task.num_kv_pairs == 4
    assert plan.recipe("mamba-D4", 1e-3, 1).model.layout == "m m"
    out = tmp_path / "out"
    for v in plan.variants:
        d = int(v.split("-D")[1])
        for seed in (0, 1):
            put(out, fake_record(v, seed, 1e-3, [1 / d, 0.5 / d], heldout=0.0), study)
    results = report_study(study, out)
    assert results["complete"] and results["sweep"]["key"] == "task.num_kv_pairs"
    report = (out / "report.md").read_text()
    assert "at the training length against pairs (`task.num_kv_pairs`)" in report
    assert "| arm | 1 | 2 | 4 |" in report
    assert "| hybrid | 100.0 ± 0.0 [100.0, 100.0] | 50.0 ± 5.0 [50.0, 50.0] | 25.0 ± 4.3" in report
    assert "![ex_match against pairs](sweep.png)" in report
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # --only takes an arm's name for all its sweep values
    only = parse_only(["variant=mamba", "variant=hybrid-D2,seed=1"], plan)
    assert only == {"variant": {"mamba-D1", "mamba-D2", "mamba-D4", "hybrid-D2"}, "seed": {1}}


def test_report_before_any_sweep_finished_says_so(tmp_path):
    """A new LR added to a study leaves every variant's sweep open: the report says why its
    table is empty instead of printing a table without length columns."""
    study = write_study(tmp_path)  # lrs 1e-3 and 3e-3
    out = tmp_path / "out"
    put(out, fake_record("hybrid", 0, 1e-3, [0.9, 0.5], heldout=0.8), study)
    results = report_study(study, out)
    assert results["variants"] == {} and results["runs_finished"] == 1
    report = (out / "report.md").read_text()
    assert "No variant has finished runs at a chosen LR yet" in report
    assert "| variant | seeds |" not in report
    assert "- hybrid: lr 0.001: 80.0" in report
    assert "Training lengths differ" not in report  # there is no table with that column
    assert results["device_time_s"] == pytest.approx(1.5)  # the sweep run counts, unchosen


def test_the_chosen_lr_is_marked_at_any_precision(tmp_path):
    """LRs with more than six significant digits: the selection's keys were "%g"-rounded, so
    the "(chosen)" mark compared unequal (and two such LRs could share a key)."""
    study = write_study(tmp_path, lrs=[1.2345678e-3, 2e-3], variants={"hybrid": []})
    out = tmp_path / "out"
    put(out, fake_record("hybrid", 0, 1.2345678e-3, [0.9, 0.5], heldout=0.8), study)
    put(out, fake_record("hybrid", 0, 2e-3, [0.9, 0.5], heldout=0.1), study)
    results = report_study(study, out)
    assert results["lr_selection"]["hybrid"]["chosen"] == 1.2345678e-3
    assert "lr 0.0012345678: 80.0 (chosen), lr 0.002: 10.0" in (out / "report.md").read_text()


def test_learned_at_counts_the_runs_that_learned(tmp_path):
    """``learned_at``: where runs either learn or stay at chance, the report counts them per
    cell (a mean of 50 % is one run at 100 % and one at 0 % here)."""
    sweep = {"key": "task.num_kv_pairs", "values": [1, 2], "name": "D", "label": "pairs"}
    study = write_study(tmp_path, sweep=sweep, lrs=[1e-3], seeds=[0, 1], learned_at=0.9)
    plan = plan_study(study)
    out = tmp_path / "out"
    for v in plan.variants:
        for seed in (0, 1):
            score = 1.0 if v.endswith("D1") or seed == 0 else 0.0
            put(out, fake_record(v, seed, 1e-3, [score, score], heldout=0.0), study)
    results = report_study(study, out)
    assert results["variants"]["mamba-D2"]["learned"] == {"at": 0.9, "runs": 1, "of": 2}
    assert results["variants"]["mamba-D1"]["learned"]["runs"] == 2
    report = (out / "report.md").read_text()
    assert "## Runs that learned: ex_match >= 90.0 % at the training length" in report
    assert "| hybrid | 2 / 2 | 1 / 2 |" in report
    with pytest.raises(RecipeError, match="learned_at"):
        load_study(write_study(tmp_path, learned_at=1.5))
    without = tmp_path / "without"
    shutil.copytree(out, without)
    write_study(tmp_path, sweep=sweep, lrs=[1e-3], seeds=[0, 1])  # no learned_at: no count
    assert "learned" not in report_study(study, without)["variants"]["mamba-D2"]
    assert "Runs that learned" not in (without / "report.md").read_text()


# --- bad input ----------------------------------------------------------------------------------
def test_bad_flags_exit_2(tmp_path, cli_error):
    study = write_study(tmp_path)
    base = ["study", str(study), "-o", str(tmp_path / "out"), "--no-progress"]
    for bad in ("2/2", "1", "a/b", "-1/2", "0/0", "1/2/3", "1/ 2x"):
        err = cli_error(*base, f"--shard={bad}")
        assert "--shard must be I/N" in err and "0 <= I < N" in err and repr(bad) in err
    err = cli_error(*base, "--only", "variant=nope")
    assert "--only variant=nope" in err and "allowed: hybrid, mamba" in err
    err = cli_error(*base, "--only", "seed=7")
    assert "--only seed=7" in err and "allowed: 0" in err
    assert "--only seed=x" in cli_error(*base, "--only", "seed=x")
    err = cli_error(*base, "--only", "color=red")
    assert "unknown key" in err and "variant or seed" in err
    err = cli_error(*base, "--only", "mamba")
    assert "--only must be" in err and "KEY=VALUE" in err
    err = cli_error(*base, "--report", "--shard", "0/2")
    assert "--report" in err and "no --shard" in err
    err = cli_error(*base, "--report")
    assert "no study folder" in err
    assert "--jobs must be at least 1, got 0" in cli_error(*base, "--jobs", "0")
    assert not (tmp_path / "out").exists(), "a bad flag still started the study"


def study_error(tmp_path: Path, cli_error, **changes) -> str:
    path = write_study(tmp_path, **changes)
    with pytest.raises(HybridkitError) as info:
        run_study(path, tmp_path / "out", device="cpu", progress=False)
    err = cli_error("study", str(path), "-o", str(tmp_path / "out"), "--no-progress")
    assert err.startswith("hybridkit study: error:")
    assert not list((tmp_path / "out").glob("*/*/metrics.jsonl")), "trained before failing"
    return str(info.value)


def test_unknown_study_key(tmp_path, cli_error):
    msg = study_error(tmp_path, cli_error, varaints={"x": []})
    assert "varaints: unknown key" in msg and "allowed keys" in msg and "variants" in msg


def test_empty_variants(tmp_path, cli_error):
    msg = study_error(tmp_path, cli_error, variants={})
    assert "variants" in msg and "at least one variant" in msg


def test_bad_base_path(tmp_path, cli_error):
    msg = study_error(tmp_path, cli_error, base="recipes/nope.yaml")
    assert "base" in msg and "nope.yaml" in msg and "not found" in msg


def test_bad_variant_override_key_names_the_variant_and_key(tmp_path, cli_error):
    variants = {"hybrid": [], "typo": ["model.d_modle=32"]}
    msg = study_error(tmp_path, cli_error, variants=variants)
    assert "model.d_modle" in msg and "unknown key" in msg and "'typo'" in msg
    msg = study_error(tmp_path, cli_error, variants={"hybrid": ["task.num_kv_pair=3"]})
    assert "task.num_kv_pair" in msg and "'hybrid'" in msg
    msg = study_error(tmp_path, cli_error, variants={"hybrid": ["model.layout=m x"]})
    assert "model.layout" in msg and "'hybrid'" in msg
    sweep = {"key": "task.num_kv_pair", "values": [2]}
    msg = study_error(tmp_path, cli_error, sweep=sweep)
    assert "task.num_kv_pair" in msg and "'hybrid-num_kv_pair2'" in msg


def test_bad_study_values(tmp_path, cli_error):
    assert "lrs" in study_error(tmp_path, cli_error, lrs=[1e-3, -1.0])
    assert "seeds must not be empty" in study_error(tmp_path, cli_error, seeds=[])
    assert "seeds must be distinct" in study_error(tmp_path, cli_error, seeds=[0, 0])
    assert "select_metric" in study_error(tmp_path, cli_error, select_metric="loss")
    assert "plain folder name" in study_error(tmp_path, cli_error, variants={"a/b": []})
    assert "set" in study_error(tmp_path, cli_error, set="train.lr=1")
    assert "sweep.values" in study_error(tmp_path, cli_error, sweep={"key": "a.b", "values": []})
    for same in ([2, 2.0, 4], [1, True]):  # equal as values, so one cell of the report
        err = study_error(tmp_path, cli_error, sweep={"key": "train.steps", "values": same})
        assert "sweep.values must be distinct" in err
    assert "dotted recipe key" in study_error(
        tmp_path, cli_error, sweep={"key": "a=1", "values": [1]}
    )


def test_lrs_that_name_the_same_run_folder_are_refused(tmp_path, cli_error):
    """Two LRs equal in the run folder's format (``lr0.001-seed0`` for both) passed as distinct:
    a real run trained one, set it aside as stale, trained the other, and so on forever."""
    msg = study_error(tmp_path, cli_error, lrs=[0.0010000001, 0.0010000002])
    assert msg.count("lrs: lrs must be distinct as run folder names write them") == 1, msg
    assert "0.0010000001 and 0.0010000002" in msg and "'lr0.001-seed<seed>'" in msg
    assert run_name(0.0010000001, 0) == run_name(0.0010000002, 0) == "lr0.001-seed0"
    plan = plan_study(write_study(tmp_path, lrs=[1e-3, 1.001e-3]))  # apart in 6 digits: fine
    assert [run_name(s.lr, s.seed) for s in plan.slots[:2]] == ["lr0.001-seed0", "lr0.001001-seed0"]


def test_a_sweep_over_a_key_the_study_sets_per_run_is_refused(tmp_path, cli_error):
    """``sweep.key: train.lr`` (with ``lrs``) or ``seed`` was accepted and overwritten in every
    run's recipe; ``train.seed`` overrides the study's seed, so all seeds trained one model."""
    for key, use in (("train.lr", "`lrs`"), ("seed", "`seeds`"), ("train.seed", "`seeds`")):
        msg = study_error(tmp_path, cli_error, sweep={"key": key, "values": [1, 2]})
        assert f"sweep.key: sweep.key {key!r} cannot be swept" in msg, msg
        assert use in msg
    assert plan_study(write_study(tmp_path, sweep={"key": "train.steps", "values": [5, 10]}))


def test_overrides_of_what_the_study_sets_per_run_are_refused(tmp_path, cli_error):
    """``set`` / variant overrides of ``seed``, ``train.seed`` or (with ``lrs``) ``train.lr``
    were replaced per run without a word (``train.seed``: every seed trained one model)."""
    msg = study_error(tmp_path, cli_error, set=["train.warmup_steps=2", "train.lr=0.5"])
    assert "set.1: 'train.lr' cannot be overridden here: the study sets every run's" in msg
    variants = {"hybrid": ["seed=3"], "mamba": ["model.layout=m m", " train.seed = 4"]}
    msg = study_error(tmp_path, cli_error, variants=variants)
    assert "variants.hybrid.0: 'seed' cannot be overridden here" in msg, msg
    assert "variants.mamba.1: 'train.seed' cannot be overridden here" in msg, msg
    # without lrs, set's train.lr is every run's LR and a sweep over it is one folder per LR
    assert plan_study(write_study(tmp_path, lrs=None, set=["train.lr=0.002"]))
    sweep = {"key": "train.lr", "values": [0.001, 0.003]}
    assert len(plan_study(write_study(tmp_path, lrs=None, sweep=sweep)).slots) == 4
    msg = study_error(tmp_path, cli_error, sweep=sweep)  # with lrs it is the study's
    assert "sweep.key: sweep.key 'train.lr' cannot be swept" in msg, msg
    # keys as the override parser reads them; --set is checked too (was a pydantic traceback)
    msg = study_error(tmp_path, cli_error, set=["train . lr=0.5"])
    assert "'train . lr' cannot be overridden here" in msg, msg
    study = write_study(tmp_path)
    with pytest.raises(RecipeError, match=r"--set: 'seed=3': 'seed' cannot be overridden"):
        load_study(study, ["seed=3"])
    assert "--set: 'seed=3'" in cli_error(
        "study", str(study), "-o", str(tmp_path / "o"), "--set", "seed=3"
    )
    # a base recipe that pins train.seed would train one model per variant: refused at planning,
    # unless the study clears it with train.seed=null
    dump_recipe(load_recipe(BASE, ["train.seed=7"]), tmp_path / "recipes" / "base.yaml")
    with pytest.raises(RecipeError, match="train.seed is pinned \\(7\\) for variant"):
        plan_study(study)
    cleared = tmp_path / "cleared.yaml"
    cleared.write_text(study.read_text().replace("- train.warmup_steps=2", "- train.seed=null"))
    assert "train.seed=null" in cleared.read_text()
    assert plan_study(cleared)


def test_study_size_is_capped_before_any_recipe_is_loaded(tmp_path, cli_error, monkeypatch):
    """100 variants x a 100-value sweep validated 10,000 recipes (over a minute without output)
    and 5,000 seeds took 43 s: the caps refuse such studies before any recipe is loaded."""

    def refuse(*a, **k):
        raise AssertionError("a recipe was loaded before the study's size was checked")

    monkeypatch.setattr("hybridkit.study.load_recipe", refuse)
    arms = {f"v{i}": [] for i in range(100)}
    sweep = {"key": "task.num_kv_pairs", "values": list(range(1, 101))}
    msg = study_error(tmp_path, cli_error, variants=arms, sweep=sweep)
    assert "sweep.values: too many variants: variants x sweep.values = 100 x 100 = 10000" in msg
    assert "allowed: at most 200" in msg
    msg = study_error(tmp_path, cli_error, variants={f"v{i}": [] for i in range(201)})
    assert "variants: too many variants: 201 variants; allowed: at most 200" in msg
    msg = study_error(tmp_path, cli_error, seeds=list(range(5000)))
    assert "seeds: seeds has 5000 entries; allowed: at most 100" in msg
    msg = study_error(tmp_path, cli_error, lrs=[i * 1e-4 for i in range(1, 22)])
    assert "lrs: lrs has 21 entries; allowed: at most 20" in msg
    # 2 arms x 100 values x (2 lrs at seed 0 + 4 more seeds) = 1200 runs, counted as planned
    msg = study_error(tmp_path, cli_error, sweep=sweep, seeds=[0, 1, 2, 3, 4])
    assert (
        "too many runs: variants x sweep.values x (lrs at the first seed + the other seeds)" in msg
    )
    assert "= 2 x 100 x (2 + 4) = 1200 runs; allowed: at most 1000 runs per study" in msg
    msg = study_error(tmp_path, cli_error, lrs=None, seeds=list(range(100)), variants=arms)
    assert "too many runs: variants x (lrs at the first seed + the other seeds)" in msg
    assert "= 100 x (1 + 99) = 10000 runs" in msg


def test_a_variant_whose_task_outgrows_the_model_vocabulary_fails_when_planned(tmp_path, cli_error):
    """The model's vocabulary must hold the task's: the trainer checked it when the variant's
    first run started (after the variants before it had trained), naming only ``<recipe>``."""
    variants = {"hybrid": [], "big": ["model.layout=m m", "task.vocab_size=100"]}
    msg = study_error(tmp_path, cli_error, variants=variants)
    study = tmp_path / "study.yaml"
    assert msg.startswith(f"invalid study {study}: variant 'big' (base recipe "), msg
    assert (
        "variants.big.1: model.vocab_size: 32 is smaller than the vocabulary of task 'mqar' "
        "(100); allowed: >= 100 (variant 'big' overrides: model.layout=m m, task.vocab_size=100)"
    ) in msg, msg
    out = ["-o", str(tmp_path / "out"), "--list"]
    assert "variant 'big'" in cli_error("study", str(study), *out)
    sweep = {"key": "task.vocab_size", "values": [24, 64], "name": "V"}
    msg = study_error(tmp_path, cli_error, sweep=sweep)
    assert "variant 'hybrid-V64'" in msg and "sweep.values.1: model.vocab_size: 32 is" in msg
    assert not (tmp_path / "out").exists()


def test_a_base_that_cannot_be_a_recipe_file_is_named(tmp_path):
    """``base`` naming a loop of symbolic links (was Python's RuntimeError from ``resolve``) or
    a directory (was reported as "not found")."""
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    for base, needle in (("loop.yaml", "a loop of symbolic links"), (".", "is a directory")):
        study = write_study(tmp_path, base=base)
        with pytest.raises(RecipeError) as err:
            load_study(study)
        assert err.value.problems[0][0] == "base" and needle in err.value.problems[0][1]


def test_study_file_problems(tmp_path, capsys):
    with pytest.raises(HybridkitError, match="no such study file") as err:
        load_study(tmp_path / "missing.yaml")
    assert str(err.value).startswith(f"invalid study {tmp_path / 'missing.yaml'}:")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(HybridkitError, match="YAML syntax error"):
        load_study(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(HybridkitError, match="must be a mapping"):
        load_study(bad)
    base_without_task = tmp_path / "recipes" / "notask.yaml"
    write_study(tmp_path)
    dump_recipe(load_recipe({"model": BASE["model"]}), base_without_task)
    path = write_study(tmp_path, base="recipes/notask.yaml")
    with pytest.raises(RecipeError, match="task"):
        run_study(path, tmp_path / "out", device="cpu", progress=False)


# --- the shipped studies ------------------------------------------------------------------------
@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_studies_validate(path):
    plan = plan_study(path)
    for variant in plan.variants:
        for lr in plan.lrs[variant]:
            assert plan.recipe(variant, lr, plan.spec.seeds[0]).task is not None
    if path.stem in CPU_STUDIES:
        # `make demo` trains every run of the quickstart on a laptop CPU: keep it one seed.
        assert len(plan.slots) <= 4 and plan.spec.seeds == [0]
    else:
        assert len(plan.spec.seeds) >= 3


@pytest.mark.triton
@pytest.mark.parametrize(
    "path", [p for p in STUDIES if p.stem not in CPU_STUDIES], ids=lambda p: p.stem
)
def test_gpu_studies_use_the_triton_and_fa4_kernels_in_bf16(path):
    """On a GPU every Mamba-3 layer of every arm must plan the Triton scan and every attention
    layer must have a head_dim FlashAttention-4 takes on an H100/H200, with bf16 autocast: a
    study that silently fell back to the torch paths would measure a different program."""
    plan = plan_study(path)
    for variant in plan.variants:
        recipe = plan.recipe(variant, plan.lrs[variant][0], plan.spec.seeds[0])
        assert recipe.train.precision in ("auto", "bf16"), variant
        model = build_model(recipe, seed=0)
        backends = summarize(model, seq_len=recipe.task.seq_len, device="cuda").backends
        if "mamba3 scan (prefill)" in backends:
            # "triton" or "triton (chunk C)" when the plan narrows the chunk (MIMO rows, bf16)
            scan = backends["mamba3 scan (prefill)"]
            assert scan.split(" (chunk ")[0] == "triton", (variant, backends)
        for layer in model.modules():
            if isinstance(layer, Attention):
                assert layer.spec.backend == "auto", variant
                assert fa4_head_dim_ok(layer.head_dim, 9), (variant, layer.head_dim)


def test_committed_study_folders_keep_only_each_runs_result():
    """The GPU studies write into benchmarks/results/STUDY, which git keeps between sessions:
    each run's result.json and the report are tracked, checkpoints, weights and logs are not
    (.gitignore), so finished runs survive a session without the repository growing."""
    import subprocess

    root = Path(__file__).parent.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    run = "benchmarks/results/lengthgen_niah/mamba3/lr0.001-seed0"
    kept = [f"{run}/{RESULT_FILE}", "benchmarks/results/lengthgen_niah/report.md"]
    dropped = [f"{run}/checkpoints/step_0000100/model.safetensors", f"{run}/metrics.jsonl"]
    dropped += [f"{run}/model.safetensors", f"{run}/final.json", f"{run}/eval.json"]
    for path in kept + dropped:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0
        assert ignored == (path in dropped), path
