"""The ops' codes are written once in Python (pyens.ops.contract) and once in C++ (csrc/*.h):
they must agree, or a kernel would run another norm, mode or form than the one asked for."""
import re
from pathlib import Path

import pytest

from pyens.ops import contract

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _constants(header: str) -> dict[str, int]:
    text = (CSRC / header).read_text()
    out = {}
    for decl in re.findall(r"constexpr\s+\w+\s+([^;]+);", text):
        for name, value in re.findall(r"(k\w+)\s*=\s*(\d+)", decl):
            out[name] = int(value)
    return out


@pytest.mark.skipif(not CSRC.exists(), reason="the C++ sources are not beside the tests (an installed copy)")
def test_cpp_headers_spell_the_same_codes():
    lp = _constants("lp_step.h")
    assert {k: lp[k] for k in ("kLinf", "kL2", "kL1")} == {"kLinf": contract.LINF, "kL2": contract.L2,
                                                           "kL1": contract.L1}
    assert (lp["kProject"], lp["kDirection"], lp["kStep"]) == (contract.PROJECT, contract.DIRECTION, contract.STEP)
    assert (lp["kBadDelta"], lp["kBadGrad"], lp["kBadX"]) == (contract.BAD_DELTA, contract.BAD_GRAD, contract.BAD_X)
    mh = _constants("mahalanobis.h")
    assert (mh["kDiag"], mh["kTril"], mh["kFull"]) == (contract.DIAG, contract.TRIL, contract.FULL)


def test_codes_are_distinct_and_named():
    assert sorted(contract.NORM_CODES.values()) == [0, 1, 2]
    assert contract.NORM_CODES == {"linf": contract.LINF, "l2": contract.L2, "l1": contract.L1}
    assert {contract.BAD_DELTA, contract.BAD_GRAD, contract.BAD_X} == {1, 2, 4}  # bits of one flag
    assert contract.FORM_NAMES == {0: "diag", 1: "tril", 2: "full"}


def test_the_references_read_the_contract():
    from pyens.reference import lp_step, mahalanobis

    assert (lp_step.LINF, lp_step.L2, lp_step.L1) == (contract.LINF, contract.L2, contract.L1)
    assert mahalanobis.FORMS is contract.FORMS
