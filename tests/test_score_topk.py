"""The fused score + top-k kernel against the reference: the k best items of hidden @ table.T, in any order of ties."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import fused_score_topk, score_topk, score_topk_reference
from kernels.score_topk import fused

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (B, N, D, k): B, N and D off powers of two; one item; k = N; several user blocks and item ranges
SHAPES = [(1, 1, 8, 1), (5, 7, 48, 7), (33, 300, 64, 17), (5, 1000, 8, 10), (33, 1000, 48, 1), (1, 1000, 64, 10)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)


def small_tiles(monkeypatch):
    """16-item tiles: N=300 makes 19 tiles in 4 ranges of 5 (interpreter: 4 programs for its 1 "SM"), so the
    running list merges tiles after the first, and the last range is short."""
    monkeypatch.setattr(fused, "BLOCK_N", 16)


def make_inputs(B, N, D, dtype, device="cpu", seed=0):
    """hidden (B, D) and the table (N, D) as models pass it: the item table without its padding row, a view."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N + 1, D, generator=g).to(device, dtype)
    return torch.randn(B, D, generator=g).to(device, dtype), weight[1:]


def assert_top_k(values, indices, hidden, table, k):
    """values are the k best scores, best first, and each index is a distinct row of table scoring its value:
    the k best up to the order of (near) ties, which a float32 sum in another order may swap."""
    B = hidden.shape[0]
    assert values.shape == indices.shape == (B, k) and values.dtype == torch.float32 and indices.dtype == torch.int64
    assert not values.isnan().any(), "an unwritten candidate was picked"
    assert ((indices >= 0) & (indices < table.shape[0])).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "an item came back twice"
    assert (values[:, :-1] >= values[:, 1:]).all()
    want, _ = score_topk_reference(hidden, table, k)
    torch.testing.assert_close(values, want, atol=1e-4, rtol=1e-5)
    rescored = (hidden.float()[:, None, :] * table.float()[indices]).sum(-1)  # (B, k)
    torch.testing.assert_close(values, rescored, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("B, N, D, k", SHAPES, ids=[f"B{b}_N{n}_D{d}_k{k}" for b, n, d, k in SHAPES])
def test_fused_matches_reference(B, N, D, k, dtype):
    hidden, table = make_inputs(B, N, D, dtype, seed=B + N)
    assert_top_k(*fused_score_topk(hidden, table, k), hidden, table, k)


@pytest.mark.parametrize("k", [1, 10, 100], ids=lambda k: f"k{k}")
def test_fused_merges_many_tiles_per_range(k, monkeypatch):
    # k=100 outlasts each 80-item range: every range leaves -inf slots, which must not be picked
    small_tiles(monkeypatch)
    hidden, table = make_inputs(5, 300, 24, torch.float32, seed=k)
    assert fused._ranges(300, 1, fused.BLOCK_N, n_sm=1, k=k) == (4, 80)
    assert_top_k(*fused_score_topk(hidden, table, k), hidden, table, k)


def test_fused_ranks_the_last_of_ascending_scores_first(monkeypatch):
    # each tile beats the whole running list: every tile takes all k merge rounds, the worst case
    small_tiles(monkeypatch)
    table = torch.linspace(-1, 1, 300)[:, None] * torch.ones(1, 16)  # (300, 16), score rises with the index
    values, indices = fused_score_topk(torch.ones(3, 16), table, 10)
    assert torch.equal(indices, torch.arange(299, 289, -1).expand(3, -1))
    assert_top_k(values, indices, torch.ones(3, 16), table, 10)


def test_equal_scores_rank_the_lower_item_first(monkeypatch):
    # items 0-99 score 8, the rest 0: the 10 best are 0-9 in order, from the first of 4 item ranges
    small_tiles(monkeypatch)
    table = (torch.arange(300) < 100).float()[:, None] * torch.ones(1, 8)
    values, indices = fused_score_topk(torch.ones(2, 8), table, 10)
    assert torch.equal(indices, torch.arange(10).expand(2, -1)) and (values == 8.0).all()
    # 0-48 raised, item 0 most; 49 is not, so it ties with 50-99 and 200-299 (raised to 8 too): 0-59 in order
    table[:50] += torch.linspace(1, 0, 50)[:, None]
    table[200:300] = 1.0
    values, indices = fused_score_topk(torch.ones(1, 8), table, 60)
    assert torch.equal(indices[0], torch.arange(60))


def test_ranges_leave_each_user_at_most_max_candidates(monkeypatch):
    monkeypatch.setattr(fused, "MAX_CANDIDATES", 64)
    n_ranges, per_range = fused._ranges(100_000, 1, 128, n_sm=132, k=10)
    assert n_ranges * 10 <= 64 and n_ranges * per_range >= 100_000
    hidden, table = make_inputs(3, 2000, 16, torch.float32, seed=9)
    assert_top_k(*fused_score_topk(hidden, table, 10), hidden, table, 10)


def test_inputs_read_in_place_whatever_their_strides(monkeypatch):
    small_tiles(monkeypatch)
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 2 * 20, generator=g)
    hiddens = {"column_slice": wide[:, 20:], "broadcast_row": wide[:1, :20].expand(9, 20)}  # row strides 40, 0
    tables = {"transposed": torch.randn(20, 300, generator=g).T,  # channel stride 300
              "padding_row_dropped": torch.randn(301, 20, generator=g)[1:]}
    for hidden in hiddens.values():
        for table in tables.values():
            assert_top_k(*fused_score_topk(hidden, table, 12), hidden, table, 12)


