"""Fuzz suite of the public Python API (issue 13): bad, edge and valid inputs through
every op and its backward, every option, numpy and torch-CPU arrays, each group of cases in
a child Python under a memory limit and a per-case deadline (how, and what fails a case:
_fuzz.py; the cases: _fuzz_cases_*.py)."""

import pytest

from _fuzz import GiB, check_group, run_groups
from _fuzz_cases_attention import attention_cases, backward_cases, longformer_cases
from _fuzz_cases_conv import conv_cases, pool_cases
from _fuzz_cases_ffn import FFN_SETUP, FFN_TORCH_SETUP, ffn_cases, ffn_torch_cases
from _fuzz_cases_linformer import LINFORMER_SETUP, linformer_cases
from _fuzz_cases_misc import memory_cases, random_cases, torch_cases
from _fuzz_cases_reformer import REFORMER_SETUP, reformer_cases

GROUPS = {
    "attention": dict(cases=attention_cases(), torch=False, budget=2 * GiB),
    "attention_backward_varlen": dict(cases=backward_cases(), torch=False, budget=2 * GiB),
    "longformer": dict(cases=longformer_cases(), torch=False, budget=2 * GiB),
    "conv": dict(cases=conv_cases(), torch=False, budget=2 * GiB),
    "pool": dict(cases=pool_cases(), torch=False, budget=2 * GiB),
    "ffn": dict(cases=ffn_cases(), torch=False, budget=2 * GiB, setup=FFN_SETUP),
    "ffn_torch": dict(cases=ffn_torch_cases(), torch=True, budget=2 * GiB, setup=FFN_TORCH_SETUP),
    "linformer": dict(cases=linformer_cases(), torch=False, budget=2 * GiB, setup=LINFORMER_SETUP),
    "reformer": dict(cases=reformer_cases(), torch=False, budget=2 * GiB, setup=REFORMER_SETUP),
    "torch": dict(cases=torch_cases(), torch=True, budget=2 * GiB),
    "random": dict(cases=random_cases(), torch=False, budget=2 * GiB),
    # The 3 GiB array is address space only; 1 GiB on top of it for everything else.
    "memory": dict(cases=memory_cases(), torch=False, budget=4 * GiB),
}
CASES = [case for g in GROUPS.values() for case in g["cases"]]


@pytest.fixture(scope="module")
def runs():
    return run_groups(GROUPS)


def test_case_names_are_unique():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_case_count():
    print(f"\nfuzz cases: {len(CASES)} in {len(GROUPS)} groups")
    assert len(CASES) >= 400


@pytest.mark.parametrize("group", list(GROUPS))
def test_fuzz_group(runs, group):
    if GROUPS[group]["torch"]:
        pytest.importorskip("torch")
    check_group(GROUPS[group], runs[group])
