"""Every fast paper claim runs in the suite; the slow ones run in `trainlab verify`."""

import pytest

from trainlab.claims.registry import all_claims
from trainlab.optim import optimizer_names

FAST = all_claims(fast_only=True)


@pytest.mark.parametrize("claim", FAST, ids=[c.name for c in FAST])
def test_fast_claim_holds(claim):
    result = claim.check()
    assert result.passed, f"{claim.name}: measured {dict(result.measured)} vs baseline {dict(result.baseline)}"


def test_every_method_carries_a_claim():
    claimed = {c.method for c in all_claims()}
    # torch-* are torch.optim's own implementations, registered only as reference baselines
    missing = [n for n in optimizer_names() if n not in claimed and not n.startswith("torch-")]
    assert not missing, f"methods without a paper claim: {missing}"
    for claim in all_claims():
        assert claim.paper and claim.promise and claim.method
