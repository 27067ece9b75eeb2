"""The ``hybridkit`` command line: one parser, one subcommand per job.

Every subcommand that reads a recipe accepts ``--set key=value`` overrides (repeatable). Errors
caused by input (a bad recipe key, a missing file, a foreign checkpoint) print one clear message
and exit with status 2; only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hybridkit.errors import HybridkitError, RecipeError
from hybridkit.plugins import env_plugins, load_plugins

SET_HELP = "override a recipe key, e.g. --set model.d_model=512 (repeatable)"
PLUGIN_HELP = (
    "import a module (mypkg.tasks) or a .py file that registers your own layer or task kinds, "
    "before the recipe is read (repeatable; also HYBRIDKIT_PLUGINS=a,b and `plugins:` in a "
    "recipe); a run directory records the plugins it was trained with"
)


def _add_set(p: argparse.ArgumentParser) -> None:
    """The options every subcommand shares: ``--set`` overrides and ``--plugin`` modules."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP
    )
    p.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE.py",
        help=PLUGIN_HELP,
    )


def _device(name: str, *, must_exist: bool = True) -> str:
    """``--device`` value -> a torch device string (clear error for unknown names).

    ``must_exist=False`` lets ``show`` report the backends of a GPU from a CPU-only machine.
    """
    import torch

    from hybridkit.runtime import resolve_device

    if not must_exist and name.startswith("cuda"):
        try:
            return str(torch.device(name))
        except RuntimeError:
            raise HybridkitError(
                f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N"
            ) from None
    return str(resolve_device(name))


