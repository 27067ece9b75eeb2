"""The greedy decode kernel (``kernels/sampling.py``) against the torch ops it replaces:
``argmax`` (first largest value, first NaN), the EOS rule and ``index_copy_`` into the token
buffer. Outputs are poisoned first; the rows are random, with planted ties, NaNs and -inf."""

from __future__ import annotations

import pytest
import torch

from hybridkit.kernels import sampling
from hybridkit.kernels.sampling import greedy_record


def _rows(batch: int, vocab: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g).to(dtype)
    if batch > 1:  # a tie of the row's maximum, later in the row
        top = x[1].max()
        x[1, vocab // 3] = top
        x[1, vocab - 1] = top
    if batch > 2:  # NaN after a large value: torch picks the first NaN
        x[2, 0] = 100.0
        x[2, vocab // 2] = float("nan")
        x[2, vocab - 2] = float("nan")
    if batch > 3:  # every value -inf: index 0
        x[3] = float("-inf")
    if batch > 4:  # the maximum in the last (masked) tile only
        x[4] = -5.0
        x[4, vocab - 1] = 3.0
    return x.to(device)


def _both(logits, eos_id=None, done=None, column=3, backend="triton"):
    """(tokens, buffer, done) from ``backend`` and from the torch ops, each on its own copies."""
    out = {}
    for side in (backend, "torch"):
        buf = torch.full((logits.shape[0], 7), -77, dtype=torch.long, device=logits.device)
        count = torch.tensor([column], device=logits.device)
        flags = None if done is None else done.clone()
        nxt = greedy_record(logits, buf, count, flags, eos_id, backend=side)
        out[side] = (nxt, buf, flags)
    return out[backend], out["torch"]


@pytest.mark.triton
@pytest.mark.parametrize("vocab", [1, 5, 64, 1000, 40000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_kernel_matches_argmax(vocab, dtype, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU runs the gpu-marked one")
    # a small tile cap, so the 1,000 and 40,000 rows take several tiles (the loop and the
    # strict comparison across tiles) without a 32K-wide tile on the interpreter
    monkeypatch.setattr(sampling, "MAX_BLOCK", 256)
    logits = _rows(6, vocab, dtype, "cpu", seed=vocab)
    (got, gbuf, _), (want, wbuf, _) = _both(logits)
    assert torch.equal(got, want), (got, want)
    assert torch.equal(gbuf, wbuf)
    assert (gbuf[:, 3] == want).all() and (gbuf[:, :3] == -77).all()


@pytest.mark.triton
def test_greedy_kernel_eos_rule():
    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    logits = _rows(5, 50, torch.float32, "cpu", seed=1)
    eos = int(logits[0].argmax())  # row 0 produces EOS now; row 1 was done already
    done = torch.tensor([False, True, False, False, False])
    (got, gbuf, gdone), (want, wbuf, wdone) = _both(logits, eos_id=eos, done=done, column=0)
    assert torch.equal(got, want) and torch.equal(gbuf, wbuf) and torch.equal(gdone, wdone)
    assert gdone.tolist()[:2] == [True, True] and got[1] == eos


def test_greedy_record_rejects_bad_arguments():
    logits = torch.zeros(2, 4)
    buf = torch.zeros(2, 3, dtype=torch.long)
    count = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="backend"):
        greedy_record(logits, buf, count, backend="cuda")
    with pytest.raises(ValueError, match="together"):
        greedy_record(logits, buf, count, eos_id=1)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        greedy_record(logits[0], buf, count)
    # auto on the CPU is the torch path
    assert greedy_record(torch.eye(2, 4), buf, count).tolist() == [0, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 50257, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_kernel_gpu(vocab, dtype):
    logits = _rows(9, vocab, dtype, "cuda", seed=vocab)
    (got, gbuf, _), (want, wbuf, _) = _both(logits, backend="auto")
    assert torch.equal(got, want) and torch.equal(gbuf, wbuf)
    done = torch.zeros(9, dtype=torch.bool, device="cuda")
    eos = int(want[5])
    (got, gbuf, gdone), (want, wbuf, wdone) = _both(logits, eos_id=eos, done=done, backend="auto")
    assert torch.equal(got, want) and torch.equal(gbuf, wbuf) and torch.equal(gdone, wdone)
