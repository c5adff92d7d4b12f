"""olmstead's benchmarks: every figure beside a baseline measured in the same run.

Run ``python -m benchmarks`` (``--quick`` for small sizes, ``--only`` to pick);
it prints one table. The baselines are bare vodozemac doing only the cryptography
of the same work, matrix-nio doing the same first send against the same Synapse,
and an empty store beside the full one.
"""
