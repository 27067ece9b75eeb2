"""Studies: a base recipe x named variants x seeds x learning rates, trained, evaluated, compared.

**Learning rates.** Recurrent models are sensitive to the learning rate, so a comparison at one
shared LR can say more about the LR than about the architecture. Every variant is therefore
trained at each of the study's ``lrs`` with the *first* seed, and its LR is chosen on a held-out
split at the training length (examples drawn with a different ``eval_seed`` from the test sets,
so the choice never looks at a test number; ties go to the smaller LR). The other seeds then train
at the chosen LR only. Why not sweep every seed: the sweep's job is to put each arm near its best
LR, and seeds exist to measure training noise *at* that LR; sweeping all of them multiplies the
cost by the number of seeds for a choice the first seed already makes. With one LR there is
nothing to choose and every seed can run at once.

**Runs are units of work.** A run is one (variant, seed, LR) and lives in
``OUT/<variant>/lr<lr>-seed<seed>/``. It is finished when its ``result.json`` exists: the run was
trained, scored on the held-out split and evaluated at every length, and the record holds all
the report needs (relative paths only). Because each run is self-contained, a study can be
split over several processes or machines (``--shard i/n``, ``--only variant=...,seed=...``), and
a re-run skips finished runs, finishes the evaluation of trained ones and resumes a half-trained
one from its newest checkpoint. The report (``report.md``, ``results.json``, PNGs) is a
function of the ``result.json`` files alone, rewritten at the end of every invocation and by
``--report``, which trains nothing: copying those small files from several machines into one
folder and running ``--report`` merges them. Every run is evaluated at every length -- also the
LR-sweep runs that will not be chosen -- since a shard cannot know the choice when it finishes a
sweep run, and coming back later to evaluate would make a run depend on other shards.

**A run belongs to its recipe.** Each ``result.json`` holds a fingerprint of the recipe the run
trained with (model, task, training hyperparameters and seed; not the device, logging or
checkpoint cadence, compile settings or other ways of running the same training). When the
study's recipe for that run has changed since -- more steps, another base, a new override -- the
old run is not counted as finished and is not resumed either: its folder is moved aside to
``<run>.stale-<k>`` (nothing is deleted) and the run trains again from scratch. What a run is
evaluated on (its lengths and examples per length, from the study and the recipe's ``eval`` and
``task`` sections) is recorded beside the fingerprint: when that changes, a finished run is
evaluated again from its weights, not retrained, and an ``eval.json`` of other lengths or
examples (a ``hybridkit eval --lengths`` of the run) is never taken for the study's.

**Order and shards.** The runs are listed seed-major: the first seed's runs (the LR sweep) for
every variant, then each further seed for every variant. Shard ``i/n`` takes every n-th run of
that list starting at the i-th (0-based), so shards are disjoint, together cover the study, and
each gets a mix of variants. A run of a later seed needs its variant's LR choice; with several
LRs and shards running side by side it may find the sweep unfinished, says so and is skipped (run
``--only seed=<first>`` first, then the rest). ``sweep`` (optional) crosses every variant with
the values of one recipe key, e.g. the number of MQAR key-value pairs; the report then adds a
table and a plot of the metric at the training length against that key.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from hybridkit.build import build_model
from hybridkit.errors import CheckpointError, HybridkitError, RecipeError, RunWouldNotFinish
from hybridkit.eval.lengthgen import evaluate_lengths
from hybridkit.eval.plots import plot_lengthgen
from hybridkit.eval.report import binomial_stderr, evaluate_run, spread
from hybridkit.footprint import check_recipe_eval, check_training
from hybridkit.fsutil import atomic_write_text, resolved
from hybridkit.plugins import env_plugins
from hybridkit.recipe import (
    RecipeSpec,
    digest,
    import_plugins,
    load_recipe,
    read_yaml_mapping,
    validation_problems,
)
from hybridkit.recipe_sections import MAX_LR
from hybridkit.rundir import load_run
from hybridkit.runtime import resolve_device
from hybridkit.schema import StrictModel, raise_problems, spec_problem
from hybridkit.study_jobs import deferral, run_parallel
from hybridkit.study_records import valid_eval, valid_heldout, valid_record
from hybridkit.summary import human_bytes, human_count, summarize
from hybridkit.tasks.base import MAX_LENGTH, Task, check_model_vocab
from hybridkit.train.determinism import deterministic_kernels
from hybridkit.train.trainer import Trainer
from hybridkit.weights import find_weights

HELD_OUT_SEED_OFFSET = 7919
RESULT_FILE = "result.json"
#: what a study writes into its folder beside the variants' folders (no variant may take a name)
REPORT_FILES = frozenset({"report.md", "results.json", "lengthgen.png", "sweep.png"})

# Train keys that change how a run executes or what it logs, not what it learns: a finished run
# stays finished when only these differ (another machine, more frequent logs, compile on,
# deterministic kernels: the same training, another rounding).
OPERATIONAL_TRAIN_KEYS = frozenset(
    {
        "device", "compile", "compile_mode", "prefetch", "activation_checkpointing",
        "deterministic", "loss_chunk_tokens", "parallel", "fsdp_mixed_precision",
        "checkpoint_format", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
        "tensorboard",
    }
)  # fmt: skip


def recipe_fingerprint(recipe: RecipeSpec) -> str:
    """What a run learns from: the model, task, training hyperparameters and seed of its recipe
    (``OPERATIONAL_TRAIN_KEYS`` left out), hashed."""
    data = recipe.model_dump(mode="json")
    train = {k: v for k, v in data.get("train", {}).items() if k not in OPERATIONAL_TRAIN_KEYS}
    kept = {"model": data.get("model"), "task": data.get("task"), "train": train}
    kept["seed"] = data.get("seed")
    return digest(kept)


METRICS = ("ex_match", "tok_acc", "scaled_acc")

# Size limits of one study, checked before any variant's recipe is loaded (validating a recipe
# takes milliseconds, so 10,000 variants planned for over a minute without a word). The shipped
# studies use at most 3 seeds, 3 lrs and 60 runs.
MAX_SEEDS = 100
MAX_LRS = 20
MAX_RUNS = 1000
MAX_VARIANTS = 200  # variants x sweep values: each variant's recipe is loaded when planning

# Keys the study sets in every run's recipe itself (``variant_recipe``), which a sweep, ``set``,
# a variant or ``--set`` must not take: each run's value overwrote them without a word
# (``train.lr`` by ``lrs``, ``seed`` by ``seeds``), and ``train.seed`` overrides the study's
# seed (the trainer prefers it), so every seed of a variant trained the same model. Key -> why,
# and what to use instead. ``train.lr`` is the study's only with ``lrs``.
STUDY_OWNED_KEYS = {
    "train.lr": "the study sets every run's train.lr from `lrs`: give learning rates as `lrs`",
    "seed": "the study sets every run's seed from `seeds`: give seeds as `seeds`",
    "train.seed": "train.seed replaces the study's seed of every run (all seeds of a variant "
    "would train the same model): give seeds as `seeds`",
}


def owned_key_problem(key: str, value: str | None, has_lrs: bool) -> str | None:
    """Why a study may not set ``key`` (to ``value``; None: a sweep's key) in its overrides, or
    None. Keys are compared as the override parser reads them (spaces around the dots do not
    matter); ``train.seed=null`` clears a base recipe's pinned seed and is allowed."""
    key = ".".join(part.strip() for part in key.split("."))
    if key not in STUDY_OWNED_KEYS or (key == "train.lr" and not has_lrs):
        return None
    if key == "train.seed" and value is not None and value.strip() in ("null", "~", ""):
        return None
    return STUDY_OWNED_KEYS[key]


def format_lr(lr: float) -> str:
    """An LR as run folder names (``lr<lr>-seed<seed>``) and reports write it."""
    return f"{lr:g}"


class SweepSpec(StrictModel):
    """One recipe key crossed with every variant (e.g. ``task.num_kv_pairs`` for MQAR capacity)."""

    key: str = Field(description="dotted recipe key, e.g. task.num_kv_pairs")
    values: list[int | float | str] = Field(description="one run group per value")
    name: str | None = Field(
        default=None, description="short tag in variant names (default: the key's last part)"
    )
    label: str | None = Field(default=None, description="axis label of the plot (default: key)")

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not value or "=" in value or value.startswith(".") or value.endswith("."):
            raise ValueError(f"sweep.key must be a dotted recipe key, got {value!r}")
        if why := owned_key_problem(value, None, has_lrs=False):  # train.lr: see StudySpec
            raise ValueError(f"sweep.key {value!r} cannot be swept: {why}")
        return value

    @field_validator("values")
    @classmethod
    def _values(cls, value: list) -> list:
        if not value:
            raise ValueError("sweep.values must not be empty")
        # distinct as text (the run names) and as values (the report's table keys: 2 == 2.0)
        as_text = {str(v) for v in value}
        try:
            as_values = {(type(v) is bool, v) for v in value}
        except TypeError:  # unhashable values (lists, mappings): the text must do
            as_values = as_text
        if len(as_text) != len(value) or len(as_values) != len(value):
            raise ValueError(f"sweep.values must be distinct, got {value}")
        return value

    @property
    def tag(self) -> str:
        return self.name or self.key.rsplit(".", 1)[-1]


class StudySpec(StrictModel):
    """A study file. ``base`` is a recipe path relative to the study file."""

    name: str | None = None
    description: str | None = None
    base: str = Field(description="recipe the variants start from (path relative to this file)")
    set: list[str] = Field(default_factory=list, description="overrides applied to every run")
    variants: dict[str, list[str]] = Field(
        description="variant name -> list of key=value overrides"
    )
    sweep: SweepSpec | None = Field(
        default=None, description="cross every variant with the values of one recipe key"
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0],
        description="every variant runs at each seed; the LR sweep runs at the first",
    )
    lrs: list[Annotated[float, Field(gt=0, le=MAX_LR)]] | None = Field(
        default=None, description="learning rates; default train.lr"
    )
    lengths: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="test lengths; default: the task's"
    )
    select_metric: str = Field(
        default="ex_match", description="ex_match | tok_acc: chooses the LR, heads the report"
    )
    select_examples: int = Field(
        default=200, gt=0, le=10**7, description="held-out examples for LR choice"
    )
    learned_at: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="a run whose select_metric at the training length reaches this counts as "
        "learned, and the report counts such runs per variant (default: no count)",
    )
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
            problem = _folder_name_problem(name)
            if problem:
                raise ValueError(f"variant name {name!r} must be a plain folder name ({problem})")
        return value

    @model_validator(mode="after")
    def _size(self) -> StudySpec:
        """At most ``MAX_VARIANTS`` variants (with a sweep: each arm at each value) and
        ``MAX_RUNS`` runs, counted as the planner lists them (every variant at each LR with the
        first seed, then once per further seed): checked before any recipe is loaded."""
        arms, values = len(self.variants), len(self.sweep.values) if self.sweep else 1
        n_lrs, n_seeds = len(self.lrs or [None]), len(self.seeds)
        runs = arms * values * (n_lrs + n_seeds - 1)
        if arms * values > MAX_VARIANTS:
            where, count = ("variants",), f"{arms} variants"
            if self.sweep is not None:
                where = ("sweep", "values")
                count = f"variants x sweep.values = {arms} x {values} = {arms * values} variants"
            message = (
                f"too many variants: {count}; allowed: at most {MAX_VARIANTS} (split the study "
                "into several study files)"
            )
            raise_problems(type(self).__name__, [spec_problem(where, message, None)])
        if runs > MAX_RUNS:
            keys, counts = "variants", f"{arms}"
            if self.sweep is not None:
                keys, counts = "variants x sweep.values", f"{arms} x {values}"
            message = (
                f"too many runs: {keys} x (lrs at the first seed + the other seeds) = "
                f"{counts} x ({n_lrs} + {n_seeds - 1}) = {runs} runs; allowed: at most "
                f"{MAX_RUNS} runs per study (split it into several study files, or use fewer "
                "variants, sweep.values, lrs or seeds)"
            )
            raise_problems(type(self).__name__, [spec_problem((), message, None)])
        return self

    @model_validator(mode="after")
    def _owned_overrides(self) -> StudySpec:
        """``set`` and variant overrides may not set what the study sets per run: each run's
        ``seed`` (and ``train.seed``, which would replace it) and, with ``lrs``, ``train.lr``;
        the run's own value would silently win (or, for ``train.seed``, every seed would train
        the same model)."""
        places = [(("set", i), text) for i, text in enumerate(self.set)]
        places += [
            (("variants", name, i), text)
            for name, items in self.variants.items()
            for i, text in enumerate(items)
        ]
        problems = []
        for where, text in places:
            key, _, value = text.partition("=")
            if why := owned_key_problem(key, value, bool(self.lrs)):
                message = f"{key.strip()!r} cannot be overridden here: {why}"
                problems.append(spec_problem(where, message, text))
        if self.sweep is not None and (
            why := owned_key_problem(self.sweep.key, None, bool(self.lrs))
        ):
            message = f"sweep.key {self.sweep.key!r} cannot be swept: {why}"
            problems.append(spec_problem(("sweep", "key"), message, self.sweep.key))
        raise_problems(type(self).__name__, problems)
        return self

    @model_validator(mode="after")
    def _sweep_names(self) -> StudySpec:
        """A sweep's variant names (``<arm>-<tag><value>``) are folders too: a value or tag
        with a '/' put its runs outside the study folder, a long one failed after training."""
        if self.sweep is None:
            return self
        problems = []
        tag = ("sweep", "name" if self.sweep.name else "key")
        for k, value in enumerate(self.sweep.values):
            for arm in self.variants:
                name = sweep_variant(self, arm, value)
                problem = _folder_name_problem(name)
                if problem:
                    # the tag alone (no value) already fails: blame sweep.name / sweep.key once
                    where = tag if _folder_name_problem(f"{arm}-{self.sweep.tag}") else None
                    message = (
                        f"makes the variant name {name!r}, not a plain folder name ({problem})"
                    )
                    problems.append(spec_problem(where or ("sweep", "values", k), message, value))
                    break
            if problems and problems[-1]["loc"] == tag:
                break
        raise_problems(type(self).__name__, problems)
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("seeds must not be empty")
        if len(value) > MAX_SEEDS:
            raise ValueError(f"seeds has {len(value)} entries; allowed: at most {MAX_SEEDS}")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("lrs must be a non-empty list of positive learning rates")
        if len(value) > MAX_LRS:
            raise ValueError(f"lrs has {len(value)} entries; allowed: at most {MAX_LRS}")
        if len(set(value)) != len(value):  # two runs in one folder
            raise ValueError(f"lrs must be distinct, got {value}")
        # Distinct as run folders name them (lr<lr>-seed<seed>): 0.0010000001 and 0.0010000002
        # were two runs of one folder, each setting the other's run aside, forever.
        seen: dict[str, float] = {}
        for lr in value:
            tag = format_lr(lr)
            if tag in seen:
                raise ValueError(
                    f"lrs must be distinct as run folder names write them (6 significant "
                    f"digits): {seen[tag]!r} and {lr!r} both make the run folder "
                    f"'lr{tag}-seed<seed>'"
                )
            seen[tag] = lr
        return value

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, value: list[int] | None) -> list[int] | None:
        """``lengths: []`` silently meant the task's lengths (``eval.lengths: []`` is refused)."""
        if value is not None and not value:
            raise ValueError(
                "lengths must be a non-empty list of test lengths; leave it out (null) for the "
                "task's"
            )
        return value

    @field_validator("select_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in ("ex_match", "tok_acc"):
            raise ValueError(f"select_metric must be ex_match or tok_acc, got {value!r}")
        return value


MAX_NAME_BYTES = 200  # a folder name (file systems allow 255; room for .stale-k and the like)


def _folder_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder inside the study folder, or None."""
    if not name or name.startswith("."):
        return "empty or starting with '.'"
    if "/" in name or "\0" in name:
        return "'/' or a NUL character in it"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if any(c in name for c in "\n\r\t"):
        return "a line break or tab in it"
    if name in REPORT_FILES:
        return f"the name of a report file the study writes ({', '.join(sorted(REPORT_FILES))})"
    return None


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
    try:
        base = resolved(path.parent / spec.base, "recipe")
    except HybridkitError as exc:  # a loop of symbolic links
        raise RecipeError(str(path), [("base", str(exc))], "study") from None
    if not base.is_file():
        what = "is a directory, not a recipe file" if base.is_dir() else "not found"
        problem = ("base", f"recipe {spec.base!r} {what} (looked at {base})")
        raise RecipeError(str(path), [problem], "study")
    problems = []
    for text in overrides:
        key, _, value = text.partition("=")
        if why := owned_key_problem(key, value, bool(spec.lrs)):
            problems.append(("--set", f"{text!r}: {key.strip()!r} cannot be overridden: {why}"))
    if problems:
        raise RecipeError(str(path), problems, "study")
    spec._source, spec._file_set = str(path), len(spec.set)
    spec.set = list(spec.set) + list(overrides)
    return spec, base


def _override_origin(spec: StudySpec, variant: str, key: str) -> str | None:
    """The study key of the last override that sets ``key`` (or a key above it), if any.

    Overrides apply in order (``set``, then the variant's list, then a sweep's value), so the
    last one that touches a key is the one that decided its value.
    """
    sources = [
        (f"set.{i}" if i < spec._file_set else "--set", text) for i, text in enumerate(spec.set)
    ]
    arm, value_index = variant, None
    if spec.sweep is not None:
        for name in spec.variants:
            for k, value in enumerate(spec.sweep.values):
                if sweep_variant(spec, name, value) == variant:
                    arm, value_index = name, k
    sources += [(f"variants.{arm}.{i}", text) for i, text in enumerate(spec.variants[arm])]
    if value_index is not None:
        sources.append((f"sweep.values.{value_index}", f"{spec.sweep.key}=..."))
    origin = None
    for where, text in sources:
        target = text.partition("=")[0].strip()
        if target and (
            key == target or key.startswith(target + ".") or target.startswith(key + ".")
        ):
            origin = where
    return origin


def sweep_variant(spec: StudySpec, arm: str, value: object) -> str:
    """The name of ``arm`` at one sweep value: ``<arm>-<tag><value>`` (e.g. ``mamba3-D16``)."""
    return f"{arm}-{spec.sweep.tag}{value}"


def study_variants(spec: StudySpec) -> dict[str, list[str]]:
    """Variant name -> overrides, with ``sweep`` expanded (one variant per arm and value)."""
    if spec.sweep is None:
        return dict(spec.variants)
    sw = spec.sweep
    return {
        sweep_variant(spec, arm, value): [*overrides, f"{sw.key}={value}"]
        for arm, overrides in spec.variants.items()
        for value in sw.values
    }


def run_name(lr: float, seed: int) -> str:
    return f"lr{format_lr(lr)}-seed{seed}"


def variant_recipe(
    spec: StudySpec, base: Path, variant: str, lr: float | None, seed: int
) -> RecipeSpec:
    extra = [f"train.lr={lr}"] if lr is not None else []
    overrides = study_variants(spec)[variant]
    try:
        recipe = load_recipe(
            base, [*spec.set, *overrides, *extra, f"seed={seed}"], plugins=spec.plugins
        )
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


# --- the plan: which runs a study consists of --------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """One run of the study. ``lr`` None: the variant's chosen LR (known once its sweep is done)."""

    variant: str
    seed: int
    lr: float | None

    def describe(self) -> str:
        lr = "chosen lr" if self.lr is None else f"lr={self.lr:g}"
        return f"{self.variant} seed={self.seed} {lr}"


@dataclass
class StudyPlan:
    """A validated study and the ordered list of its runs (see the module docstring)."""

    spec: StudySpec
    base: Path
    path: Path
    variants: dict[str, list[str]]
    lrs: dict[str, list[float]]  # per variant: the study's lrs, else the variant recipe's lr
    slots: list[Slot]
    arm_of: dict[str, tuple[str, object]]  # sweep only: variant -> (arm, sweep value)
    _fingerprints: dict[tuple[str, float, int], str] = field(default_factory=dict, repr=False)
    _evaluations: dict[tuple[str, float, int], dict] = field(default_factory=dict, repr=False)

    @property
    def first_seed(self) -> int:
        return self.spec.seeds[0]

    def recipe(self, variant: str, lr: float, seed: int) -> RecipeSpec:
        # Pass train.lr only when the study sweeps it, so a run's recipe.yaml equals the
        # variant's own recipe otherwise.
        given = lr if self.spec.lrs is not None else None
        return variant_recipe(self.spec, self.base, variant, given, seed)

    def evaluation(self, variant: str, lr: float, seed: int) -> dict:
        """What the run's evaluation covers: its lengths and examples per length, resolved
        from the study and the run's recipe. Not part of the fingerprint (evaluating differently
        changes nothing the run learned), so a record or ``eval.json`` made with other settings
        is evaluated again, not retrained."""
        key = (variant, lr, seed)
        if key not in self._evaluations:
            recipe = self.recipe(variant, lr, seed)
            lengths = self.spec.lengths or recipe.eval.lengths or recipe.task.eval_lengths
            examples = recipe.eval.examples or recipe.task.eval_examples
            self._evaluations[key] = {"lengths": [int(n) for n in lengths], "examples": examples}
        return self._evaluations[key]

    def fingerprint(self, variant: str, lr: float, seed: int) -> str:
        """:func:`recipe_fingerprint` of the run's recipe (cached: reports ask for every run)."""
        key = (variant, lr, seed)
        if key not in self._fingerprints:
            self._fingerprints[key] = recipe_fingerprint(self.recipe(variant, lr, seed))
        return self._fingerprints[key]


def plan_study(
    study_path: str | Path, overrides: Sequence[str] = (), plugins: Sequence[str] = ()
) -> StudyPlan:
    """Validate the study and every variant (before anything trains) and list its runs;
    ``plugins`` (``--plugin``) are imported first (see :func:`load_study`)."""
    spec, base = load_study(study_path, overrides, plugins=plugins)
    variants = study_variants(spec)
    # A typo in the last variant should not surface after an hour of training the first ones.
    recipes = {v: variant_recipe(spec, base, v, None, spec.seeds[0]) for v in variants}
    _check_lengths(spec, recipes)
    _check_vocab(spec, base, recipes)
    pinned = sorted(v for v, r in recipes.items() if r.train.seed is not None)
    if pinned:  # the trainer prefers train.seed to the study's seed of each run
        message = (
            f"train.seed is pinned ({recipes[pinned[0]].train.seed}) for variant(s) "
            f"{', '.join(map(repr, pinned))}, so every seed of them would train the same model; "
            "remove it from the base recipe or add train.seed=null to the study's set"
        )
        raise RecipeError(
            f"{spec._source or '<study>'} (base recipe {base})", [("train.seed", message)], "study"
        )
    lrs = {v: list(spec.lrs) if spec.lrs else [recipes[v].train.lr] for v in variants}
    first, rest = spec.seeds[0], spec.seeds[1:]
    slots = [Slot(v, first, lr) for v in variants for lr in lrs[v]]
    for seed in rest:
        slots += [Slot(v, seed, lrs[v][0] if len(lrs[v]) == 1 else None) for v in variants]
    arm_of: dict[str, tuple[str, object]] = {}
    if spec.sweep is not None:
        for arm in spec.variants:
            for value in spec.sweep.values:
                arm_of[sweep_variant(spec, arm, value)] = (arm, value)
    return StudyPlan(spec, base, Path(study_path), variants, lrs, slots, arm_of)


def _check_lengths(spec: StudySpec, recipes: Mapping[str, RecipeSpec]) -> None:
    """The study's ``lengths`` are test lengths of every variant's task: checked before any run
    trains (they failed at the first evaluation, naming ``--lengths``, or ran out of memory)."""
    problems = []
    for i, length in enumerate(spec.lengths or []):
        for variant, recipe in recipes.items():
            if length > MAX_LENGTH:
                problem = f"length {length} is too long; allowed: at most {MAX_LENGTH}"
            else:
                problem = recipe.task.length_problem(length)
            if problem is not None:
                problems.append((f"lengths.{i}", f"variant {variant!r}: {problem}"))
                break
    if problems:
        raise RecipeError(spec._source or "<study>", problems, "study")


def _check_vocab(spec: StudySpec, base: Path, recipes: Mapping[str, RecipeSpec]) -> None:
    """Every variant's model vocabulary holds its task's (the trainer's check, made here for all
    variants before any run trains: a variant whose override grew the task's vocabulary was
    refused only when its first run started, after the variants before it had trained, and the
    message named neither the study nor the variant)."""
    tasks: dict[str, Task | None] = {}  # task spec digest -> task (variants often share one)
    for variant, recipe in recipes.items():
        key = digest(recipe.task.model_dump(mode="json"))
        if key not in tasks:
            try:
                tasks[key] = recipe.task.build()
                tasks[key].check_attributes()
            except HybridkitError:
                # A task that cannot be built here (a text task's file that is on the training
                # machine but not where ``--report`` merges the results) is left to the trainer.
                tasks[key] = None
        task = tasks[key]
        try:
            if task is not None:
                check_model_vocab(task, recipe.model.vocab_size, recipe.task.kind)
        except RecipeError as err:  # the trainer's sentence, placed in the study
            at, message = err.problems[0]
            # like variant_recipe's errors: the study file, the variant and the override that
            # set the vocabulary or the task (the error is rare: origins are looked up only now)
            origin = _override_origin(spec, variant, at) or _override_origin(spec, variant, "task")
            overrides = ", ".join(study_variants(spec)[variant]) or "none"
            message += f" (variant {variant!r} overrides: {overrides})"
            source = f"{spec._source or '<study>'}: variant {variant!r} (base recipe {base})"
            problem = (f"{origin}: {at}" if origin else at, message)
            raise RecipeError(source, [problem], "study") from None


def _check_memory(plan: StudyPlan, variants: set[str], device: str) -> None:
    """Each selected variant's training step and test lengths fit the free memory of
    ``device`` (:mod:`hybridkit.footprint`): checked before the first run trains, not after
    it (a length past the memory ended a process through the OOM killer, without a word)."""
    target = resolve_device(device)
    for variant in sorted(variants):
        recipe = variant_recipe(plan.spec, plan.base, variant, None, plan.spec.seeds[0])
        micro = recipe.train.batch_size // recipe.train.grad_accum
        check_training(recipe.model, recipe.task, recipe.train.batch_size, micro, target)
        check_recipe_eval(
            recipe, plan.spec.lengths, target, given_key="lengths", where=f" (variant {variant!r})"
        )


SHARD_FORM = "I/N with integers 0 <= I < N (e.g. --shard 0/4 ... --shard 3/4)"
ONLY_FORM = "comma-separated KEY=VALUE items, KEY variant or seed (e.g. variant=mamba3,seed=1,2)"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; a clear error naming the flag otherwise."""
    parts = text.split("/")
    try:
        i, n = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        i = n = None
    if i is None or n is None or n < 1 or not 0 <= i < n:
        raise HybridkitError(f"--shard must be {SHARD_FORM}; got {text!r}")
    return i, n


def parse_only(texts: Sequence[str], plan: StudyPlan) -> dict[str, set]:
    """``--only`` values -> ``{"variant": {...}, "seed": {...}}``.

    Items are comma separated; an item without ``=`` adds a value to the previous key, so
    ``seed=1,2`` and ``seed=1,seed=2`` mean the same. Keys may repeat across flags."""
    chosen: dict[str, set] = {}
    for text in texts:
        key = None
        if not text.strip(" ,"):  # an empty value (a shell variable unset) would select every run
            raise HybridkitError(f"--only must be {ONLY_FORM}; got {text!r}")
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            if "=" in item:
                key, value = (s.strip() for s in item.split("=", 1))
            elif key is not None:
                value = item
            else:
                raise HybridkitError(f"--only must be {ONLY_FORM}; got {text!r}")
            if key == "variant":
                # With a sweep, an arm's name stands for all of its variants.
                names = [v for v, (arm, _) in plan.arm_of.items() if arm == value]
                if value in plan.variants:
                    names = [value]
                if not names:
                    allowed = [*plan.variants, *(plan.spec.variants if plan.arm_of else ())]
                    raise HybridkitError(
                        f"--only variant={value}: no such variant; allowed: " + ", ".join(allowed)
                    )
                chosen.setdefault(key, set()).update(names)
            elif key == "seed":
                try:
                    seed = int(value)
                except ValueError:
                    seed = None
                if seed not in plan.spec.seeds:
                    raise HybridkitError(
                        f"--only seed={value}: not a seed of this study; allowed: "
                        + ", ".join(str(s) for s in plan.spec.seeds)
                    )
                chosen.setdefault(key, set()).add(seed)
            else:
                raise HybridkitError(f"--only {key}=...: unknown key; must be {ONLY_FORM}")
    return chosen


def select_slots(
    slots: Sequence[Slot],
    only: Mapping[str, set] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[Slot]:
    """The runs ``--only`` keeps, then every n-th of those for ``--shard i/n``."""
    only = only or {}
    kept = [
        s
        for s in slots
        if s.variant in only.get("variant", {s.variant}) and s.seed in only.get("seed", {s.seed})
    ]
    if shard is None:
        return kept
    i, n = shard
    return kept[i::n]


def start_order(slots: Sequence[Slot], out: Path) -> list[Slot]:
    """The order in which to start ``slots``: longest first, as far as the LR rule allows.

    A time-limited call cuts off the runs started last, and a run cut off half-way loses all but
    its checkpoints; a long run started last also keeps the call's other workers idle at its
    end. So every LR-sweep run comes before any run at a chosen LR (those wait for the sweep of
    their variant), and within each group variants with no finished run yet come first (their
    length is unknown, and may be the longest), then the others by the mean wall time of their
    finished runs in ``out``, longest first. Ties keep the study's order."""
    seconds = {v: statistics.fmean(t) for v, t in recorded_seconds(slots, out).items()}
    return sorted(slots, key=lambda s: (s.lr is None, -seconds.get(s.variant, math.inf)))


def recorded_seconds(slots: Sequence[Slot], out: Path) -> dict[str, list[float]]:
    """Per variant of ``slots``, the wall time (training + evaluation) of each of its finished
    runs in ``out``, as their ``result.json`` recorded it; variants without one are left out."""
    seconds: dict[str, list[float]] = {}
    for variant in {s.variant for s in slots}:
        for path in (out / variant).glob(f"*/{RESULT_FILE}"):
            try:
                record = json.loads(path.read_text())
                t = float(record["train_wall_time_s"]) + float(record["eval_wall_time_s"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable record tells nothing about the time
            seconds.setdefault(variant, []).append(t)
    return seconds


def expected_seconds(status: str, recorded: Mapping[str, list[float]], slot: Slot) -> float:
    """What a run about to start is expected to take, before this call has timed any: the
    longest finished run of its variant, or 0 (unknown) when it has none or is already part
    trained (it resumes from a checkpoint and needs less)."""
    if status.startswith("started"):
        return 0.0
    return max(recorded.get(slot.variant, ()), default=0.0)


# --- run records -------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    """A JSON object the study or the trainer wrote into a run folder, or None if it is missing
    or damaged (cut short by a kill, a full disk or a copy): each such file is made again from
    the run, so a damaged one counts as not written instead of stopping the study."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def read_record(run_dir: Path, spec: StudySpec, fingerprint: str, evaluation: dict) -> dict | None:
    """A run's ``result.json`` if it exists, was trained with the recipe whose fingerprint is
    given and was made with the study's evaluation settings (``evaluation``:
    :meth:`StudyPlan.evaluation`)."""
    record = read_json(run_dir / RESULT_FILE)
    if record is None or record.get("recipe_fingerprint") != fingerprint:
        return None
    if not valid_record(record, spec.select_metric):
        return None  # damaged, or lacking a field the report reads: made again
    if record.get("select_examples") != spec.select_examples:
        return None
    if record.get("evaluation") != evaluation:
        return None
    return record


def chosen_lr(plan: StudyPlan, variant: str, out: Path) -> tuple[float | None, dict[float, float]]:
    """The variant's LR (None while its sweep is unfinished) and the held-out scores so far."""
    lrs = plan.lrs[variant]
    scores: dict[float, float] = {}
    for lr in lrs:
        run_dir = out / variant / run_name(lr, plan.first_seed)
        key = (variant, lr, plan.first_seed)
        rec = read_record(run_dir, plan.spec, plan.fingerprint(*key), plan.evaluation(*key))
        if rec is not None:
            scores[lr] = rec["heldout"][plan.spec.select_metric]
    if len(lrs) == 1:
        return lrs[0], scores
    if len(scores) < len(lrs):
        return None, scores
    return max(scores, key=lambda lr: (scores[lr], -lr)), scores


def held_out_eval(run_dir: Path, spec: StudySpec, device: str) -> dict:
    """Metrics at the training length on examples disjoint from the test sets (cached)."""
    cache = run_dir / "heldout.json"
    cached = read_json(cache)
    if (
        cached is not None
        and cached.get("select_examples") == spec.select_examples
        and valid_heldout(cached, spec.select_metric)
    ):
        return cached
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
    res = {"select_examples": spec.select_examples, **res}
    atomic_write_text(cache, json.dumps(res, indent=1))
    return res


def _eval_overrides(evaluation: dict) -> list[str]:
    """The overrides the study evaluates a run with (its examples per length)."""
    return [f"eval.examples={evaluation['examples']}"]


def _cached_eval(run_dir: Path, evaluation: dict) -> dict | None:
    """The run's ``eval.json`` if it covers exactly ``evaluation``'s lengths and examples with
    no other overrides (one written by ``hybridkit eval --lengths ...`` at other lengths, or with
    ``--set`` of another window, is not the study's; one written before the overrides were
    recorded is evaluated again). One of a checkpoint never reaches here: training removes
    eval.json (``STALE_WHEN_TRAINING``)."""
    payload = read_json(run_dir / "eval.json")
    if payload is None or not valid_eval(payload):
        return None
    if payload.get("overrides") != _eval_overrides(evaluation):
        return None
    results = payload["results"]
    if [r["length"] for r in results] != evaluation["lengths"]:
        return None
    if any(r.get("examples") != evaluation["examples"] for r in results):
        return None
    return payload


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def _trained(run_dir: Path) -> bool:
    """Training finished and its weights are here. A run folder copied back from a GPU
    machine without its weights (too large to carry) holds final.json alone: it trains again
    (from its newest checkpoint if one came along) rather than failing in evaluation; so does a
    run whose final.json is damaged (resuming from its last checkpoint writes it again)."""
    if read_json(run_dir / "final.json") is None:
        return False
    try:
        find_weights(run_dir)
    except (CheckpointError, OSError):
        return False
    return True


def _trained_with_other_recipe(run_dir: Path, fingerprint: str) -> bool:
    """The folder holds a run (finished or not) of a recipe other than ``fingerprint``'s: its
    ``result.json`` says so, else the ``recipe.yaml`` the trainer wrote when it started."""
    record = read_json(run_dir / RESULT_FILE)
    if record is not None and isinstance(record.get("recipe_fingerprint"), str):
        return record["recipe_fingerprint"] != fingerprint
    # no record, or one without a fingerprint (damaged): the recipe the trainer wrote decides
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        return False
    try:
        return recipe_fingerprint(load_recipe(recipe_file)) != fingerprint
    except RecipeError:  # written by an older hybridkit, or damaged: not this recipe's run
        return True


def _set_aside(run_dir: Path) -> Path:
    """Rename a stale run folder to the first free ``<name>.stale-<k>`` (nothing is deleted)."""
    k = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.stale-{k}")).exists():
        k += 1
    run_dir.rename(aside)
    return aside


def run_slot(
    plan: StudyPlan,
    slot: Slot,
    out: Path,
    *,
    device: str,
    progress: bool,
    tag: str = "",
    deadline: float | None = None,
) -> str:
    """Bring one run to finished; returns ``done`` (already was), ``ran`` or ``waiting``.
    ``deadline`` (``time.time()``) goes to the trainer, which raises
    :class:`~hybridkit.errors.RunWouldNotFinish` when the run would train past it."""
    spec = plan.spec
    lr = slot.lr
    if lr is None:
        lr, scores = chosen_lr(plan, slot.variant, out)
        if lr is None:
            print(
                f"[study] {tag}waiting: {slot.describe()} needs the variant's LR choice "
                f"({len(scores)} of {len(plan.lrs[slot.variant])} LR runs at seed "
                f"{plan.first_seed} finished, some in another shard?); skipped"
            )
            return "waiting"
    run_dir = out / slot.variant / run_name(lr, slot.seed)
    fingerprint = plan.fingerprint(slot.variant, lr, slot.seed)
    evaluation = plan.evaluation(slot.variant, lr, slot.seed)
    if read_record(run_dir, spec, fingerprint, evaluation) is not None:
        return "done"
    recipe = plan.recipe(slot.variant, lr, slot.seed)
    if _trained_with_other_recipe(run_dir, fingerprint):
        aside = _set_aside(run_dir)
        print(
            f"[study] {tag}{slot.describe()}: {run_dir} was trained with another recipe than the "
            f"study's now; moved to {aside.name}, training again"
        )
    if not _trained(run_dir):
        print(f"[study] {tag}training {slot.variant} lr={lr:g} seed={slot.seed} -> {run_dir}")
        if recipe.train.device == "auto" and device != "auto":
            recipe.train.device = device
        Trainer(recipe, run_dir, resume="auto", progress=progress, deadline=deadline).fit()
    else:
        print(f"[study] {tag}evaluating {slot.variant} lr={lr:g} seed={slot.seed} ({run_dir})")
    t0 = time.time()
    with deterministic_kernels(recipe.train.deterministic):
        heldout = held_out_eval(run_dir, spec, device)
        # the study's settings, not the run folder's recipe.yaml: its eval section may be older
        payload = _cached_eval(run_dir, evaluation) or evaluate_run(
            run_dir,
            lengths=evaluation["lengths"],
            overrides=_eval_overrides(evaluation),
            device=device,
        )
    eval_time = time.time() - t0
    train_length = payload["train_length"]
    # on the meta device: sizes only (no weights, and no kernel plan for this machine's device)
    s = summarize(build_model(recipe, device="meta"), seq_len=train_length, device="meta")
    final = read_json(run_dir / "final.json") or {}
    record = {
        "variant": slot.variant,
        "seed": slot.seed,
        "lr": lr,
        "run": _rel(run_dir, out),
        "recipe_fingerprint": fingerprint,
        "select_examples": spec.select_examples,
        "lengths_requested": list(spec.lengths) if spec.lengths is not None else None,
        "evaluation": evaluation,
        "heldout": {k: v for k, v in heldout.items() if k != "select_examples"},
        "task": payload["task"],
        "train_length": train_length,
        "chance": payload["chance"],
        "results": payload["results"],
        "params": s.total_params,
        "state_bytes_per_seq": s.state_bytes_per_seq,
        "kv_bytes_per_token": s.kv_bytes_per_token,
        "steps": final.get("step"),
        "train_wall_time_s": float(final.get("wall_time_s", 0.0)),
        "eval_wall_time_s": eval_time,
    }
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(record, indent=1))
    return "ran"


def _run_slot_in_worker(
    study_path: str,
    overrides: Sequence[str],
    plugins: Sequence[str],
    slot: Slot,
    out: str,
    device: str,
    tag: str,
    threads: int,
    deadline: float | None = None,
) -> tuple[str, float]:
    """One run in a ``--jobs`` worker process: ``(run_slot's status, seconds)``, or
    ``("deferred", its projected seconds)`` when it stopped for the deadline."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.monotonic()
    plan = plan_study(study_path, overrides, plugins)
    try:
        status = run_slot(
            plan, slot, Path(out), device=device, progress=False, tag=tag, deadline=deadline
        )
    except RunWouldNotFinish as stop:
        print(f"[study] {tag}deferred: {slot.describe()}: {stop}")
        return "deferred", stop.projected_s
    return status, time.monotonic() - t0


def slot_status(plan: StudyPlan, slot: Slot, out: Path) -> tuple[str, str | None]:
    """``(status, run folder relative to out or None)`` without touching anything."""
    lr = slot.lr
    if lr is None:
        lr, scores = chosen_lr(plan, slot.variant, out)
        if lr is None:
            done = len(scores)
            return f"waiting for the LR choice ({done} of {len(plan.lrs[slot.variant])})", None
    run_dir = out / slot.variant / run_name(lr, slot.seed)
    rel = _rel(run_dir, out)
    fingerprint = plan.fingerprint(slot.variant, lr, slot.seed)
    evaluation = plan.evaluation(slot.variant, lr, slot.seed)
    if read_record(run_dir, plan.spec, fingerprint, evaluation) is not None:
        return "finished", rel
    if _trained_with_other_recipe(run_dir, fingerprint):
        return "trained with another recipe (re-run sets it aside and trains again)", rel
    if (run_dir / RESULT_FILE).is_file():
        return "evaluated with other settings (re-run re-evaluates)", rel
    if _trained(run_dir):
        return "trained, not evaluated", rel
    if (run_dir / "final.json").is_file():
        return "trained, weights missing or final.json damaged (re-run trains it again)", rel
    if (run_dir / "checkpoints" / "latest").is_file():
        return "started (resumes from its checkpoint)", rel
    return "not started", rel


# --- entry points ------------------------------------------------------------------------------
def run_study(
    study_path: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
    shard: tuple[int, int] | str | None = None,
    only: Sequence[str] | Mapping[str, set] | None = None,
    plugins: Sequence[str] = (),
    time_budget: float | None = None,
    jobs: int = 1,
) -> dict:
    """Train and evaluate this invocation's runs, then report; returns the results dict.

    ``shard`` is ``(i, n)`` or ``"i/n"``; ``only`` is ``--only`` strings or a parsed mapping.
    Finished runs are skipped; the report covers every finished run in ``out_dir``. The others
    start longest first, as far as the LR rule allows (:func:`start_order`).

    ``time_budget`` (seconds from the start of this call): no run is started that would end
    past it, judged by the slowest run of this call so far and by the longest finished run of
    its variant in ``out`` (the wall time its ``result.json`` recorded; a run with neither
    always starts). Made for machines lent with a hard time limit: a run cut off half-way keeps
    only its checkpoints, often too large to carry to the next machine, so it is better never
    begun; the runs left over are listed and a later call with the same selection picks them
    up. (A time recorded on a slower machine or with more runs beside it may defer a run that
    would have fit; a larger budget, or none, starts it.) A run that starts and is projected
    from its first timed steps to train past the budget stops there, with a checkpoint saved
    (the trainer's ``deadline``), and counts as deferred; its projected time then judges the
    runs after it.

    ``jobs`` > 1 trains that many runs at once, each in a worker process of its own
    (:mod:`hybridkit.study_jobs`: small models leave a GPU mostly idle)."""
    if jobs < 1:
        raise HybridkitError(f"--jobs must be at least 1, got {jobs}")
    plan = plan_study(study_path, overrides, plugins)
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if only is not None and not isinstance(only, Mapping):
        only = parse_only(only, plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = start_order(select_slots(plan.slots, only, shard), out)
    _check_memory(plan, {slot.variant for slot in todo}, device)
    # The report first describes what is finished for the study as it is now: a report left by
    # an earlier invocation may count runs this one will set aside (the study changed), and if
    # this invocation is killed, that old report must not stand as "complete".
    write_study_report(plan, out)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"[study] {len(todo)} of the study's {len(plan.slots)} runs selected{where}")
    counts = {"done": 0, "ran": 0, "waiting": 0, "deferred": 0}
    start, slowest = time.monotonic(), 0.0
    recorded = recorded_seconds(todo, out) if time_budget is not None else {}
    deadline = time.time() + time_budget if time_budget is not None else None
    if jobs > 1 and len(todo) > 1:
        counts = run_parallel(
            todo, out, study_path=study_path, overrides=overrides, plugins=plugins,
            device=device, jobs=jobs, time_budget=time_budget, start=start,
            status_of=lambda slot: slot_status(plan, slot, out)[0], worker=_run_slot_in_worker,
            expected=lambda status, slot: expected_seconds(status, recorded, slot),
            deadline=deadline,
        )  # fmt: skip
        todo = []
    for k, slot in enumerate(todo, 1):
        status = slot_status(plan, slot, out)[0] if time_budget is not None else ""
        before = expected_seconds(status, recorded, slot)
        late = deferral(k, len(todo), slot, start, slowest, time_budget, before)
        if late is not None and status != "finished" and not status.startswith("waiting"):
            print(late)
            counts["deferred"] += 1
            continue
        t0 = time.monotonic()
        try:
            status = run_slot(
                plan, slot, out, device=device, progress=progress, tag=f"{k}/{len(todo)} ",
                deadline=deadline,
            )  # fmt: skip
        except RunWouldNotFinish as stop:
            print(f"[study] {k}/{len(todo)} deferred: {slot.describe()}: {stop}")
            slowest = max(slowest, stop.projected_s)
            counts["deferred"] += 1
            continue
        if status == "ran":
            slowest = max(slowest, time.monotonic() - t0)
        counts[status] += 1
    print(
        f"[study] this invocation: {counts['ran']} run(s) finished now, {counts['done']} already "
        f"finished (skipped), {counts['waiting']} waiting for an LR choice"
        + (f", {counts['deferred']} deferred (time budget)" if counts["deferred"] else "")
    )
    return write_study_report(plan, out)


def report_study(
    study_path: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    plugins: Sequence[str] = (),
):
    """Merge whatever runs are finished in ``out_dir`` into the report; trains nothing."""
    out = Path(out_dir)
    if not out.is_dir():
        raise HybridkitError(
            f"--report: no study folder {out} (run `hybridkit study {study_path} -o {out}` first)"
        )
    return write_study_report(plan_study(study_path, overrides, plugins), out)


def list_study(
    study_path: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
    only: Sequence[str] | None = None,
    plugins: Sequence[str] = (),
) -> list[tuple[Slot, str, str | None]]:
    """The selected runs with their status, for planning shards; trains nothing."""
    plan = plan_study(study_path, overrides, plugins)
    parsed = parse_only(only, plan) if only else None
    out = Path(out_dir)
    return [(s, *slot_status(plan, s, out)) for s in select_slots(plan.slots, parsed, shard)]


# --- merging finished runs ---------------------------------------------------------------------
def collect(plan: StudyPlan, out: Path) -> tuple[dict, dict, list[dict]]:
    """Finished records per variant at its LR, the LR selection, and what is missing."""
    spec = plan.spec
    chosen_records: dict[str, list[dict]] = {}
    selection: dict[str, dict] = {}
    missing: list[dict] = []

    def miss(variant: str, seed: int, lr: float | None, why: str) -> None:
        run = None if lr is None else f"{variant}/{run_name(lr, seed)}"
        missing.append({"variant": variant, "seed": seed, "lr": lr, "run": run, "why": why})

    for v in plan.variants:
        lr, scores = chosen_lr(plan, v, out)
        selection[v] = {
            # each LR exactly (shortest round-trip text): "%g" made 1.2345678e-3 "0.00123457",
            # which the report's "(chosen)" test no longer matched (and two LRs could collide)
            "scores": {str(x): s for x, s in scores.items()},
            "chosen": lr,
            "seed": plan.first_seed,
        }
        if lr is None:
            for x in plan.lrs[v]:
                if x not in scores:
                    status, _ = slot_status(plan, Slot(v, plan.first_seed, x), out)
                    miss(v, plan.first_seed, x, status)
            for seed in spec.seeds[1:]:
                miss(v, seed, None, "waiting for the LR choice")
            continue
        records = []
        for seed in spec.seeds:
            run_dir = out / v / run_name(lr, seed)
            rec = read_record(
                run_dir, spec, plan.fingerprint(v, lr, seed), plan.evaluation(v, lr, seed)
            )
            if rec is None:
                miss(v, seed, lr, slot_status(plan, Slot(v, seed, lr), out)[0])
            else:
                records.append(rec)
        if records:
            chosen_records[v] = records
    return chosen_records, selection, missing


def summarize_variant(records: list[dict]) -> dict:
    """Mean, spread over seeds and binomial standard error per length and metric."""
    first = records[0]
    by_length = [{r["length"]: r for r in rec["results"]} for rec in records]
    # the lengths every seed was evaluated at (the same list unless a record was edited)
    lengths = [r["length"] for r in first["results"] if all(r["length"] in b for b in by_length)]
    chance = first["chance"]
    table = {}
    for length in lengths:
        rows = [b[length] for b in by_length]
        n = min(r["examples"] for r in rows)
        cell: dict = {"n": n, "tokens": rows[0]["tokens"]}
        for m in METRICS:
            vals = [r[m] for r in rows]
            stats = {**spread(vals), "per_seed": vals}
            if m == "scaled_acc":
                # scaled = (tok_acc - chance) / (1 - chance): its error is tok_acc's, rescaled.
                tok = statistics.fmean(r["tok_acc"] for r in rows)
                stats["stderr"] = binomial_stderr(tok, n) / (1.0 - chance)
            else:
                stats["stderr"] = binomial_stderr(stats["mean"], n)
            cell[m] = stats
        table[str(length)] = cell
    train = [rec["train_wall_time_s"] for rec in records]
    return {
        "lr": first["lr"],
        "seeds": [rec["seed"] for rec in records],
        "runs": [rec["run"] for rec in records],
        "task": first["task"],
        "train_length": first["train_length"],
        "chance": chance,
        "params": first["params"],
        "state_bytes_per_seq": first["state_bytes_per_seq"],
        "kv_bytes_per_token": first["kv_bytes_per_token"],
        "train_wall_time_s": sum(train),
        "eval_wall_time_s": sum(rec.get("eval_wall_time_s", 0.0) for rec in records),
        "by_length": table,
    }


def write_study_report(plan: StudyPlan, out: Path) -> dict:
    """results.json, report.md and the plots from the finished runs in ``out``."""
    spec = plan.spec
    records, selection, missing = collect(plan, out)
    variants = {v: summarize_variant(recs) for v, recs in records.items()}
    if spec.learned_at is not None:
        for summary in variants.values():
            k, n = learned_runs(summary, spec.select_metric, spec.learned_at)
            summary["learned"] = {"at": spec.learned_at, "runs": k, "of": n}
    states = [slot_status(plan, slot, out) for slot in plan.slots]
    statuses = [status for status, _ in states]
    # every finished run's time, the LR sweep's runs that were not chosen included
    finished_seconds = 0.0
    for status, rel in states:
        record = read_json(out / rel / RESULT_FILE) if status == "finished" and rel else None
        if record is not None:
            finished_seconds += float(record.get("train_wall_time_s", 0.0))
            finished_seconds += float(record.get("eval_wall_time_s", 0.0))
    report = {
        "study": spec.name or plan.path.stem,
        "study_file": plan.path.name,
        "base": spec.base,
        # the study's ``set`` with the command line's ``--set`` appended: what every run got
        "set": list(spec.set),
        "train_steps": sorted(
            {r["steps"] for recs in records.values() for r in recs if r.get("steps")}
        ),
        "seeds": list(spec.seeds),
        "lrs": spec.lrs,
        "metric": spec.select_metric,
        "selection_metric": spec.select_metric,
        "lr_rule": (
            f"LR chosen per variant by held-out {spec.select_metric} ({spec.select_examples} "
            f"examples at the training length) of the seed-{plan.first_seed} runs, ties to the "
            "smaller LR; the other seeds train at the chosen LR only"
            if any(len(x) > 1 for x in plan.lrs.values())
            else "one LR per variant, nothing to choose (held-out scores shown for reference)"
        ),
        "runs_total": len(plan.slots),
        "runs_finished": statuses.count("finished"),
        "complete": not missing,
        "lr_selection": selection,
        "variants": variants,
        "missing": missing,
        "sweep": spec.sweep.model_dump() if spec.sweep else None,
        "device_time_s": finished_seconds,
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=1))
    write_report(report, plan, out)
    return report


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.1f}"


def format_cell(stats: dict, seeds: int) -> str:
    """``mean ± stderr [min, max]`` in %, the range only when there are several seeds."""
    text = f"{_pct(stats['mean'])} ± {_pct(stats['stderr'])}"
    if seeds > 1:
        text += f" [{_pct(stats['min'])}, {_pct(stats['max'])}]"
    return text


def write_report(report: dict, plan: StudyPlan, out: Path) -> None:
    spec = plan.spec
    metric = report["metric"]
    variants = report["variants"]
    n_seeds = len(spec.seeds)
    # Variants may be trained on different tasks (a state-tracking study mixes parity and
    # arithmetic), so columns are the union of lengths and missing cells show "-".
    lengths = sorted({int(n) for v in variants.values() for n in v["by_length"]})
    train_lens = {v["train_length"] for v in variants.values()}
    train_len = next(iter(train_lens)) if len(train_lens) == 1 else None
    lines = [f"# Study: {report['study']}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lrs = spec.lrs or "from the recipe"
    lines += [
        f"Base recipe `{Path(spec.base).name}`; {len(plan.variants)} variants; seeds "
        f"{spec.seeds}; learning rates {lrs}. Learning-rate rule: {report['lr_rule']}. "
        + (
            f"Trained at length {train_len}."
            if train_len
            else "Training lengths differ per variant (column `train len`)."
            if len(train_lens) > 1
            else ""
        ),
        "",
        "Overrides of every run: "
        + (", ".join(f"`{o}`" for o in report["set"]) if report["set"] else "none")
        + (
            "; trained for " + " / ".join(map(str, report["train_steps"])) + " steps."
            if report["train_steps"]
            else "."
        ),
        "",
        f"Runs finished: {report['runs_finished']} of {report['runs_total']}"
        + ("." if report["complete"] else " -- this report is partial; see Missing runs."),
        "",
        f"## {metric} (%) by evaluation length",
        "",
        "Cells: mean over the finished seeds ± the binomial standard error sqrt(p(1-p)/n) of "
        "the test set (p the mean, n the evaluated answers per length)"
        + (" [min, max over seeds]" if n_seeds > 1 else "")
        + "; - = not evaluated for that variant.",
        "",
    ]
    header = (
        "| variant | seeds | params | state / seq | KV / token | lr | train len "
        "| train time / run | " + " | ".join(str(n) for n in lengths) + " | 2x / 1x |"
    )
    if variants:
        lines += [header, "|" + "---|" * (9 + len(lengths))]
    else:  # an empty table would have no length columns: say why there is nothing yet
        lines.append(
            "No variant has finished runs at a chosen LR yet (the LR sweep of the first seed "
            "must finish first): see the learning-rate selection and the missing runs below."
        )
    for name, v in variants.items():
        cells = []
        for n in lengths:
            cell = v["by_length"].get(str(n))
            cells.append("-" if cell is None else format_cell(cell[metric], len(v["seeds"])))
        one = v["by_length"].get(str(v["train_length"]))
        two = v["by_length"].get(str(2 * v["train_length"]))
        ratio = "-"
        if one and two and one[metric]["mean"]:
            ratio = f"{two[metric]['mean'] / one[metric]['mean']:.2f}"
        per_run = v["train_wall_time_s"] / len(v["seeds"])
        lines.append(
            f"| {name} | {len(v['seeds'])}/{n_seeds} | {human_count(v['params'])} | "
            f"{human_bytes(v['state_bytes_per_seq'])} | {human_bytes(v['kv_bytes_per_token'])} | "
            f"{v['lr']:g} | {v['train_length']} | {per_run:.0f} s | "
            + " | ".join(cells)
            + f" | {ratio} |"
        )
    if variants:
        lines += [
            "",
            "## scaled accuracy (%) by evaluation length",
            "",
            "0 = chance, 100 = perfect; mean over seeds"
            + (" [min, max]" if n_seeds > 1 else "")
            + ".",
            "",
            "| variant | " + " | ".join(str(n) for n in lengths) + " |",
            "|" + "---|" * (1 + len(lengths)),
        ]
        for name, v in variants.items():
            cells = []
            for n in lengths:
                cell = v["by_length"].get(str(n))
                if cell is None:
                    cells.append("-")
                    continue
                s = cell["scaled_acc"]
                text = _pct(s["mean"])
                if len(v["seeds"]) > 1:
                    text += f" [{_pct(s['min'])}, {_pct(s['max'])}]"
                cells.append(text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    images = ["![length generalisation](lengthgen.png)"] if variants else []
    if spec.sweep is not None and variants:
        lines += _sweep_section(report, plan, out, images)
    if spec.learned_at is not None and variants:
        lines += _learned_section(report, plan)
    lines += [
        "",
        f"## Learning-rate selection (held-out {metric} % of the seed-{plan.first_seed} runs)",
        "",
    ]
    for name, sel in report["lr_selection"].items():
        scores = ", ".join(
            f"lr {lr}: {_pct(s)}" + (" (chosen)" if float(lr) == sel["chosen"] else "")
            for lr, s in sel["scores"].items()
        )
        lines.append(f"- {name}: {scores or 'no finished run yet'}")
    if report["missing"]:
        lines += ["", "## Missing runs", ""]
        for m in report["missing"]:
            lr = "chosen lr" if m["lr"] is None else f"lr {m['lr']:g}"
            where = f" (`{m['run']}`)" if m["run"] else ""
            lines.append(f"- {m['variant']} seed {m['seed']} {lr}{where}: {m['why']}")
    lines += [
        "",
        f"Device time of the finished runs (training + evaluation): "
        f"{report['device_time_s']:.0f} s.",
        "",
        *images,
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))
    if not variants:
        return
    curves, errors, bands = {}, {}, {}
    for name, v in variants.items():
        pts = sorted((int(n), cell[metric]) for n, cell in v["by_length"].items())
        curves[name] = [(n, s["mean"]) for n, s in pts]
        errors[name] = [s["stderr"] for _, s in pts]
        bands[name] = [(s["min"], s["max"]) for _, s in pts]
    plot_lengthgen(
        curves,
        out / "lengthgen.png",
        train_length=train_len,
        metric=metric,
        title=f"{report['study']}: {metric} vs length\n{_legend_note(n_seeds)}",
        errors=errors,
        bands=bands if n_seeds > 1 else None,
    )


def _legend_note(n_seeds: int) -> str:
    note = "bars: ±1 binomial standard error"
    return note + ("; shaded: range over seeds" if n_seeds > 1 else "")


def learned_runs(variant: dict, metric: str, threshold: float) -> tuple[int, int]:
    """(runs whose ``metric`` at the training length reaches ``threshold``, finished runs) of
    one variant's summary (:func:`summarize_variant`)."""
    cell = variant["by_length"].get(str(variant["train_length"]))
    if cell is None:
        return 0, 0
    values = cell[metric]["per_seed"]
    return sum(v >= threshold for v in values), len(values)


def _learned_section(report: dict, plan: StudyPlan) -> list[str]:
    """How many runs of each variant learned the training length (``learned_at``).

    Why: where a run either crosses a plateau or stays at chance (MQAR's 1/D), a mean over
    seeds of 52 % can be one run at 100 % and one at 4 %; the count says which."""
    spec, metric = plan.spec, report["metric"]
    counts = {  # counted once, by write_study_report
        name: (v["learned"]["runs"], v["learned"]["of"]) for name, v in report["variants"].items()
    }
    lines = [
        "",
        f"## Runs that learned: {metric} >= {_pct(spec.learned_at)} % at the training length",
        "",
        "Learned / finished runs (seeds) of each variant at its chosen LR.",
        "",
    ]
    if spec.sweep is None:
        lines += ["| variant | learned |", "|---|---|"]
        lines += [f"| {name} | {k} / {n} |" for name, (k, n) in counts.items()]
        return lines
    sw = spec.sweep
    by_arm: dict[str, dict] = {}
    for name, count in counts.items():
        arm, value = plan.arm_of[name]
        by_arm.setdefault(arm, {})[value] = count
    lines += [
        f"| arm ({sw.label or sw.key}) | " + " | ".join(str(x) for x in sw.values) + " |",
        "|" + "---|" * (1 + len(sw.values)),
    ]
    for arm in spec.variants:
        row = by_arm.get(arm, {})
        cells = [f"{row[x][0]} / {row[x][1]}" if x in row else "-" for x in sw.values]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _sweep_section(report: dict, plan: StudyPlan, out: Path, images: list[str]) -> list[str]:
    """Metric at each variant's training length against the sweep key (table + plot)."""
    sw = plan.spec.sweep
    metric = report["metric"]
    label = sw.label or sw.key
    n_seeds = len(plan.spec.seeds)
    at_train: dict[str, dict] = {}
    for name, v in report["variants"].items():
        arm, value = plan.arm_of[name]
        cell = v["by_length"].get(str(v["train_length"]))
        if cell is not None:
            at_train.setdefault(arm, {})[value] = (cell[metric], len(v["seeds"]))
    lines = [
        "",
        f"## {metric} (%) at the training length against {label} (`{sw.key}`)",
        "",
        "| arm | " + " | ".join(str(x) for x in sw.values) + " |",
        "|" + "---|" * (1 + len(sw.values)),
    ]
    for arm in plan.spec.variants:
        row = at_train.get(arm, {})
        cells = [format_cell(*row[x]) if x in row else "-" for x in sw.values]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if all(isinstance(x, int | float) for x in sw.values):
        curves, errors, bands = {}, {}, {}
        for arm, row in at_train.items():
            xs = [x for x in sw.values if x in row]
            curves[arm] = [(x, row[x][0]["mean"]) for x in xs]
            errors[arm] = [row[x][0]["stderr"] for x in xs]
            bands[arm] = [(row[x][0]["min"], row[x][0]["max"]) for x in xs]
        plot_lengthgen(
            curves,
            out / "sweep.png",
            metric=metric,
            title=f"{report['study']}: {metric} at the training length\n{_legend_note(n_seeds)}",
            errors=errors,
            bands=bands if n_seeds > 1 else None,
            xlabel=label,
        )
        images.append(f"![{metric} against {label}](sweep.png)")
    return lines
