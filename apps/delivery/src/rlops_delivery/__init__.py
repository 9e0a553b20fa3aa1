"""rlops delivery: canary rollouts judged by policy-aware checks, the OPE gate on served logs, and the loop
that retrains from them."""