def _int_arg(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]. A bad value becomes argparse's usage error
    (exit status 2, the option named) instead of a traceback from deep inside the command."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def _float_arg(low: float, *, inclusive: bool):
    """An argparse type: a finite float above ``low`` (or equal to it with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


def _output_dir(text: str, flag: str, *, prefix: bool = False) -> Path:
    """The directory ``flag`` names (with ``prefix``, the one its files go into), checked before
    any work is done: an empty value (which would write into the current directory) or a file
    where a directory must go is a clear error."""
    if not text.strip():
        raise HybridkitError(f"{flag} needs a directory path, got an empty string")
    path = Path(text)
    if prefix and (path.name in ("", ".", "..") or path.is_dir()):
        raise HybridkitError(
            f"{flag} {text}: names a directory, but {flag} is a file prefix (it writes "
            f"{flag.lstrip('-').upper()}.json and .md); pass e.g. {Path(text) / 'bench'}"
        )
    for part in (path.parent, *path.parent.parents) if prefix else (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise HybridkitError(
                    f"{flag} {text}: {part} exists and is not a directory; pass a directory path"
                )
            break
    return path


def _result_paths(prefix: Path) -> tuple[Path, Path]:
    """(PREFIX.json, PREFIX.md) of a ``bench --out PREFIX``: the name is kept whole (``r.yaml``
    -> ``r.yaml.json``; ``with_suffix`` dropped the extension, so ``--out notes.txt`` replaced
    an unrelated ``notes.md``), except that a name ending in ``.json`` or ``.md`` stands for
    that pair (``--out results.json`` -> ``results.json`` and ``results.md``)."""
    if prefix.suffix in (".json", ".md"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")


_positive_int = _int_arg(1)
_nonnegative_int = _int_arg(0)
_seed = _int_arg(0, 2**63 - 1)
MAX_SEQ_LEN = 2**32
MAX_BATCH = 1 << 16  # sequences decoded at once (generate --batch, bench decode --batch)


# --- show -------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hybridkit.build import build_model
    from hybridkit.rundir import load_source
    from hybridkit.summary import human_bytes, human_count, summarize

    recipe, _ = load_source(args.recipe, args.overrides, plugins=args.plugins)
    # Structure only (no weights are allocated), so a recipe of any size shows at once.
    model = build_model(recipe, device="meta")
    device = _device(args.device, must_exist=False)
    s = summarize(model, seq_len=args.seq_len, act_dtype=args.dtype, device=device)
    console = Console()
    title = recipe.name or Path(args.recipe).stem
    table = Table(
        title=f"{title}: {len(s.rows)} layers, d_model {recipe.model.d_model}, "
        f"vocab {recipe.model.vocab_size}"
    )
    for col, just in (
        ("#", "right"),
        ("template", "left"),
        ("layers", "left"),
        ("options", "left"),
        ("params", "right"),
    ):
        table.add_column(col, justify=just)
    for row in s.rows:
        table.add_row(str(row.index), row.template, row.kinds, row.options, human_count(row.params))
    console.print(table)
    totals = Table(title="parameters", show_header=True)
    totals.add_column("part")
    totals.add_column("params", justify="right")
    for kind, n in sorted(s.param_counts.items()):
        totals.add_row(kind, f"{n:,}")
    totals.add_row(
        "[bold]total[/bold]", f"[bold]{s.total_params:,}[/bold] ({human_count(s.total_params)})"
    )
    console.print(totals)
    mem = Table(
        title=f"inference memory per sequence (k/v and KV cache in {args.dtype}, states fp32)"
    )
    mem.add_column("what")
    mem.add_column("bytes", justify="right")
    mem.add_row("recurrent state (all layers)", human_bytes(s.state_bytes_per_seq))
    mem.add_row("KV cache per token (all layers)", human_bytes(s.kv_bytes_per_token))
    for length, n in s.kv_bytes_at.items():
        mem.add_row(f"KV cache at {length:,} tokens", human_bytes(n))
    for length, n in s.kv_bytes_at.items():
        if length == args.seq_len:
            mem.add_row(
                f"[bold]total at --seq-len {length:,} x batch {args.batch}[/bold]",
                human_bytes(args.batch * (n + s.state_bytes_per_seq)),
            )
    console.print(mem)
    if s.backends:
        import torch

        here = device == "cpu" or torch.cuda.is_available()
        title = f"kernel backends on this machine ({device})"
        if not here:
            title = f"kernel backends a CUDA GPU would run ({device}; this machine has none)"
        be = Table(title=title)
        be.add_column("op")
        be.add_column("backend")
        for op, name in s.backends.items():
            be.add_row(op, name)
        console.print(be)
    return 0


# --- generate ---------------------------------------------------------------------------------
def _parse_prompts(text: str, batch: int) -> list[list[int]]:
    try:
        prompts = [[int(t) for t in part.split(",") if t.strip()] for part in text.split(";")]
    except ValueError:
        raise HybridkitError(
            f"--prompt-ids must be comma-separated integers (';' between prompts), got {text!r}"
        ) from None
    if not prompts or any(not p for p in prompts):
        raise HybridkitError("--prompt-ids needs at least one token per prompt")
    if len({len(p) for p in prompts}) != 1:
        raise HybridkitError("all prompts in --prompt-ids must have the same length")
    if len(prompts) == 1:
        prompts = prompts * batch
    elif batch != 1:
        raise HybridkitError(
            f"--batch {batch} copies a single prompt; --prompt-ids gives {len(prompts)} "
            "prompts (their number is the batch): drop --batch or give one prompt"
        )
    return prompts


#: ``generate`` options of free sampling, and their defaults (None in the parser, so that
#: ``--task-examples``, which decodes its own prompts greedily, can refuse them when given)
_SAMPLING_DEFAULTS = {
    "prompt_ids": "1",
    "batch": 1,
    "max_new_tokens": 32,
    "temperature": 1.0,
    "top_k": None,
}


def _generate_options(args: argparse.Namespace) -> None:
    """Refuse options the chosen mode ignores (naming them), then fill in the defaults."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if args.task_examples:
        given = [flag(k) for k in _SAMPLING_DEFAULTS if getattr(args, k) is not None]
        if given:
            raise HybridkitError(
                f"--task-examples decodes the task's own prompts greedily; it does not take "
                f"{', '.join(given)} (drop them, or drop --task-examples to sample)"
            )
    elif args.length is not None:
        raise HybridkitError("--length applies to --task-examples only")
    for name, default in _SAMPLING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hybridkit.build import build_model
    from hybridkit.rundir import load_source
    from hybridkit.weights import load_weights

    _generate_options(args)
    recipe, weights = load_source(args.source, args.overrides, plugins=args.plugins)
    device = _device(args.device)
    model = build_model(recipe, seed=recipe.seed)
    if weights is not None:
        load_weights(model, weights)
    else:
        print(
            f"note: {args.source} is a recipe, so the weights are random (seed {recipe.seed})",
            file=sys.stderr,
        )
    model = model.to(device).eval()
    if args.task_examples:
        return _generate_task_examples(model, recipe, args, device)
    prompts = _parse_prompts(args.prompt_ids, args.batch)
    vocab = recipe.model.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise HybridkitError(f"--prompt-ids has ids outside [0, {vocab}): {bad[:5]}")
    _check_generation_memory(model, len(prompts), len(prompts[0]), args.max_new_tokens, device)
    ids = torch.tensor(prompts, device=device)
    out = model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        ssm_dtype=_ssm_dtype(args.ssm_dtype),
    )
    for i, row in enumerate(out.tolist()):
        prompt, new = row[: ids.shape[1]], row[ids.shape[1] :]
        print(f"[{i}] prompt {prompt} -> {new}")
    return 0


