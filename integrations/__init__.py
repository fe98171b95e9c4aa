"""Ways into mpts from other trainers: `mpts.integrations.verl` (verl 0.9.1) and `mpts.integrations.trl`."""
