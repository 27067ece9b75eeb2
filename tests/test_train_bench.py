"""``hybridkit.train.bench``: the FLOP formula, real optimizer steps, the report (CPU, tiny)."""

from __future__ import annotations

import pytest
import torch

from hybridkit import build_model
from hybridkit.recipe import load_recipe
from hybridkit.recipe_sections import TrainSpec
from hybridkit.train.bench import bench_train, categorize, flops_per_token, markdown
from hybridkit.train.optim import build_optimizer
from tests.helpers import tiny_recipe


def test_flops_per_token_counts_matmul_weights_and_attention():
    recipe = tiny_recipe("m a", d_model=16, vocab=64)
    model = build_model(recipe, seed=0)
    count = flops_per_token(model, seq_len=32)
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2)
    weights -= model.embedding.weight.numel()  # a lookup, no FLOPs...
    if model.spec.tie_embeddings:
        weights += model.embedding.weight.numel()  # ...but the tied head multiplies
    attn = model.blocks[1].mixer
    expected = 6 * weights + 12 * attn.n_heads * attn.head_dim * 32
    assert count.per_token == expected
    assert "6 x" in count.formula and "attention" in count.formula


def test_bench_runs_real_optimizer_steps_and_reports():
    recipe = tiny_recipe("m a", d_model=16, vocab=64)
    model = build_model(recipe, seed=0)
    optimizer = build_optimizer(model, TrainSpec(lr=1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    result = bench_train(model, optimizer, batch=2, seq_len=16, steps=3, warmup=1)
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert moved, "the benchmark must take real optimizer steps"
    assert result.tokens_per_s > 0 and result.step_ms > 0 and len(result.step_ms_all) == 3
    assert result.host_ms_all is None  # the host runs the kernels itself on a CPU
    assert result.mfu_measured > 0 and result.mfu_datasheet is None  # no GPU here
    assert result.breakdown_ms and all(v >= 0 for v in result.breakdown_ms.values())
    text = markdown(result)
    assert "tokens/s" in text and "FLOPs per token" in text and "one profiled step" in text
    assert result.top_kernels and "longest kernels of that step" in text


def test_compiled_bench_counts_graphs_and_breaks(monkeypatch):
    """A compiled run reports Dynamo's graphs and graph breaks (``aot_eager`` here: the CPU
    needs no C++ toolchain for it): the tiny hybrid compiles whole, and a forward that breaks
    on purpose is counted, with its reason, in the JSON and the report."""
    import hybridkit.train.bench as bench

    monkeypatch.setattr(
        bench, "compile_module", lambda m, mode: torch.compile(m, backend="aot_eager")
    )
    model = build_model(tiny_recipe("m a", d_model=16, vocab=64), seed=0)
    optimizer = build_optimizer(model, TrainSpec(lr=1e-3))
    run = dict(batch=2, seq_len=16, steps=2, warmup=2, compile_model=True, profile=False)
    whole = bench_train(model, optimizer, **run).compile_stats
    assert whole["graph_breaks"] == 0 and whole["graphs_warmup"] >= 1
    assert whole["graphs_timed"] == 0
    assert whole["cudagraph_skips"] == 0  # default mode: no CUDA graphs asked for, none skipped

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids, targets=None):
            loss = self.inner(ids, targets=targets)
            torch._dynamo.graph_break()
            return loss * 1.0

    result = bench_train(model, optimizer, module=Broken(), **run)
    assert result.compile_stats["graph_breaks"] >= 1
    assert result.compile_stats["graphs_warmup"] >= 2
    text = markdown(result)
    assert "graph break(s), no recompilation." in text and "- graph break:" in text
    assert "CUDA graphs" not in text  # only reduce-overhead reports them
    result.compile_mode, result.compile_stats["cudagraph_skips"] = "reduce-overhead", 2
    assert "CUDA graphs: 2 compiled graph(s) skipped them" in markdown(result)


def test_kernel_names_fall_into_categories():
    assert categorize("_bwd_x_kernel") == "mamba3 scan"
    assert categorize("flash_fwd_kernel") == "attention"
    assert categorize("multi_tensor_apply_kernel") == "optimizer"
    assert categorize("sm90_xmma_gemm_bf16") == "matmuls (projections, MLP, head)"
    assert categorize("aten::add") == "other"
    assert categorize("_norm_bwd_kernel") == "norms"  # not the scan's "_bwd_"
    assert categorize("triton_poi_fused_add_mul_silu_3") == "element-wise (Inductor)"
    assert categorize("void at::native::direct_copy_kernel_cuda") == "copies and casts"
    # kernel families whose names hold the scan's "_bwd_"
    assert categorize("_swiglu_bwd_kernel") == "SwiGLU"
    assert categorize("_ce_bwd_kernel") == "loss"
    fa4_bwd = "kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90"
    assert categorize(fa4_bwd) == "attention"


def test_gpu_breakdown_counts_each_kernel_once():
    """On a GPU only kernel events count: not the CPU op that launched a kernel (it reports the
    kernel's time as its own device time) and not a ``record_function`` range's GPU span (a
    user annotation: torch.compile's compiled region or the optimizer step covers many
    kernels). Before user annotations were left out, a compiled step's breakdown summed to
    about twice the step."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from hybridkit.profiling import sum_events
    from hybridkit.train.bench import CATEGORIES

    def event(key, us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(
            key=key, self_device_time_total=us, self_cpu_time_total=1.0, count=1,
            device_type=device, is_user_annotation=annotation,
        )  # fmt: skip

    events = [
        event("sm90_xmma_gemm_bf16", 300.0),
        event("aten::mm", 300.0, device=DeviceType.CPU),
        event("_bwd_x_kernel", 200.0),
        event("Torch-Compiled Region: 0/0", 500.0, annotation=True),
        event("Optimizer.step#AdamW.step", 100.0, annotation=True),
        event("multi_tensor_apply_kernel", 100.0),
    ]
    prof = sum_events(events, torch.device("cuda"), CATEGORIES)
    assert prof.ms == {
        "matmuls (projections, MLP, head)": 0.3,
        "mamba3 scan": 0.2,
        "optimizer": 0.1,
    }
    # the longest kernels by name, summed over their launches, longest first
    events.append(event("_bwd_x_kernel", 150.0))
    prof = sum_events(events, torch.device("cuda"), CATEGORIES)
    assert [(k["name"], k["count"]) for k in prof.top] == [
        ("_bwd_x_kernel", 2),
        ("sm90_xmma_gemm_bf16", 1),
        ("multi_tensor_apply_kernel", 1),
    ]
    assert prof.top[0]["ms"] == pytest.approx(0.35) and prof.top[0]["category"] == "mamba3 scan"
    short = sum_events(events, torch.device("cuda"), CATEGORIES, top=2)
    assert [k["name"] for k in short.top] == ["_bwd_x_kernel", "sm90_xmma_gemm_bf16"]
    cpu = sum_events(events, torch.device("cpu"), CATEGORIES)
    assert sum(cpu.count.values()) == len(events)  # ops' own time on a CPU, each counted


def test_top_kernels_table_cuts_long_names_and_escapes_bars():
    from hybridkit.profiling import top_kernels_table

    top = [
        {"name": "triton_per_fused_" + "add_mul_" * 20, "category": "c", "ms": 3.0, "count": 4},
        {"name": "a|b", "category": "c", "ms": 1.0, "count": 1},
    ]
    lines = top_kernels_table(top, 8.0)
    assert lines[2].startswith("| `triton_per_fused_add_mul_")
    assert lines[2].endswith("...` | c | 3 | 4 | 38% |")
    assert lines[3] == "| `a\\|b` | c | 1 | 1 | 12% |"


def test_cli_bench_train_writes_json_and_markdown(tmp_path, capsys):
    from hybridkit.cli import main

    out = tmp_path / "bench" / "tiny"
    argv = ["bench", "train", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", "2"]
    argv += ["--seq-len", "32", "--steps", "2", "--warmup", "1", "--out", str(out)]
    assert main([*argv, "--top-kernels", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    data = __import__("json").loads(out.with_suffix(".json").read_text())
    assert data["batch"] == 2 and data["seq_len"] == 32 and data["tokens_per_s"] > 0
    assert len(data["rank0"]["top_kernels"]) == 3  # the profiled step's ops, by name
    assert out.with_suffix(".md").is_file()
    with pytest.raises(SystemExit):  # a count below 1 is a usage error
        main([*argv, "--top-kernels", "0"])


def test_bench_out_keeps_the_whole_name(tmp_path):
    """``--out`` is a prefix kept whole: ``with_suffix`` dropped any extension, so ``--out
    notes.txt`` replaced an unrelated ``notes.md``; a name ending in .json / .md stands for the
    pair it names."""
    from hybridkit.cli import _result_paths, main

    (tmp_path / "notes.md").write_text("mine")
    argv = ["bench", "train", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", "1"]
    argv += ["--seq-len", "8", "--steps", "1", "--warmup", "0", "--no-profile"]
    assert main([*argv, "--out", str(tmp_path / "notes.txt")]) == 0
    assert (tmp_path / "notes.md").read_text() == "mine"
    assert (tmp_path / "notes.txt.json").is_file() and (tmp_path / "notes.txt.md").is_file()
    assert _result_paths(tmp_path / "r.json") == (tmp_path / "r.json", tmp_path / "r.md")
    assert _result_paths(tmp_path / "r.md") == (tmp_path / "r.json", tmp_path / "r.md")
    assert _result_paths(tmp_path / "v1.2") == (tmp_path / "v1.2.json", tmp_path / "v1.2.md")


def test_cli_bench_train_refuses_a_step_past_the_free_memory(monkeypatch, capsys):
    """A huge ``--batch`` is refused before the model is built, naming the flags that shrink
    it (it was ended by the OOM killer with no message)."""
    from hybridkit import footprint
    from hybridkit.cli import main
    from hybridkit.train import bench_parallel

    built = []
    monkeypatch.setattr(bench_parallel, "build_model", lambda *a, **k: built.append(1))
    monkeypatch.setattr(footprint, "free_memory_bytes", lambda where: 10**6)
    argv = ["bench", "train", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", "4096"]
    assert main([*argv, "--seq-len", "4096"]) == 2
    err = capsys.readouterr().err
    assert "a benchmark step of 4096 x 4096 tokens" in err and "lower --batch or --seq-len" in err
    assert not built


def _benchmark_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _one_step_bench(layout: str):
    """One unprofiled timed step of a tiny model of ``layout`` (no warm-up)."""
    model = build_model(tiny_recipe(layout, d_model=16, vocab=64), seed=0)
    return bench_train(
        model, build_optimizer(model, TrainSpec()), batch=1, seq_len=8, steps=1, warmup=0,
        profile=False,
    )  # fmt: skip


def test_benchmark_summary_and_report_from_partial_results(tmp_path):
    """The #17 benchmark's report works from whatever cases finished (one failed here)."""
    script = _benchmark_script()
    result = _one_step_bench("m a")
    hybrid = {"case": "hybrid_compiled", **result.to_dict()}
    transformer = {
        **hybrid,
        "case": "transformer_compiled",
        "tokens_per_s": hybrid["tokens_per_s"] / 2,
    }
    matched = {**hybrid, "case": "transformer_matched_compiled"}
    matched["tokens_per_s"] = hybrid["tokens_per_s"] / 0.8
    failed = {"case": "hybrid_16k_ckpt", "error": "OutOfMemoryError: CUDA out of memory"}
    results = [hybrid, failed, transformer, matched]
    verdict = script.summary(results)
    assert abs(verdict["ratio_hybrid_vs_transformer"] - 2.0) < 1e-9 and verdict["target_ratio_met"]
    assert abs(verdict["ratio_hybrid_vs_matched_transformer"] - 0.8) < 1e-9
    assert verdict["target_ratio_met_matched_transformer"] is False
    env = result.environment
    assert env["date"] and env["torch"] == torch.__version__ and "git_commit" in env
    text = script.markdown(env, results, verdict)
    assert "hybrid_16k_ckpt" in text and "failed: OutOfMemoryError" in text
    assert "ratio_hybrid_vs_transformer | 2.000" in text
    script.write(tmp_path, "train_throughput", {"environment": env, "cases": results}, text)
    assert (tmp_path / "train_throughput.json").is_file()
    # merged from two runs: the ratio needs both cases from the same one
    other = {"environment": env, "cases": [transformer]}
    (tmp_path / "b.json").write_text(__import__("json").dumps(other))
    args = type("Args", (), {"merge": [tmp_path / "train_throughput.json", tmp_path / "b.json"]})
    args.out = tmp_path / "merged"
    script.merge(args)
    merged = __import__("json").loads((args.out / "train_throughput.json").read_text())
    # hybrid, failed 16k, the Transformer now from b.json, the matched one
    assert [c["run"] for c in merged["cases"]] == [0, 0, 1, 0]
    assert "ratio_hybrid_vs_transformer" not in merged["summary"]
    names = [c.name for c in script.CASES]
    wanted = {"hybrid_eager", "hybrid_compiled", "hybrid_16k_ckpt", "transformer_compiled"}
    wanted.add("transformer_matched_compiled")
    assert wanted <= set(names) and names[0] == "hybrid_eager"


def test_matched_transformer_has_the_hybrids_parameter_count():
    """``transformer_400m_matched.yaml`` is the 24-layer Transformer's layers 31 deep: within 1 %
    of the 400M hybrid's parameters, where the 24-layer one is 21 % smaller."""
    script = _benchmark_script()

    def count(path):
        model = build_model(load_recipe(path), seed=0, device="meta")
        return sum(p.numel() for p in model.parameters())

    hybrid, matched = count(script.HYBRID), count(script.TRANSFORMER_MATCHED)
    assert abs(matched / hybrid - 1) < 0.01
    assert count(script.TRANSFORMER) < 0.8 * hybrid


def test_benchmark_compares_runs_by_kernel_settings(tmp_path, capsys):
    """``train_throughput.py --compare``: one row per (run, case) with the settings each case
    recorded (``bench_train`` reads them from the kernel configuration), its step against the
    first run of the same case, and failed cases listed."""
    import json

    from hybridkit.kernels.config import kernel_config

    script = _benchmark_script()
    model = build_model(tiny_recipe("m a", d_model=16, vocab=64), seed=0)
    opt = build_optimizer(model, TrainSpec())
    runs = []
    for name, settings, scale in (("on", {}, 1.0), ("off", {"train_norms": False}, 1.25)):
        with kernel_config(**settings):
            result = bench_train(model, opt, batch=1, seq_len=8, steps=1, warmup=0, profile=False)
        assert f"Kernel settings: {result.kernels}." in markdown(result)
        case = {"case": "hybrid_eager", **result.to_dict()}
        case["step_ms"] = 100.0 * scale
        case["step_ms_all"] = [100.0 * scale, 110.0 * scale]
        case["host_ms_all"] = [90.0 * scale, 80.0 * scale, 95.0 * scale] if name == "on" else None
        cases = [case] + ([{"case": "hybrid_compiled", "error": "boom"}] if name == "off" else [])
        path = tmp_path / name / "train_throughput.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"environment": result.environment, "cases": cases}))
        runs.append(path)
    args = type("Args", (), {"compare": runs, "out": tmp_path / "cmp"})
    script.compare(args)
    out = json.loads((tmp_path / "cmp" / "train_compare.json").read_text())
    on, off, failed = out["rows"]
    assert on["kernels"] == "defaults" and off["kernels"] == "train_norms=0"
    assert on["vs_first"] == 1.0 and abs(off["vs_first"] - 1.25) < 1e-12
    assert (off["step_ms_min"], off["step_ms_max"]) == (125.0, 137.5)
    assert failed == {"file": str(runs[1]), "case": "hybrid_compiled", "error": "boom"}
    text = (tmp_path / "cmp" / "train_compare.md").read_text()
    assert on["host_ms"] == 90.0 and off["host_ms"] is None
    assert "| hybrid_eager | defaults | 100.0 | 100.0 / 110.0 | 90.0 |" in text
    assert "| hybrid_eager | train_norms=0 | 125.0 | 125.0 / 137.5 | n/a |" in text
    assert "1.250x" in text and "failed: boom" in text and text in capsys.readouterr().out


def test_report_states_the_host_time_to_issue_a_step():
    """On a GPU the report gives the host's median time to issue a step next to the step, so an
    eager step that waits on its launches shows as such (``host_ms_all``)."""
    result = _one_step_bench("m")
    assert "Host time" not in markdown(result)
    result.host_ms_all = [30.0, 10.0, 20.0]
    assert "Host time to issue a step (median): 20.0 ms" in markdown(result)