def _ssm_dtype(name: str):
    """``--ssm-dtype``'s torch dtype; None keeps the cache's default (float32)."""
    import torch

    return torch.bfloat16 if name == "bfloat16" else None


def _generate_task_examples(model, recipe, args: argparse.Namespace, device: str) -> int:
    """``generate --task-examples N``: the first N examples of the task's fixed test set at
    ``--length`` (default: the training length), each cut just before its first answer and
    continued by the model for as many tokens as that answer has; prints the prompt's tail, the
    expected answer, the model's and whether they match. Raw ids mean little on a task model;
    this shows what it does with the inputs it was trained on."""
    from hybridkit.footprint import check_prompt_examples
    from hybridkit.generation import DecodeRunner, Sampling
    from hybridkit.tasks.base import IGNORE_INDEX, MAX_LENGTH, check_model_vocab

    if recipe.task is None:
        raise HybridkitError(
            "--task-examples needs a recipe or run with a task section; "
            f"{args.source} has none (use --prompt-ids)"
        )
    task = recipe.task.build()
    check_model_vocab(task, recipe.model.vocab_size, recipe.task.kind, args.source)
    length = args.length or recipe.task.max_train_length()
    if length > MAX_LENGTH:  # as eval --lengths: the test set would not fit in any memory
        raise HybridkitError(f"--length {length} is too long; allowed: at most {MAX_LENGTH}")
    check_prompt_examples(recipe, length, device)
    try:
        batch = task.eval_set(length).select(slice(0, args.task_examples))
    except ValueError as err:
        raise HybridkitError(f"--length {length}: {err}") from None
    answers = {}  # example -> (first scored position, length of the first answer)
    for i in range(len(batch)):
        scored = (batch.targets[i] != IGNORE_INDEX).nonzero().flatten().tolist()
        if not scored:
            continue
        first = scored[0]
        run = 1  # the first answer: scored positions in a row from ``first``
        while run < len(scored) and scored[run] == first + run:
            run += 1
        answers[i] = (first, run)
    # one runner (one static cache, one captured step on a GPU) for every example: sized for
    # the longest prompt plus the longest answer (a task's sequences may be longer than
    # ``length``: BOS and separators), and a fresh prefill resets it in place
    longest = max((run for _, run in answers.values()), default=1)
    prompt = max((first + 1 for first, _ in answers.values()), default=1)
    runner = DecodeRunner(
        model, 1, prompt + longest, longest, Sampling(temperature=0.0),
        seed=args.seed, ssm_dtype=_ssm_dtype(args.ssm_dtype),
    )  # fmt: skip
    right = 0
    for i, (first, run) in answers.items():
        runner.prefill(batch.inputs[i : i + 1, : first + 1].to(device))
        runner.decode(run)
        got = runner.tokens[0, :run].tolist()
        want = batch.targets[i, first : first + run].tolist()
        right += got == want
        tail = batch.inputs[i, max(0, first - 11) : first + 1].tolist()
        print(
            f"[{i}] ...{tail} -> model {got}, answer {want} "
            f"{'(right)' if got == want else '(wrong)'}"
        )
    print(f"{right} of {len(answers)} first answers right (greedy, task length {length})")
    return 0


