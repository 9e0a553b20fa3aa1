"""TorchServe, the serving backend: everything in rlops that knows TorchServe lives in this package.

- :mod:`.backend`: :class:`~rlops_server.torchserve.backend.TorchServeBackend`, the
  :class:`rlops_server.backend.ServingBackend` over TorchServe's management API, and the local start;
- :mod:`.handler`: the thin TorchServe handler over :class:`rlops_server.runtime.PolicyRuntime`;
- :mod:`.archive`: the ``.mar`` of a registry version;
- :mod:`.config`: ``config.properties``, per-model settings, the frontend's log config;
- :mod:`.metrics_config`: TorchServe's ``metrics.yaml`` with the rlops metrics declared;
- :mod:`.process`: a local TorchServe process: start, wait until ready, stop, state;
- :mod:`.worker`: what rlops changes in TorchServe's Python worker;
- ``frontend/``: rlops' batcher, a class of TorchServe's Java frontend.

TorchServe 0.12.0 is its final release: another backend replaces this package and nothing else.
"""
