"""Fast generation (``hybridkit.generation``): the static cache, the runner, sampling.

CPU: the static decode step (fixed-size KV rings with a device position, Mamba-3 states in place)
reproduces the full forward in float64 for every layer kind, including sliding windows whose ring
wraps and prompts shorter and longer than the window; padding a batch to its bucket changes
nothing; EOS stops. GPU (``-m gpu``): tokens through the captured CUDA graph equal the eager
step's, greedy and sampled, and the static step's logits stay within bf16 tolerance of the
forward.
"""

from __future__ import annotations

import pytest
import torch

from hybridkit import build_model
from hybridkit.check import _perturb_constant_params
from hybridkit.generation import DecodeRunner, Sampling, batch_bucket, generate, sample
from tests.helpers import attn_block, mamba_block, rel_err, tiny_recipe

EVERY_KIND = dict(
    s=mamba_block(),
    m=mamba_block(mimo_rank=2, outproj_norm="grouped_pregate"),
    r=mamba_block(rope=False, trapezoid=False, ngroups=2),
    a=attn_block(position="rope", n_kv_heads=1),
    w=attn_block(window=3, n_heads=4, n_kv_heads=2, position="rope"),
)


def _model(dtype=torch.float64, device="cpu", layout="s a m w r"):
    model = build_model(tiny_recipe(layout, **EVERY_KIND), seed=0, dtype=dtype, device=device)
    _perturb_constant_params(model, torch.Generator(device="cpu").manual_seed(1))
    return model.eval()


@pytest.mark.parametrize("prefill", [1, 2, 5, 8])
def test_static_decode_equals_forward_every_layer_kind(prefill, one_thread):
    """Prefill, switch to the static form, step the rest: the logits equal the forward's."""
    model = _model()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        want = model(ids)
        cache = model.allocate_cache(2, ids.shape[1])
        got = [model(ids[:, :prefill], cache=cache)]
        position = torch.zeros(1, dtype=torch.long)
        cache.make_static(position)
        for t in range(prefill, ids.shape[1]):
            got.append(model.step(ids[:, t], cache)[:, None])
    assert int(position) == ids.shape[1]
    assert rel_err(torch.cat(got, dim=1), want) < 1e-10


def test_runner_greedy_is_the_forward_argmax_and_padding_changes_nothing(one_thread):
    model = _model()
    ids = torch.randint(0, 64, (3, 4))
    out = generate(model, ids, 6, sampling=Sampling(temperature=0))
    assert batch_bucket(3) == 4 and batch_bucket(1) == 1 and batch_bucket(16) == 16
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])
    for row in range(3):
        alone = generate(model, ids[row : row + 1], 6, sampling=Sampling(temperature=0))
        assert torch.equal(alone[0], out[row])


def test_runner_reuses_its_tensors_across_prompts(one_thread):
    """A second prefill resets the cache in place: same results as a fresh runner."""
    model = _model()
    a, b = torch.randint(0, 64, (2, 2, 5))
    runner = DecodeRunner(model, 2, 12, 7, Sampling(temperature=1.0, top_k=5), seed=3)
    ptrs = [t.data_ptr() for t in runner.cache.layers[0]]
    runner.prefill(a)
    runner.decode(7)
    runner.prefill(b)
    runner.decode(7)
    second = runner.tokens.clone()
    fresh = DecodeRunner(model, 2, 12, 7, Sampling(temperature=1.0, top_k=5), seed=3)
    fresh.prefill(b)
    fresh.decode(7)
    assert torch.equal(second, fresh.tokens)
    assert ptrs == [t.data_ptr() for t in runner.cache.layers[0]]
    with pytest.raises(ValueError, match="new tokens per prompt"):
        runner.decode(1)  # the token buffer is full until the next prefill


def test_eos_stops_and_fills():
    model = _model(layout="s a")
    ids = torch.randint(0, 64, (2, 3))
    free = generate(model, ids, 40, sampling=Sampling(temperature=0))
    eos = int(free[0, 4])  # the second token of sequence 0
    out = generate(model, ids, 40, sampling=Sampling(temperature=0, eos_id=eos))
    first = (out[0, 3:] == eos).nonzero()[0, 0]
    assert (out[0, 3 + first :] == eos).all()
    assert torch.equal(out[:, : 3 + first + 1], free[:, : 3 + first + 1])