def test_mixed_dtypes_rank_in_float32():
    hidden, table = make_inputs(4, 300, 32, torch.float32, seed=2)
    table = table.bfloat16()
    assert_top_k(*fused_score_topk(hidden, table, 10), hidden, table, 10)


@pytest.mark.parametrize("fn", [fused_score_topk, score_topk_reference], ids=["fused", "reference"])
def test_out_rows_written_only_where_active_with_offset_indices(fn, monkeypatch):
    small_tiles(monkeypatch)
    hidden, table = make_inputs(6, 300, 16, torch.float32, seed=5)
    values, indices = torch.full((6, 10), -7.0), torch.full((6, 10), -7, dtype=torch.int64)
    active = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)[::2]  # strided, as a column
    got = fn(hidden, table, 10, out=(values, indices), active=active, index_offset=1)
    assert got[0] is values and got[1] is indices
    assert (values[~active] == -7).all() and (indices[~active] == -7).all()
    assert_top_k(values[active], indices[active] - 1, hidden[active], table, 10)
    fn(hidden, table, 10, out=(values, indices))  # without active every row is written
    assert_top_k(values, indices, hidden, table, 10)


def test_cpu_tensors_take_the_reference():
    hidden, table = make_inputs(3, 50, 8, torch.bfloat16, seed=3)
    for got, want in zip(score_topk(hidden, table, 5), score_topk_reference(hidden, table, 5)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("fn", [score_topk, fused_score_topk], ids=["score_topk", "fused_score_topk"])
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=8), "k must be in 1..7"),
        (dict(k=0), "k must be in 1..7"),
        (dict(hidden=torch.zeros(2, 5)), "D=5"),
        (dict(hidden=torch.zeros(4)), "must be \\(B, D\\)"),
        (dict(table=torch.zeros(7, 4, dtype=torch.float16)), "float32 or bfloat16"),
        (dict(table=torch.zeros(7, 4, device="meta")), "table is on meta"),
        (dict(out=(torch.zeros(2, 3), torch.zeros(2, 3))), "indices must be a contiguous torch.int64"),
        (dict(out=(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.int64))), "values must be .* \\(2, 3\\)"),
        (dict(active=torch.ones(2, dtype=torch.bool)), "active needs out"),
        (dict(out=(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)), active=torch.ones(2)), "active must"),
    ],
    ids=["k_above_N", "k_zero", "D", "hidden_1d", "fp16", "device", "out_dtype", "out_shape", "active_alone",
         "active_dtype"],
)
def test_bad_inputs_raise_value_error(fn, change, message):
    inputs = dict(hidden=torch.zeros(2, 4), table=torch.zeros(7, 4), k=3)
    with pytest.raises(ValueError, match=message):
        fn(**(inputs | change))


def test_fused_refuses_what_the_reference_takes():
    hidden, table = make_inputs(2, 300, 8, torch.float32)
    with pytest.raises(ValueError, match=f"k <= {fused.MAX_K}"):
        fused_score_topk(hidden, table, fused.MAX_K + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("B, N, D, k", [(1024, 100_000, 64, 10), (1, 100_000, 64, 10), (257, 30_001, 48, 17),
                                        (64, 20_000, 128, 100), (33, 5_000, 256, 128), (4096, 1_000, 64, 1)])
def test_fused_gpu_real_sizes(B, N, D, k, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a float32 reference
    hidden, table = make_inputs(B, N, D, dtype, "cuda", seed=B)
    values, indices = score_topk(hidden, table, k)
    assert_top_k(values, indices, hidden, table, k)
    # random scores leave no near ties at the top: the items themselves agree
    assert (indices == score_topk_reference(hidden, table, k)[1]).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_gpu_replays_in_a_cuda_graph():
    hidden, table = make_inputs(1024, 100_000, 64, torch.float32, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # Triton compiles on the first call, which capture cannot record
        score_topk(hidden, table, 10)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, indices = score_topk(hidden, table, 10)
    hidden.copy_(torch.randn_like(hidden))
    graph.replay()
    assert_top_k(values, indices, hidden, table, 10)


def test_fused_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, table = make_inputs(2, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="fused_score_topk needs CUDA tensors.*use kernels.score_topk"):
        fused_score_topk(hidden, table, 3)


def test_benchmark_runs_and_compares_with_the_plain_ranking(tmp_path):
    out = tmp_path / "score_topk.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "score_topk_kernel.py"), "--shapes", "3x300,1x40",
                    "--d-model", "16", "--json", str(out)], check=True, cwd=REPO, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["B"], r["N"]) for r in rows] == [(3, 300), (1, 40)]
    for row in rows:
        assert row["same"] is True
        assert all(ms > 0 for method in ("fused", "plain") for ms in row[method].values())
