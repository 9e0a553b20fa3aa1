"""rlops server: serve registry policies on TorchServe, log decisions, and join rewards to them.

The serving core (:mod:`rlops_server.runtime`) knows nothing of TorchServe; :mod:`rlops_server.handler`,
:mod:`rlops_server.archive`, :mod:`rlops_server.tsconfig` and :mod:`rlops_server.process` are the only
TorchServe-specific modules. The package shares only ``rlops_contracts`` with the trainer.
"""
