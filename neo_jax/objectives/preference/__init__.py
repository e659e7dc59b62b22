"""Preference optimisation: ACPO and the DPO family (docs/acpo.md).

    losses      the losses, pure functions of summed sequence log-probs (a registry of kinds)
    objective   the Objective: one forward scores chosen and rejected on packed pairs; the
                frozen reference policy
    compare     DPO against ACPO from one SFT checkpoint: the runs' configs and the plot
                (`neo-jax compare-preference`)

Random preference batches for tests and benchmarks: neo_jax/data/synthetic_pairs.py.
"""
