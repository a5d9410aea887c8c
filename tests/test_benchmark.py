"""common/benchmark.py: interleaved timing and the results files benchmarks record."""

import json
import sys

import pytest
import torch

from common.benchmark import interleaved, markdown_table, stream_pass, write_results
from common.optimizers import kernels


def test_interleaved_alternates_order_and_skips_warmup():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2,
                          device=torch.device("cpu"), warmup_rounds=1)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t.wall) for t in timings.values()] == [2, 2]


def test_write_results_records_date_command_machine_table_and_raw(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/bench_x.py", "--quick"])
    table = markdown_table(["method", "ms"], [["AdamW", "1.0"], ["a|b", 2]])
    md, js = write_results(tmp_path / "out" / "bench_x.md", title="Bench X", table=table,
                           raw={"AdamW": [1.0, 1.1]}, notes=["min over rounds"])
    assert (md.name, js.name) == ("bench_x.md", "bench_x.json")
    text = md.read_text()
    assert text.startswith("# Bench X\n") and "| a\\|b | 2 |" in text and "min over rounds" in text
    assert "- command: `python3 scripts/bench_x.py --quick`" in text and f"torch {torch.__version__}" in text
    data = json.loads(js.read_text())
    assert data["raw"] == {"AdamW": [1.0, 1.1]} and data["table"] == table
    assert data["command"] == "python3 scripts/bench_x.py --quick" and data["device"] == "cpu"
    for key in ("date", "host", "cpu", "cpu_count", "torch_threads", "python", "torch"):
        assert data[key], key
    md2, _ = write_results(tmp_path / "out" / "bench_x", title="again", table=table, raw=[], argv=["--full"])
    assert md2 == md and "python3 scripts/bench_x.py --full" in md.read_text()


def test_bench_baselines_records_its_table(tmp_path, capsys):
    from script_modules import load_script

    bench = load_script("bench_baselines")
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--sets", "transformer15m", "--rounds", "1", "--only", "Prodigy", "--threads", "1",
                           "--record", str(tmp_path / "bb")])
    finally:
        torch.set_num_threads(threads)
    assert [r["method"] for r in rows] == ["torch AdamW", "Prodigy"]
    data = json.loads((tmp_path / "bb.json").read_text())
    assert data["raw"] == rows and "| transformer15m | Prodigy |" in (tmp_path / "bb.md").read_text()


@pytest.mark.skipif(kernels.compiler() is None, reason="needs a C compiler: apt-get install -y gcc")
def test_stream_pass_reads_every_stream_and_writes_the_first_ones():
    shapes = [torch.Size([70000]), torch.Size([3, 5]), torch.Size([0])]  # over a chunk, small, empty
    run = stream_pass(shapes, reads=3, writes=2)
    before = [[x.clone() for x in ts] for ts in run.tensors]
    run()
    for old, new in zip(before, run.tensors):
        total = old[0] + old[1] + old[2]
        torch.testing.assert_close(new[0], 0.5 * old[0] + 1e-3 * total)
        torch.testing.assert_close(new[1], 0.5 * old[1] + 1e-3 * total)
        assert torch.equal(new[2], old[2])
    with pytest.raises(ValueError, match="writes"):
        stream_pass(shapes, reads=2, writes=3)
