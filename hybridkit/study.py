"""Studies: a base recipe x named variants x seeds x learning rates, trained, evaluated, compared.

Recurrent models are sensitive to the learning rate, so a comparison at one shared LR can say
more about the LR than the architecture. A study therefore trains every variant at every LR (and
seed), picks each variant's best LR on a *held-out* split at the training length (examples drawn
with a different seed from the test sets), and only then evaluates the chosen runs at every
length on the fixed test sets. Runs are resumable and finished runs are skipped, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, PrivateAttr, ValidationError, field_validator

from hybridkit.build import build_model
from hybridkit.errors import RecipeError
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.eval.plots import plot_lengthgen
from hybridkit.eval.report import evaluate_run
from hybridkit.plugins import env_plugins
from hybridkit.recipe import (
    RecipeSpec,
    import_plugins,
    load_recipe,
    read_yaml_mapping,
    validation_problems,
)
from hybridkit.rundir import load_run
from hybridkit.runtime import resolve_device
from hybridkit.schema import StrictModel
from hybridkit.summary import human_bytes, human_count, summarize
from hybridkit.train.trainer import Trainer

HELD_OUT_SEED_OFFSET = 7919


class StudySpec(StrictModel):
    """A study file. ``base`` is a recipe path relative to the study file."""

    name: str | None = None
    description: str | None = None
    base: str = Field(description="recipe the variants start from (path relative to this file)")
    set: list[str] = Field(default_factory=list, description="overrides applied to every run")
    variants: dict[str, list[str]] = Field(
        description="variant name -> list of key=value overrides"
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0], description="seeds per (variant, lr)"
    )
    lrs: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="learning rates; default train.lr"
    )
    lengths: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="test lengths; default: the task's"
    )
    select_metric: str = Field(default="ex_match", description="ex_match | tok_acc")
    select_examples: int = Field(default=200, gt=0, description="held-out examples for LR choice")
    plugins: list[str] = Field(
        default_factory=list,
        description="modules or .py files (relative to this file) imported before validation",
    )

    _source: str | None = PrivateAttr(default=None)  # the study file (for error messages)
    _file_set: int = PrivateAttr(default=0)  # how many `set` items the file holds (then --set)

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if not value:
            raise ValueError("a study needs at least one variant")
        for name in value:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"variant name {name!r} must be a plain folder name")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("seeds must not be empty")
        return value

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not value:
            raise ValueError("lrs must be a non-empty list of positive learning rates")
        return value

    @field_validator("select_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in ("ex_match", "tok_acc"):
            raise ValueError(f"select_metric must be ex_match or tok_acc, got {value!r}")
        return value


def load_study(
    path: str | Path, overrides: Sequence[str] = (), *, plugins: Sequence[str] = ()
) -> tuple[StudySpec, Path]:
    """Validate a study file; returns the spec and the resolved base recipe path.

    ``overrides`` (the command line's ``--set``) are appended to the study's ``set``; the spec
    remembers the file and which ``set`` items came from it, so that a bad override found later
    (when a variant's recipe is loaded) is reported at the study key that holds it. The study's
    ``plugins`` (relative to the study file), ``HYBRIDKIT_PLUGINS`` and ``plugins`` (the
    command line's ``--plugin``) are imported first and passed on to every variant's recipe,
    whose run directory records them.
    """
    path = Path(path)
    data = read_yaml_mapping(path, what="study", keys="base, variants, seeds, ...")
    import_plugins(data, str(path), path.parent, [*env_plugins(), *plugins], what="study")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(
            str(path), validation_problems(exc, data, root=StudySpec), "study"
        ) from None
    base = (path.parent / spec.base).resolve()
    if not base.is_file():
        problem = ("base", f"recipe {spec.base!r} not found (looked at {base})")
        raise RecipeError(str(path), [problem], "study")
    spec._source, spec._file_set = str(path), len(spec.set)
    spec.set = list(spec.set) + list(overrides)
    return spec, base


def _override_origin(spec: StudySpec, variant: str, key: str) -> str | None:
    """The study key of the last override that sets ``key`` (or a key above it), if any.

    Overrides apply in order (``set``, then the variant's list), so the last one that touches a
    key is the one that decided its value.
    """
    sources = [
        (f"set.{i}" if i < spec._file_set else "--set", text) for i, text in enumerate(spec.set)
    ]
    sources += [(f"variants.{variant}.{i}", text) for i, text in enumerate(spec.variants[variant])]
    origin = None
    for where, text in sources:
        target = text.partition("=")[0].strip()
        if target and (
            key == target or key.startswith(target + ".") or target.startswith(key + ".")
        ):
            origin = where
    return origin


def run_name(lr: float, seed: int) -> str:
    return f"lr{lr:g}-seed{seed}"


def variant_recipe(
    spec: StudySpec, base: Path, variant: str, lr: float | None, seed: int
) -> RecipeSpec:
    extra = [f"train.lr={lr}"] if lr is not None else []
    try:
        overrides = [*spec.set, *spec.variants[variant], *extra, f"seed={seed}"]
        recipe = load_recipe(base, overrides, plugins=spec.plugins)
    except RecipeError as err:
        # Name the study file, the variant and the study key of the override that caused each
        # problem: the bad key is usually in the study's overrides, not in the base file.
        problems = []
        for key, message in err.problems:
            origin = _override_origin(spec, variant, key)
            problems.append((f"{origin}: {key}" if origin else key, message))
        source = f"{spec._source or '<study>'}: variant {variant!r} (base recipe {base})"
        raise RecipeError(source, problems, "study") from None
    if recipe.task is None:
        raise RecipeError(str(base), [("task", "a study's base recipe needs a task section")])
    return recipe


def run_study(
    study_path: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
    plugins: Sequence[str] = (),
) -> dict:
    """Train, select, evaluate and report; returns the results dict (also results.json)."""
    spec, base = load_study(study_path, overrides, plugins=plugins)
    # Validate every variant before training anything (a typo in the last variant should not
    # surface after an hour of training the first ones) and before writing anything.
    recipes = {v: variant_recipe(spec, base, v, None, spec.seeds[0]) for v in spec.variants}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lrs = spec.lrs or [None]
    t0 = time.time()
    runs: dict[str, dict] = {}
    for variant in spec.variants:
        runs[variant] = {}
        for lr in lrs:
            for seed in spec.seeds:
                recipe = variant_recipe(spec, base, variant, lr, seed)
                run_dir = out / variant / run_name(recipe.train.lr, seed)
                if not (run_dir / "final.json").is_file():
                    print(
                        f"[study] training {variant} lr={recipe.train.lr:g} seed={seed} "
                        f"-> {run_dir}"
                    )
                    if recipe.train.device == "auto" and device != "auto":
                        recipe.train.device = device
                    Trainer(recipe, run_dir, resume="auto", progress=progress).fit()
                runs[variant].setdefault(recipe.train.lr, []).append(run_dir)
    # Learning-rate selection on held-out examples at the training length.
    chosen: dict[str, float] = {}
    selection: dict[str, dict[str, float]] = {}
    for variant, by_lr in runs.items():
        scores = {}
        for lr, dirs in by_lr.items():
            vals = [held_out_score(d, spec, device) for d in dirs]
            scores[lr] = statistics.fmean(vals)
        selection[variant] = {f"{lr:g}": s for lr, s in scores.items()}
        chosen[variant] = max(scores, key=lambda lr: (scores[lr], -lr))
    # Test evaluation of the chosen runs at every length.
    results: dict[str, dict] = {}
    for variant, lr in chosen.items():
        per_seed = []
        for run_dir in runs[variant][lr]:
            cached = run_dir / "eval.json"
            lengths = spec.lengths
            if cached.is_file() and _same_lengths(cached, lengths):
                payload = json.loads(cached.read_text())
            else:
                payload = evaluate_run(run_dir, lengths=lengths, device=device)
            per_seed.append(payload)
        results[variant] = summarize_variant(
            variant, lr, per_seed, recipes[variant], runs[variant][lr]
        )
    report = {
        "study": spec.name or Path(study_path).stem,
        "base": str(base),
        "selection_metric": spec.select_metric,
        "lr_selection": selection,
        "variants": results,
        "wall_time_s": time.time() - t0,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    write_report(report, spec, out)
    return report


def _same_lengths(path: Path, lengths: Sequence[int] | None) -> bool:
    if lengths is None:
        return True
    done = [r["length"] for r in json.loads(path.read_text())["results"]]
    return done == list(lengths)


def held_out_score(run_dir: Path, spec: StudySpec, device: str) -> float:
    """Score at the training length on examples disjoint from the test sets (cached)."""
    cache = run_dir / "heldout.json"
    if cache.is_file():
        return json.loads(cache.read_text())[spec.select_metric]
    recipe, model = load_run(run_dir)
    task_spec = recipe.task.model_copy(
        update={
            "eval_seed": recipe.task.eval_seed + HELD_OUT_SEED_OFFSET,
            "eval_examples": spec.select_examples,
        }
    )
    model = model.to(resolve_device(device))
    res = evaluate_lengths(
        model,
        task_spec.build(),
        [task_spec.seq_len],
        batch_size=recipe.eval.batch_size,
        precision=recipe.train.precision,
        decode_examples=0,
    )[0]
    cache.write_text(json.dumps(res))
    return res[spec.select_metric]


def summarize_variant(
    variant: str, lr: float, per_seed: list[dict], recipe: RecipeSpec, dirs: list[Path]
) -> dict:
    lengths = [r["length"] for r in per_seed[0]["results"]]
    table = {}
    for i, length in enumerate(lengths):
        vals = [p["results"][i] for p in per_seed]
        table[str(length)] = {
            "ex_match": statistics.fmean(v["ex_match"] for v in vals),
            "tok_acc": statistics.fmean(v["tok_acc"] for v in vals),
            "scaled_acc": statistics.fmean(v["scaled_acc"] for v in vals),
            "per_seed_ex_match": [v["ex_match"] for v in vals],
            "tokens": vals[0]["tokens"],
        }
    model = build_model(recipe, seed=0)
    s = summarize(model, seq_len=per_seed[0]["train_length"])
    wall = 0.0
    for d in dirs:
        final = d / "final.json"
        if final.is_file():
            wall += float(json.loads(final.read_text()).get("wall_time_s", 0.0))
    return {
        "lr": lr,
        "runs": [str(d) for d in dirs],
        "train_length": per_seed[0]["train_length"],
        "params": s.total_params,
        "state_bytes_per_seq": s.state_bytes_per_seq,
        "kv_bytes_per_token": s.kv_bytes_per_token,
        "train_wall_time_s": wall,
        "by_length": table,
    }


def write_report(report: dict, spec: StudySpec, out: Path) -> None:
    variants = report["variants"]
    # Variants may be trained on different tasks (a state-tracking study mixes parity and
    # arithmetic), so columns are the union of lengths and missing cells show "-".
    lengths = sorted({int(n) for v in variants.values() for n in v["by_length"]})
    train_lens = {v["train_length"] for v in variants.values()}
    train_len = next(iter(train_lens)) if len(train_lens) == 1 else None
    lines = [f"# Study: {report['study']}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    trained = (
        f"Trained at length {train_len}. "
        if train_len
        else "Training lengths differ per variant (column `train len`). "
    )
    lines += [
        f"Base recipe: `{Path(report['base']).name}`; seeds {spec.seeds}; learning rates "
        f"{spec.lrs or 'from the recipe'} (best per variant chosen on {spec.select_examples} "
        f"held-out examples at the training length, metric {report['selection_metric']}). "
        + trained
        + "Cells: ex_match % (scaled accuracy %) per evaluation length, mean over seeds; "
        "- = not evaluated for that variant.",
        "",
    ]
    header = (
        "| variant | params | state / seq | KV / token | lr | train len | train time | "
        + " | ".join(str(n) for n in lengths)
        + " | 2x / 1x |"
    )
    lines += [header, "|" + "---|" * (8 + len(lengths))]
    for name, v in variants.items():
        cells = []
        for n in lengths:
            cell = v["by_length"].get(str(n))
            cells.append(
                "-"
                if cell is None
                else f"{100 * cell['ex_match']:.1f} ({100 * cell['scaled_acc']:.1f})"
            )
        one = v["by_length"].get(str(v["train_length"]), {}).get("ex_match")
        two = v["by_length"].get(str(2 * v["train_length"]), {}).get("ex_match")
        ratio = f"{two / one:.2f}" if one and two is not None else "-"
        lines.append(
            f"| {name} | {human_count(v['params'])} | {human_bytes(v['state_bytes_per_seq'])} | "
            f"{human_bytes(v['kv_bytes_per_token'])} | {v['lr']:g} | {v['train_length']} | "
            f"{v['train_wall_time_s']:.0f} s | " + " | ".join(cells) + f" | {ratio} |"
        )
    lines += ["", "LR selection (held-out score per learning rate):", ""]
    for name, scores in report["lr_selection"].items():
        lines.append(
            f"- {name}: " + ", ".join(f"lr {lr}: {100 * s:.1f}" for lr, s in scores.items())
        )
    lines += [
        "",
        f"Total wall time {report['wall_time_s']:.0f} s.",
        "",
        "![length generalisation](lengthgen.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    curves = {
        name: [(int(n), cell["ex_match"]) for n, cell in v["by_length"].items()]
        for name, v in variants.items()
    }
    plot_lengthgen(
        curves,
        out / "lengthgen.png",
        train_length=train_len,
        title=f"{report['study']}: ex_match vs length",
    )
