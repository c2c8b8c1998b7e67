"""ppl_lvm.recipes: what trains a guide (infer_local, amortization_gaps). Their behaviour is tested
in tests/test_guides.py, where they lived; here the paths they keep."""
import ppl_lvm
from ppl_lvm import guides, recipes


def test_old_import_paths_are_the_recipes():
    # the names moved out of ppl_lvm.guides: every path a user wrote still gives the same object
    from ppl_lvm.guides import Gaps, amortization_gaps, infer_local

    assert infer_local is recipes.infer_local is ppl_lvm.infer_local is guides.infer_local
    assert amortization_gaps is recipes.amortization_gaps is ppl_lvm.amortization_gaps
    assert Gaps is recipes.Gaps