def _check_generation_memory(
    model,
    batch: int,
    prompt: int,
    new: int,
    device: str,
    *,
    flags: tuple[str, str, str] = ("--batch", "prompt", "--max-new-tokens"),
    copies: int = 1,
) -> None:
    """Refuse a ``generate`` (or ``bench decode``: other ``flags`` name the batch, prompt and
    new tokens) whose caches cannot fit in the free memory of ``device``, naming the flags,
    before anything is allocated (else: a crash or the OOM killer, minutes later); ``copies``
    caches of that size are allocated at once."""
    from hybridkit.generation import generation_bytes
    from hybridkit.runtime import free_memory_bytes
    from hybridkit.summary import human_bytes

    need = copies * generation_bytes(model, batch, prompt, new)
    free = free_memory_bytes(device)
    if free is not None and need > free:
        terms = [
            f"{f} {v}" if f.startswith("--") else f"{v} {f}"
            for f, v in zip(flags, (batch, prompt, new))
        ]
        lower = [f for f in flags if f.startswith("--")]
        lower = ", ".join(lower[:-1]) + " or " + lower[-1] if len(lower) > 1 else lower[0]
        raise HybridkitError(
            f"{terms[0]} x ({terms[1]} + {terms[2]}) tokens needs about "
            f"{human_bytes(need)} for the caches, logits and tokens, but {device} has "
            f"{human_bytes(free)} free; lower {lower}"
        )


# --- check ------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hybridkit.check import consistency_check
    from hybridkit.rundir import load_source

    recipe, _ = load_source(args.recipe, args.overrides, plugins=args.plugins)
    report = consistency_check(
        recipe.model,
        batch=args.batch,
        prefill=args.prefill,
        steps=args.steps,
        seed=args.seed,
        tolerance=args.tol,
    )
    first, second, steps = report.lengths
    table = Table(
        title=f"decode vs full forward (float64): prefill {first} + continued prefill {second} "
        f"+ {steps} steps"
    )
    for col in ("#", "layers", "max |diff|", "relative", "ok"):
        table.add_column(col, justify="right" if col != "layers" else "left")
    for e in report.layers:
        table.add_row(
            str(e.index),
            e.kinds,
            f"{e.max_abs:.2e}",
            f"{e.rel:.2e}",
            "yes" if e.rel <= report.tolerance else "[red]NO[/red]",
        )
    console = Console()
    console.print(table)
    verdict = "[green]PASS[/green]" if report.ok else "[red]FAIL[/red]"
    console.print(
        f"logits relative error {report.logits_rel:.2e} "
        f"(tolerance {report.tolerance:.0e}): {verdict}"
    )
    return 0 if report.ok else 1


# --- train / eval / study ---------------------------------------------------------------------
def _int_list(text: str, flag: str, high: int, too: str = "too large") -> list[int]:
    """A comma-separated list of positive integers up to ``high`` (clean errors)."""
    parts = [t.strip() for t in text.split(",")]
    if parts == [""]:
        raise HybridkitError(f"{flag} needs at least one positive value")
    # an empty part ("1,,2") was skipped, a repeated value measured twice: both refused
    if not all(t.isascii() and t.isdigit() and len(t) <= 18 for t in parts):
        raise HybridkitError(
            f"{flag} must be comma-separated positive integers (no empty parts), got {text!r}"
        )
    values = [int(t) for t in parts]
    if min(values) <= 0:
        raise HybridkitError(f"{flag}: {min(values)} is not allowed; every value must be >= 1")
    if max(values) > high:
        raise HybridkitError(f"{flag}: {max(values)} is {too}; allowed: at most {high}")
    if len(set(values)) != len(values):
        raise HybridkitError(f"{flag} lists a value twice, got {text!r}")
    return values


def _lengths(text: str | None) -> list[int] | None:
    from hybridkit.tasks.base import MAX_LENGTH

    if text is None:
        return None
    return _int_list(text, "--lengths", MAX_LENGTH, "too long")


_TASK_HINT = (
    "model-only recipes (tiny_hybrid, hybrid_m, ...) cannot be trained on their own: start from "
    "a task recipe such as hybridkit/recipes/induction_tiny.yaml, or add a task section"
)


