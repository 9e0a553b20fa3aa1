"""rlops stack: the local monitoring stack, the actions that alerts trigger, report and dashboards."""
