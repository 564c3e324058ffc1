"""Peak-memory planning: predict a training step's peak by part (:mod:`poetx.plan.memory`,
torch-free) and refuse a run that cannot fit on its GPU (:mod:`poetx.plan.fit`)."""
