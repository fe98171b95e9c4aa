"""Ways into mpts from other trainers: `mpts.integrations.trl` (TRL's GRPOTrainer) and
`mpts.integrations.verl` (verl's RayPPOTrainer). Each translates the trainer's batches into
`Selector` calls and writes the run in mpts's trace schema; import the one you use (each needs
its extra: `pip install 'mpts[trl]'`)."""