def test_gumbel_sampling_follows_the_distribution():
    """Gumbel-max draws from softmax(logits / T); top-k never leaves the top k."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, Sampling(temperature=1.0), gen)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert (freq - torch.softmax(logits[0].double(), -1)).abs().max() < 0.02
    top = sample(logits, Sampling(temperature=2.0, top_k=2), gen)
    assert set(top.unique().tolist()) == {1, 2}
    assert torch.equal(sample(logits[:3], Sampling(temperature=0)), torch.tensor([2, 2, 2]))


def test_tiny_temperatures_sample_the_argmax():
    """Scores are taken relative to each row's best logit and the temperature floored at
    float32's smallest normal: 1e-40 (subnormal) and 1e-50 (0 in float32) gave ties of inf
    or 0 / 0 before, and argmax then picked the first of them."""
    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 5
    gen = torch.Generator().manual_seed(1)
    for t in (1e-6, 1e-30, 1e-40, 1e-50):
        assert torch.equal(sample(logits, Sampling(temperature=t), gen), logits.argmax(-1)), t
    # a row of -inf logits (nothing to sample) leaves the other rows' draws unchanged
    masked = logits.clone()
    masked[0] = float("-inf")
    warm = Sampling(temperature=0.5)
    a = sample(masked, warm, torch.Generator().manual_seed(2))
    b = sample(logits, warm, torch.Generator().manual_seed(2))
    assert torch.equal(a[1:], b[1:])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(temperature=-1.0), "temperature must be a finite number"),
        (dict(temperature=True), "temperature must be a finite number"),
        (dict(top_k=2.5), "top_k must be None or an integer >= 1"),
        (dict(top_k=True), "top_k must be None or an integer >= 1"),
        (dict(top_k=0), "top_k must be None or an integer >= 1"),
        (dict(eos_id=-1), "eos_id must be None or an integer >= 0"),
    ],
)
def test_sampling_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**options)


def test_generate_and_runner_refuse_what_they_cannot_do(one_thread):
    model = _model(layout="s a")
    ids = torch.randint(0, 64, (2, 3))
    greedy = Sampling(temperature=0)
    with pytest.raises(ValueError, match="ids must be \\(batch, length\\)"):
        generate(model, ids[0], 2, sampling=greedy)
    with pytest.raises(ValueError, match="batch >= 1, got shape \\(0, 3\\)"):
        generate(model, ids[:0], 2, sampling=greedy)
    for bad in (2.0, -1, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
            model.generate(ids, bad)
    with pytest.raises(ValueError, match="eos_check_every must be >= 1"):
        DecodeRunner(model, 2, 8, 4, Sampling(temperature=0, eos_id=1), eos_check_every=0)
    # a prompt and new tokens past the cache would wrap full attention's ring: refused
    runner = DecodeRunner(model, 2, 10, 4, greedy)
    runner.prefill(ids.repeat(1, 2))  # 6 + 4 = 10: fits
    with pytest.raises(ValueError, match="need 11 positions; the runner's cache holds 10"):
        runner.prefill(torch.randint(0, 64, (2, 7)))


def test_sliding_cache_smaller_than_its_window_says_so(one_thread):
    """A window layer's buffer shorter than its window cannot slide: the same clear error as a
    full-attention cache (a shape mismatch inside the cache before)."""
    model = _model(layout="w")  # window 3
    model_w = build_model(
        tiny_recipe("w", w=attn_block(window=10, position="rope")), seed=0, dtype=torch.float64
    ).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="allocate the InferenceCache"):
        model_w(torch.randint(0, 64, (1, 7)), cache=model_w.allocate_cache(1, 5))
    with torch.no_grad():  # a window shorter than the cache slides as before
        model(torch.randint(0, 64, (1, 7)), cache=model.allocate_cache(1, 5))


def test_bf16_state_runs_and_stays_close():
    """The opt-in bf16 Mamba-3 state: same tokens' logits within bf16 rounding of fp32's."""
    model = _model(dtype=torch.float32, layout="s m")
    ids = torch.randint(0, 64, (2, 4))
    runs = {}
    for dt in (None, torch.bfloat16):
        runner = DecodeRunner(model, 2, 24, 20, Sampling(temperature=0), ssm_dtype=dt)
        assert runner.cache.layers[0].ssm.dtype == (dt or torch.float32)
        runner.prefill(ids)
        runner.decode(20)
        runs[dt] = runner.logits.clone()
    assert rel_err(runs[torch.bfloat16], runs[None]) < 5e-2


def test_compiled_step_compiles_once():
    """``compile_step``: one graph for every decode step. A host counter the step bumped
    (``seqlen_offset``) was a guard, so every token recompiled, and on the GPU the compile
    landed inside the CUDA-graph capture."""
    from torch._dynamo.utils import counters

    model = _model(dtype=torch.float32, layout="s a m w")
    runner = DecodeRunner(model, 2, 30, 12, Sampling(temperature=0), compile_step=True)
    runner.prefill(torch.randint(0, 64, (2, 5)))
    runner.decode(2)
    graphs = counters["stats"]["unique_graphs"]
    runner.decode(5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert runner.cache.seqlen_offset == 5 and int(runner.position) == 12


@pytest.mark.parametrize("start", [0, 1, 6])
def test_forced_runner_is_the_forward_argmax_every_layer_kind(start, one_thread):
    """Teacher-forced decoding (evaluation's decode subset) through the runner's static step:
    after prefilling ``start`` tokens, the argmax after each fed token is the forward's, at
    every position, for every layer kind; an empty prompt starts from no context."""
    model = _model()
    ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        want = model(ids).argmax(-1)
    runner = DecodeRunner(model, 3, 10, 10 - start, Sampling(temperature=0.0), forced=True)
    runner.tokens.fill_(-7)  # poison: every returned position must be written
    runner.prefill(ids[:, :start])
    got = runner.force(ids[:, start:])
    assert torch.equal(got, want[:, start:])
    assert int(runner.position) == 10


def test_forced_runner_refuses_what_it_cannot_do(one_thread):
    model = _model(layout="s a")
    forced = DecodeRunner(model, 2, 6, 4, Sampling(temperature=0.0), forced=True)
    forced.prefill(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="4 more steps, got ids of shape \\(2, 5\\)"):
        forced.force(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="holds 2 sequences"):
        forced.force(torch.zeros(3, 1, dtype=torch.long))
    sampler = DecodeRunner(model, 2, 6, 4, Sampling(temperature=0.0))
    with pytest.raises(ValueError, match="forced=True"):
        sampler.force(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt is empty"):
        sampler.prefill(torch.zeros(2, 0, dtype=torch.long))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_graph_equals_eager_tokens(temperature):
    """512 tokens in bf16 through the CUDA graph equal the eager step's, token for token."""
    model = _model(dtype=torch.bfloat16, device="cuda", layout="s a m w r")
    ids = torch.randint(0, 64, (4, 16), device="cuda")
    sampling = Sampling(temperature=temperature, top_k=20 if temperature else None)
    graph = generate(model, ids, 512, sampling=sampling, seed=5, use_graph=True)
    eager = generate(model, ids, 512, sampling=sampling, seed=5, use_graph=False)
    assert torch.equal(graph, eager)


@pytest.mark.gpu
def test_eval_decode_subset_through_the_graph_under_autocast():
    """Evaluation's decode subset on the GPU: an fp32 model under bf16 autocast, teacher-forced
    through the captured step (autocast's weight-cast cache off, so the replays cast again):
    equal to the same subset run eagerly, and the forward's argmax at nearly every position."""
    from hybridkit.eval.lengthgen import predict_incremental

    model = _model(dtype=torch.float32, device="cuda", layout="s a m w")
    ids = torch.randint(0, 64, (8, 40), device="cuda")
    got = predict_incremental(model, ids, 5, "bf16")
    runner = DecodeRunner(model, 8, 40, 35, Sampling(temperature=0.0), forced=True)
    assert runner.graph is not None
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        eager = DecodeRunner(
            model, 8, 40, 35, Sampling(temperature=0.0), forced=True, use_graph=False
        )
        eager.prefill(ids[:, :5])
        want = eager.force(ids[:, 5:]).cpu()
        forward = model(ids).argmax(-1).cpu()
    assert torch.equal(got[:, 5:], want)
    assert (got[:, :5] == -100).all()
    assert (got[:, 5:] == forward[:, 5:]).double().mean() > 0.95


@pytest.mark.gpu
def test_compiled_step_in_the_graph_equals_eager_tokens():
    """``compile_step`` on the GPU: torch.compile around the Triton step, inside our graph.
    fp32, and only the first 16 tokens: fused element-wise ops may round differently, and a
    random tiny model's near-ties would then flip a later greedy choice."""
    model = _model(dtype=torch.float32, device="cuda", layout="s a m w")
    ids = torch.randint(0, 64, (4, 16), device="cuda")
    runs = []
    for compiled, graph in ((False, False), (True, True)):
        runner = DecodeRunner(
            model, 4, 16 + 64, 64, Sampling(temperature=0), use_graph=graph, compile_step=compiled
        )
        assert (runner.graph is not None) == graph
        runner.prefill(ids)
        runner.decode(64)
        runs.append(runner.tokens.clone())
    assert torch.equal(runs[0][:, :16], runs[1][:, :16])


@pytest.mark.gpu
def test_fa4_decode_in_the_graph_equals_eager_and_forward():
    """``fa4_decode``: the static step's attention through FA4's ``seqused_k`` path, captured
    in the graph; tokens equal the eager step's, logits stay near the forward's."""
    from hybridkit.kernels.attention import fa4_unavailable
    from hybridkit.kernels.config import kernel_config

    reason = fa4_unavailable("cuda", torch.bfloat16)
    if reason:
        pytest.skip(reason)
    model = _model(dtype=torch.bfloat16, device="cuda", layout="s a m w r")
    ids = torch.randint(0, 64, (4, 16), device="cuda")
    with kernel_config(fa4_decode=True):
        graph = generate(model, ids, 256, sampling=Sampling(temperature=0), use_graph=True)
        eager = generate(model, ids, 256, sampling=Sampling(temperature=0), use_graph=False)
        with torch.no_grad():
            want = model(graph[:, :-1]).float()
            cache = model.allocate_cache(4, graph.shape[1])
            got = [model(graph[:, :16], cache=cache)]
            cache.make_static(torch.zeros(1, dtype=torch.long, device="cuda"))
            got += [model.step(graph[:, t], cache)[:, None] for t in range(16, graph.shape[1] - 1)]
    assert torch.equal(graph, eager)
    assert rel_err(torch.cat(got, dim=1).float(), want) < 3e-2


@pytest.mark.gpu
def test_static_step_logits_match_forward_bf16():
    model = _model(dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 64, (4, 40), device="cuda")
    with torch.no_grad():
        want = model(ids).float()
        cache = model.allocate_cache(4, ids.shape[1])
        got = [model(ids[:, :17], cache=cache)]
        cache.make_static(torch.zeros(1, dtype=torch.long, device="cuda"))
        got += [model.step(ids[:, t], cache)[:, None] for t in range(17, ids.shape[1])]
    assert rel_err(torch.cat(got, dim=1).float(), want) < 3e-2


def test_cli_bench_decode_writes_json_and_markdown(tmp_path, capsys):
    import json

    from hybridkit.cli import main

    out = tmp_path / "bench" / "decode"
    argv = ["bench", "decode", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", "1,2"]
    argv += ["--prompt", "5", "--new", "4", "--drift-tokens", "3", "--out", str(out), "--layer"]
    assert main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    row = result["rows"][1]
    assert row["tokens_per_s"] > 0 and row["floor_ms"] > 0
    assert row["ratio_to_floor"] == pytest.approx(row["ms_per_step"] / row["floor_ms"])
    assert set(row["bytes_per_step"]) == {"weights", "mamba3_state", "kv"}
    assert row["bytes_per_step"]["mamba3_state"] > 0 and row["bytes_per_step"]["kv"] > 0
    assert result["drift"]["tokens"] == 3 and {"torch", "triton"} <= set(result["versions"])
    assert [r["batch"] for r in result["layer_rows"]] == [1, 2]
    layer = result["layer_rows"][0]
    assert layer["us_per_step"] > 0 and layer["floor_us"] > 0 and not layer["graph"]
    assert layer["ratio_to_floor"] == pytest.approx(layer["us_per_step"] / layer["floor_us"])
    assert "| batch |" in out.with_suffix(".md").read_text()
    assert "One Mamba-3 layer's step" in out.with_suffix(".md").read_text()
    assert "Decoding throughput" in capsys.readouterr().out


def test_bench_decode_profiles_and_passes_its_options_to_the_runner(tmp_path, monkeypatch):
    """``--profile``: device (here CPU op) time and launches per token by category, in the JSON
    and the Markdown, next to the time between kernels. ``--compile`` reaches the runner (it
    once only labelled the report "step compiled" while every step ran uncompiled)."""
    import json

    from hybridkit import decode_bench
    from hybridkit.cli import main

    seen = []
    real = decode_bench.DecodeRunner

    def runner(*args, **kw):
        seen.append(kw["compile_step"])
        return real(*args, **{**kw, "compile_step": False})  # compiling is not what is tested

    monkeypatch.setattr(decode_bench, "DecodeRunner", runner)
    out = tmp_path / "decode"
    argv = ["bench", "decode", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", "1,2"]
    assert main([*argv, "--prompt", "4", "--new", "3", "--out", str(out), "--profile"]) == 0
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert sum(row["profile_ms_per_token"].values()) > 0
    assert set(row["kernels_per_token"]) == set(row["profile_ms_per_token"])
    assert "matmuls" in row["profile_ms_per_token"]
    text = out.with_suffix(".md").read_text()
    assert "Batch 1, profiled" in text and "| between kernels |" in text
    assert row["top_kernels_per_token"] and "Its longest kernels" in text
    assert seen == [False, False]
    assert main([*argv, "--prompt", "4", "--new", "3", "--compile"]) == 0
    assert seen[2:] == [True, True]


def test_decode_profile_categories():
    from hybridkit.decode_bench import DECODE_CATEGORIES
    from hybridkit.profiling import categorize

    def cat(name: str) -> str:
        return categorize(name, DECODE_CATEGORIES)

    assert cat("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttention") == "attention"
    assert cat("mamba3_step_kernel") == "mamba3 step"
    assert cat("kernel_cutlass_kernel_hybridkitkernelsmamba3stepcute_kernel") == "mamba3 step"
    assert cat("triton_poi_fused__to_copy_add_mul_silu_3") == "element-wise (Inductor)"
    assert cat("triton_per_fused__to_copy_mean_pow_rsqrt_1") == "element-wise (Inductor)"
    assert cat("_norm_fwd_kernel") == "norms"
    assert cat("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmuls"
    assert cat("_skinny_linear_kernel") == "matmuls"
    assert cat("void at::native::direct_copy_kernel_cuda") == "copies and casts"


def test_cli_bench_decode_rejects_bad_batches(cli_error):
    assert "--batch" in cli_error(
        "bench", "decode", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", "1,x"
    )
    assert "--batch" in cli_error(
        "bench", "decode", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", "0"
    )
    # an empty part was skipped and a repeated batch measured twice
    for batches, needle in (("1,,2", "no empty parts"), ("1,1", "lists a value twice")):
        err = cli_error("bench", "decode", "hybridkit/recipes/tiny_hybrid.yaml", "--batch", batches)
        assert needle in err, err


@pytest.mark.slow
def test_compiled_step_gives_the_same_tokens():
    """``compile_step``: torch.compile of the step (static cache, in-place updates) changes
    nothing in float64 greedy decoding."""
    model = _model(layout="s a w")
    ids = torch.randint(0, 64, (2, 5))
    runs = []
    for compiled in (False, True):
        runner = DecodeRunner(model, 2, 13, 8, Sampling(temperature=0), compile_step=compiled)
        runner.prefill(ids)
        runner.decode(8)
        runs.append(runner.tokens.clone())
    assert torch.equal(runs[0], runs[1])


def test_decode_compare_tables_settings_against_the_first(tmp_path, capsys):
    """``benchmarks/decode_compare.py``: one row per (settings, batch), ratios to the first file,
    files without a ``kernels`` key read as the defaults."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_compare.py"
    spec = importlib.util.spec_from_file_location("decode_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(kernels, layer_us, tps, x_floor):
        layer = [dict(batch=1, ssm_dtype="float32", kernel_us=5.0, layer_us=layer_us,
                      target_layer_us=25.0)]  # fmt: skip
        rows = [dict(batch=1, tokens_per_s=tps, ms_per_step=1e3 / tps, ratio_to_floor=x_floor)]
        data = {"device": "GPU", "layer": layer, "model": {"fp32 state": {"rows": rows}}}
        if kernels:
            data["kernels"] = kernels
        return data

    files = []
    for i, data in enumerate((run(None, 27.0, 1000.0, 5.0), run("pdl=1", 13.5, 4000.0, 1.25))):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(data))
    report = module.compare([module.load(f) for f in files])
    assert "| defaults | float32 | 1 | 5.0 | 27.0 | 1.00x | 25 |" in report
    assert "| pdl=1 | float32 | 1 | 5.0 | 13.5 | 0.50x | 25 |" in report
    assert "| pdl=1 | 1 | 4,000 | 0.250 | 1.25 | 4.00x | yes |" in report
    # a layer-only run first and a model-only run after it: each table takes as its baseline
    # the first file that has it
    layer_only = run("step_split=2", 20.0, 1.0, 1.0)
    model_only = run("norm_linear=1", 0, 2000.0, 2.0)
    del layer_only["model"], model_only["layer"]
    runs = [layer_only, run("defaults", 27.0, 1000.0, 5.0), model_only]
    report = module.compare([dict(r, file=f"{i}.json") for i, r in enumerate(runs)])
    assert "| defaults | float32 | 1 | 5.0 | 27.0 | 1.35x | 25 |" in report
    assert "| norm_linear=1 | 1 | 2,000 | 0.500 | 2.00 | 2.00x | no |" in report
