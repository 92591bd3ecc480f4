"""Training across workers: compressed communication with error feedback, 1-bit Adam, robust aggregation.

Every method runs two ways over one functional core: on real ``torch.distributed`` ranks (DDP communication
hooks, or collectives inside the optimizer), and in a single-process n-worker simulator
(:mod:`optimlab.distributed.simulator`) for tests and the bench. Bytes sent are counted by one wrapper around
the collectives (:mod:`optimlab.distributed.comm`).
"""
