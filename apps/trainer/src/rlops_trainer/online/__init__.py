"""Online training on Ray with RLlib (PPO, APPO, DQN; SAC for Box actions): one config file from a
laptop to a Ray cluster.

``config`` (the typed YAML config), ``rllib`` (the RLlib algorithm and its results as rlops metrics
records), ``run`` (the loop: checkpoints, resume, stop rules, metrics endpoint), ``export`` (the
trained module as the offline trainer's policy directory), ``tracking`` (MLflow, optional).
``rlops train online --config FILE --out DIR`` is the command; docs/online-training.md the guide.
"""
