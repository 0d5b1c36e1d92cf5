"""Which parameters are clustered, and into how many values (gkq_jax.rules)."""

import warnings

import numpy as np
import pytest

import gkq_jax as gkq


def linen_like_params():
  rng = np.random.default_rng(0)
  shapes = {"Conv_0": (3, 3, 2, 6), "Conv_1": (3, 3, 6, 5), "Dense_0": (20, 16),
            "Dense_1": (16, 10)}
  return {"params": {name: {"kernel": rng.standard_normal(s).astype(np.float32),
                            "bias": np.zeros(s[-1], np.float32)}
                     for name, s in shapes.items()}}


def test_rules_choose_clusters_per_parameter():
  params = linen_like_params()
  rules = [gkq.ClusterRule(r"Conv_\d/kernel$", 4), gkq.bits_rule(r"Dense_1/kernel$", 1),
           gkq.ClusterRule(r"Dense_0/kernel$", 0)]
  q = gkq.quantize(params, None, rules)
  ks = {p: c.num_clusters for p, c in gkq.clustered_leaves(q)}
  assert ks == {"params/Conv_0/kernel": 4, "params/Conv_1/kernel": 4,
                "params/Dense_1/kernel": 2}
  assert not isinstance(q["params"]["Dense_0"]["kernel"], gkq.ClusteredArray)


def test_selected_leaves_and_min_ndim():
  params = linen_like_params()
  chosen = gkq.selected_leaves(params, [gkq.ClusterRule("Conv_0", 4), gkq.ClusterRule(".", 8)])
  named = dict(gkq.named_leaves(chosen))
  assert named["params/Conv_0/kernel"] and named["params/Dense_1/kernel"]
  assert not named["params/Conv_0/bias"]  # ndim 1 < min_ndim 2
  assert gkq.clusters_for([gkq.ClusterRule("bias", 4, min_ndim=1)], "x/bias", np.zeros(3)) == 4


def test_rule_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match=r"rule 'Cnov' matches no parameter. Paths look like"):
    gkq.check_rules(linen_like_params(), [gkq.ClusterRule("Cnov", 4)])
  with pytest.raises(ValueError, match="not a valid regex"):
    gkq.ClusterRule("(", 4)
  with pytest.raises(ValueError, match="bits must be in 1..16"):
    gkq.bits_rule("kernel", 17)


def test_cluster_counts_must_be_integers():
  with pytest.raises(ValueError, match=r"bits must be in 1..16 and an integer, got 2.5"):
    gkq.bits_rule("kernel$", 2.5)
  with pytest.raises(ValueError, match=r"num_clusters must be an integer.*got 7.5"):
    gkq.ClusterRule("kernel$", 7.5)
  assert gkq.bits_rule("kernel$", np.int64(3)).num_clusters == 8


def test_first_matching_rule_wins():
  # Dense_0's own rule comes first, so the catch-all after it must not override it;
  # a skip rule (0 clusters) placed first shadows every later rule the same way.
  params = linen_like_params()
  rules = [gkq.ClusterRule(r"Dense_0/kernel$", 2), gkq.ClusterRule(r"kernel$", 8),
           gkq.ClusterRule(r"Conv_1", 4)]
  ks = {p: gkq.clusters_for(rules, p, leaf) for p, leaf in gkq.named_leaves(params)
        if p.endswith("kernel")}
  assert ks == {"params/Conv_0/kernel": 8, "params/Conv_1/kernel": 8,
                "params/Dense_0/kernel": 2, "params/Dense_1/kernel": 8}
  skip_first = [gkq.ClusterRule("Dense_0", 0)] + rules
  selected = dict(gkq.named_leaves(gkq.selected_leaves(params, skip_first)))
  assert not selected["params/Dense_0/kernel"] and selected["params/Dense_1/kernel"]


def test_a_rule_an_earlier_rule_shadows_warns_naming_both():
  # First match wins: Dense_0 gets the catch-all's 4 values, not 16 (issue 25).
  params = linen_like_params()
  shadowed = [gkq.bits_rule("kernel$", 2), gkq.bits_rule("Dense_0/kernel$", 4)]
  with pytest.warns(UserWarning, match=r"^rule 'Dense_0/kernel\$' \(rule 1\) never applies: the "
                                       r"earlier rule 'kernel\$' \(rule 0\) matches all of its 1 "
                                       r"parameter.*put 'Dense_0/kernel\$' first") as record:
    q = gkq.quantize(params, None, shadowed, method="lloyd", init="linear")
  assert len(record) == 1  # once per dead rule
  assert q["params"]["Dense_0"]["kernel"].num_clusters == 4
  with warnings.catch_warnings():  # the narrower rule first: every rule decides something
    warnings.simplefilter("error")
    gkq.check_rules(params, shadowed[::-1])