def cmd_train(args: argparse.Namespace) -> int:
    from hybridkit.recipe import load_recipe
    from hybridkit.train import distributed as dist_utils
    from hybridkit.train.trainer import Trainer

    recipe = load_recipe(args.recipe, args.overrides, plugins=args.plugins)
    _output_dir(args.out, "-o/--out")
    resume = None if args.resume == "none" else args.resume
    try:
        trainer = Trainer(recipe, args.out, resume=resume, progress=not args.no_progress)
    except RecipeError as err:  # the trainer's checks know no file name: give them this one
        if err.source != "<recipe>":
            raise
        hint = [("", _TASK_HINT)] if any(k == "task" for k, _ in err.problems) else []
        raise RecipeError(args.recipe, err.problems + hint) from None
    try:
        out = trainer.fit()
    finally:
        dist_utils.shutdown(trainer.dist)
    if not trainer.dist.is_main:
        return 0  # under torchrun only rank 0 reports
    if "final_eval" in out:
        for r in out["final_eval"]:
            print(
                f"eval at length {r['length']}: ex_match {100 * r['ex_match']:.1f}%  "
                f"tok_acc {100 * r['tok_acc']:.1f}%  scaled {100 * r['scaled_acc']:.1f}%"
            )
    print(f"run directory: {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hybridkit.eval.report import evaluate_run, markdown_table

    def show(r: dict) -> None:
        print(
            f"length {r['length']:>6}: ex_match {100 * r['ex_match']:5.1f}%  "
            f"tok_acc {100 * r['tok_acc']:5.1f}%"
        )

    if args.out is not None:
        _output_dir(args.out, "--out")
    payload = evaluate_run(
        args.run,
        lengths=_lengths(args.lengths),
        overrides=args.overrides,
        device=args.device,
        out_dir=args.out,
        on_length=show,
    )
    print(markdown_table(payload["results"], payload["train_length"]))
    print(f"wrote eval.json, eval.md and eval.png to {args.out or args.run}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from hybridkit.study import list_study, parse_shard, report_study, run_study

    out = str(Path("runs") / Path(args.study).stem) if args.out is None else args.out
    _output_dir(out, "-o/--out")
    from hybridkit.train.trainer import training_run_at

    owner = training_run_at(Path(out))
    if owner is not None:
        raise HybridkitError(
            f"-o/--out {out}: {owner} is the folder of a training run; a study needs its own "
            "folder (pass a new one)"
        )
    if args.report and (args.shard is not None or args.only or args.list):
        raise HybridkitError(
            "--report merges every finished run into the report and trains nothing; "
            "it takes no --shard, --only or --list"
        )
    if args.time_budget is not None and not args.time_budget > 0:
        raise HybridkitError(
            f"--time-budget must be a positive number of seconds, got {args.time_budget:g}"
        )
    if args.jobs < 1:  # checked for --list too, so a listed command line also runs
        raise HybridkitError(f"--jobs must be at least 1, got {args.jobs}")
    # `--shard ""` (an empty shell variable) is an error, not the whole study
    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.list:
        rows = list_study(
            args.study,
            out,
            overrides=args.overrides,
            shard=shard,
            only=args.only,
            plugins=args.plugins,
        )
        for slot, status, run in rows:
            print(f"{slot.describe():<48} {status}" + (f"  [{run}]" if run else ""))
        print(f"{len(rows)} run(s) selected; study folder {out}")
        return 0
    if args.report:
        report = report_study(args.study, out, overrides=args.overrides, plugins=args.plugins)
    else:
        report = run_study(
            args.study,
            out,
            overrides=args.overrides,
            device=args.device,
            progress=not args.no_progress,
            shard=shard,
            only=args.only or None,
            plugins=args.plugins,
            time_budget=args.time_budget,
            jobs=args.jobs,
        )
    if report["complete"]:
        print((Path(out) / "report.md").read_text())
    else:
        print(
            f"{report['runs_finished']} of {report['runs_total']} runs finished; "
            f"{len(report['missing'])} missing (listed in the report)"
        )
    print(f"report: {Path(out) / 'report.md'}; results: {Path(out) / 'results.json'}")
    return 0


# --- parser -----------------------------------------------------------------------------------
def cmd_bench_train(args: argparse.Namespace) -> int:
    """One process, or every rank of ``torchrun --nproc-per-node N -m hybridkit bench train``;
    only rank 0 prints and writes (:mod:`hybridkit.train.bench_parallel`)."""
    import json

    from hybridkit.rundir import load_source
    from hybridkit.train import distributed as dist_utils
    from hybridkit.train.bench_parallel import bench_recipe, parallel_markdown

    recipe, _ = load_source(args.recipe, args.overrides, plugins=args.plugins)
    if args.out is not None:
        _output_dir(args.out, "--out", prefix=True)
    if args.device != "auto":
        _device(args.device)  # a clear error for a bad name before any process group exists
    info, job, rank0 = bench_recipe(
        recipe,
        device=args.device,
        batch=args.batch,
        seq_len=args.seq_len or (recipe.task.max_train_length() if recipe.task else 2048),
        steps=args.steps,
        warmup=args.warmup,
        compile_model=args.compile or recipe.train.compile,
        profile=not args.no_profile,
        top_kernels=args.top_kernels,
    )
    if info.is_main:
        text = parallel_markdown(job, rank0)
        print(text)
        if args.out:
            out_json, out_md = _result_paths(Path(args.out))
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(job.to_dict(), indent=1))
            out_md.write_text(text)
    dist_utils.shutdown(info)
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    import json

    import torch

    from hybridkit.build import build_model
    from hybridkit.decode_bench import bench_decode, markdown
    from hybridkit.rundir import load_source

    recipe, _ = load_source(args.recipe, args.overrides, plugins=args.plugins)
    device = torch.device(_device(args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(recipe, seed=0, dtype=dtype, device=device)
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        _output_dir(args.out, "--out", prefix=True)
    batches = _int_list(args.batch, "--batch", MAX_BATCH)
    # the largest batch's caches (and the profiled tokens), then the two drift caches: refused
    # before anything is allocated, like generate's
    extra = 8 if args.profile else 0
    flags = ("--batch", "--prompt", "--new")
    _check_generation_memory(
        model, max(batches), args.prompt, args.new + extra, device, flags=flags
    )
    if args.drift_tokens:
        flags = ("batch", "--prompt", "--drift-tokens")
        _check_generation_memory(
            model, 1, args.prompt, args.drift_tokens + 1, device, flags=flags, copies=2
        )

    def write(result) -> None:  # after every batch size: a cut-off run keeps what it measured
        if out is not None:
            out_json, out_md = _result_paths(out)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(result.to_dict(), indent=1))
            out_md.write_text(markdown(result))

    result = bench_decode(
        model,
        batches=batches,
        prompt=args.prompt,
        new=args.new,
        ssm_dtype=_ssm_dtype(args.ssm_dtype),
        drift_tokens=args.drift_tokens,
        use_graph=False if args.no_graph else None,
        compile_step=args.compile,
        layer_step=args.layer,
        profile_tokens=8 if args.profile else 0,
        on_row=write,
    )
    write(result)
    print(markdown(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridkit",
        description="Compose, train and study hybrid Mamba-3 / attention language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_show(sub)
    _add_generate(sub)
    _add_check(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_study(sub)
    _add_bench(sub)
    return parser


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="validate a recipe and print its layers, parameters and memory")
    p.add_argument("recipe", help="recipe YAML file or run directory")
    p.add_argument(
        "--seq-len",
        type=_int_arg(1, MAX_SEQ_LEN),
        default=2048,
        help="sequence length for KV-cache bytes (default 2048)",
    )
    p.add_argument(
        "--batch", type=_positive_int, default=1, help="batch size for the memory total (default 1)"
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="activation dtype of k/v states and KV cache (default bfloat16)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="device whose kernel backends to report: auto|cpu|cuda (default auto)",
    )
    _add_set(p)
    p.set_defaults(func=cmd_show)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample tokens from a trained run or a randomly initialised recipe"
    )
    p.add_argument(
        "source", help="run directory (recipe.yaml + weights) or recipe YAML (random weights)"
    )
    p.add_argument(
        "--prompt-ids",
        default=None,
        help="comma-separated token ids; ';' separates prompts of equal length (default '1')",
    )
    p.add_argument(
        "--batch",
        type=_int_arg(1, MAX_BATCH),
        default=None,
        help="copies of a single prompt to sample in parallel (default 1)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_int_arg(0, MAX_SEQ_LEN),
        default=None,
        help="tokens to sample (default 32)",
    )
    task_help = "instead of --prompt-ids: the task's first N test examples, cut before their "
    task_help += "first answer, continued greedily and compared with it"
    p.add_argument("--task-examples", type=_positive_int, metavar="N", help=task_help)
    length_help = "--task-examples at this length (default: the task's training length)"
    p.add_argument("--length", type=_int_arg(1, MAX_SEQ_LEN), help=length_help)
    p.add_argument(
        "--temperature",
        type=_float_arg(0.0, inclusive=True),
        default=None,
        help="0 = greedy (default 1.0)",
    )
    p.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="sample among the k most likely tokens (default: all)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--ssm-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="Mamba-3 state storage while decoding (default float32; bfloat16 halves its bytes, "
        "`bench decode --drift-tokens` measures its drift)",
    )
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    _add_set(p)
    p.set_defaults(func=cmd_generate)


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="check that prefill + token-by-token decode reproduces the full forward (float64)",
    )
    p.add_argument("recipe", help="recipe YAML file or run directory")
    p.add_argument("--batch", type=_int_arg(1, MAX_BATCH), default=2, help="sequences (default 2)")
    p.add_argument(
        "--prefill",
        type=_int_arg(1, MAX_SEQ_LEN),
        default=None,
        help="tokens of the first prefill (default: the smallest Mamba-3 chunk + 3, so that the "
        "prefill ends inside a chunk); a continued prefill of chunk/2 + 1 tokens follows",
    )
    p.add_argument(
        "--steps",
        type=_int_arg(0, MAX_SEQ_LEN),
        default=6,
        help="decode steps after the prefills (default 6)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed for weights and ids (default 0)")
    p.add_argument(
        "--tol",
        type=_float_arg(0.0, inclusive=False),
        default=1e-8,
        help="max relative error per layer (default 1e-8)",
    )
    _add_set(p)
    p.set_defaults(func=cmd_check)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe (task + model) into a run directory")
    p.add_argument("recipe", help="recipe YAML file with model, task and train sections")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="run directory (created; holds checkpoints, metrics.jsonl)",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (newest checkpoint in --out, the default), none, or a checkpoint directory",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    _add_set(p)
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a trained run at many lengths (eval.json, eval.md, eval.png)"
    )
    p.add_argument("run", help="run directory written by `hybridkit train`")
    p.add_argument(
        "--lengths",
        default=None,
        help="comma-separated lengths (default: recipe eval.lengths or the task's eval_lengths)",
    )
    p.add_argument(
        "--out", default=None, help="where to write the results (default: the run directory)"
    )
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    _add_set(p)
    p.set_defaults(func=cmd_eval)


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study", help="train and compare variants of a recipe (report.md + lengthgen.png)"
    )
    p.add_argument("study", help="study YAML: base recipe, variants, seeds, learning rates")
    p.add_argument("-o", "--out", default=None, help="output directory (default runs/<study name>)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only every N-th run of the study starting at the I-th (0 <= I < N), "
        "e.g. one shard per GPU call; finished runs are skipped either way",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="run only these runs: variant=NAME[,NAME...] and/or seed=S[,S...], "
        "e.g. --only variant=mamba3,seed=1,2 (repeatable; applied before --shard)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train up to N runs at once in N worker processes (default 1): the small "
        "models of the synthetic studies leave a GPU mostly idle, so several runs share it",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no run that would end more than SECONDS after this command began, judged "
        "by its slowest run so far and by the recorded times of the finished runs of the same "
        "variant; a run projected past it from its first steps stops with a checkpoint "
        "(for machines with a hard time limit; the rest is listed)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: merge the finished runs in --out into report.md, results.json "
        "and the plots, listing the missing runs",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="train nothing: print the selected runs and their status (finished, waiting, ...)",
    )
    _add_set(p)
    p.set_defaults(func=cmd_study)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure speed: `bench train RECIPE`, `bench decode RECIPE`")
    what = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    p = what.add_parser(
        "train",
        help="training throughput: tokens/s, TFLOP/s, MFU, peak memory, a per-kernel breakdown",
    )
    p.add_argument("recipe", help="recipe YAML file or run directory")
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        help="sequences per step on each rank (default: train.batch_size, split over the "
        "ranks under torchrun)",
    )
    p.add_argument(
        "--seq-len",
        type=_int_arg(1, MAX_SEQ_LEN),
        default=None,
        help="tokens per sequence (default: the recipe task's longest training length; 2048 "
        "for a model-only recipe)",
    )
    p.add_argument("--steps", type=_positive_int, default=10, help="timed steps (default 10)")
    p.add_argument(
        "--warmup", type=_nonnegative_int, default=3, help="untimed steps first (default 3)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled breakdown step")
    p.add_argument(
        "--top-kernels",
        type=_positive_int,
        default=None,
        help="longest kernels of the profiled step kept by name in the JSON (default 25; the "
        "report shows 15)",
    )
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default: train.device)")
    p.add_argument(
        "--out", default=None, help="write OUT.json and OUT.md as well (OUT may end in .json)"
    )
    _add_set(p)
    p.set_defaults(func=cmd_bench_train)
    _add_bench_decode(what)


