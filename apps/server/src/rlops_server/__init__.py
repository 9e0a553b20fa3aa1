"""rlops server: serve registry policies, log decisions, and join rewards to them.

The serving core (:mod:`rlops_server.runtime`, :mod:`rlops_server.requests`) knows no model server;
:mod:`rlops_server.serving` starts and reaches a server through the :mod:`rlops_server.backend` protocol,
and TorchServe, the one backend, is the subpackage :mod:`rlops_server.torchserve`. The package shares
only ``rlops_contracts`` with the trainer.
"""
