"""The lab: built-in workloads, the benchmark runner, reports and the claims registry."""