def _add_bench_decode(what) -> None:
    p = what.add_parser(
        "decode",
        help="generation throughput per batch size against the byte floor (weights + states + KV)",
    )
    p.add_argument("recipe", help="recipe YAML file or run directory (random weights)")
    p.add_argument("--batch", default="1,16,128", help="batch sizes (default 1,16,128)")
    p.add_argument(
        "--prompt", type=_int_arg(1, MAX_SEQ_LEN), default=512, help="prompt tokens (default 512)"
    )
    p.add_argument(
        "--new", type=_int_arg(1, MAX_SEQ_LEN), default=256, help="new tokens (default 256)"
    )
    p.add_argument(
        "--ssm-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="Mamba-3 state storage (default float32; bfloat16 halves its bytes)",
    )
    p.add_argument(
        "--drift-tokens",
        type=_int_arg(0, MAX_SEQ_LEN),
        default=0,
        help="also measure the bf16 state's drift from fp32 over this many tokens (default 0)",
    )
    p.add_argument("--no-graph", action="store_true", help="run the decode step eagerly")
    p.add_argument(
        "--layer",
        action="store_true",
        help="also time the first Mamba-3 layer's step alone per batch size, against its byte "
        "floor (in a CUDA graph on a GPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the step inside the graph (experimental)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile 8 more tokens per batch size: device time and kernels per token by "
        "kernel category, and the time between kernels",
    )
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument(
        "--out",
        default=None,
        help="write OUT.json and OUT.md after every batch (OUT may end in .json)",
    )
    _add_set(p)
    p.set_defaults(func=cmd_bench_decode)


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if _torchrun_rank():
        from hybridkit.train.distributed import exit_rank

        exit_rank(code)  # why not a plain return: exit_rank's docstring
    return code


