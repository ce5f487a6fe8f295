"""The measured search (DESIGN.md "Searching"): the solver proposes, measurement decides.

- ``menu``: the option menu (bits × group size) and its steps;
- ``store``: every matrix quantized once at every menu choice, plans stitched from it;
- ``meter``: KL(base ‖ model) per sequence on disjoint token splits, paired differences;
- ``loop``: the trust-region loop around the OR-Tools knapsack;
- ``types``: its settings (``SearchConfig``) and its record (``Step``, ``SearchResult``).
"""

#: what an accepted step makes stale (``types.SearchConfig.relinearise``)
RELINEARISE = ("layers", "moved")
#: how an accepted step moves the trust region (``types.SearchConfig.grow``)
GROW = ("accept", "ratio")
