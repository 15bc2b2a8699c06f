"""Every fast paper claim runs in the suite; the slow ones run in `trainlab verify`."""

import pytest

from trainlab.lab.claims import all_claims

FAST = all_claims(fast_only=True)


@pytest.mark.parametrize("claim", FAST, ids=[c.name for c in FAST])
def test_fast_claim_holds(claim):
    result = claim.check()
    assert result.passed, f"{claim.name}: measured {dict(result.measured)} vs baseline {dict(result.baseline)}"


def test_every_claim_names_a_registered_method_and_paper():
    from trainlab.optim import optimizer_names

    methods = set(optimizer_names())
    for claim in all_claims():
        assert claim.paper and claim.promise
        assert claim.method in methods or claim.method.startswith(("lab", "schedule", "curvature", "stablemax")), claim
