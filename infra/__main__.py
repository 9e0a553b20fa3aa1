"""Pulumi entry point (Pulumi.yaml: main: infra/). The program lives in rlops_infra.program."""

from rlops_infra.program import main

main()
