"""scripts/make_record.py: synthetic quick.json / bench.json folders (as gpu_check.sh
writes them on the device) -> one record folder under a temporary results folder, and
the index. No GPU and no flashkernels build needed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_record.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quick_json(commit="abc1234", date="2026-12-06"):
    return {
        "meta": {
            "kind": "quick",
            "device": "NVIDIA H200",
            "driver": "580.159.04",
            "commit": commit,
            "date": date,
            "budget_s": 280,
            "elapsed_s": 231.4,
        },
        "status": "fail",
        "steps": [
            {
                "name": "rust-smoke",
                "title": "one small case of every kernel vs the CPU reference",
                "status": "pass",
                "seconds": 12.3,
                "counts": {"passed": 9, "failed": 0, "skipped": 0},
                "summary": "9 passed",
            },
            {
                "name": "python-gpu",
                "title": "Python GPU tests",
                "status": "fail",
                "seconds": 80.5,
                "counts": {"passed": 140, "failed": 1, "skipped": 2},
                "summary": "FAILED test_conv_gpu.py::test_nhwc",
            },
            {
                "name": "sanitizer",
                "title": "compute-sanitizer memcheck",
                "status": "skipped",
                "seconds": 0,
                "counts": {},
                "summary": "budget: 5 s left",
            },
        ],
    }


def attention_row(d, n, ours_ms, peer_ms, headline=False, peer_error=False):
    flops = 4.0 * 2 * 16 * n * n * d
    results = {
        "flashkernels": {"ms": ours_ms, "tflops": flops / ours_ms / 1e9},
        "torch_flash": {"ms": peer_ms, "tflops": flops / peer_ms / 1e9},
        "mem_efficient": (
            {"error": "RuntimeError: no kernel"}
            if peer_error
            else {"ms": 2 * ours_ms, "tflops": flops / (2 * ours_ms) / 1e9}
        ),
    }
    return {
        "op": "attention_fwd",
        "case": f"D{d} N{n}",
        "headline": headline,
        "series": f"D{d}",
        "x_name": "N",
        "x": n,
        "metric": "tflops",
        "params": {"B": 2, "H": 16, "N": n, "D": d, "causal": False},
        "check": {"rel_err": 0.0023, "ok": True},
        "peer": "torch_flash",
        "ratio": peer_ms / ours_ms,
        "results": results,
    }


def bench_json(commit="abc1234", date="2026-12-06"):
    rows = [
        attention_row(128, n, 0.1 * n / 512, 0.085 * n / 512, headline=(n == 8192), peer_error=(n == 512))
        for n in (512, 2048, 8192)
    ]
    rows.append(attention_row(64, 8192, 3.6, 3.7))
    # Categorical x, GB/s, and a headline row whose peer failed (no ratio): the next
    # headline row of the op is the one the index shows.
    rows.append(
        {
            "op": "conv_fwd",
            "case": "56x56 64->64 3x3",
            "headline": True,
            "series": "bf16 NHWC",
            "x_name": "layer",
            "x": "56x56 64->64 3x3",
            "metric": "gbps",
            "check": {"rel_err": 0.004, "ok": True},
            "peer": "cudnn",
            "results": {"flashkernels": {"ms": 0.5, "gbps": 900.0}, "cudnn": {"error": "RuntimeError: cuDNN error"}},
        }
    )
    rows.append(
        {
            "op": "conv_fwd",
            "case": "28x28 128->128 3x3",
            "headline": True,
            "series": "bf16 NHWC",
            "x_name": "layer",
            "x": "28x28 128->128 3x3",
            "metric": "gbps",
            "check": {"rel_err": 0.2, "ok": False},
            "peer": "cudnn",
            "ratio": 0.5,
            "results": {"flashkernels": {"ms": 0.4, "gbps": 700.0}, "cudnn": {"ms": 0.2, "gbps": 1400.0}},
        }
    )
    return {
        "meta": {
            "kind": "bench",
            "device": "NVIDIA H200",
            "driver": "580.159.04",
            "commit": commit,
            "date": date,
            "torch": "2.11.0+cu130",
            "budget_s": 280,
            "elapsed_s": 250.2,
            "rounds": 2,
        },
        "rows": rows,
        "skipped": [{"op": "longformer_fwd", "case": "N65536 window", "reason": "budget: 10 s left"}],
        "failed": [{"op": "conv_train", "case": "7x7 512->512 3x3", "error": "CUDA error: launch failed"}],
        # gpu_check.py adds the bench step's own steps and status.
        "steps": [
            {
                "name": "bench",
                "title": "every op against its peer",
                "status": "timeout",
                "seconds": 250.0,
                "counts": {},
                "summary": "[cut: the step's 250 s ran out]",
            }
        ],
        "status": "fail",
    }


def write(folder, name, content):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(content) if name.endswith(".json") else content)
    return path


def run(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def made(tmp_path):
    """A record from a quick folder and a bench folder (files one level down, as the
    device tool may return them)."""
    quick_dir, bench_dir, results = tmp_path / "q", tmp_path / "b", tmp_path / "results"
    write(quick_dir / "out", "quick.json", quick_json())
    write(quick_dir / "out", "quick.log", "quick log line\n")
    write(bench_dir, "bench.json", bench_json())
    write(bench_dir, "bench.log", "bench log line\n")
    write(bench_dir, "bench.md", "| table |\n")
    results.mkdir()
    run(quick_dir, bench_dir, "--results", results)
    return results, results / "2026-12-06-h200-abc1234"


def test_record_json(made):
    _, folder = made
    record = json.loads((folder / "record.json").read_text())
    assert record["meta"] == {
        "date": "2026-12-06",
        "device": "NVIDIA H200",
        "driver": "580.159.04",
        "commit": "abc1234",
    }
    assert record["quick"] == quick_json()
    assert record["bench"] == bench_json()
    assert record["headlines"]["attention_fwd"]["case"] == "D128 N8192"
    assert record["headlines"]["attention_fwd"]["ratio"] == pytest.approx(0.85)
    assert record["headlines"]["conv_fwd"] == {"case": "28x28 128->128 3x3", "peer": "cudnn", "ratio": 0.5}
    assert (folder / "quick.log").read_text() == "quick log line\n"
    assert (folder / "bench.log").read_text() == "bench log line\n"
    assert (folder / "bench.md").read_text() == "| table |\n"
    assert all(p.is_file() for p in folder.iterdir()), "files no deeper than the record folder"


def test_record_readme(made):
    _, folder = made
    text = (folder / "README.md").read_text()
    assert "NVIDIA H200" in text and "abc1234" in text and "580.159.04" in text
    for op in ("attention_fwd", "conv_fwd"):
        assert f"### {op}" in text
    # Headline ratio from the input: 0.085 / 0.1 -> 0.85x torch_flash, at the top.
    assert "0.85x torch_flash" in text
    assert text.index("0.85x torch_flash") < text.index("## Quick check")
    # Quick steps, with their counts and status.
    assert "| rust-smoke |" in text and "| python-gpu |" in text and "skipped" in text
    assert "FAILED test_conv_gpu.py::test_nhwc" in text
    assert "140 passed, 1 failed, 2 skipped" in text
    assert "## Benchmarks: fail" in text and "ran out" in text
    # Every contender, the errored peer, the failed check, the GB/s unit, the missing ratio.
    for word in (
        "torch_flash",
        "mem_efficient",
        "cudnn",
        "RuntimeError: no kernel",
        "**FAIL**",
        "GB/s",
        "TFLOP/s",
        "cudnn failed",
    ):
        assert word in text, word
    # Skipped and failed cases listed.
    assert "N65536 window" in text and "budget: 10 s left" in text
    assert "7x7 512->512 3x3" in text and "CUDA error: launch failed" in text


def test_plots(made):
    pytest.importorskip("matplotlib")
    _, folder = made
    for op in ("attention_fwd", "conv_fwd"):
        data = (folder / f"{op}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000
        assert f"({op}.png)" in (folder / "README.md").read_text()


def test_index_newest_first(made, tmp_path):
    results, _ = made
    older = tmp_path / "older"
    write(older, "bench.json", bench_json(commit="0ld0000", date="2026-11-30"))
    run(older, "--results", results, "--name", "2026-11-30-h200-older")
    # A folder from before record.json: listed, not dropped.
    (results / "2026-11-01-h200-legacy").mkdir()
    run("--index-only", "--results", results)
    index = (results / "README.md").read_text()
    new, old, legacy = (
        index.index(f"[{n}]") for n in ("2026-12-06-h200-abc1234", "2026-11-30-h200-older", "2026-11-01-h200-legacy")
    )
    assert new < old < legacy
    new_row = next(line for line in index.splitlines() if "[2026-12-06-h200-abc1234]" in line)
    assert "0.85x torch_flash" in new_row and "0.50x cudnn" in new_row
    assert "fail 1/3" in new_row
    assert "(2026-12-06-h200-abc1234/)" in new_row
    header = next(line for line in index.splitlines() if line.startswith("| date"))
    assert "attention_fwd" in header and "conv_fwd" in header


def test_bench_alone(tmp_path):
    bench_dir, results = tmp_path / "b", tmp_path / "results"
    write(bench_dir, "bench.json", bench_json())
    results.mkdir()
    run(bench_dir, "--results", results)
    folder = results / "2026-12-06-h200-abc1234"
    record = json.loads((folder / "record.json").read_text())
    assert "quick" not in record and record["bench"] == bench_json()
    assert "No quick check" in (folder / "README.md").read_text()
    row = next(line for line in (results / "README.md").read_text().splitlines() if "2026-12-06-h200-abc1234" in line)
    assert "| — |" in row and "0.85x torch_flash" in row


def test_cut_run_few_rows(tmp_path):
    """A run cut short: one row without a ratio, no skipped/failed keys, no logs."""
    bench = bench_json()
    bench["rows"] = [bench["rows"][4]]
    del bench["skipped"], bench["failed"]
    bench_dir, results = tmp_path / "b", tmp_path / "results"
    write(bench_dir, "bench.json", bench)
    results.mkdir()
    run(bench_dir, "--results", results, "--name", "cut")
    text = (results / "cut" / "README.md").read_text()
    assert "### conv_fwd" in text and "cudnn failed" in text


def test_meta_disagreement_is_shown(tmp_path):
    """Steps from two different commits: the record says so instead of hiding one."""
    quick_dir, bench_dir, results = tmp_path / "q", tmp_path / "b", tmp_path / "results"
    write(quick_dir, "quick.json", quick_json(commit="abc1234"))
    bench = bench_json(commit="def5678")
    bench["meta"]["driver"] = None  # nvidia-smi gave no driver: the quick step's is kept
    write(bench_dir, "bench.json", bench)
    run(quick_dir, bench_dir, "--results", results, "--name", "mixed")
    record = json.loads((results / "mixed" / "record.json").read_text())
    assert record["meta"]["commit"] == "abc1234"
    assert record["meta"]["driver"] == "580.159.04"
    assert record["meta"]["conflicts"] == {"commit": ["abc1234", "def5678"]}
    assert "disagree on commit" in (results / "mixed" / "README.md").read_text()