def _torchrun_rank() -> bool:
    """Whether this process is a rank under torchrun (read from the environment, so that a
    command that never needed torch does not import it to ask)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and os.environ.get("WORLD_SIZE", "1") != "1"


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    kernels_env = os.environ.get("HYBRIDKIT_KERNELS")
    if kernels_env:
        # a bad kernel setting is otherwise found at the first launch, deep inside a compiled
        # graph's trace (a Dynamo traceback); read it here, where it can be said plainly
        from hybridkit.kernels.config import parse_env

        try:
            parse_env(kernels_env)
        except ValueError as err:
            print(f"hybridkit {args.command}: error: {err}", file=sys.stderr)
            return 2
    try:
        # Imported before anything is read, so that every recipe (and a run directory's, which
        # names its own plugins too) can use the kinds they register.
        load_plugins([*env_plugins(), *args.plugins])
        return args.func(args)
    except HybridkitError as err:
        print(f"hybridkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.filename is None:
            raise
        # a path the command must write or read that the file system refuses (a folder where a
        # file goes, a file where a folder goes, a read-only or missing place): checked up
        # front where it can be, otherwise caught here so it reads as an error, not a traceback
        where = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
        reason = err.strerror or type(err).__name__
        print(f"hybridkit {args.command}: error: {where}: {reason}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:
        if not _out_of_memory(err):
            raise
        # commands check what they can estimate before allocating (generate, bench decode);
        # the rest (bench train, check, eval at huge sizes) end here instead of in a traceback
        print(
            f"hybridkit {args.command}: error: {_out_of_memory_message(err, args)}", file=sys.stderr
        )
        return 2


#: options whose values set how much memory a command needs, as argparse names them
_SIZE_OPTIONS = ("batch", "seq_len", "prefill", "prompt", "new", "max_new_tokens",
                 "drift_tokens", "length", "lengths", "task_examples")  # fmt: skip


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (torch's CUDA or CPU allocator, numpy)."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return any(s in text for s in ("out of memory", "can't allocate memory", "not enough memory"))


def _out_of_memory_message(err: BaseException, args: argparse.Namespace) -> str:
    """The allocation failure's first line and the size options this command was given."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    # check's --steps are decode steps, each growing the caches it compares
    check = getattr(args, "command", None) == "check"
    names = (*_SIZE_OPTIONS, "steps") if check else _SIZE_OPTIONS
    given = [
        f"--{name.replace('_', '-')} {getattr(args, name)}"
        for name in names
        if getattr(args, name, None) not in (None, "", [])
    ]
    sizes = f"; lower one of: {', '.join(given)}" if given else ""
    return f"out of memory ({first[:200]}){sizes}"


if __name__ == "__main__":
    sys.exit(main())
