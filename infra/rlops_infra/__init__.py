"""The rlops Pulumi program (see infra/README.md)."""
