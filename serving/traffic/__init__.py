"""Traffic controls in front of the pipeline: admission and shedding, caching, priorities, budgets."""
